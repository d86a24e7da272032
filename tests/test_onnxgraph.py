import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis import onnxgraph
from cnnvis.errors import CnnvisError


def test_provider_choice_with_mocked_provider_lists():
    cpu_only = ["CPUExecutionProvider"]
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnxgraph.select_providers("auto", cpu_only) == ["CPUExecutionProvider"]
    assert onnxgraph.select_providers("auto", with_cuda) == with_cuda
    assert onnxgraph.select_providers("cpu", with_cuda) == ["CPUExecutionProvider"]
    assert onnxgraph.select_providers("cuda", with_cuda) == with_cuda
    with pytest.raises(CnnvisError, match="^device='cuda': .*no CUDAExecutionProvider"):
        onnxgraph.select_providers("cuda", cpu_only)
    with pytest.raises(CnnvisError, match="^device='tpu': expected one of"):
        onnxgraph.select_providers("tpu", cpu_only)


def test_auto_falls_back_to_cpu_when_cuda_is_listed_but_cannot_start(monkeypatch):
    import onnxruntime as ort

    calls = []
    real = ort.InferenceSession

    def fake_session(data, sess_options=None, providers=None):
        calls.append(list(providers))
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("CUDA driver not found")
        return real(data, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    sess = onnxgraph.create_session(_relu_model(), device="auto")
    assert calls == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    assert sess.get_providers() == ["CPUExecutionProvider"]


def _relu_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    return onnxgraph.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


def test_fold_constants_turns_computed_weights_into_initializers():
    # weight = ConstantOfShape(shape) * 2 + Constant, as some exporters write it
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "w_shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["ones", "two"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    # IR<4 style: the shape initializer is also listed as a graph input
    shape_in = helper.make_tensor_value_info("w_shape", TensorProto.INT64, [2])
    m = onnxgraph.make_model(helper.make_graph(nodes, "g", [x, shape_in], [y], [shape]))
    folded = onnxgraph.fold_constants(m)
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]
    assert [i.name for i in folded.graph.input] == ["x"]
    w = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}["w"]
    np.testing.assert_array_equal(w, np.full((2, 3), 2.0, np.float32))
    sess = onnxgraph.create_session(folded, device="cpu")
    np.testing.assert_allclose(sess.run(None, {"x": np.ones((4, 2), np.float32)})[0], np.full((4, 3), 4.0))


def test_fold_constants_reads_every_constant_form():
    # Constant nodes as exporters without constant folding write them: value_ints (a shape),
    # value_floats, value_float, value_int; w = ones(2, 3) * [1, 2, 3] * 2.0 * 3
    nodes = [
        helper.make_node("Constant", [], ["w_shape"], value_ints=[2, 3]),
        helper.make_node("Constant", [], ["row"], value_floats=[1.0, 2.0, 3.0]),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Constant", [], ["three"], value_int=3),
        helper.make_node("ConstantOfShape", ["w_shape"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Cast", ["three"], ["three_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ones", "row"], ["w1"]),
        helper.make_node("Mul", ["w1", "two"], ["w2"]),
        helper.make_node("Mul", ["w2", "three_f"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    m = onnxgraph.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]))
    folded = onnxgraph.fold_constants(m)
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]
    w = onnxgraph.initializer_map(folded)["w"]
    np.testing.assert_array_equal(numpy_helper.to_array(w), np.array([[6.0, 12.0, 18.0]] * 2, np.float32))
    x = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    got = onnxgraph.create_session(folded, device="cpu").run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, onnxgraph.create_session(m, device="cpu").run(None, {"x": x})[0])
    np.testing.assert_allclose(got, x.astype(np.float64) @ np.array([[6.0, 12.0, 18.0]] * 2), rtol=1e-6)
    assert onnxgraph.constant_node_value(helper.make_node("Constant", [], ["s"], value_string="a")) is None


