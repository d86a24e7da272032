"""Activation maximisation on models with a known optimal stimulus, batching, regularisers,
determinism and the CLI."""
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis import maximize as mx
from cnnvis.preprocess import InputSpace
from cnnvis.cli import main
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model
from cnnvis.preprocess import preset


def _model(nodes, inits, in_shape, out, out_dim, sidecar):
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    proto = make_model(graph)
    return Model(proto, name="m", sidecar=sidecar), proto


def smooth_filters(n=2, size=8, seed=0):
    """Smooth, distinct 3×size×size filters (Gaussian bumps times colour weights)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(2, size - 3, 2)
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0) - 0.3
        out.append(rng.standard_normal((3, 1, 1)) * bump)
    return np.stack(out).astype(np.float32)


SIDE = {"preprocessing": preset("imagenet", (3, 8, 8)).to_dict()}  # a mean: grey is 0


def one_filter_model(weights):
    """conv with kernels as large as the 3×8×8 input: channel c's mean = <w_c, x> + b_c."""
    n = weights.shape[0]
    nodes = [helper.make_node("Conv", ["data", "w", "b"], ["conv"], name="conv", kernel_shape=[8, 8]),
             helper.make_node("Flatten", ["conv"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    inits = {"w": weights, "b": np.full(n, 0.3), "fw": np.eye(n), "fb": np.zeros(n)}
    return _model(nodes, inits, (3, 8, 8), "prob", n, SIDE)


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_linear_filter_maximiser_is_the_filter_scaled():
    w = smooth_filters(2)
    model, _ = one_filter_model(w)
    am = mx.ActivationMaximization(model, layer="conv", steps=60, learning_rate=0.1, clip="none", norm_bound=3.0,
                                   seed=1).run(None, target=[0, 1])
    assert am.patterns.shape == (2, 3, 8, 8)
    for c in range(2):
        # under ||x|| <= r the maximiser of <w, x> is r w / ||w||
        assert _cos(am.patterns[c], w[c]) > 0.99
        assert np.linalg.norm(am.patterns[c]) == pytest.approx(3.0, rel=1e-4)
        assert am.objective[c] == pytest.approx(3.0 * np.linalg.norm(w[c]) + 0.3, rel=1e-3)
    # the objective climbed
    assert (am.history[-1] > am.history[0]).all()


def test_blur_decay_and_clip_keep_the_answer_for_a_smooth_filter():
    w = smooth_filters(2, seed=4)
    model, _ = one_filter_model(w)
    am = mx.ActivationMaximization(model, layer="conv", steps=80, learning_rate=0.1, blur_sigma=0.5, blur_every=4,
                                   decay=0.01, clip="range", norm_bound=3.0, seed=0).run(None, target=[0, 1])
    for c in range(2):
        assert _cos(am.patterns[c], w[c]) > 0.95
    space = InputSpace(preset("imagenet", (3, 8, 8)), (3, 8, 8))
    assert (am.patterns >= np.minimum(space.low_, space.high_) - 1e-5).all()
    assert (am.patterns <= np.maximum(space.low_, space.high_) + 1e-5).all()


def _jitter_average(wc, j):
    """The maximiser of the expected objective E_s <w, roll(x, s)> over uniform shifts |s| <= j is
    the average of the filter rolled back by every shift."""
    acc = np.zeros(wc.shape)
    for dy in range(-j, j + 1):
        for dx in range(-j, j + 1):
            acc += np.roll(wc, (-dy, -dx), axis=(1, 2))
    return acc


def test_jitter_maximises_the_shift_averaged_objective():
    w = smooth_filters(2, seed=4)
    model, _ = one_filter_model(w)
    # small steps: the pattern averages many randomly shifted gradients
    am = mx.ActivationMaximization(model, layer="conv", steps=150, learning_rate=0.01, jitter=1, clip="none",
                                   norm_bound=3.0, seed=0).run(None, target=[0, 1])
    for c in range(2):
        assert _cos(am.patterns[c], _jitter_average(w[c], 1)) > 0.95


def test_logit_objective_maximises_each_class_in_one_batch():
    rng = np.random.default_rng(2)
    wfc = rng.standard_normal((3, 12)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["data"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    side = {"preprocessing": preset("imagenet", (3, 2, 2)).to_dict()}
    model, _ = _model(nodes, {"fw": wfc, "fb": np.zeros(3)}, (3, 2, 2), "prob", 3, side)
    am = mx.ActivationMaximization(model, objective="logit", steps=40, learning_rate=0.1, clip="none",
                                   norm_bound=1.0).run(None, target=[2, 0, 1])
    assert am.layer == "fc" and am.indices.tolist() == [2, 0, 1]
    for row, k in enumerate([2, 0, 1]):
        assert _cos(am.patterns[row], wfc[k]) > 0.99  # each batch element followed its own class


def test_deterministic_by_seed_and_channel_mean_on_a_relu_layer():
    w = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["data", "w", "b"], ["conv"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["fc"], name="fc", transB=1)]
    inits = {"w": w, "b": np.zeros(4), "fw": np.ones((2, 4 * 36)), "fb": np.zeros(2)}
    model, _ = _model(nodes, inits, (3, 8, 8), "fc", 2, SIDE)
    kw = dict(steps=15, jitter=2, blur_sigma=0.7, blur_every=3, decay=0.02, seed=7)
    a = mx.ActivationMaximization(model, **kw).run(None, target=[0, 1, 2, 3])
    b = mx.ActivationMaximization(model, **kw).run(None, target=[0, 1, 2, 3])
    c = mx.ActivationMaximization(model, **{**kw, "seed": 8}).run(None, target=[0, 1, 2, 3])
    assert a.layer == "relu"  # the default: last layer with maps
    assert np.array_equal(a.patterns, b.patterns) and np.array_equal(a.history, b.history)
    assert not np.array_equal(a.patterns, c.patterns)
    assert (a.objective > a.history[0]).all()
    tiles = a.display_tiles()
    assert tiles.shape == (4, 8, 8, 3)
    # target=None: every channel of the layer, in order — the same patterns as naming them all
    every = mx.ActivationMaximization(model, **kw).run()
    assert every.indices.tolist() == [0, 1, 2, 3] and np.array_equal(every.patterns, a.patterns)


def test_given_starting_images_are_where_the_ascent_starts():
    weights = smooth_filters(2).astype(np.float64)
    model, _ = one_filter_model(smooth_filters(2))
    start = np.random.default_rng(4).uniform(-0.5, 0.5, (2, 3, 8, 8)).astype(np.float32)
    # no steps, no clipping or bound: the patterns are the starting images, the objective theirs
    res = mx.ActivationMaximization(model, layer="conv", steps=0, clip="none").run(start, target=[1, 0])
    np.testing.assert_array_equal(res.patterns, start)
    # channel c's mean is <w_c, x> + 0.3 (the 8×8 kernel covers the input)
    expected = [np.sum(weights[1] * start[0]) + 0.3, np.sum(weights[0] * start[1]) + 0.3]
    np.testing.assert_allclose(res.objective, expected, rtol=1e-5)
    with pytest.raises(CnnvisError, match="inputs: 1 starting images for 2 indices"):
        mx.ActivationMaximization(model, layer="conv", steps=0).run(start[:1], target=[1, 0])


def test_errors_name_the_problem():
    model, _ = one_filter_model(smooth_filters(2))
    with pytest.raises(CnnvisError, match="index 5"):
        mx.ActivationMaximization(model, layer="conv", steps=1).run(None, target=[5])
    with pytest.raises(CnnvisError, match="channel_mean needs"):
        mx.ActivationMaximization(model, layer="fc", steps=1).run(None, target=[0])
    with pytest.raises(CnnvisError, match="objective"):
        mx.ActivationMaximization(model, objective="loss", steps=1).run(None, target=[0])
    with pytest.raises(CnnvisError, match="decay"):
        mx.ActivationMaximization(model, layer="conv", decay=1.5, steps=1).run(None, target=[0])


def test_cli_maximize_grid_and_files(tmp_path):
    w = smooth_filters(3)
    _, proto = one_filter_model(w)
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    (tmp_path / "m.onnx.json").write_text(json.dumps(SIDE))
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["maximize", "--model", str(path), "--layer", "conv", "--channels", "2", "--steps", "30",
                     "--out", str(out)]) == 0
        outs.append(out)
    data = json.loads((outs[0] / "conv_maximize.json").read_text())
    assert data["indices"] == [0, 1] and len(data["final_objective"]) == 2
    patterns = np.load(outs[0] / "conv_patterns.npy")
    assert patterns.shape == (2, 3, 8, 8)
    for c in range(2):  # each channel's pattern looks like its own filter (0.85 here), not the other's
        assert _cos(patterns[c], w[c]) > 0.7 and _cos(patterns[c], w[c]) > _cos(patterns[c], w[1 - c]) + 0.2
    for name in ("conv_patterns.png", "conv_patterns.npy", "conv_maximize.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    # tile k of the picture is pattern k as RGB, min-max scaled on its own (grey is 0 in this input
    # space); the label's cell in each tile's top-left corner aside
    from PIL import Image

    grid = next(f["grid"] for f in json.loads((outs[0] / "manifest.json").read_text())["runs"]["maximize"]["files"]
                if f["path"] == "conv_patterns.npy")
    pic = np.asarray(Image.open(outs[0] / "conv_patterns.png").convert("RGB")).astype(np.float64)
    z = grid["scale"]
    assert grid["cols"] == 2 and pic.shape == (8 * z, 17 * z, 3)
    for k in range(2):
        tile = pic[z // 2::z, k * 9 * z + z // 2:(k * 9 + 8) * z:z]
        p = patterns[k].transpose(1, 2, 0).astype(np.float64)
        expected = np.rint(255 * (p - p.min()) / (p.max() - p.min()))
        keep = np.ones((8, 8), bool)
        keep[0, :2] = False  # the label
        np.testing.assert_allclose(tile[keep], expected[keep], atol=1)
    assert main(["maximize", "--model", str(path), "--objective", "logit", "--index", "2", "--steps", "3",
                 "--out", str(tmp_path / "logit")]) == 0
    assert json.loads((tmp_path / "logit" / "fc_maximize.json").read_text())["labels"] == ["class 2"]
    assert main(["maximize", "--model", str(path), "--layer", "conv", "--index", "9", "--steps", "3",
                 "--out", str(tmp_path / "bad")]) == 2
