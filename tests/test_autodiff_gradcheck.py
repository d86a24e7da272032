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
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return make_model(g)


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
    # the observation: with noise the same check passes with nothing excluded
    m = to_float64(mnist_like_net())
    x = digit() + np.random.default_rng(1).uniform(0, 1 / 255, (1, 1, 12, 12))
    report = gradcheck(m, x, "x", objective="logit", index=3, samples=40)["x"]
    assert len(report.kinked) == 0 and report.kink_note == "" and report.max_rel_error <= 1e-6


def test_a_wrong_rule_still_fails_on_the_entries_away_from_kinks(monkeypatch):
    right = rules._RULE_TABLE["Gemm"]

    def off_by_a_thousandth(ctx):
        grads = right(ctx)
        grads[0] = ctx.b.scale(grads[0], 1.001) if grads[0] is not None else None
        return grads

    monkeypatch.setitem(rules._RULE_TABLE, "Gemm", off_by_a_thousandth)
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