def _float64_chunk_model():
    """A float64 graph (onnxruntime's CPU kernels have no float64 Conv, so it cannot load it) as
    TorchScript writes torch.chunk(conv(x), 2, dim=1) without constant folding: the Slice bounds
    Shape(c) -> Gather(1) -> Add(1) -> Div(2) (-> Mul(2)) -> Unsqueeze, with the constants as
    Constant nodes. A third Slice ends at Cast(Cast(channels, DOUBLE) * 0.5, INT64): float
    arithmetic on a shape. y = a * b + d for a = c[:, :2], b = c[:, 2:4], d = c[:, :2]."""
    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value), name))

    w = np.random.default_rng(5).standard_normal((4, 4, 1, 1))
    nodes = [const("one", np.int64(1)), const("two", np.int64(2)), const("axis0", np.array([0], np.int64)),
             const("start", np.array([0], np.int64)), const("ch", np.array([1], np.int64)),
             const("halfd", np.float64(0.5)),
             helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
             helper.make_node("Add", ["n", "one"], ["n1"]),
             helper.make_node("Div", ["n1", "two"], ["half"]),
             helper.make_node("Mul", ["half", "two"], ["whole"]),
             helper.make_node("Unsqueeze", ["half", "axis0"], ["mid"]),
             helper.make_node("Unsqueeze", ["whole", "axis0"], ["end"]),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["nf", "halfd"], ["hf"]),
             helper.make_node("Cast", ["hf"], ["hi"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["hi", "axis0"], ["fend"]),
             helper.make_node("Slice", ["c", "start", "mid", "ch"], ["a"]),
             helper.make_node("Slice", ["c", "mid", "end", "ch"], ["b"]),
             helper.make_node("Slice", ["c", "start", "fend", "ch"], ["d"]),
             helper.make_node("Mul", ["a", "b"], ["ab"]),
             helper.make_node("Add", ["ab", "d"], ["y"])]
    graph = helper.make_graph(nodes, "chunk64", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 2, 3, 3])],
                              [numpy_helper.from_array(w, "w")])
    return onnxgraph.make_model(graph), w


def test_fold_shape_arithmetic_of_a_float64_model_onnxruntime_cannot_load():
    """The integer Slice bounds become initializers (probed in a float32 copy); the bound computed
    through float64 arithmetic is not taken from that copy and stays computed. The folded graph's
    forward equals the unmodified graph's (onnx's reference evaluator, exactly) and numpy's."""
    from onnx.reference import ReferenceEvaluator

    m, w = _float64_chunk_model()
    with pytest.raises(CnnvisError):
        onnxgraph.create_session(m, device="cpu")  # the premise: onnxruntime cannot probe it as it is
    folded = onnxgraph.fold_shape_arithmetic(m, (4, 3, 3))
    inits = {k: numpy_helper.to_array(v) for k, v in onnxgraph.initializer_map(folded).items()}
    assert inits["mid"].tolist() == [2] and inits["end"].tolist() == [4]
    assert "hi" not in inits and "fend" not in inits
    assert {o for nd in folded.graph.node for o in nd.output} >= {"hf", "hi", "fend"}
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 3, 3))
        got = ReferenceEvaluator(folded).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, ReferenceEvaluator(m).run(None, {"x": x})[0])
        c = np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])
        np.testing.assert_allclose(got, c[:, :2] * c[:, 2:] + c[:, :2], rtol=1e-12, atol=1e-12)


def test_every_written_model_loads_in_onnxruntime():
    m = _relu_model()
    assert m.ir_version == onnxgraph.IR_VERSION and onnxgraph.opset_of(m) == onnxgraph.OPSET
    onnx.checker.check_model(m)
    out = onnxgraph.create_session(m, device="cpu").run(None, {"x": np.array([[-1, 2]], np.float32)})[0]
    np.testing.assert_array_equal(out, [[0, 2]])


def test_make_batch_dynamic_rewrites_fixed_reshape():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])
    target = numpy_helper.from_array(np.array([1, -1], np.int64), "target")
    m = onnxgraph.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "target"], ["y"])],
                                               "g", [x], [y], [target]))
    dyn = onnxgraph.make_batch_dynamic(m)
    out = onnxgraph.create_session(dyn, device="cpu").run(None, {"x": np.zeros((5, 2, 3), np.float32)})[0]
    assert out.shape == (5, 6)
    assert onnxgraph.static_shapes(dyn, (4, 2, 3))["y"] == (4, 6)


