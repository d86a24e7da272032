"""gradcheck: kinks (max-pool ties, rectifier bounds) told from errors, on an MNIST-like input."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.autodiff import GradientEngine, gradcheck, rules, to_float64
from cnnvis.onnxgraph import make_model


def n(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)


def mnist_like_net():
    """LeNet-like: conv5x5 -> relu -> maxpool -> conv3x3 -> relu -> maxpool -> fc (float64)."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((4, 1, 5, 5)) * 0.4, "b1": rng.standard_normal(4) * 0.3,
             "w2": rng.standard_normal((6, 4, 3, 3)) * 0.3, "b2": rng.standard_normal(6) * 0.3,
             "fc": rng.standard_normal((10, 6 * 3 * 3)) * 0.3, "fb": np.zeros(10)}
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]), n("Relu", ["c1"], ["r1"]),
             n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             n("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), n("Relu", ["c2"], ["r2"]),
             n("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]), n("Flatten", ["p2"], ["f"]),
             n("Gemm", ["f", "fc", "fb"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "mnistlike", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return make_model(g)



def break_rule(monkeypatch, op: str, factor: float = 1.001) -> None:
    """Make ``op``'s backward rule wrong by ``factor`` on its first input (a deliberately wrong
    rule, which gradcheck must still fail)."""
    right = rules._RULE_TABLE[op]

    def off(ctx):
        grads = right(ctx)
        grads[0] = ctx.b.scale(grads[0], factor) if grads[0] is not None else None
        return grads

    monkeypatch.setitem(rules._RULE_TABLE, op, off)

def digit():
    """A '7' of grey levels on an exactly zero background."""
    x = np.zeros((1, 1, 12, 12))
    x[0, 0, 2, 3:10] = 0.9
    for i in range(3, 11):
        x[0, 0, i, 10 - (i - 2) // 2] = 0.7 + 0.02 * i
    return x


def test_max_pool_ties_on_a_zero_background_are_excluded_and_the_check_passes():
    m = to_float64(mnist_like_net())
    x = digit()
    report = gradcheck(m, x, "x", objective="logit", index=3, samples=25)["x"]
    # the zero background makes flat relu(bias) windows: perturbing a pixel there breaks a tie
    assert len(report.kinked) > 0
    assert f"{len(report.kinked)} of {report.sampled} sampled entries sit on a kink" in str(report)
    assert len(report.entries) == 25  # replacements were drawn away from kinks
    assert not set(report.kinked) & set(report.entries)
    assert report.max_rel_error <= 1e-6, str(report)
    # the excluded entries are where the finite difference is wrong, not the gradient: there it
    # averages two one-sided derivatives
    analytic = GradientEngine(m, "x", objective="logit", per_sample=False).run(x, index=3)["x"].reshape(-1)
    scale = np.abs(report.numeric).max()
    assert np.abs(analytic[report.kinked] - report.kinked_numeric).max() > 1e-3 * scale


def test_one_grey_level_of_noise_has_no_ties():
    # the issue's observation: with noise the same check passes with nothing excluded
    m = to_float64(mnist_like_net())
    x = digit() + np.random.default_rng(1).uniform(0, 1 / 255, (1, 1, 12, 12))
    report = gradcheck(m, x, "x", objective="logit", index=3, samples=40)["x"]
    assert len(report.kinked) == 0 and report.kink_note == "" and report.max_rel_error <= 1e-6


def test_a_wrong_rule_still_fails_on_the_entries_away_from_kinks(monkeypatch):
    break_rule(monkeypatch, "Gemm")
    m = to_float64(mnist_like_net())
    report = gradcheck(m, digit(), "x", objective="logit", index=3, samples=25)["x"]
    assert len(report.kinked) > 0 and len(report.entries) == 25
    assert 5e-4 < report.max_rel_error < 5e-3, str(report)  # the 0.1% error, on clean entries


def test_weight_entries_on_a_kink_are_found_through_the_conv_shortcut():
    # a conv weight is checked through its conv's output (linear in the weight): ties still show
    m = to_float64(mnist_like_net())
    reports = gradcheck(m, digit(), ["w2", "fc", "b1"], objective="logit", index=3, samples=30)
    for w, r in reports.items():
        assert r.max_rel_error <= 1e-6, str(r)
        assert len(r.entries) == min(30, {"w2": 216, "fc": 540, "b1": 4}[w]) - (len(r.kinked) if w == "b1" else 0)


@pytest.mark.parametrize("op,attrs,value", [
    ("Relu", {}, 0.0), ("Abs", {}, 0.0), ("HardSwish", {}, 3.0), ("HardSwish", {}, -3.0),
    ("LeakyRelu", {"alpha": 0.1}, 0.0), ("HardSigmoid", {}, 2.5),
])
def test_an_input_exactly_at_a_bound_is_a_kink(op, attrs, value):
    # y = sum(op(x)) with x exactly at the op's non-differentiable point: excluded, and only there
    g = helper.make_graph([n(op, ["x"], ["y"], **attrs)], "k", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    m = make_model(g)
    x = np.array([[value, 0.5, -0.7, 1.3]])
    report = gradcheck(m, x, "x", objective="seed", target="y", seed=np.ones((1, 4)), samples=4)["x"]
    assert report.kinked.tolist() == [0]
    assert report.entries.tolist() == [1, 2, 3] and report.max_rel_error <= 1e-6


def test_max_ties_are_kinks_and_all_kinks_give_no_verdict():
    g = helper.make_graph([n("Max", ["x", "k"], ["y"])], "k", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                          [numpy_helper.from_array(np.array([1.0, 2.0, 3.0]), "k")])
    report = gradcheck(make_model(g), np.array([[1.0, 2.0, 3.0]]), "x", objective="seed", target="y", seed=np.ones((1, 3)),
                       samples=3)["x"]
    assert len(report.kinked) == 3 and len(report.entries) == 0
    assert np.isnan(report.max_rel_error)  # no verdict: not a pass


# ------------------------------------------- the float64 reference ops against onnxruntime's forward

def _single_node(op, inputs, attrs, n_out, elem, opset):
    from onnx import TensorProto as T

    outs = [f"out{i}" for i in range(n_out)]
    out_types = [T.INT64 if (op == "MaxPool" and i == 1) else elem for i in range(n_out)]
    g = helper.make_graph([helper.make_node(op, list(inputs), outs, **attrs)], "one",
                          [helper.make_tensor_value_info(k, elem, None) for k in inputs],
                          [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types)])
    return make_model(g, opset=opset)


def against_onnxruntime(op, inputs, attrs, n_out=1, opset=17, runs=None):
    """Run one node in the float64 reference (cnnvis's replacement ops) and in onnxruntime
    (float32) on the same float32-representable inputs; assert equal outputs."""
    from cnnvis.autodiff.backend import Runner
    from cnnvis.onnxgraph import create_session

    x32 = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
    ref = Runner(_single_node(op, inputs, attrs, n_out, TensorProto.DOUBLE, opset), backend="reference")(
        {k: v.astype(np.float64) for k, v in x32.items()})
    sess = create_session(_single_node(op, inputs, attrs, n_out, TensorProto.FLOAT, opset), device="cpu")
    want = dict(zip([f"out{i}" for i in range(n_out)], sess.run(None, x32)))
    for name, w in want.items():
        got = ref[name]
        assert got.shape == w.shape, (op, attrs, name, got.shape, w.shape)
        if w.dtype.kind == "i":
            np.testing.assert_array_equal(got, w, err_msg=f"{op} {attrs}")
        else:
            np.testing.assert_allclose(got, w, rtol=0, atol=2e-6 * max(1.0, float(np.abs(w).max())),
                                       err_msg=f"{op} {attrs}")


def _r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


WINDOWS = [
    dict(kernel_shape=[3, 3]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 2], strides=[2, 3], pads=[0, 1, 2, 0]),
    dict(kernel_shape=[2, 2], dilations=[2, 1], strides=[1, 2]),
    dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(kernel_shape=[4, 3], auto_pad="SAME_LOWER", strides=[3, 2]),
    dict(kernel_shape=[2, 3], auto_pad="SAME_UPPER", dilations=[2, 2]),
    dict(kernel_shape=[3, 3], auto_pad="VALID", strides=[2, 1]),
]


@pytest.mark.parametrize("attrs", WINDOWS + [
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[2, 3], strides=[3, 1], pads=[0, 1, 1, 0], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, dilations=[2, 2]),
])
@pytest.mark.parametrize("size", [(7, 6), (8, 9)])
def test_reference_maxpool_values_and_switches(attrs, size):
    against_onnxruntime("MaxPool", {"x": _r(2, 3, *size)}, attrs, n_out=2)


@pytest.mark.parametrize("attrs", [w for w in WINDOWS if not ("dilations" in w and "SAME" in w.get("auto_pad", ""))]
                         + [dict(kernel_shape=[1, 1]), dict(kernel_shape=[5, 6], strides=[5, 3], pads=[1, 0, 0, 2])])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_conv(attrs, group):
    # (onnxruntime refuses a dilated Conv with SAME padding; MaxPool takes it, see above)
    against_onnxruntime("Conv", {"x": _r(2, 4, 9, 8), "w": _r(4, 4 // group, *attrs["kernel_shape"], seed=1),
                                 "b": _r(4, seed=2)}, dict(attrs, group=group))


@pytest.mark.parametrize("shape", [(2, 2, 5), (1, 2, 4, 3, 5)])
def test_reference_conv_in_1d_and_3d(shape):
    nd = len(shape) - 2
    attrs = dict(kernel_shape=[2] * nd, strides=[2] * nd, pads=[1] * nd + [0] * nd)
    against_onnxruntime("Conv", {"x": _r(*shape), "w": _r(3, shape[1], *[2] * nd, seed=1)}, attrs)


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0]),
    dict(kernel_shape=[2, 3], strides=[2, 1], pads=[0, 1, 1, 0], dilations=[1, 2]),
    dict(kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[3, 3], strides=[1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], output_shape=[6, 8]),
    dict(kernel_shape=[3, 2], strides=[2, 3], output_shape=[5, 10], output_padding=[1, 0]),
])
@pytest.mark.parametrize("group", [1, 2])
def test_reference_conv_transpose(attrs, group):
    against_onnxruntime("ConvTranspose", {"x": _r(2, 4, 3, 4), "w": _r(4, 6 // group, *attrs["kernel_shape"], seed=1),
                                          "b": _r(6, seed=2)}, dict(attrs, group=group))


@pytest.mark.parametrize("size", [1, 3, 5])
@pytest.mark.parametrize("beta,alpha,bias", [(0.75, 1e-4 * 5, 1.0), (0.5, 0.5, 1.5), (1.0, 0.3, 2.0), (0.6, 0.5, 1.5)])
def test_reference_lrn(size, beta, alpha, bias):
    against_onnxruntime("LRN", {"x": _r(2, 7, 3, 4) * 3}, dict(size=size, alpha=alpha, beta=beta, bias=bias))


def test_reference_erf_and_gelu():
    x = np.concatenate([_r(2, 50) * 3, np.array([[0.0, -6.0, 6.0] + [0.5] * 47] * 2)], axis=1)
    against_onnxruntime("Erf", {"x": x}, {})
    for approximate in ("none", "tanh"):
        against_onnxruntime("Gelu", {"x": x}, {"approximate": approximate}, opset=20)


def _recording(monkeypatch, calls):
    """Record every call of cnnvis's reference ops (node, inputs) while tests run float64 graphs."""
    from cnnvis.autodiff import backend

    original = backend._reference_ops

    def wrapped():
        classes = []
        for cls in original():
            def run(self, *args, _cls=cls, **kw):
                res = _cls.run(self, *args, **kw)
                calls.append((self.onnx_node, [np.array(a) for a in args if a is not None]))
                return res
            classes.append(type(cls.__name__, (cls,), {"run": run, "op_domain": ""}))
        return classes

    monkeypatch.setattr(backend, "_reference_ops", wrapped)


def test_every_reference_op_call_of_the_gradient_checks_matches_onnxruntime(monkeypatch):
    # the float64 forward and backward graphs of the rule tests' cases, run in the reference: every
    # call to a replaced op (with its attributes and input shapes) replayed in onnxruntime
    import test_autodiff_ops as ops_tests

    calls = []
    _recording(monkeypatch, calls)
    cases = []
    for attrs in ops_tests.CONV_CASES:
        for group in (1, 2):
            cases.append((ops_tests.tiny([ops_tests.n("Conv", ["x", "w", "b"], ["y"], group=group, **attrs)],
                                         {"w": (4, 4 // group, *attrs["kernel_shape"]), "b": (4,)}, (4, 7, 6)),
                          (2, 4, 7, 6), ["x", "w", "b"]))
    for attrs in ops_tests.POOL_CASES + [dict(kernel_shape=[2, 2], dilations=[2, 2], strides=[1, 2])]:
        cases.append((ops_tests.tiny([ops_tests.n("MaxPool", ["x"], ["y"], **attrs)], {}, (2, 8, 7)), (2, 2, 8, 7), ["x"]))
        for include in (0, 1):
            if "dilations" not in attrs:
                cases.append((ops_tests.tiny([ops_tests.n("AveragePool", ["x"], ["y"], count_include_pad=include,
                                                          **attrs)], {}, (2, 8, 7)), (2, 2, 8, 7), ["x"]))
    for size in (3, 5):
        for beta in (0.75, 0.5, 1.0, 0.6):
            cases.append((ops_tests.tiny([ops_tests.n("LRN", ["x"], ["y"], size=size, alpha=0.5, beta=beta, bias=1.5)],
                                         {}, (6, 3, 4)), (2, 6, 3, 4), ["x"]))
    for attrs in ops_tests.CONV_TRANSPOSE_CASES:
        for group in (1, 2):
            cases.append((ops_tests.tiny([ops_tests.n("ConvTranspose", ["x", "wt", "bt"], ["y"], group=group, **attrs)],
                                         {"wt": (4, 6 // group, *attrs["kernel_shape"]), "bt": (6,)}, (4, 3, 4)),
                          (2, 4, 3, 4), ["x", "wt", "bt"]))
    cases.append((ops_tests.tiny([ops_tests.n("Gelu", ["x"], ["y"])], {}, (3, 4), opset=20), (2, 3, 4), ["x"]))
    for model, shape, wrt in cases:
        m64 = to_float64(model)
        x = _r(*shape, seed=3)
        out_shape = GradientEngine(m64, wrt[0], objective="seed", target="y").graph_info(shape[1:]).target_shape
        seed = _r(shape[0], *out_shape, seed=4)
        for per_sample in (True, False):
            GradientEngine(m64, wrt, objective="seed", target="y", per_sample=per_sample).run(x, seed=seed)
        gradcheck(m64, x, wrt, objective="seed", target="y", seed=seed, samples=2)
    seen = {}
    for node, args in calls:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        key = (node.op_type, repr(sorted(attrs.items())), tuple(a.shape for a in args))
        seen.setdefault(key, (node, attrs, args))
    assert {k[0] for k in seen} == {"Conv", "MaxPool", "ConvTranspose", "LRN", "Gelu", "Erf"}
    for node, attrs, args in seen.values():
        names = ["x", "w", "b"][:len(args)]
        n_out = 2 if node.op_type == "MaxPool" else 1
        against_onnxruntime(node.op_type, dict(zip(names, args)), attrs, n_out=n_out,
                            opset=20 if node.op_type == "Gelu" else 17)
    assert len(seen) > 100, len(seen)  # forward and backward convolutions of many geometries


@pytest.mark.parametrize("op,attrs,inits", [
    ("GlobalMaxPool", {}, {}), ("ReduceMax", {"keepdims": 0, "axes": [2, 3]}, {}), ("MaxPool", {"kernel_shape": [2, 2]}, {}),
    ("Clip", {}, {"lo": np.array(-1.0), "hi": np.array(1.0)}),
])
def test_ties_and_bounds_of_reductions_and_clip_are_kinks(op, attrs, inits):
    # x = [1, 1, 0.2, -0.3]: a tie of the two maxima (entries 0, 1; for Clip: both at the upper bound)
    inputs = ["x"] + list(inits)
    g = helper.make_graph([n(op, inputs, ["y"], **attrs)], "k",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = make_model(g)
    x = np.array([1.0, 1.0, 0.2, -0.3]).reshape(1, 1, 2, 2)
    y_shape = {"Clip": (1, 1, 2, 2), "ReduceMax": (1, 1)}.get(op, (1, 1, 1, 1))
    report = gradcheck(m, x, "x", objective="seed", target="y", seed=np.ones(y_shape), samples=4)["x"]
    assert report.kinked.tolist() == [0, 1], str(report)
    assert report.entries.tolist() == [2, 3] and report.max_rel_error <= 1e-6


def test_the_reference_backend_shares_no_geometry_with_the_rules():
    """backend.py is the independent float64 reference the rules are checked against: it writes its
    window geometry itself, so it imports neither the rules' modules nor cnnvis.ops (where the rules'
    geometry lives), nor any of ops' geometry helpers through another module (onnxgraph re-exports
    some), at module level or inside functions."""
    import ast
    import pathlib

    import cnnvis.autodiff.backend as backend
    from cnnvis import ops

    tree = ast.parse(pathlib.Path(backend.__file__).read_text())
    modules, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            modules.add(base)
            names.update(a.name for a in node.names)
            if not node.module:  # "from .. import ops"
                modules.update(base + a.name for a in node.names)
    assert "numpy" in modules and "..onnxgraph" in modules  # the parse sees the imports
    forbidden_modules = {"..ops", "cnnvis.ops", ".rules", "cnnvis.autodiff.rules", ".graph",
                         "cnnvis.autodiff.graph", ".builder", "cnnvis.autodiff.builder"}
    assert not modules & forbidden_modules, sorted(modules & forbidden_modules)
    geometry = {"window", "Window", "same_pads", "same_pad_totals", "split_pads", "transpose_same_pads",
                "transpose_pad_totals", "pool_output_size", "same_pool_output_size", "floor_mode_pads",
                "average_pool_divisors"}
    assert geometry <= set(vars(ops)), "the list names ops' geometry helpers"
    assert not names & geometry, sorted(names & geometry)


# --------------------------------------- float32 models: the rule check in float64, precision apart
def flipping_net():
    """x (1x3x1x1) -> Flatten -> MatMul W1 -> +1000 -> -1000 -> Relu -> MatMul W2 -> logits (float32).

    Unit 0's pre-activation is x . W1[:, 0] = 1e-5 for ``flip_input``: float64 keeps it (Relu
    passes), float32 loses it in 1000 + 1e-5 (half an ulp of 1000 is 3e-5) and gets exactly 0
    (Relu blocks), so the float32 gradient misses unit 0's path. Units 1 and 2 sit at +1 and -2.
    """
    w1 = np.array([[1.0, 1e5, 0.0], [0.0, 0.0, -1e5], [0.0, 0.0, 0.0]])
    w2 = np.array([[300.0, -1.0], [0.5, 2.0], [1.0, 1.0]])
    nodes = [n("Flatten", ["x"], ["f"]), n("MatMul", ["f", "w1"], ["h"]), n("Add", ["h", "big"], ["hb"]), n("Sub", ["hb", "big"], ["z"]),
             n("Relu", ["z"], ["r"]), n("MatMul", ["r", "w2"], ["logits"])]
    inits = {"w1": w1, "w2": w2, "big": np.array([1000.0])}
    g = helper.make_graph(nodes, "flip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1, 1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return make_model(g)


def flip_input():
    return np.array([[1e-5, 2e-5, 0.3]], dtype=np.float32).reshape(1, 3, 1, 1)


def by_hand_gradient(unit0_passes: bool):
    """d logit0 / dx: sum over the units Relu passes of W1[:, u] * W2[u, 0] (hand-computed)."""
    g = np.array([1e5 * 0.5, 0.0, 0.0])  # unit 1 (z = 1) passes; unit 2 (z = -2) is blocked
    if unit0_passes:
        g += np.array([1.0, 0.0, 0.0]) * 300.0
    return g


def test_float32_decision_flip_is_a_precision_note_not_a_rule_failure():
    m, x = flipping_net(), flip_input()
    # the premise, independently: float32 rounds unit 0's pre-activation to exactly 0, float64 not
    z32 = (np.float32(x.flat[0]) + np.float32(1000.0)) - np.float32(1000.0)
    assert z32 == 0.0 and float(x.flat[0]) > 0
    g32 = GradientEngine(m, "x", objective="logit", per_sample=False).run(x, index=0)["x"].reshape(-1)
    np.testing.assert_allclose(g32, by_hand_gradient(False), rtol=1e-6)
    r = gradcheck(m, x, "x", objective="logit", index=0, samples=3)["x"]
    # the rule check: the float64 gradient graph against float64 central differences (and by hand)
    assert len(r.entries) == 3 and len(r.kinked) == 0
    np.testing.assert_allclose(r.analytic, by_hand_gradient(True)[r.entries], rtol=1e-9)
    assert r.max_rel_error <= 1e-6, str(r)
    # precision apart: distance 300 / 50300 of the largest entry (above the default 1e-3, where
    # comparing the float32 gradient with the differences used to fail), one Relu sign of 3 differs
    assert r.float32_rel_error == pytest.approx(300.0 / 50300.0, rel=1e-6)
    assert (r.decisions_differ, r.decisions) == (1, 3)
    assert "1 of 3 forward decisions (Relu signs, pool switches, bounds) differ" in str(r)
    assert r.failure(1e-3) == ""  # above the tolerance, explained by the flip: not a failure


def test_a_wrong_rule_fails_a_float32_model_too(monkeypatch):
    break_rule(monkeypatch, "MatMul")
    r = gradcheck(flipping_net(), flip_input(), "x", objective="logit", index=0, samples=3)["x"]
    assert 5e-4 < r.max_rel_error < 5e-3, str(r)  # the float64 gradient graph has the wrong rule too
    assert r.failure(1e-4).startswith("relative error")


def test_an_unexplained_float32_distance_fails():
    # a float32 gradient far from the float64 one with no decision differing is not precision
    m, x = flipping_net(), flip_input()
    x64 = x.astype(np.float64)
    x64.reshape(-1)[0] = 0.5  # unit 0 well away from 0: no flip
    x = x64.astype(np.float32)
    good = GradientEngine(m, "x", objective="logit", per_sample=False).run(x, index=0)["x"]
    r = gradcheck(m, x, "x", objective="logit", index=0, samples=3)["x"]
    assert r.decisions_differ == 0 and r.float32_rel_error <= 1e-6 and r.failure(1e-3) == ""
    r.float32_rel_error = float(np.abs(good * 0.01).max() / np.abs(good).max())  # as a 1% float32-only error would
    assert "no forward decision differing" in r.failure(1e-3)
