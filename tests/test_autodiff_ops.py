"""Every backward rule against float64 central differences on tiny random graphs.

Float64 models run in onnx's reference evaluator and must match to 1e-6 (relative to the largest
sampled gradient); the same float32 models run in onnxruntime and must match to 1e-3.
"""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.autodiff import GradientEngine, gradcheck, to_float64
from cnnvis.onnxgraph import create_session, make_model

F64_TOL = 1e-6
F32_TOL = 1e-3


def tiny(nodes, inits, in_shape, out="y", seed=0, opset=17):
    rng = np.random.default_rng(seed)
    tensors = []
    for name, value in inits.items():
        arr = value if isinstance(value, np.ndarray) else rng.standard_normal(value) * 0.5
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        tensors.append(numpy_helper.from_array(arr, name))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], tensors)
    return make_model(g, opset=opset)


def n(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0] + "_node", **attrs)


def check(model, x, wrt, objective="seed", target="y", samples=25, **kw):
    if objective == "seed" and "seed" not in kw:
        sess = create_session(model, device="cpu")
        shape = sess.run([target], {"x": x.astype(np.float32)})[0].shape if target == "y" else None
        if shape is not None:
            kw["seed"] = np.random.default_rng(7).standard_normal(shape)
    for m, tol, dtype in ((to_float64(model), F64_TOL, np.float64), (model, F32_TOL, np.float32)):
        reports = gradcheck(m, x.astype(dtype), wrt, objective=objective, target=target, samples=samples, **kw)
        for w, r in reports.items():
            assert np.max(np.abs(r.numeric)) > 0, f"{w}: gradient is identically zero on the sampled entries"
            assert r.max_rel_error <= tol, f"{dtype.__name__} {r}"


def rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


CONV_CASES = [
    dict(kernel_shape=[3, 3], pads=[1, 0, 2, 1], strides=[2, 1]),  # asymmetric pads, stride 2
    dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[1, 1, 1, 1]),  # dilation, stride 1 -> Conv path
    dict(kernel_shape=[2, 2], strides=[3, 3]),  # stride larger than the kernel
    dict(kernel_shape=[3, 3], pads=[3, 3, 3, 3]),  # stride 1 with pads > k-1 -> ConvTranspose path
    dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(kernel_shape=[1, 1]),  # 1x1: unfold is the input itself
    # big strided kernels: weight gradients unfold space-to-depth blocks (padded, or cropped)
    dict(kernel_shape=[7, 7], strides=[2, 2], pads=[3, 2, 1, 3]),
    dict(kernel_shape=[5, 6], strides=[5, 3], pads=[1, 0, 0, 2]),
]