def _allowzero_reshape_model(target, allowzero=1):
    """x (1, 4, 1, 1) -> Relu -> Reshape(allowzero) to ``target`` (a dynamo flatten)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "target"], ["y"], allowzero=allowzero)]
    init = numpy_helper.from_array(np.array(target, np.int64), "target")
    return onnxgraph.make_model(helper.make_graph(nodes, "g", [x], [y], [init]))


@pytest.mark.parametrize("target", [[1, 4], [1, -1], [1, 2, 2]])
def test_make_batch_dynamic_allowzero_reshape_runs_at_any_batch(target):
    # allowzero=1: a 0 in the target would be a literal zero ("requested shape {0,4}" at any
    # batch), so the batch must not become a plain 0 there.
    m = _allowzero_reshape_model(target)
    dyn = onnxgraph.make_batch_dynamic(m)
    rng = np.random.default_rng(0)
    orig = onnxgraph.create_session(m, device="cpu")
    sess = onnxgraph.create_session(dyn, device="cpu")
    for n in (1, 3):
        x = rng.normal(size=(n, 4, 1, 1)).astype(np.float32)
        out = sess.run(None, {"x": x})[0]
        expect = np.maximum(x, 0).reshape([n] + [4 if d == -1 else d for d in target[1:]])  # numpy reshape
        assert out.shape == expect.shape
        np.testing.assert_array_equal(out, expect)
        for i in range(n):  # each image as the original file computes it
            np.testing.assert_array_equal(out[i:i + 1], orig.run(None, {"x": x[i:i + 1]})[0])
    assert onnxgraph.static_shapes(dyn, (3, 4, 1, 1))["y"] == (3, *expect.shape[1:])


def test_make_batch_dynamic_leaves_a_literal_zero_target():
    # [1, 4, 0] with allowzero=1 is a literal zero (only an empty tensor takes it): left unchanged
    dyn = onnxgraph.make_batch_dynamic(_allowzero_reshape_model([1, 4, 0]))
    assert numpy_helper.to_array(dyn.graph.initializer[0]).tolist() == [1, 4, 0]
    assert onnxgraph.attributes(dyn.graph.node[1])["allowzero"] == 1


def _as_strided_model(variant="leading_one"):
    """A batch-1 dynamo-style file (x declared 1x2x3x3, opset 18): Conv -> Reshape [-1] -> Gather of
    the constant indices of one image's NCHW -> NHWC transpose -> Relu. Variants: "leading_one"
    (indices (1, 3, 3, 2)), "negative" (the same as negative indices), "flat" (indices (18,), then
    Reshape [1, 3, 3, 2]), "transposed" (a Transpose (1, 0, 2, 3) before the flatten: its first
    axis is the maps, not the batch), "shared" (the flattened tensor is also an output),
    "constant_nodes" (as dynamo writes it without constant folding: the target [-1] a Constant node
    with ``value_ints``, the indices a Constant node with a ``value`` tensor)."""
    nhwc = np.transpose(np.arange(18).reshape(2, 3, 3), (1, 2, 0)).astype(np.int64)
    w = np.random.default_rng(2).standard_normal((2, 2, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    if variant == "transposed":
        nodes.append(helper.make_node("Transpose", ["c"], ["ct"], name="swap", perm=[1, 0, 2, 3]))
    nodes.append(helper.make_node("Reshape", [nodes[-1].output[0], "minus_one"], ["f"], name="view"))
    if variant == "flat":
        inits += [numpy_helper.from_array(nhwc.reshape(18), "idx"),
                  numpy_helper.from_array(np.array([1, 3, 3, 2], np.int64), "nhwc")]
        nodes += [helper.make_node("Gather", ["f", "idx"], ["pf"], name="as_strided", axis=0),
                  helper.make_node("Reshape", ["pf", "nhwc"], ["p"], name="unflat")]
    else:
        idx = nhwc.reshape(1, 3, 3, 2) - (18 if variant == "negative" else 0)
        inits.append(numpy_helper.from_array(idx, "idx"))
        nodes.append(helper.make_node("Gather", ["f", "idx"], ["p"], name="as_strided", axis=0))
    if variant == "constant_nodes":
        inits = inits[:1]
        nodes[:0] = [helper.make_node("Constant", [], ["minus_one"], name="target", value_ints=[-1]),
                     helper.make_node("Constant", [], ["idx"], name="indices",
                                      value=numpy_helper.from_array(nhwc.reshape(1, 3, 3, 2), "idx"))]
    nodes.append(helper.make_node("Relu", ["p"], ["y"], name="relu"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 2])]
    if variant == "shared":
        outputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [18]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              outputs, inits)
    return onnxgraph.make_model(graph, opset=18)


@pytest.mark.parametrize("variant", ["leading_one", "negative", "flat", "constant_nodes"])
def test_make_batch_dynamic_makes_an_as_strided_gather_per_image(variant):
    """Reshape [-1] -> Gather(axis 0) becomes Reshape [-1, 18] -> Gather(axis 1): a batch of 3 runs
    at once and each image equals the unmodified file run on it alone (exactly) and numpy's
    NHWC transpose of a float64 1x1 convolution."""
    m = _as_strided_model(variant)
    dyn = onnxgraph.make_batch_dynamic(m)
    gather = next(nd for nd in dyn.graph.node if nd.op_type == "Gather")
    assert onnxgraph.attributes(gather)["axis"] == 1
    inits = onnxgraph.initializer_map(dyn)
    assert "idx" not in inits and "minus_one" not in inits  # replaced, not left unused
    assert not [nd for nd in dyn.graph.node if nd.op_type == "Constant"]
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    out = onnxgraph.create_session(dyn, device="cpu").run(None, {"x": x})[0]
    orig = onnxgraph.create_session(m, device="cpu")
    assert out.shape == (3, 3, 3, 2)
    w = numpy_helper.to_array(m.graph.initializer[0])[:, :, 0, 0].astype(np.float64)
    want = np.maximum(np.einsum("nchw,oc->nhwo", x.astype(np.float64), w), 0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    for i in range(3):
        np.testing.assert_array_equal(out[i:i + 1], orig.run(None, {"x": x[i:i + 1]})[0])


@pytest.mark.parametrize("variant", ["transposed", "shared"])
def test_make_batch_dynamic_leaves_a_gather_it_cannot_prove_per_image(variant):
    # transposed: at batch N the flattened maps interleave the images, so the indices mix images;
    # shared: the flattened tensor has another use the rewrite would change
    dyn = onnxgraph.make_batch_dynamic(_as_strided_model(variant))
    gather = next(nd for nd in dyn.graph.node if nd.op_type == "Gather")
    assert onnxgraph.attributes(gather).get("axis", 0) == 0 and gather.input[1] == "idx"
    assert numpy_helper.to_array(onnxgraph.initializer_map(dyn)["minus_one"]).tolist() == [-1]


def lrn_f64(x, size, alpha, beta, bias):
    """ONNX LRN: y = x / (bias + alpha/size · Σ_{c-floor((size-1)/2)}^{c+ceil((size-1)/2)} x²)^beta."""
    x = x.astype(np.float64)
    c = x.shape[1]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = x ** 2
    s = np.zeros_like(x)
    for ch in range(c):
        s[:, ch] = sq[:, max(0, ch - lo):min(c, ch + hi + 1)].sum(axis=1)
    return x / (bias + alpha / size * s) ** beta


@pytest.mark.parametrize("size,alpha,beta,bias", [(5, 1e-4, 0.75, 1.0), (3, 0.3, 0.6, 2.0), (4, 0.5, 0.9, 1.5),
                                                  (5, 0.2, 0.75, 1.0), (3, 0.3, 0.5, 1.0), (5, 0.1, 1.0, 2.0)])
def test_decomposed_lrn_equals_formula(size, alpha, beta, bias):
    from cnnvis import nets

    b = nets.NetBuilder((8, 5, 5))
    b.lrn("norm", size=size, alpha=alpha, beta=beta, k=bias)
    dec = onnxgraph.decompose_lrn(b.build("lrn"))
    assert "LRN" not in [n.op_type for n in dec.graph.node]
    x = np.random.default_rng(size).standard_normal((2, 8, 5, 5)).astype(np.float32) * 3
    got = onnxgraph.create_session(dec, device="cpu").run(["norm"], {"data": x})[0]
    ref = lrn_f64(x, size, alpha, beta, bias)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-6


def test_decomposed_lrn_takes_its_relu_out_of_the_blocked_layout():
    # the Relu before an LRN becomes Max(x, 0) so that it runs in NCHW beside the LRN's ops;
    # every tensor, tapped or not, keeps its value
    from cnnvis import nets

    b = nets.NetBuilder((3, 12, 12))
    b.conv("conv1", 16, 3)
    b.relu("relu1")
    b.lrn("norm1", size=5, alpha=0.2, beta=0.75, k=1.0)
    b.relu("relu2")
    proto = b.build("lrn")
    dec = onnxgraph.decompose_lrn(proto)
    ops = {n.name: n.op_type for n in dec.graph.node}
    assert ops["relu1"] == "Max" and ops["relu2"] == "Relu"  # only the Relu feeding the LRN
    x = np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float32)
    names = ["conv1", "relu1", "norm1", "relu2"]
    del dec.graph.output[:], proto.graph.output[:]
    for m in (dec, proto):
        m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names)
    got = dict(zip(names, onnxgraph.create_session(dec, device="cpu").run(names, {"data": x})))
    ref = dict(zip(names, onnxgraph.create_session(proto, device="cpu").run(names, {"data": x})))
    assert (got["relu1"] >= 0).all() and (got["relu1"] == 0).any()
    for t in ("conv1", "relu1"):
        np.testing.assert_array_equal(got[t], ref[t])
    for t in ("norm1", "relu2"):  # onnxruntime's LRN kernel sums in another order
        assert np.abs(got[t] - ref[t]).max() / np.abs(ref[t]).max() < 1e-6


def test_static_shapes_use_onnxruntimes_ceil_mode_sizes():
    # 5 wide, kernel 2, stride 2, pads 1+1, ceil: the 4th window would start in the end padding,
    # which onnxruntime drops (3 outputs); plain onnx shape inference says 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                            ceil_mode=1)
    m = onnxgraph.make_model(helper.make_graph([pool], "g", [x], [y]))
    ran = onnxgraph.create_session(m, device="cpu").run(None, {"x": np.zeros((1, 1, 5, 5), np.float32)})[0]
    assert onnxgraph.static_shapes(m, (1, 1, 5, 5))["y"] == ran.shape == (1, 1, 3, 3)
    assert onnxgraph.pool_output_size(5, 2, 2, 1, 1, True) == 3
    assert onnxgraph.pool_output_size(6, 2, 2, 1, 1, True) == 4  # here the last window starts in the image


def _window_model(nodes, in_shape, opset=19, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    return onnxgraph.make_model(helper.make_graph(nodes, "g", [x], [y], list(inits)), opset=opset)


def _ran_shape(m, in_shape):
    """onnxruntime's output shape, or None where onnxruntime refuses to run the graph."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    try:
        out = onnxgraph.create_session(m, device="cpu").run(None, {"x": np.zeros(in_shape, np.float32)})[0]
    except (Fail, InvalidArgument, RuntimeException):
        return None
    return out.shape


