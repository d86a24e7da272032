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


def tiny(nodes, inits, in_shape, out="y", seed=0):
    rng = np.random.default_rng(seed)
    tensors = []
    for name, value in inits.items():
        arr = value if isinstance(value, np.ndarray) else rng.standard_normal(value) * 0.5
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        tensors.append(numpy_helper.from_array(arr, name))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], tensors)
    return make_model(g)


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