@pytest.mark.parametrize("attrs", CONV_CASES)
@pytest.mark.parametrize("group", [1, 2])
def test_conv(attrs, group):
    m = tiny([n("Conv", ["x", "w", "b"], ["y"], group=group, **attrs)], {"w": (4, 4 // group, *attrs["kernel_shape"]), "b": (4,)}, (4, 7, 6))
    check(m, rand(2, 4, 7, 6), ["x", "w", "b"])


@pytest.mark.parametrize("attrs", [a for a in CONV_CASES if a.get("strides", [1])[0] > 1 and a["kernel_shape"][0] >= 5])
@pytest.mark.parametrize("group", [1, 2])
def test_per_sample_conv_weight_gradient_for_a_fixed_batch(attrs, group):
    # big strided kernels: full chunks of batch_size images run in a graph specialised to that size,
    # where each sample's weight gradient is one group of a grouped convolution; it must agree with
    # the float64 engine (itself checked against finite differences above) and with the general graph
    m = tiny([n("Conv", ["x", "w", "b"], ["c"], group=group, **attrs), n("Relu", ["c"], ["y"])],
             {"w": (4, 4 // group, *attrs["kernel_shape"]), "b": (4,)}, (4, 9, 8))
    x = rand(3, 4, 9, 8).astype(np.float32)
    seed = rand(3, *create_session(m, device="cpu").run(None, {"x": x})[0].shape[1:], seed=2)
    fixed = GradientEngine(m, "w", objective="seed", target="y", batch_size=3)
    got = fixed.run(x, seed=seed)["w"]
    assert list(fixed._built) == [((4, 9, 8), 3)]  # no remainder: the general graph is never built
    assert fixed.graph_info(x.shape[1:]).target == "y" and len(fixed._built) == 1
    specialised = fixed.graph(x.shape[1:], batch=3)
    assert specialised.static_batch == 3
    conv_groups = {a.i for node in specialised.model.graph.node if node.op_type == "Conv"
                   for a in node.attribute if a.name == "group"}
    assert 3 * group in conv_groups  # one group per (sample, conv group)
    assert specialised.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    general = GradientEngine(m, "w", objective="seed", target="y", batch_size=4).run(x, seed=seed)["w"]
    want = GradientEngine(to_float64(m), "w", objective="seed", target="y").run(x.astype(np.float64), seed=seed)["w"]
    scale = np.abs(want).max()
    assert got.shape == want.shape == (3, 4, 4 // group, *attrs["kernel_shape"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(general, want, rtol=0, atol=1e-5 * scale)
    # a run with a shorter last chunk: full chunks in the fixed graph, the rest in the general one
    mixed = GradientEngine(m, "w", objective="seed", target="y", batch_size=2).run(x, seed=seed)["w"]
    np.testing.assert_allclose(mixed, want, rtol=0, atol=1e-5 * scale)


def test_fixed_batch_form_is_chosen_per_conv():
    # a 3x3 stride-1 conv before a 7x7 stride-2 one: only the big strided kernel takes the grouped form
    m = tiny([n("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
              n("Conv", ["r1", "w2"], ["y"], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3])],
             {"w1": (4, 4, 3, 3), "w2": (4, 4, 7, 7)}, (4, 9, 8))
    x = rand(3, 4, 9, 8).astype(np.float32)
    seed = rand(3, *create_session(m, device="cpu").run(None, {"x": x})[0].shape[1:], seed=2)
    engine = GradientEngine(m, ["w1", "w2"], objective="seed", target="y", batch_size=3)
    got = engine.run(x, seed=seed)
    groups = [a.i for node in engine.graph(x.shape[1:], batch=3).model.graph.node if node.op_type == "Conv"
              for a in node.attribute if a.name == "group"]
    assert groups.count(3) == 1
    want = GradientEngine(to_float64(m), ["w1", "w2"], objective="seed", target="y").run(x.astype(np.float64), seed=seed)
    for w in ("w1", "w2"):
        np.testing.assert_allclose(got[w], want[w], rtol=0, atol=1e-5 * np.abs(want[w]).max())


@pytest.mark.parametrize("pads", [[2, 2, 2, 2], [2, 1, 0, 2]])
@pytest.mark.parametrize("group", [1, 2])
def test_batch_summed_conv_weight_gradient_in_a_one_thread_session(pads, group):
    # one-thread sessions (training workers): a 5x5 kernel over >= 16 channels a group takes its
    # batch-summed weight gradient as a convolution with the output gradient as the kernel
    m = tiny([n("Conv", ["x", "w", "b"], ["y"], group=group, kernel_shape=[5, 5], pads=pads)],
             {"w": (4, 32 // group, 5, 5), "b": (4,)}, (32, 9, 8))
    x = rand(3, 32, 9, 8).astype(np.float32)
    seed = rand(3, *create_session(m, device="cpu").run(None, {"x": x})[0].shape[1:], seed=2)
    one = GradientEngine(m, "w", objective="seed", target="y", per_sample=False, threads=1)
    got = one.run(x, seed=seed)["w"]
    want = GradientEngine(to_float64(m), "w", objective="seed", target="y", per_sample=False).run(
        x.astype(np.float64), seed=seed)["w"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())

    def unfolds(engine):
        return sum("unfold_kernel" in i.name for i in engine.graph(x.shape[1:]).model.graph.initializer)

    assert unfolds(one) == 0 and unfolds(GradientEngine(m, "w", objective="seed", target="y", per_sample=False,
                                                        threads=2)) == 1


@pytest.mark.parametrize("op,attrs,positive", [
    ("Relu", {}, False), ("LeakyRelu", {"alpha": 0.2}, False), ("Sigmoid", {}, False), ("Tanh", {}, False),
    ("Sqrt", {}, True), ("Softmax", {"axis": 1}, False), ("LogSoftmax", {"axis": -1}, False),
    ("Identity", {}, False), ("Dropout", {}, False), ("Flatten", {"axis": 1}, False),
    ("Transpose", {"perm": [0, 2, 3, 1]}, False), ("GlobalAveragePool", {}, False), ("GlobalMaxPool", {}, False),
])
def test_unary(op, attrs, positive):
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1])]
    src = "c"
    if positive:
        nodes.append(n("Mul", ["c", "c"], ["sq"]))
        nodes.append(n("Add", ["sq", "one"], ["pos"]))
        src = "pos"
    nodes.append(n(op, [src], ["y"], **attrs))
    m = tiny(nodes, {"w": (3, 3, 1, 1), "one": np.ones(1, np.float32)}, (3, 4, 5))
    check(m, rand(2, 3, 4, 5), ["x", "w", "c"])


def test_prelu_and_clip():
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), n("PRelu", ["c", "slope"], ["p"]),
             n("Clip", ["p", "lo", "hi"], ["y"])]
    m = tiny(nodes, {"w": (3, 3, 1, 1), "slope": (3, 1, 1), "lo": np.array(-0.3, np.float32),
                     "hi": np.array(0.4, np.float32)}, (3, 4, 4))
    check(m, rand(2, 3, 4, 4), ["x", "slope", "c"])


@pytest.mark.parametrize("size", [3, 5])  # onnxruntime accepts odd sizes only
@pytest.mark.parametrize("beta", [0.75, 0.5, 1.0, 0.6])  # the expanded forward has a branch for each but 0.6
def test_lrn(size, beta):
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             n("LRN", ["c"], ["y"], size=size, alpha=0.5, beta=beta, bias=1.5)]
    m = tiny(nodes, {"w": (6, 3, 1, 1)}, (3, 3, 4))
    check(m, rand(2, 3, 3, 4), ["x", "w"])


def test_lrn_expanded_forward_matches_the_op():
    # the gradient graph writes LRN out (faster, and it keeps s**beta for the backward pass); its
    # forward values must be the op's: onnxruntime's (4-D only) and a float64 numpy one (3-D, 5-D)
    from cnnvis.autodiff import GradientEngine

    size, alpha, beta, bias = 5, 0.3, 0.75, 1.2
    for in_shape in [(7, 3, 4), (7, 5), (7, 2, 3, 2)]:
        m = tiny([n("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)], {}, in_shape)
        x = (rand(2, *in_shape) * 3).astype(np.float32)
        x64 = x.astype(np.float64)
        window = np.stack([(x64[:, max(0, c - 2):c + 3] ** 2).sum(axis=1) for c in range(7)], axis=1)
        want = x64 / (bias + alpha / size * window) ** beta
        got = GradientEngine(m, "x", objective="seed", target="y", outputs=["y"]).run(
            x, seed=np.ones((2, *in_shape))).outputs["y"]
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
        if len(in_shape) == 3:
            np.testing.assert_allclose(create_session(m, device="cpu").run(None, {"x": x})[0], want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_relu_mask_folded_into_the_following_maxpool(shared):
    # Relu -> MaxPool: the Relu's mask is applied on the pooled gradient instead (exact); not when the
    # Relu output has another reader or is itself asked for
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), n("Relu", ["c"], ["r"]),
             n("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]
    if shared:
        nodes += [n("Flatten", ["p"], ["pf"]), n("Flatten", ["r"], ["rf"]), n("Concat", ["pf", "rf"], ["y"], axis=1)]
    else:
        nodes += [n("Identity", ["p"], ["y"])]
    m = tiny(nodes, {"w": (3, 2, 1, 1)}, (2, 7, 6))
    x = rand(3, 2, 7, 6)
    check(m, x, ["x", "w", "c"])
    check(m, x, ["x", "r"])  # the Relu output asked for: its gradient must not be masked

    from cnnvis.autodiff import build_gradient_graph

    gg = build_gradient_graph(m, (2, 7, 6), ["w"], objective="seed", target="y")
    masked = {node.input[0] for node in gg.model.graph.node if node.op_type == "Greater"}
    assert masked == ({"r"} if shared else {"p"})


@pytest.mark.parametrize("reader", [None, "r", "l"])
def test_relu_mask_folded_through_an_lrn_into_the_maxpool(reader):
    # AlexNet's Relu -> LRN -> MaxPool: the pooled gradient carries the Relu's mask (exact: the LRN
    # keeps zeros zero), unless the Relu or LRN output is read elsewhere
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), n("Relu", ["c"], ["r"]),
             n("LRN", ["r"], ["l"], size=3, alpha=0.5, beta=0.75, bias=1.0),
             n("MaxPool", ["l"], ["p"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]
    if reader:
        nodes += [n("Flatten", ["p"], ["pf"]), n("Flatten", [reader], ["rf"]), n("Concat", ["pf", "rf"], ["y"], axis=1)]
    else:
        nodes += [n("Identity", ["p"], ["y"])]
    m = tiny(nodes, {"w": (4, 3, 1, 1)}, (3, 7, 6))
    x = rand(2, 3, 7, 6)
    check(m, x, ["x", "w"])

    from cnnvis.autodiff import build_gradient_graph

    gg = build_gradient_graph(m, (3, 7, 6), ["w"], objective="seed", target="y")
    masked = {node.input[0] for node in gg.model.graph.node if node.op_type == "Greater"}
    assert masked == ({"p"} if reader is None else {"r"})


POOL_CASES = [
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),  # ceil windows overhang the border
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 3], strides=[3, 1], pads=[0, 1, 1, 0], ceil_mode=1),  # stride > kernel
    dict(kernel_shape=[3, 3], strides=[1, 1]),  # overlapping windows
]


@pytest.mark.parametrize("attrs", POOL_CASES)
def test_maxpool(attrs):
    m = tiny([n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), n("MaxPool", ["c"], ["y"], **attrs)],
             {"w": (2, 2, 1, 1)}, (2, 8, 7))
    check(m, rand(2, 2, 8, 7), ["x", "w"])


def test_maxpool_dilation():
    m = tiny([n("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2], strides=[1, 2])], {}, (2, 7, 7))
    check(m, rand(2, 2, 7, 7), ["x"])


@pytest.mark.parametrize("attrs", POOL_CASES)
@pytest.mark.parametrize("include_pad", [0, 1])
def test_avgpool(attrs, include_pad):
    m = tiny([n("AveragePool", ["x"], ["y"], count_include_pad=include_pad, **attrs)], {}, (2, 8, 7))
    check(m, rand(2, 2, 8, 7), ["x"])


AVGPOOL_DILATION_CASES = [  # AveragePool has dilations from opset 19
    dict(kernel_shape=[3, 2], dilations=[2, 2], strides=[2, 1], pads=[1, 0, 1, 1]),
    dict(kernel_shape=[2, 3], dilations=[3, 2], strides=[1, 2], pads=[1, 1, 0, 2]),
    dict(kernel_shape=[3, 2], dilations=[2, 2], strides=[2, 2], pads=[1, 1, 1, 0], ceil_mode=1),
]


@pytest.mark.parametrize("attrs", AVGPOOL_DILATION_CASES)
@pytest.mark.parametrize("include_pad", [0, 1])
def test_avgpool_dilation(attrs, include_pad):
    m = tiny([n("AveragePool", ["x"], ["y"], count_include_pad=include_pad, **attrs)], {}, (2, 8, 7), opset=19)
    check(m, rand(2, 2, 8, 7), ["x"])


DILATED_SAME_POOLS = [
    ("MaxPool", 17, dict(kernel_shape=[3, 2], dilations=[2, 2], strides=[2, 1], auto_pad="SAME_UPPER")),
    ("MaxPool", 17, dict(kernel_shape=[3, 2], dilations=[2, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    ("AveragePool", 19, dict(kernel_shape=[3, 2], dilations=[2, 2], strides=[2, 1], auto_pad="SAME_UPPER")),
    ("AveragePool", 19, dict(kernel_shape=[3, 2], dilations=[2, 3], strides=[2, 2], auto_pad="SAME_LOWER",
                             count_include_pad=1)),
]


def _two_pools(op, opset, attrs):
    """1x1 Conv -> pool -> pool: the second pool's input size depends on the first one's pads."""
    return tiny([n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), n(op, ["c"], ["p"], **attrs),
                 n(op, ["p"], ["y"], **attrs)], {"w": (2, 2, 1, 1)}, (2, 9, 8), opset=opset)


@pytest.mark.parametrize("op,opset,attrs", DILATED_SAME_POOLS)
def test_dilated_same_pools(op, opset, attrs):
    """onnxruntime sizes a dilated pool's SAME pads by the undilated kernel, so its output is shorter
    than onnx shape inference says; the gradient is the
    one of what onnxruntime runs, checked against central differences of onnxruntime's forward
    (float32) and of the reference evaluator (float64)."""
    m = _two_pools(op, opset, attrs)
    x = rand(2, 2, 9, 8)
    y = create_session(m, device="cpu").run(None, {"x": x.astype(np.float32)})[0]
    # rows: kernel 3, dilation 2, stride 2; pads by the undilated kernel 1 + 1 on 9 rows -> 4, then
    # 0 + 1 (SAME_UPPER) or 1 + 0 on 4 -> 1 (the specification's dilated pads give 5, then 3)
    assert y.shape[2] == 1
    check(m, x, ["x", "w"])


@pytest.mark.parametrize("op,opset,attrs", DILATED_SAME_POOLS)
def test_dilated_same_pools_pinned_to_onnxruntime_s_pads(op, opset, attrs):
    """The forward with those pools' pads written out computes what onnxruntime computes for the
    original: bit for bit in onnxruntime, to 1e-6 (float64) in the reference evaluator."""
    from cnnvis.autodiff.backend import Runner
    from cnnvis.autodiff.graph import _pin_dilated_same_pools

    m = _two_pools(op, opset, attrs)
    pinned = _pin_dilated_same_pools(m, (2, 9, 8), "onnxruntime")
    pools = [node for node in pinned.graph.node if node.op_type == op]
    assert all(helper.get_attribute_value(a) == b"NOTSET" for p in pools for a in p.attribute if a.name == "auto_pad")
    x = rand(2, 2, 9, 8)
    want = create_session(m, device="cpu").run(None, {"x": x.astype(np.float32)})[0]
    got = create_session(pinned, device="cpu").run(None, {"x": x.astype(np.float32)})[0]
    np.testing.assert_array_equal(got, want)
    ref = Runner(to_float64(pinned), backend="reference", device="cpu")({"x": x})["y"]
    np.testing.assert_allclose(ref, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm(trans_a, trans_b):
    nodes = [n("Flatten", ["x"], ["f"])]
    a = "f"
    if trans_a:
        nodes.append(n("Transpose", ["f"], ["ft"], perm=[1, 0]))
        a = "ft"
    nodes.append(n("Gemm", [a, "w", "c"], ["y"], alpha=0.7, beta=1.3, transA=trans_a, transB=trans_b))
    m = tiny(nodes, {"w": (5, 12) if trans_b else (12, 5), "c": (1, 5)}, (3, 2, 2))
    check(m, rand(3, 3, 2, 2), ["x", "w", "c"])


def test_matmul_broadcasting():
    nodes = [n("Reshape", ["x", "shape"], ["r"]), n("MatMul", ["r", "w"], ["m"]), n("MatMul", ["m", "v"], ["y"])]
    m = tiny(nodes, {"shape": np.array([0, 3, 4], np.int64), "w": (4, 5), "v": (5,)}, (3, 2, 2))
    check(m, rand(2, 3, 2, 2), ["x", "w", "v", "m"])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
@pytest.mark.parametrize("const_shape", [(3, 1, 1), (1, 3, 1, 4), (4,), ()])
def test_broadcast_binary(op, const_shape):
    nodes = [n("Sigmoid", ["x"], ["s"]), n(op, ["s", "k"], ["y"])]
    value = np.random.default_rng(3).uniform(0.5, 1.5, const_shape).astype(np.float32)
    m = tiny(nodes, {"k": value}, (3, 2, 4))
    check(m, rand(2, 3, 2, 4), ["x", "k"])


def test_binary_both_batched():
    nodes = [n("Sigmoid", ["x"], ["s"]), n("Tanh", ["x"], ["t"]), n("Div", ["s", "s2"], ["d"]),
             n("Add", ["t", "one"], ["s2"]), n("Mul", ["d", "t"], ["y"])]
    nodes = [nodes[0], nodes[1], nodes[3], nodes[2], nodes[4]]
    m = tiny(nodes, {"one": np.full(1, 2.0, np.float32)}, (2, 3))
    check(m, rand(2, 2, 3), ["x", "t"])


def test_shape_ops():
    nodes = [
        n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        n("Split", ["c", "split"], ["s1", "s2"], axis=1),
        n("Concat", ["s2", "s1", "s2"], ["cat"], axis=1),
        n("Slice", ["cat", "starts", "ends", "axes", "steps"], ["sl"]),
        n("Pad", ["sl", "pads"], ["pd"]),
        n("Reshape", ["pd", "shape"], ["y"]),
    ]
    inits = {"w": (3, 3, 1, 1), "split": np.array([1, 2], np.int64),
             "starts": np.array([4, 1], np.int64), "ends": np.array([-100, 6], np.int64),
             "axes": np.array([1, 3], np.int64), "steps": np.array([-2, 2], np.int64),
             "pads": np.array([0, 0, 1, 0, 0, 1, 0, 2], np.int64), "shape": np.array([0, -1], np.int64)}
    m = tiny(nodes, inits, (3, 4, 6))
    check(m, rand(2, 3, 4, 6), ["x", "w", "cat", "s1"])


def test_batchnorm():
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             n("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-3)]
    var = np.random.default_rng(5).uniform(0.5, 2.0, 3).astype(np.float32)
    m = tiny(nodes, {"w": (3, 3, 1, 1), "scale": (3,), "bias": (3,), "mean": (3,), "var": var}, (3, 3, 3))
    check(m, rand(2, 3, 3, 3), ["x", "scale", "bias", "mean", "var"])


# ------------------------------------------------------------------ objectives

def _small_net():
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), n("Relu", ["c"], ["r"]),
             n("Flatten", ["r"], ["f"]), n("Gemm", ["f", "fc", "fb"], ["logits"], transB=1),
             n("Softmax", ["logits"], ["prob"], axis=1)]
    return tiny(nodes, {"w": (4, 2, 3, 3), "fc": (5, 4 * 3 * 3), "fb": (5,)}, (2, 3, 3), out="prob")


@pytest.mark.parametrize("objective,target,index", [
    ("logit", None, np.array([0, 4])), ("probability", None, np.array([1, 2])),
    ("log_probability", None, np.array([3, 0])), ("cross_entropy", None, np.array([2, 2])),
    ("unit", "c", (1, 2, 0)), ("channel_sum", "r", np.array([0, 3])), ("channel_mean", "c", np.array([2, 1])),
    ("channel_max", "c", np.array([1, 3])),
])
def test_objectives(objective, target, index):
    m = _small_net()
    kw = {"labels": index} if objective == "cross_entropy" else {"index": index}
    check(m, rand(2, 2, 3, 3), ["x", "w"], objective=objective, target=target, **kw)


def test_seed_objective_on_intermediate():
    m = _small_net()
    check(m, rand(2, 2, 3, 3), ["x", "w"], objective="seed", target="r", seed=rand(2, 4, 3, 3, seed=9))


def test_float64_engine_matches_float32_onnxruntime():
    from cnnvis.autodiff import GradientEngine

    m32 = _small_net()
    x = rand(3, 2, 3, 3)
    e32 = GradientEngine(m32, ["x", "w"], objective="logit")
    e64 = GradientEngine(to_float64(m32), ["x", "w"], objective="logit")
    assert (e32.backend_, e64.backend_) == ("onnxruntime", "reference")
    r32, r64 = e32.run(x, index=1), e64.run(x, index=1)
    for w in ("x", "w"):
        assert r64[w].dtype == np.float64 and r32[w].dtype == np.float32
        np.testing.assert_allclose(r32[w], r64[w], rtol=0, atol=1e-5 * np.abs(r64[w]).max())


# ------------------------------------------------- ops of modern CNN exports (torchvision, timm)

def _with_source(op_nodes, in_shape, inits=None, opset=17, positive=False, spread=1.0):
    """x -> 1x1 Conv (so weights and an intermediate are checked too) [-> x^2 + 0.5] -> op nodes -> y."""
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1])]
    src = "c"
    if positive:
        nodes += [n("Mul", ["c", "c"], ["sq"]), n("Add", ["sq", "half"], ["s"])]
        src = "s"
    for node in op_nodes:
        node.input[:] = [src if i == "SRC" else i for i in node.input]
    c = in_shape[0]
    weights = {"w": np.random.default_rng(4).standard_normal((c, c, 1, 1)).astype(np.float32) * spread,
               "half": np.full(1, 0.5, np.float32)}
    weights.update(inits or {})
    return tiny(nodes + list(op_nodes), weights, in_shape, opset=opset)


@pytest.mark.parametrize("op,attrs,positive,spread", [
    ("HardSigmoid", {}, False, 3.0), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, False, 3.0),
    ("HardSwish", {}, False, 4.0), ("Erf", {}, False, 1.0), ("Exp", {}, False, 1.0), ("Log", {}, True, 1.0),
    ("Neg", {}, False, 1.0), ("Abs", {}, False, 1.0), ("Reciprocal", {}, True, 1.0),
    ("Elu", {"alpha": 0.7}, False, 1.0), ("Selu", {}, False, 1.0), ("Softplus", {}, False, 2.0),
    ("Softsign", {}, False, 2.0), ("Mish", {}, False, 2.0),
])
def test_pointwise(op, attrs, positive, spread):
    # spread: the 1x1 conv's weights scale the op's inputs past its kinks (HardSwish at +-3, HardSigmoid's ramp)
    m = _with_source([n(op, ["SRC"], ["y"], **attrs)], (3, 4, 5), positive=positive, spread=spread,
                     opset=18 if op == "Mish" else 17)
    check(m, rand(2, 3, 4, 5), ["x", "w", "c"])




def test_hardswish_float64_gradient_is_that_of_the_function_with_alpha_as_onnx_stores_it():
    # ONNX defines HardSwish by a HardSigmoid whose float attribute alpha = 1/6 is float32(1/6), and onnx's
    # reference evaluator computes exactly that in float64; the float64 gradient is that function's:
    # 2 alpha x + 1/2 on the ramp (not x/3 + 1/2: 1e-8 apart), 1 above 0.5 / alpha = 2.99999991
    from onnx.reference import ReferenceEvaluator

    g = helper.make_graph([n("HardSwish", ["x"], ["y"])], "hs", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    m = make_model(g)
    alpha = float(np.float32(1.0 / 6.0))  # 0.16666667163...
    x = np.array([[1.0, -2.0, 2.99999995, -2.99999995, 4.0, -4.0]])
    np.testing.assert_array_equal(ReferenceEvaluator(m).run(None, {"x": x})[0], x * np.clip(alpha * x + 0.5, 0.0, 1.0))
    want = np.where(alpha * x + 0.5 >= 1.0, 1.0, np.where(alpha * x + 0.5 > 0.0, 2.0 * alpha * x + 0.5, 0.0))
    np.testing.assert_array_equal(want[0, 2:], [1.0, 0.0, 1.0, 0.0])  # past the float32 alpha's bounds
    got = GradientEngine(m, "x", objective="seed", target="y").run(x, seed=np.ones_like(x))["x"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset20(approximate):
    m = _with_source([n("Gelu", ["SRC"], ["y"], approximate=approximate)], (3, 4, 5), opset=20, spread=2.0)
    check(m, rand(2, 3, 4, 5), ["x", "w", "c"])


def test_gelu_as_torch_exports_it_with_erf():
    # torch.onnx (opset 17): y = x * 0.5 * (1 + erf(x / sqrt(2)))
    nodes = [n("Div", ["SRC", "sqrt2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["a"]),
             n("Mul", ["SRC", "a"], ["m"]), n("Mul", ["m", "halfc"], ["y"])]
    m = _with_source(nodes, (3, 4, 5), {"sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
                                        "halfc": np.array(0.5, np.float32)}, spread=2.0)
    x = rand(2, 3, 4, 5)
    check(m, x, ["x", "w"])
    # the same function as the Gelu op (up to the float32 constants 1/sqrt(2), 0.5): same input gradient
    gelu = _with_source([n("Gelu", ["SRC"], ["y"])], (3, 4, 5), opset=20, spread=2.0)
    seed = rand(2, 3, 4, 5, seed=5)
    a = GradientEngine(to_float64(m), "x", objective="seed", target="y").run(x, seed=seed)["x"]
    b = GradientEngine(to_float64(gelu), "x", objective="seed", target="y").run(x, seed=seed)["x"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("to", [TensorProto.DOUBLE, TensorProto.FLOAT])
def test_cast_between_float_types(to):
    # Mul and Neg only: rules that write constants use the model's float type
    nodes = [n("Cast", ["SRC"], ["d"], to=to), n("Mul", ["d", "d"], ["s"]), n("Neg", ["s"], ["ng"]),
             n("Cast", ["ng"], ["y"], to=TensorProto.FLOAT)]
    m = _with_source(nodes, (3, 2, 3))
    check(m, rand(2, 3, 2, 3), ["x", "w"])


@pytest.mark.parametrize("region", [TensorProto.DOUBLE, TensorProto.FLOAT16])
def test_rules_inside_a_region_cast_to_another_float_type(region):
    # Relu, Sigmoid, LayerNorm, Clip write constants and masks: in the region's type, not the model's
    body = [n("Relu", ["d"], ["r"]), n("Sigmoid", ["r"], ["s"]), n("Mul", ["s", "d"], ["m"]),
            n("LayerNormalization", ["m", "ls", "lb"], ["ln"], axis=-1), n("Clip", ["ln", "lo", "hi"], ["cl"])]
    region_type = helper.tensor_dtype_to_np_dtype(region)
    consts = {"ls": np.linspace(0.5, 1.5, 3).astype(region_type), "lb": np.linspace(-0.2, 0.2, 3).astype(region_type),
              "lo": np.array(-1.0, region_type), "hi": np.array(1.2, region_type)}
    cast = _with_source([n("Cast", ["SRC"], ["d"], to=region)] + body + [n("Cast", ["cl"], ["y"], to=TensorProto.FLOAT)],
                        (3, 2, 3), consts)
    for init in cast.graph.initializer:  # tiny() stores float32: the region's constants in its type
        if init.name in consts:
            init.CopyFrom(numpy_helper.from_array(consts[init.name], init.name))
    x = rand(2, 3, 2, 3)
    if region == TensorProto.DOUBLE:
        check(cast, x, ["x", "w"])
        return
    # float16: the same function as the float32 graph, gradients to float16 precision
    plain = _with_source([n("Identity", ["SRC"], ["d"])] + body + [n("Identity", ["cl"], ["y"])], (3, 2, 3),
                         {k: v.astype(np.float32) for k, v in consts.items()})
    seed = rand(2, 3, 2, 3, seed=3)
    got = GradientEngine(cast, ["x", "w"], objective="seed", target="y").run(x.astype(np.float32), seed=seed)
    want = GradientEngine(plain, ["x", "w"], objective="seed", target="y").run(x.astype(np.float32), seed=seed)
    for w in ("x", "w"):
        assert got[w].dtype == np.float32
        np.testing.assert_allclose(got[w], want[w], rtol=0, atol=2e-2 * np.abs(want[w]).max())


def test_cast_to_integers_passes_no_gradient():
    # y = c + float(int(c)): the integer path is piecewise constant, d y / d c = 1
    nodes = [n("Cast", ["SRC"], ["i"], to=TensorProto.INT64), n("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
             n("Add", ["SRC", "f"], ["y"])]
    m = _with_source(nodes, (2, 2, 2))
    x = rand(1, 2, 2, 2)
    got = GradientEngine(m, "c", objective="seed", target="y").run(x.astype(np.float32), seed=np.ones((1, 2, 2, 2)))["c"]
    np.testing.assert_array_equal(got, np.ones((1, 2, 2, 2), np.float32))


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_broadcast(op):
    nodes = [n("Tanh", ["SRC"], ["t"]), n(op, ["SRC", "t", "k"], ["y"])]
    m = _with_source(nodes, (3, 2, 4), {"k": np.random.default_rng(2).uniform(-0.5, 0.5, (3, 1, 4)).astype(np.float32)},
                     spread=2.0)
    check(m, rand(2, 3, 2, 4), ["x", "w", "k", "t"])


def test_max_min_ties_go_to_the_first_input():
    nodes = [n("Max", ["x", "x2"], ["y"])]
    m = tiny([n("Identity", ["x"], ["x2"])] + nodes, {}, (4,))
    got = GradientEngine(m, ["x", "x2"], objective="seed", target="y").run(
        np.array([[1.0, -2.0, 0.0, 3.0]], np.float32), seed=np.array([[1.0, 2.0, 3.0, 4.0]]))
    # x2 is x: the whole gradient reaches x once (first input), never twice
    np.testing.assert_array_equal(got["x2"], np.zeros((1, 4)))
    np.testing.assert_array_equal(got["x"], [[1.0, 2.0, 3.0, 4.0]])


def test_sum_and_mean_variadic():
    nodes = [n("Tanh", ["SRC"], ["t"]), n("Sum", ["SRC", "t", "k"], ["s"]), n("Mean", ["s", "t"], ["y"])]
    m = _with_source(nodes, (3, 2, 4), {"k": (1, 3, 1, 1)})
    check(m, rand(2, 3, 2, 4), ["x", "w", "k"])


def test_where_with_a_constant_and_a_computed_condition():
    cond = np.random.default_rng(0).random((3, 1, 4)) > 0.5
    nodes = [n("Tanh", ["SRC"], ["t"]), n("Where", ["cond", "SRC", "t"], ["wh"]),
             n("Greater", ["t", "zero"], ["pos"]), n("Where", ["pos", "wh", "k"], ["y"])]
    m = _with_source(nodes, (3, 2, 4), {"cond": cond, "zero": np.zeros(1, np.float32), "k": (2, 4)})
    check(m, rand(2, 3, 2, 4), ["x", "w", "k"])


def test_gather_and_gather_elements_with_constant_indices():
    gidx = np.array([[2, 0], [2, -1]], np.int64)  # repeated and negative indices
    nodes = [n("Gather", ["SRC", "gidx"], ["g"], axis=3),  # (N, 3, 2, 2, 2)
             n("Reshape", ["g", "shape"], ["gr"]),  # (N, 3, 2, 4)
             n("Gather", ["gr", "scalar"], ["y"], axis=1)]
    m = _with_source(nodes, (3, 2, 4), {"gidx": gidx, "scalar": np.array(1, np.int64),
                                        "shape": np.array([0, 3, 2, 4], np.int64)})
    check(m, rand(2, 3, 2, 4), ["x", "w", "gr"])


def test_gather_elements_of_a_weight():
    # GatherElements' constant indices fix every axis, the batch too: on a weight it serves any batch
    eidx = np.random.default_rng(1).integers(-3, 3, (3, 3, 1, 1)).astype(np.int64)
    nodes = [n("GatherElements", ["w0", "eidx"], ["wg"], axis=1), n("Conv", ["x", "wg"], ["y"], kernel_shape=[1, 1])]
    m = tiny(nodes, {"w0": (3, 3, 1, 1), "eidx": eidx}, (3, 2, 4))
    check(m, rand(2, 3, 2, 4), ["x", "w0"])


REDUCE_OPS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceSumSquare",
              "ReduceLogSumExp"]


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("axes,keepdims", [([2, 3], 1), ([-1], 0), ([1, 3], 0), (None, 1)])
@pytest.mark.parametrize("opset", [13, 18])
def test_reductions(op, axes, keepdims, opset):
    # opset 13: axes an attribute (ReduceSum: already an input); opset 18: an input for every Reduce
    as_input = opset >= 18 or op == "ReduceSum"
    inits, inputs, attrs = {}, ["SRC"], {"keepdims": keepdims}
    if axes is not None and as_input:
        inits["axes"] = np.array(axes, np.int64)
        inputs.append("axes")
    elif axes is not None:
        attrs["axes"] = axes
    if axes is None:  # every axis but the batch: flatten first
        nodes = [n("Flatten", ["SRC"], ["f"]), n(op, ["f"] + inputs[1:], ["y"], **attrs)]
        inits["axes"] = np.array([1], np.int64)
        if as_input:
            nodes[1].input.append("axes")
        else:
            nodes[1].attribute.extend([helper.make_attribute("axes", [1])])
    else:
        nodes = [n(op, inputs, ["y"], **attrs)]
    positive = op in ("ReduceL1",)
    m = _with_source(nodes, (3, 2, 4), inits, opset=opset, positive=positive)
    check(m, rand(2, 3, 2, 4), ["x", "w"])


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
def test_reduce_max_ties_share_the_gradient_evenly(op):
    m = tiny([n(op, ["x", "axes"], ["y"], keepdims=0)], {"axes": np.array([1], np.int64)}, (4,), opset=18)
    x = np.array([[2.0, 5.0, 5.0, -1.0], [-3.0, 0.0, -3.0, -3.0]], np.float32)
    got = GradientEngine(m, "x", objective="seed", target="y").run(x, seed=np.array([[4.0], [6.0]]).reshape(2))["x"]
    want = [[0, 2, 2, 0], [0, 6, 0, 0]] if op == "ReduceMax" else [[0, 0, 0, 4], [2, 0, 2, 2]]
    np.testing.assert_allclose(got, want, rtol=0, atol=0)


def test_reduce_l2_at_zero_has_zero_gradient():
    m = tiny([n("ReduceL2", ["x"], ["y"], axes=[1], keepdims=1)], {}, (3,), opset=13)
    got = GradientEngine(m, "x", objective="seed", target="y").run(np.zeros((1, 3), np.float32), seed=np.ones((1, 1)))["x"]
    np.testing.assert_array_equal(got, np.zeros((1, 3)))


def test_reduction_over_the_batch_is_refused():
    from cnnvis.errors import CnnvisError

    m = tiny([n("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), n("Add", ["x", "m"], ["y"])], {}, (3,), opset=13)
    with pytest.raises(CnnvisError, match=r"ReduceMean.*batch axis"):
        GradientEngine(m, "x", objective="seed", target="y").run(np.ones((2, 3), np.float32), seed=np.ones((2, 3)))


@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_layer_normalization(axis):
    shape = (3, 2, 4)
    norm = shape[axis:] if axis > 0 else shape[-1:]
    nodes = [n("LayerNormalization", ["SRC", "scale", "bias"], ["y"], axis=axis, epsilon=1e-3)]
    m = _with_source(nodes, shape, {"scale": norm, "bias": norm})
    check(m, rand(2, *shape), ["x", "w", "scale", "bias"])


def test_layer_normalization_channels_last_as_convnext_exports_it():
    # ConvNeXt: NCHW -> NHWC, LayerNorm over C, -> NCHW
    nodes = [n("Transpose", ["SRC"], ["t"], perm=[0, 2, 3, 1]),
             n("LayerNormalization", ["t", "scale", "bias"], ["ln"], axis=-1, epsilon=1e-6),
             n("Transpose", ["ln"], ["y"], perm=[0, 3, 1, 2])]
    m = _with_source(nodes, (4, 3, 3), {"scale": (4,), "bias": (4,)})
    check(m, rand(2, 4, 3, 3), ["x", "w", "scale"])


def test_instance_normalization():
    m = _with_source([n("InstanceNormalization", ["SRC", "scale", "bias"], ["y"], epsilon=1e-3)], (3, 2, 4),
                     {"scale": (3,), "bias": (3,)})
    check(m, rand(2, 3, 2, 4), ["x", "w", "scale", "bias"])


@pytest.mark.parametrize("opset,param", [(18, 2), (21, 4)])
def test_group_normalization(opset, param):
    # opset 18: scale/bias per group; opset 21: per channel
    m = _with_source([n("GroupNormalization", ["SRC", "scale", "bias"], ["y"], num_groups=2, epsilon=1e-3)],
                     (4, 2, 3), {"scale": (param,), "bias": (param,)}, opset=opset)
    check(m, rand(2, 4, 2, 3), ["x", "w", "scale", "bias"])


def test_per_sample_normalization_parameter_gradients_sum_to_the_batch_gradient():
    m = _with_source([n("GroupNormalization", ["SRC", "scale", "bias"], ["g"], num_groups=2, epsilon=1e-3),
                      n("LayerNormalization", ["g", "ls", "lb"], ["l"], axis=2),
                      n("InstanceNormalization", ["l", "iscale", "ibias"], ["y"])],
                     (4, 2, 3), {"scale": (4,), "bias": (4,), "ls": (2, 3), "lb": (2, 3), "iscale": (4,), "ibias": (4,)},
                     opset=21)
    x, seed = rand(3, 4, 2, 3).astype(np.float32), rand(3, 4, 2, 3, seed=3)
    wrt = ["scale", "bias", "ls", "lb", "iscale", "ibias"]
    per = GradientEngine(m, wrt, objective="seed", target="y").run(x, seed=seed)
    summed = GradientEngine(m, wrt, objective="seed", target="y", per_sample=False).run(x, seed=seed)
    for w in wrt:
        assert per[w].shape[0] == 3
        np.testing.assert_allclose(per[w].sum(axis=0), summed[w], rtol=0, atol=1e-5 * np.abs(summed[w]).max())


CONV_TRANSPOSE_CASES = [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0]),
    dict(kernel_shape=[2, 3], strides=[2, 1], pads=[0, 1, 1, 0], dilations=[1, 2]),
    dict(kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),  # the classic 2x upsampling
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[3, 3], strides=[2, 2], output_shape=[6, 8]),  # pads from the output shape
]


@pytest.mark.parametrize("attrs", CONV_TRANSPOSE_CASES)
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(attrs, group):
    nodes = [n("ConvTranspose", ["SRC", "wt", "bt"], ["y"], group=group, **attrs)]
    m = _with_source(nodes, (4, 3, 4), {"wt": (4, 6 // group, *attrs["kernel_shape"]), "bt": (6,)})
    check(m, rand(2, 4, 3, 4), ["x", "w", "wt", "bt", "c"])
    # per-sample weight gradients (unfold of the output gradient) sum to the batch gradient
    x = rand(3, 4, 3, 4).astype(np.float32)
    seed = rand(3, *create_session(m, device="cpu").run(None, {"x": x})[0].shape[1:], seed=2)
    per = GradientEngine(m, ["wt", "bt"], objective="seed", target="y").run(x, seed=seed)
    summed = GradientEngine(to_float64(m), ["wt", "bt"], objective="seed", target="y", per_sample=False).run(
        x.astype(np.float64), seed=seed)
    for w in ("wt", "bt"):
        assert per[w].shape == (3, *summed[w].shape)
        np.testing.assert_allclose(per[w].sum(axis=0), summed[w], rtol=0, atol=1e-5 * np.abs(summed[w]).max())


RESIZE_CASES = [
    ("nearest", "asymmetric", "floor", [1, 1, 2, 2]),  # torch's nearest upsampling
    ("nearest", "half_pixel", "round_prefer_floor", [1, 1, 1.5, 2.5]),
    ("nearest", "align_corners", "round_prefer_ceil", [1, 1, 0.5, 3]),
    ("nearest", "pytorch_half_pixel", "ceil", [1, 1, 2, 0.75]),
    ("linear", "half_pixel", "round_prefer_floor", [1, 1, 2, 2]),
    ("linear", "pytorch_half_pixel", "round_prefer_floor", [1, 1, 1.5, 0.5]),
    # whole output lengths: onnx's reference evaluator sizes align_corners by the fractional length
    # in*scale where onnxruntime uses the output's (test_resize_matrix_matches_onnxruntime checks that)
    ("linear", "align_corners", "round_prefer_floor", [1, 1, 2.5, 1.6]),
    ("linear", "asymmetric", "round_prefer_floor", [1, 1, 0.75, 3]),
]


@pytest.mark.parametrize("mode,transform,nearest,scales", RESIZE_CASES)
def test_resize_with_scales(mode, transform, nearest, scales):
    nodes = [n("Resize", ["SRC", "", "scales"], ["y"], mode=mode, coordinate_transformation_mode=transform,
               nearest_mode=nearest)]
    m = _with_source(nodes, (2, 4, 5), {"scales": np.array(scales, np.float32)})
    check(m, rand(2, 2, 4, 5), ["x", "w", "c"])


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_with_sizes_and_axes_opset18(mode):
    nodes = [n("Resize", ["SRC", "", "", "sizes"], ["y"], mode=mode, axes=[3, 2])]
    m = _with_source(nodes, (2, 4, 5), {"sizes": np.array([7, 3], np.int64)}, opset=18)
    check(m, rand(2, 2, 4, 5), ["x", "w"])


@pytest.mark.parametrize("mode,transform,nearest,scales", RESIZE_CASES)
def test_resize_matrix_matches_onnxruntime(mode, transform, nearest, scales):
    # the per-axis matrices the rule uses, applied to an input, give onnxruntime's forward output
    from cnnvis.autodiff.rules import resize_matrix

    m = tiny([n("Resize", ["x", "", "scales"], ["y"], mode=mode, coordinate_transformation_mode=transform,
                nearest_mode=nearest)], {"scales": np.array(scales, np.float32)}, (2, 4, 5))
    x = rand(1, 2, 4, 5).astype(np.float32)
    want = create_session(m, device="cpu").run(None, {"x": x})[0]
    oh, ow = want.shape[2:]
    mh = resize_matrix(mode, nearest, transform, oh, 4, scales[2])
    mw = resize_matrix(mode, nearest, transform, ow, 5, scales[3])
    got = np.einsum("hi,ncij,wj->nchw", mh, x.astype(np.float64), mw)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_tile():
    m = _with_source([n("Tile", ["SRC", "reps"], ["y"])], (2, 2, 3), {"reps": np.array([1, 2, 1, 3], np.int64)})
    check(m, rand(2, 2, 2, 3), ["x", "w"])


@pytest.mark.parametrize("equation,other,swap", [
    ("nchw,oc->nohw", (5, 3), False),  # a 1x1 conv as einsum
    ("bij,jk->bik", (4, 3), False),
    ("bhwc,cd->bhwd", (3, 2), False),  # channels last
    ("oc,nchw->nohw", (5, 3), True),  # the constant first
    ("nchw,c->nhw", (3,), False),
    ("abcd,be", (3, 2), False),  # implicit output: the letters seen once, sorted (a, c, d, e)
    ("nchw,ck->nk", (3, 2), False),  # h, w summed in the input alone
])
def test_einsum_two_operands(equation, other, swap):
    term = equation.split("->")[0].split(",")[1 if swap else 0]
    pre, src = [], "SRC"
    if term == "bij":
        pre, src = [n("Reshape", ["SRC", "shape3"], ["r"])], "r"  # (N, 3, 4)
    elif term == "bhwc":
        pre, src = [n("Transpose", ["SRC"], ["r"], perm=[0, 2, 3, 1])], "r"
    ins = ["k", src] if swap else [src, "k"]
    m = _with_source(pre + [n("Einsum", ins, ["y"], equation=equation)], (3, 2, 2),
                     {"k": other, "shape3": np.array([0, 3, 4], np.int64)})
    check(m, rand(2, 3, 2, 2), ["x", "w", "k"])


def test_einsum_per_sample_weight_gradients_sum_to_the_batch_gradient():
    m = _with_source([n("Einsum", ["SRC", "k"], ["y"], equation="nchw,ck->nkw")], (3, 2, 2), {"k": (3, 2)})
    x, seed = rand(3, 3, 2, 2).astype(np.float32), rand(3, 2, 2, seed=4)
    per = GradientEngine(m, "k", objective="seed", target="y").run(x, seed=seed)["k"]
    summed = GradientEngine(m, "k", objective="seed", target="y", per_sample=False).run(x, seed=seed)["k"]
    assert per.shape == (3, 3, 2)
    # by hand: dL_n/dk[c, k] = sum_{h, w} x'[n, c, h, w] seed[n, k, w] with x' the conv output
    c = create_session(tiny([n("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])],
                            {"w": np.random.default_rng(4).standard_normal((3, 3, 1, 1)).astype(np.float32)}, (3, 2, 2)),
                       device="cpu").run(None, {"x": x})[0]
    want = np.einsum("nchw,nkw->nck", c.astype(np.float64), seed)
    np.testing.assert_allclose(per, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(summed, want.sum(axis=0), rtol=0, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------- deconvnet and guided on the new ops (as documented)

def test_deconvnet_and_guided_keep_the_exact_gradient_of_non_rectifiers():
    # MobileNetV3/EfficientNet/ConvNeXt pieces without a Relu: every rule gives the same gradient
    nodes = [n("HardSwish", ["SRC"], ["hs"]),
             n("ReduceMean", ["hs", "axes"], ["se"], keepdims=1), n("HardSigmoid", ["se"], ["gate"]),
             n("Mul", ["hs", "gate"], ["scaled"]),
             n("Sigmoid", ["scaled"], ["sg"]), n("Mul", ["scaled", "sg"], ["silu"]),  # SiLU
             n("Gelu", ["silu"], ["ge"]), n("Mish", ["ge"], ["mi"]),
             n("Clip", ["mi", "lo", "hi"], ["cl"]),  # a Clip whose lower bound is not 0
             n("LayerNormalization", ["cl", "ls", "lb"], ["y"], axis=1)]
    m = _with_source(nodes, (3, 2, 4), {"axes": np.array([2, 3], np.int64), "lo": np.array(-0.5, np.float32),
                                        "hi": np.array(0.5, np.float32), "ls": (3, 2, 4), "lb": (3, 2, 4)},
                     opset=20, spread=2.0)
    x, seed = rand(2, 3, 2, 4).astype(np.float32), rand(2, 3, 2, 4, seed=6)
    runs = {r: GradientEngine(m, ["x", "w"], objective="seed", target="y", rule=r).run(x, seed=seed)
            for r in ("gradient", "deconvnet", "guided")}
    for r in ("deconvnet", "guided"):
        for w in ("x", "w"):
            np.testing.assert_array_equal(runs[r][w], runs["gradient"][w])
    assert np.abs(runs["gradient"]["x"]).max() > 0


def test_relu6_clip_is_a_rectifier_under_deconvnet_and_guided():
    # y = Clip(x, 0, 6) with the seed as the backward signal: by the documented definitions
    m = tiny([n("Clip", ["x", "lo", "hi"], ["y"])], {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)},
             (3, 4))
    x = (rand(2, 3, 4) * 5).astype(np.float32)
    seed = rand(2, 3, 4, seed=8)
    inside = (x >= 0) & (x <= 6)
    assert inside.any() and (~inside).any() and (seed < 0).any()
    want = {"gradient": seed * inside, "deconvnet": np.maximum(seed, 0),
            "guided": np.maximum(seed * inside, 0)}
    for r, expected in want.items():
        got = GradientEngine(m, "x", objective="seed", target="y", rule=r).run(x, seed=seed)["x"]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_pad_with_axes_opset18_and_split_with_num_outputs():
    nodes = [n("Pad", ["SRC", "pads", "", "paxes"], ["p"]),  # pads for axes 3 and 2 only
             n("Split", ["p"], ["s1", "s2"], axis=3, num_outputs=2), n("Mul", ["s1", "s2"], ["y"])]
    m = _with_source(nodes, (3, 2, 3), {"pads": np.array([1, 0, 0, 2], np.int64), "paxes": np.array([3, 2], np.int64)},
                     opset=18)
    check(m, rand(2, 3, 2, 3), ["x", "w"])


# ------------------------------------------------- blocks as torch.onnx (opset 17/18) exports them

def _conv(name, x, cin, cout, k, inits, group=1, stride=1, bias=True):
    inits[name + ".w"] = (cout, cin // group, k, k)
    ins = [x, name + ".w"]
    if bias:
        inits[name + ".b"] = (cout,)
        ins.append(name + ".b")
    return n("Conv", ins, [name], kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride, stride])


def _runtime_flatten(x, out, nodes, inits):
    # x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape (int64 shape tensors)
    inits.update({"i0": np.array(0, np.int64), "ax0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)})
    nodes += [n("Shape", [x], [x + "_shape"]), n("Gather", [x + "_shape", "i0"], [x + "_n"], axis=0),
              n("Unsqueeze", [x + "_n", "ax0"], [x + "_n1"]), n("Concat", [x + "_n1", "minus1"], [x + "_dims"], axis=0),
              n("Reshape", [x, x + "_dims"], [out])]


def _mobilenet_v3_block():
    inits, nodes = {}, []
    nodes += [_conv("c1", "x", 4, 8, 3, inits), n("HardSwish", ["c1"], ["h1"]),
              _conv("dw", "h1", 8, 8, 3, inits, group=8), n("HardSwish", ["dw"], ["h2"]),
              # squeeze-and-excitation: ReduceMean (axes as input, opset 18) -> conv -> relu -> conv -> HardSigmoid -> Mul
              n("ReduceMean", ["h2", "axes23"], ["sq"], keepdims=1), _conv("se1", "sq", 8, 4, 1, inits),
              n("Relu", ["se1"], ["ser"]), _conv("se2", "ser", 4, 8, 1, inits),
              n("HardSigmoid", ["se2"], ["gate"], alpha=1.0 / 6, beta=0.5), n("Mul", ["h2", "gate"], ["scaled"]),
              _conv("pw", "scaled", 8, 4, 1, inits), n("Add", ["pw", "x"], ["res"]),
              n("GlobalAveragePool", ["res"], ["gap"])]
    _runtime_flatten("gap", "flat", nodes, inits)
    inits.update({"axes23": np.array([2, 3], np.int64), "fc": (5, 4), "fb": (5,)})
    nodes.append(n("Gemm", ["flat", "fc", "fb"], ["y"], transB=1))
    return tiny(nodes, inits, (4, 6, 6), opset=18)


def _shufflenet_v2_block():
    inits, nodes = {}, []
    nodes += [n("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),  # chunk(2, dim=1), opset 18
              _conv("b1", "b", 4, 4, 1, inits), n("Relu", ["b1"], ["b1r"]), _conv("b2", "b1r", 4, 4, 3, inits, group=4),
              n("Concat", ["a", "b2"], ["cat"], axis=1),
              # channel shuffle, groups 2: Reshape -> Transpose -> Reshape
              n("Reshape", ["cat", "s5"], ["r5"]), n("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
              n("Reshape", ["t5", "s4"], ["y"])]
    inits.update({"s5": np.array([0, 2, 4, 5, 5], np.int64), "s4": np.array([0, 8, 5, 5], np.int64)})
    return tiny(nodes, inits, (8, 5, 5), opset=18)


def _convnext_block():
    inits, nodes = {}, []
    c = 4
    nodes += [_conv("dw", "x", c, c, 7, inits, group=c), n("Transpose", ["dw"], ["nhwc"], perm=[0, 2, 3, 1]),
              n("LayerNormalization", ["nhwc", "ln.w", "ln.b"], ["ln"], axis=-1, epsilon=1e-6),
              n("MatMul", ["ln", "fc1"], ["m1"]), n("Add", ["m1", "fc1.b"], ["a1"]),
              # GELU as torch exports it at opset 17
              n("Div", ["a1", "sqrt2"], ["d"]), n("Erf", ["d"], ["e"]), n("Add", ["e", "one"], ["e1"]),
              n("Mul", ["a1", "e1"], ["m"]), n("Mul", ["m", "half"], ["gelu"]),
              n("MatMul", ["gelu", "fc2"], ["m2"]), n("Add", ["m2", "fc2.b"], ["a2"]),
              n("Mul", ["a2", "gamma"], ["ls"]), n("Transpose", ["ls"], ["nchw"], perm=[0, 3, 1, 2]),
              n("Add", ["nchw", "x"], ["y"])]
    inits.update({"ln.w": (c,), "ln.b": (c,), "fc1": (c, 4 * c), "fc1.b": (4 * c,), "fc2": (4 * c, c), "fc2.b": (c,),
                  "gamma": (c,), "sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
                  "half": np.array(0.5, np.float32)})
    return tiny(nodes, inits, (c, 8, 8))


def _efficientnet_block():
    inits, nodes = {}, []
    nodes += [_conv("c1", "x", 3, 6, 3, inits, stride=2, bias=False),
              n("BatchNormalization", ["c1", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"]),
              n("Sigmoid", ["bn"], ["sg"]), n("Mul", ["bn", "sg"], ["silu"]),  # SiLU
              n("GlobalAveragePool", ["silu"], ["sq"]), _conv("se1", "sq", 6, 2, 1, inits),
              n("Sigmoid", ["se1"], ["s1"]), n("Mul", ["se1", "s1"], ["se1a"]), _conv("se2", "se1a", 2, 6, 1, inits),
              n("Sigmoid", ["se2"], ["gate"]), n("Mul", ["silu", "gate"], ["y"])]
    inits.update({"bn.s": (6,), "bn.b": (6,), "bn.m": (6,), "bn.v": np.random.default_rng(1).uniform(0.5, 2, 6).astype(np.float32)})
    return tiny(nodes, inits, (3, 7, 7))


@pytest.mark.parametrize("build,first_conv,in_shape", [
    (_mobilenet_v3_block, "c1.w", (4, 6, 6)), (_shufflenet_v2_block, "b1.w", (8, 5, 5)),
    (_convnext_block, "dw.w", (4, 8, 8)), (_efficientnet_block, "c1.w", (3, 7, 7)),
])
def test_blocks_of_modern_classifiers(build, first_conv, in_shape):
    m = build()
    x = rand(2, *in_shape)
    check(m, x, ["x", first_conv])
    # deconvnet / guided run and give finite gradients of the input (the rectifiers as documented)
    out_shape = create_session(m, device="cpu").run(None, {"x": x.astype(np.float32)})[0].shape
    seed = rand(*out_shape, seed=2)
    for r in ("deconvnet", "guided"):
        g = GradientEngine(m, "x", objective="seed", target="y", rule=r).run(x.astype(np.float32), seed=seed)["x"]
        assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g).max() > 0
    # per-sample weight gradients (conv-gradients) through the block sum to the batch gradient
    per = GradientEngine(m, first_conv, objective="seed", target="y").run(x.astype(np.float32), seed=seed)[first_conv]
    summed = GradientEngine(m, first_conv, objective="seed", target="y", per_sample=False).run(
        x.astype(np.float32), seed=seed)[first_conv]
    np.testing.assert_allclose(per.sum(axis=0), summed, rtol=0, atol=1e-5 * np.abs(summed).max())


@pytest.mark.parametrize("op,attrs,in_shape", [
    ("DepthToSpace", {"blocksize": 2, "mode": "DCR"}, (8, 2, 3)), ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, (8, 2, 3)),
    ("SpaceToDepth", {"blocksize": 2}, (2, 4, 6)),
])
def test_depth_to_space_and_back(op, attrs, in_shape):
    m = _with_source([n(op, ["SRC"], ["y"], **attrs)], in_shape)
    check(m, rand(2, *in_shape), ["x", "w"])


def test_constants_from_constant_nodes_as_exporters_write_them():
    # Clip bounds (ReLU6), Slice starts/ends and Resize scales given by Constant nodes, not initializers
    def const(name, value):
        return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))

    nodes = [const("lo", np.array(0.0, np.float32)), const("hi", np.array(6.0, np.float32)),
             const("st", np.array([1], np.int64)), const("en", np.array([3], np.int64)), const("ax", np.array([2], np.int64)),
             const("sc", np.array([1, 1, 2, 2], np.float32)),
             n("Clip", ["SRC", "lo", "hi"], ["r6"]), n("Slice", ["r6", "st", "en", "ax"], ["sl"]),
             n("Resize", ["sl", "", "sc"], ["y"], mode="nearest")]
    m = _with_source(nodes, (2, 4, 3), spread=4.0)
    check(m, rand(2, 2, 4, 3), ["x", "w"])
    x, seed = rand(2, 2, 4, 3).astype(np.float32), rand(2, 2, 4, 6, seed=2)
    exact = GradientEngine(m, "c", objective="seed", target="y").run(x, seed=seed)["c"]
    deconv = GradientEngine(m, "c", objective="seed", target="y", rule="deconvnet").run(x, seed=seed)["c"]
    assert (exact < 0).any() and (deconv >= 0).all()  # the Constant-bound Clip is a rectifier


def test_per_sample_gradients_of_a_float16_weight_cast_to_float32():
    # mixed-precision exports store weights in float16 and Cast them: per-sample weight gradients
    # reach the stored weight, in its type
    w16 = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float16)
    nodes = [n("Cast", ["w16"], ["w"], to=TensorProto.FLOAT), n("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])]
    m = tiny(nodes, {}, (2, 5, 5))
    m.graph.initializer.append(numpy_helper.from_array(w16, "w16"))
    x, seed = rand(2, 2, 5, 5).astype(np.float32), rand(2, 3, 3, 3, seed=2)
    got = GradientEngine(m, "w16", objective="seed", target="y").run(x, seed=seed)["w16"]
    want = GradientEngine(m, "w", objective="seed", target="y").run(x, seed=seed)["w"]
    assert got.dtype == np.float16 and got.shape == (2, 3, 2, 3, 3)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


# ----------------------------------------------- a dynamo batch-1 export's as_strided (issue 17)

def _as_strided_net(dtype=np.float32, indices="leading_one", batch_first=True, constant_nodes=False):
    """A batch-1 file (x declared 1x3x3x3, opset 18) as torch's dynamo exporter writes a permute:
    Conv (3 maps, 4x4) -> Reshape [-1] (the whole tensor) -> Gather of the constant indices of the
    NCHW -> NHWC transpose of one image -> Tanh -> Reshape [1, -1] -> MatMul -> logits (1x5).
    ``indices``: "leading_one" gives them the shape (1, 4, 4, 3); "flat" the shape (48,), followed by
    a Reshape [1, 4, 4, 3]. ``batch_first=False`` puts a Transpose (1, 0, 2, 3) before the flatten:
    its first axis is then the maps, and at any batch but 1 the indices pick from several images.
    ``constant_nodes``: the Reshape target [-1] and the indices as Constant nodes (``value_ints``,
    ``value``), as dynamo writes them without constant folding."""
    rng = np.random.default_rng(3)
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    # position k of the NHWC order (h, w, c) reads element c*16 + h*4 + w of the NCHW image
    nhwc = np.transpose(np.arange(48).reshape(3, 4, 4), (1, 2, 0)).astype(np.int64)
    inits = {"w": rng.standard_normal((3, 3, 2, 2)) * 0.5, "b": rng.standard_normal(3) * 0.1,
             "minus_one": np.array([-1], np.int64), "flat2": np.array([1, -1], np.int64),
             "fc": rng.standard_normal((48, 5)) * 0.3}
    nodes = [n("Conv", ["x", "w", "b"], ["c"], kernel_shape=[2, 2], pads=[1, 1, 1, 1])]  # (1, 3, 4, 4)
    if not batch_first:
        nodes.append(n("Transpose", ["c"], ["ct"], perm=[1, 0, 2, 3]))
    nodes.append(n("Reshape", [nodes[-1].output[0], "minus_one"], ["f"]))
    if indices == "leading_one":
        inits["idx"] = nhwc.reshape(1, 4, 4, 3)
        nodes.append(n("Gather", ["f", "idx"], ["p"], axis=0))
    else:
        inits["idx"] = nhwc.reshape(48)
        inits["nhwc_shape"] = np.array([1, 4, 4, 3], np.int64)
        nodes += [n("Gather", ["f", "idx"], ["pf"], axis=0), n("Reshape", ["pf", "nhwc_shape"], ["p"])]
    nodes += [n("Tanh", ["p"], ["t"]), n("Reshape", ["t", "flat2"], ["v"]), n("MatMul", ["v", "fc"], ["y"])]
    if constant_nodes:
        nodes[:0] = [helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
                     helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(inits.pop("idx"), "idx"))]
        del inits["minus_one"]
    tensors = [numpy_helper.from_array(v.astype(dtype) if v.dtype.kind == "f" else v, k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "as_strided", [helper.make_tensor_value_info("x", elem, [1, 3, 3, 3])],
                          [helper.make_tensor_value_info("y", elem, [1, 5])], tensors)
    return make_model(g, opset=18)


def _central_differences(model64, x, names, index, eps=1e-6):
    """d logit[index] / d (x, w) by float64 central differences of the unmodified batch-1 graph in
    onnx's reference evaluator, one image at a time (per-sample weight gradients)."""
    from onnx.reference import ReferenceEvaluator

    inits = {i.name: numpy_helper.to_array(i) for i in model64.graph.initializer}
    out = {name: [] for name in names}
    for image in x:
        def logit(x1, w):
            m = onnx_copy(model64)
            for init in m.graph.initializer:
                if init.name == "w":
                    init.CopyFrom(numpy_helper.from_array(w, "w"))
            return ReferenceEvaluator(m).run(None, {"x": x1[None]})[0][0, index]

        for name, base in (("x", image), ("w", inits["w"])):
            grad = np.zeros_like(base)
            for k in np.ndindex(base.shape):
                plus, minus = base.copy(), base.copy()
                plus[k] += eps
                minus[k] -= eps
                args = (plus, inits["w"]) if name == "x" else (image, plus)
                args_m = (minus, inits["w"]) if name == "x" else (image, minus)
                grad[k] = (logit(*args) - logit(*args_m)) / (2 * eps)
            out[name].append(grad)
    return {name: np.stack(v) for name, v in out.items()}


def onnx_copy(model):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


@pytest.mark.parametrize("constant_nodes", [False, True])
@pytest.mark.parametrize("indices", ["leading_one", "flat"])
def test_as_strided_gather_of_a_batch_one_export_differentiates_per_sample(indices, constant_nodes):
    """The Reshape [-1] -> Gather is rewritten into a per-image Gather (onnxgraph.make_batch_dynamic):
    input and per-sample first-conv weight gradients of a batch of 3 equal float64 central
    differences of the unmodified file run one image at a time (float64 engine to 1e-6 of the
    largest entry, float32 onnxruntime engine to 1e-3); also with the target and indices written
    as Constant nodes (a dynamo export without constant folding)."""
    x = rand(3, 3, 3, 3, seed=4)
    index = 2
    want = _central_differences(_as_strided_net(np.float64, indices), x, ["x", "w"], index)
    for model, dtype, tol, backend in ((_as_strided_net(np.float64, indices, constant_nodes=constant_nodes),
                                        np.float64, F64_TOL, "reference"),
                                       (_as_strided_net(np.float32, indices, constant_nodes=constant_nodes),
                                        np.float32, F32_TOL, "onnxruntime")):
        engine = GradientEngine(model, ["x", "w"], objective="logit", per_sample=True, backend=backend)
        got = engine.run(x.astype(dtype), index=index)
        for name in ("x", "w"):
            assert got[name].shape == want[name].shape
            scale = np.max(np.abs(want[name]))
            assert scale > 0
            err = np.max(np.abs(got[name] - want[name])) / scale
            assert err <= tol, f"{dtype.__name__} {name}: {err}"


def test_as_strided_gather_whose_indices_mix_images_is_one_line():
    """The flattened tensor's first axis is not the batch (a Transpose before the flatten): at any
    batch but 1 the indices select from several images, the graph is left as it is and the
    gradient stops at the Gather in one line."""
    from cnnvis.errors import CnnvisError

    engine = GradientEngine(_as_strided_net(batch_first=False), ["x"], objective="logit")
    with pytest.raises(CnnvisError) as info:
        engine.run(rand(2, 3, 3, 3).astype(np.float32), index=0)
    message = str(info.value)
    assert "\n" not in message
    assert message == "node 'p_node' (Gather): Gather along the batch axis cannot be differentiated per sample"


def test_gather_gradient_of_a_large_permutation_stays_linear_in_the_axis():
    """A per-image permutation of 16384 positions (4 maps of 64x64, as a dynamo as_strided permute
    after the per-image rewrite): the gradient is the seed read back through the inverse permutation
    (numpy: dx[:, perm] = seed), exactly, and the gradient graph's constants grow with the axis
    (a one-hot selection matrix would hold 16384² floats: 1 GiB)."""
    per = 4 * 64 * 64
    perm = np.random.default_rng(8).permutation(per).astype(np.int64)
    nodes = [n("Reshape", ["x", "flat"], ["f"]), n("Gather", ["f", "perm"], ["y"], axis=1)]
    m = tiny(nodes, {"flat": np.array([0, -1], np.int64), "perm": perm}, (4, 64, 64))
    x = rand(2, 4, 64, 64).astype(np.float32)
    seed = rand(2, per, seed=9).astype(np.float32)
    engine = GradientEngine(m, "x", objective="seed", target="y")
    got = engine.run(x, seed=seed)["x"]
    want = np.zeros((2, per), np.float32)
    want[:, perm] = seed
    np.testing.assert_array_equal(got, want.reshape(2, 4, 64, 64))
    graph = engine.graph(x.shape[1:]).model.graph
    assert sum(int(np.prod(i.dims)) for i in graph.initializer) <= 4 * per