def test_static_shapes_of_same_padded_pools_are_onnxruntimes():
    """For every SAME pool of the grid that onnxruntime runs, the layer table's shape is the one
    onnxruntime returns. Plain onnx inference gives ceil(size / stride) and disagrees for dilated
    kernels (onnxruntime pads by the undilated kernel); onnxruntime refuses only the undilated
    pools whose SAME padding would be negative (a kernel shorter than the stride skips input)."""
    import itertools

    from cnnvis import ops

    compared, disagreements, refused = 0, [], []
    for auto_pad, op, k, d, s, (h, w) in itertools.product(
            ("SAME_UPPER", "SAME_LOWER"), ("MaxPool", "AveragePool", "LpPool"), (1, 2, 3), (1, 2, 3), (1, 2, 3),
            ((5, 8), (6, 7))):
        pool = helper.make_node(op, ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], dilations=[d, d],
                                auto_pad=auto_pad)
        shape = (1, 2, h, w)
        m = _window_model([pool], shape)
        ran = _ran_shape(m, shape)
        case = (auto_pad, op, k, d, s, h, w)
        if ran is None:
            refused.append(case)
            continue
        compared += 1
        assert onnxgraph.static_shapes(m, shape)["y"] == ran, case
        if onnxgraph.static_shapes(m, shape, onnxruntime_pools=False)["y"] != ran:
            disagreements.append(case)
            assert ran[2:] == tuple(ops.same_pool_output_size(size, k, s, d) for size in (h, w))
    assert compared > 250
    assert disagreements and all(case[3] > 1 and case[2] > 1 for case in disagreements)
    assert ("SAME_UPPER", "MaxPool", 2, 2, 1, 5, 8) in disagreements  # onnx 5x8, onnxruntime 4x7
    assert all(case[3] == 1 and min(ops.same_pad_totals(case[5:], [case[2]] * 2, [case[4]] * 2, [1, 1])) < 0
               for case in refused), refused


