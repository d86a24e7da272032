"""cnnvis.ops: window geometry against onnxruntime's own auto_pad and pooling, hand-computed SAME
pads, the shape-only tensors of a torch-style flatten, and the rule table."""
import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis import ops
from cnnvis.autodiff.rules import supported_ops
from cnnvis.errors import CnnvisError
from cnnvis.onnxgraph import make_model, static_shapes_and_types


def _run(nodes, x, inits=(), out="y"):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], list(inits))
    sess = ort.InferenceSession(make_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([out], {"x": x})[0]


def test_same_pads_hand_computed():
    # size 7, kernel 3, stride 2: out 4, total (4-1)*2 + 3 - 7 = 2 -> 1 + 1
    assert ops.same_pads("SAME_UPPER", [7], [3], [2], [1]) == [1, 1]
    # size 6, kernel 3, stride 2: out 3, total 2*2 + 3 - 6 = 1; the odd pixel at the end (UPPER) or start
    assert ops.same_pads("SAME_UPPER", [6], [3], [2], [1]) == [0, 1]
    assert ops.same_pads("SAME_LOWER", [6], [3], [2], [1]) == [1, 0]
    # dilation 2 makes a 3-kernel span 5: size 5 stride 1 -> total 4
    assert ops.same_pads("SAME_UPPER", [5, 5], [3, 3], [1, 1], [2, 2]) == [2, 2, 2, 2]
    # stride larger than the kernel: no padding needed
    assert ops.same_pads("SAME_LOWER", [8], [1], [3], [1]) == [0, 0]


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_pads_equal_onnxruntime_auto_pad(auto_pad):
    """A Conv with ops.window's explicit pads gives onnxruntime's auto_pad result, bit for bit."""
    rng = np.random.default_rng(0)
    # (onnxruntime refuses dilation with SAME padding; the hand-computed test covers dilation)
    for size, k, s, d in itertools.product((5, 6, 9), (1, 2, 3, 4), (1, 2, 3), (1,)):
        x = rng.normal(size=(1, 1, size, size + 1)).astype(np.float32)
        w = numpy_helper.from_array(rng.normal(size=(1, 1, k, k)).astype(np.float32), "w")
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                dilations=[d, d], auto_pad=auto_pad)
        win = ops.window(node, in_shape=x.shape)
        explicit = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                    dilations=[d, d], pads=list(win.pads))
        np.testing.assert_array_equal(_run([explicit], x, [w]), _run([node], x, [w]),
                                      err_msg=f"size {size} k {k} s {s} d {d}")


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_pool_same_pads_equal_onnxruntime_auto_pad(auto_pad):
    """MaxPool with auto_pad and with ops.window's explicit pads: the same values in onnxruntime,
    dilated pools included (onnxruntime sizes their SAME pads by the undilated kernel)."""
    rng = np.random.default_rng(3)
    for size, k, s, d in itertools.product((5, 6, 9), (2, 3), (1, 2), (1, 2)):
        x = rng.normal(size=(1, 2, size, size + 2)).astype(np.float32)
        node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], dilations=[d, d],
                                auto_pad=auto_pad)
        win = ops.window(node, in_shape=x.shape)
        explicit = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], dilations=[d, d],
                                    pads=list(win.pads))
        np.testing.assert_array_equal(_run([explicit], x), _run([node], x), err_msg=f"size {size} k {k} s {s} d {d}")


def test_same_pool_output_size_hand_computed():
    # size 6, kernel 2, dilation 2, stride 1: onnxruntime pads by the undilated kernel (1 in
    # total), so the extent 3 fits 6 + 1 - 3 + 1 = 5 times; the specification says 6
    assert ops.same_pool_output_size(6, 2, 1, 2) == 5
    # size 6, kernel 2, dilation 2, stride 3: padding 3 + 2 - 6 = -1, span 6 - 1 - 3 = 2, 2 // 3 + 1 = 1
    assert ops.same_pool_output_size(6, 2, 3, 2) == 1
    # size 5, kernel 3, dilation 3, stride 3: padding 1, span 5 + 1 - 7 = -1 truncates to 0: 1 output
    assert ops.same_pool_output_size(5, 3, 3, 3) == 1
    assert ops.same_pool_output_size(7, 3, 2, 1) == 4  # undilated: ceil(7 / 2)