def test_static_shapes_of_same_conv_transpose_with_output_padding_are_onnxruntimes():
    """A SAME ConvTranspose is ``size * stride`` long in onnxruntime, or the whole transposed
    length ``stride * (size - 1) + output_padding + extent`` where that is shorter; onnx's
    inference adds the output padding to ``size * stride``."""
    import itertools

    compared, disagreements = 0, []
    for auto_pad, k, d, s, size, out_pad in itertools.product(("SAME_UPPER", "SAME_LOWER"), (1, 2, 3), (1, 2),
                                                             (1, 2, 3), (3, 4), (0, 1)):
        if out_pad >= s:  # onnxruntime refuses output padding as large as the stride
            continue
        weight = numpy_helper.from_array(np.ones((2, 1, k, k), np.float32), "w")
        conv = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                dilations=[d, d], output_padding=[out_pad, out_pad], auto_pad=auto_pad)
        shape = (1, 2, size, size + 1)
        m = _window_model([conv], shape, inits=[weight])
        ran = _ran_shape(m, shape)
        case = (auto_pad, k, d, s, size, out_pad)
        expected = tuple(min(n * s, s * (n - 1) + out_pad + (k - 1) * d + 1) for n in (size, size + 1))
        assert ran == (1, 1, *expected), case
        assert onnxgraph.static_shapes(m, shape)["y"] == ran, case
        if onnxgraph.static_shapes(m, shape, onnxruntime_pools=False)["y"] != ran:
            disagreements.append(case)
        compared += 1
    assert compared == 2 * 3 * 2 * 3 * 2 + 2 * 3 * 2 * 2 * 2  # output padding 1 for strides 2 and 3
    assert ("SAME_UPPER", 2, 1, 2, 3, 1) in disagreements  # onnx 7x9, onnxruntime 6x8
    assert all(case[-1] for case in disagreements)