def test_same_pad_totals_hand_computed():
    # 7 long, stride 2: 4 outputs; (4 - 1) * 2 + extent 3 - 7 = 2; dilation 2 (extent 5): 4
    assert ops.same_pad_totals([7, 7], [3, 3], [2, 2], [1, 2]) == [2, 4]
    # 6 long, kernel 2, stride 3: 2 outputs, (2 - 1) * 3 + 2 - 6 = -1 (not clamped; same_pads clamps)
    assert ops.same_pad_totals([6], [2], [3], [1]) == [-1]
    assert ops.same_pads("SAME_UPPER", [6], [2], [3], [1]) == [0, 0]


def test_window_reads_attributes_and_weight_kernel():
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 1], pads=[1, 0, 2, 3], dilations=[1, 2])
    win = ops.window(node, weight_shape=(8, 3, 5, 3))
    assert win.kernel == (5, 3) and win.strides == (2, 1) and win.dilations == (1, 2)
    assert win.pads_begin == (1, 0) and win.pads_end == (2, 3) and win.extent == (5, 5)
    valid = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], auto_pad="VALID")
    assert ops.window(valid).pads == (0, 0, 0, 0)
    same = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], auto_pad="SAME_UPPER")
    with pytest.raises(CnnvisError, match="needs a static input shape"):
        ops.window(same)
    with pytest.raises(CnnvisError, match="no kernel_shape"):
        ops.window(helper.make_node("MaxPool", ["x"], ["y"]))


def test_transpose_same_pads_follow_the_specification():
    # size 4, stride 2, kernel 3: total = 2*3 + 0 + 3 - 8 = 1; UPPER puts the smaller half first
    assert ops.transpose_same_pads("SAME_UPPER", [4], [3], [2], [1], [0]) == [0, 1]
    assert ops.transpose_same_pads("SAME_LOWER", [4], [3], [2], [1], [0]) == [1, 0]


def test_pool_output_size_equals_onnxruntime():
    rng = np.random.default_rng(1)
    for size, k, s, p in itertools.product((6, 7, 13), (2, 3), (1, 2, 3), (0, 1)):
        if p >= k:
            continue
        x = rng.normal(size=(1, 1, size, size)).astype(np.float32)
        for ceil in (0, 1):
            node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                    pads=[p, p, p, p], ceil_mode=ceil)
            got = ops.pool_output_size(size, k, s, p, p, bool(ceil))
            assert _run([node], x).shape[-1] == got, (size, k, s, p, ceil)