def test_static_shapes_size_a_pool_from_the_real_size_of_the_pool_before_it():
    # 5 -> ceil-mode pool (pads 1+1, kernel 2, stride 2) -> 3 (onnx says 4) -> ceil-mode pool
    # (kernel 2, stride 2) -> 2 from 3; sized from onnx's stale 4 its floor-mode stand-in would
    # have no end pad and give 1
    pool1 = helper.make_node("MaxPool", ["x"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                             ceil_mode=1)
    pool2 = helper.make_node("MaxPool", ["p1"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    dilated = helper.make_node("MaxPool", ["p2"], ["p3"], kernel_shape=[2, 2], dilations=[2, 2],
                               auto_pad="SAME_UPPER")
    shape = (1, 1, 5, 5)
    m = _window_model([pool1, pool2], shape, opset=17)
    shapes = onnxgraph.static_shapes(m, shape)
    assert shapes["p1"] == (1, 1, 3, 3) and shapes["p2"] == _ran_shape(m, shape) == (1, 1, 2, 2)
    shape = (1, 1, 9, 9)  # 9 -> 5 -> 3 -> SAME dilated: 2 (onnx says 3)
    m = _window_model([pool1, pool2, dilated], shape, opset=17)
    shapes = onnxgraph.static_shapes(m, shape)
    assert (shapes["p1"], shapes["p2"], shapes["p3"]) == ((1, 1, 5, 5), (1, 1, 3, 3), (1, 1, 2, 2))
    assert shapes["p3"] == _ran_shape(m, shape)


def _conv_head_net():
    """x → Conv(c) → Relu(r) → Flatten → Gemm(fc, weights W) → logits; a side branch Neg(r) → n."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.standard_normal((5, 4 * 6 * 6)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["n"], name="neg"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    return onnxgraph.make_model(graph)


def test_drop_unused_keeps_only_what_the_outputs_need():
    import onnxruntime as ort

    net = _conv_head_net()
    tapped = onnxgraph.with_outputs(net, ["r"], {})
    pruned = onnxgraph.drop_unused(onnxgraph.with_outputs(net, ["r"], {}))
    assert [n.name for n in pruned.graph.node] == ["conv", "relu"]  # the head and the side branch are gone
    assert [i.name for i in pruned.graph.initializer] == ["cw"]  # and the head's weights
    x = np.random.default_rng(4).standard_normal((3, 2, 8, 8)).astype(np.float32)
    full = ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r"], {"x": x})[0]
    part = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r"], {"x": x})[0]
    assert np.array_equal(full, part)  # the same kernels on the same data: bit for bit
    assert np.array_equal(part, np.maximum(full, 0))
    kept = onnxgraph.drop_unused(onnxgraph.with_outputs(net, ["n", "logits"], {}))
    assert [n.name for n in kept.graph.node] == [n.name for n in net.graph.node]


def test_drop_unused_leaves_a_graph_with_subgraphs_whole():
    net = _conv_head_net()
    then = helper.make_graph([helper.make_node("Identity", ["r"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    net.graph.initializer.append(cond)
    net.graph.node.append(helper.make_node("If", ["cond"], ["picked"], then_branch=then, else_branch=then))
    before = len(net.graph.node)
    assert len(onnxgraph.drop_unused(onnxgraph.with_outputs(net, ["c"], {})).graph.node) == before