def _torch_flatten_graph():
    """Conv -> Relu -> Shape -> Gather(0) -> Unsqueeze -> Concat([n, -1]) -> Reshape -> MatMul, and a
    float ConstantOfShape of the shape added to the logits (a value that depends on the shape only)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(rng.normal(size=(4 * 6 * 6, 5)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array([1], np.int64), "ones_shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["r", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
             helper.make_node("ConstantOfShape", ["ones_shape"], ["half"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Cast", ["n1"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["half", "nf"], ["bias"]),
             helper.make_node("Add", ["logits", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return make_model(graph)


def test_shape_subgraph_is_not_data():
    proto = _torch_flatten_graph()
    data = ops.data_tensors(proto)
    assert {"x", "c", "r", "flat", "logits", "y"} <= data
    assert not data & {"s", "n", "n1", "target", "half", "nf", "bias"}
    _, types = static_shapes_and_types(proto, (1, 3, 8, 8))
    assert types["target"] == TensorProto.INT64 and types["bias"] == TensorProto.FLOAT
    # bias is float but only depends on the batch size: not a feature
    assert ops.feature_tensors(proto, types) == {"x", "c", "r", "flat", "logits", "y"}


def test_op_classes():
    assert "LRN" in ops.POINTWISE_OPS and "HardSwish" in ops.POINTWISE_OPS and "Mul" in ops.BROADCAST_OPS
    assert "InstanceNormalization" in ops.GLOBAL_OPS and not ops.GLOBAL_OPS & ops.POINTWISE_OPS
    assert "Conv" in ops.WINDOW_OPS and ops.POOL_OPS < ops.WINDOW_OPS
    # feature maps: activations (also the modern ones), not a Mul (a rescaling by a constant) or a reshape
    assert {"Relu", "HardSwish", "Gelu", "Conv"} <= ops.FEATURE_OPS <= ops.DISPLAY_OPS
    assert not {"Mul", "Reshape", "Shape", "Dropout"} & ops.FEATURE_OPS
    assert not {"Reshape", "Transpose", "Dropout", "Shape", "Gather"} & ops.DISPLAY_OPS
    assert ops.attributes(helper.make_node("Conv", ["x"], ["y"], auto_pad="VALID"))["auto_pad"] == "VALID"
    assert ops.is_float(TensorProto.FLOAT16) and ops.is_float(TensorProto.BFLOAT16)
    assert not ops.is_float(TensorProto.INT64) and not ops.is_float(TensorProto.BOOL)


def test_sliding_window_and_value_preserving_classes():
    assert ops.SLIDING_WINDOW_OPS == {"Conv", "MaxPool", "AveragePool", "LpPool"}
    assert not ops.SLIDING_WINDOW_OPS & ops.GLOBAL_OPS and set(ops.PAD_VALUES) < ops.SLIDING_WINDOW_OPS
    assert not ops.VALUE_PRESERVING_OPS & ops.DISPLAY_OPS  # bookkeeping: activations skips them


@pytest.mark.parametrize("op", sorted(ops.SLIDING_WINDOW_OPS))
def test_pad_values_are_what_onnxruntime_pads_with(op):
    """An op of ops.PAD_VALUES with pads gives what it gives unpadded on the input padded with that
    value; AveragePool (excluding the padding from its divisor) matches no single value."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 2, 5, 6)).astype(np.float32)
    pads = [1, 2, 2, 1]
    inits, inputs = [], ["x"]
    if op == "Conv":
        inits, inputs = [numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "w")], ["x", "w"]
    padded = helper.make_node(op, inputs, ["y"], kernel_shape=[3, 3], strides=[2, 1], pads=pads)
    plain = helper.make_node(op, inputs, ["y"], kernel_shape=[3, 3], strides=[2, 1])
    got = _run([padded], x, inits)

    def filled(value):
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=value)
        return _run([plain], xp.astype(np.float32), inits)

    if op in ops.PAD_VALUES:
        np.testing.assert_allclose(filled(ops.PAD_VALUES[op]), got, rtol=1e-5, atol=1e-6)
    else:
        assert op == "AveragePool"
        zeros = filled(0.0)
        assert not np.allclose(zeros, got)  # the corner windows divide by fewer than 9 taps
        # windows inside the image: rows start at 2 * i - 1 (i = 1), columns at j - 2 (j = 2..5)
        np.testing.assert_allclose(zeros[..., 1:2, 2:6], got[..., 1:2, 2:6], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", sorted(ops.VALUE_PRESERVING_OPS))
def test_value_preserving_ops_keep_the_values(op):
    x = np.random.default_rng(6).normal(size=(2, 3, 1, 4)).astype(np.float32)
    inits, inputs, attrs = [], ["x"], {}
    if op == "Reshape":
        inits, inputs = [numpy_helper.from_array(np.array([2, 4, 3], np.int64), "shape")], ["x", "shape"]
    elif op in ("Squeeze", "Unsqueeze"):
        inits, inputs = [numpy_helper.from_array(np.array([2], np.int64), "axes")], ["x", "axes"]
    elif op == "Transpose":
        attrs = {"perm": [0, 2, 3, 1]}
    y = _run([helper.make_node(op, inputs, ["y"], **attrs)], x, inits)
    assert y.size == x.size
    np.testing.assert_array_equal(np.sort(y, axis=None), np.sort(x, axis=None))


def test_backward_rule_ops_is_the_rule_table():
    assert ops.backward_rule_ops() == supported_ops()
    assert ops.has_backward_rule("Conv") and ops.has_backward_rule("MaxPool")
    assert not ops.has_backward_rule("NonZero") and not ops.has_backward_rule("Shape")


def test_floor_mode_pads_give_onnxruntime_s_ceil_mode_pool():
    """The ceil-mode pool and the floor-mode pool with ops.floor_mode_pads' end pads give the same
    values in onnxruntime (including a window dropped for starting in the end padding)."""
    rng = np.random.default_rng(2)
    for size, k, s, p in itertools.product((6, 7, 13), (2, 3), (2, 3), (0, 1)):
        x = rng.normal(size=(1, 1, size, size)).astype(np.float32)
        node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, ceil_mode=1)
        out, pads = ops.floor_mode_pads(ops.window(node), (size, size))
        floor = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=pads)
        ceil = _run([node], x)
        assert ceil.shape[2:] == tuple(out), (size, k, s, p)
        np.testing.assert_array_equal(_run([floor], x), ceil, err_msg=f"{(size, k, s, p)}")


def test_split_pads_hand_computed():
    # the odd pixel at the end for SAME_UPPER, at the beginning otherwise; negative totals stay
    assert ops.split_pads("SAME_UPPER", [3, 4]) == [1, 2, 2, 2]
    assert ops.split_pads("SAME_LOWER", [3, 0]) == [2, 0, 1, 0]
    assert ops.split_pads("NOTSET", [5]) == [3, 2]
    assert ops.split_pads("SAME_UPPER", [-1]) == [-1, 0]


def test_transpose_pad_totals_hand_computed():
    # size 3, kernel 3, stride 2, output_padding 1: full extent 2*2 + 1 + 3 = 8; SAME output 6 -> 2
    assert ops.transpose_pad_totals([3], [3], [2], [1], [1]) == [2]
    # an output_shape of 7 leaves 1; dilation 2 widens the kernel span to 5: 2*2 + 0 + 5 - 6 = 3
    assert ops.transpose_pad_totals([3], [3], [2], [1], [1], out_sizes=[7]) == [1]
    assert ops.transpose_pad_totals([3], [3], [2], [2], [0]) == [3]
    # kernel 1 stride 2: the transposed windows reach 5 of the 6 SAME outputs
    assert ops.transpose_pad_totals([3], [1], [2], [1], [0]) == [-1]
    assert ops.transpose_same_pads("SAME_UPPER", [3], [1], [2], [1], [0]) == [0, 0]


def test_average_pool_divisors_hand_computed():
    # size 5, kernel 3, stride 2, pads 1/1: windows [-1,1], [1,3], [3,5]
    np.testing.assert_array_equal(ops.average_pool_divisors(5, 3, 3, 2, 1, 1, 0), [2, 3, 2])
    np.testing.assert_array_equal(ops.average_pool_divisors(5, 3, 3, 2, 1, 1, 1), [3, 3, 3])
    # dilation 2: taps {-1, 1, 3}, {1, 3, 5}: 5 is in the end padding, counted only with the padding
    np.testing.assert_array_equal(ops.average_pool_divisors(5, 2, 3, 2, 1, 1, 0, 2), [2, 2])
    np.testing.assert_array_equal(ops.average_pool_divisors(5, 2, 3, 2, 1, 1, 1, 2), [3, 3])
    # a ceil-mode window overhanging the end padding: taps {4, 5, 6} with size 5 + pad 1 -> 2 counted
    np.testing.assert_array_equal(ops.average_pool_divisors(5, 3, 3, 2, 0, 1, 1), [3, 3, 2])


def test_average_pool_divisors_equal_onnxruntime():
    """Divisors read off onnxruntime's AveragePool (opset 19, dilations): a one-hot input at a tap
    of window i gives 1 / divisor there, so divisor_i = 1 / max over the one-hot inputs."""
    for size, k, s, d, (pb, pe), ceil, include in itertools.product(
            (5, 8), (2, 3), (1, 2), (1, 2), ((0, 0), (1, 0), (1, 1), (0, 1)), (0, 1), (0, 1)):
        node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[k], strides=[s], dilations=[d],
                                pads=[pb, pe], ceil_mode=ceil, count_include_pad=include)
        graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, 1, size])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        sess = ort.InferenceSession(make_model(graph, opset=19).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        y = sess.run(["y"], {"x": np.eye(size, dtype=np.float32)[:, None, :]})[0][:, 0, :]
        out = ops.pool_output_size(size, k, s, pb, pe, bool(ceil), d)
        assert y.shape[1] == out
        divisors = ops.average_pool_divisors(size, out, k, s, pb, pe, include, d)
        np.testing.assert_allclose(1.0 / y.max(axis=0), divisors, rtol=1e-6, err_msg=f"{(size, k, s, d, pb, pe, ceil, include)}")
