"""Occlusion maps: a model whose class depends on one region, the incremental path against brute
force, the grey from the preprocessing, coverage maps and overlays."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis import occlusion as occ
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model
from cnnvis.analysis.inputspace import probabilities
from cnnvis.preprocess import input_space, preset


def _graph(nodes, inits, in_shape, out_name, out_dim):
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *in_shape])
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", out_dim])
    init = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    return make_model(helper.make_graph(nodes, "t", [inp], [out], init))


REGION = (slice(4, 8), slice(4, 8))  # the only pixels the class-0 logit reads


def region_model():
    """1×12×12 → relu(1×1 conv, weight 1) → flatten → logits: z0 = 0.25·Σ region, z1 = 3."""
    w = np.zeros((2, 144), np.float32)
    mask = np.zeros((12, 12), np.float32)
    mask[REGION] = 1.0
    w[0] = 0.25 * mask.ravel()
    nodes = [helper.make_node("Conv", ["data", "c.w", "c.b"], ["conv"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    inits = {"c.w": np.ones((1, 1, 1, 1)), "c.b": np.zeros(1), "fc.w": w, "fc.b": np.array([0.0, 3.0])}
    proto = _graph(nodes, inits, (1, 12, 12), "prob", 2)
    return Model(proto, name="region", sidecar={"preprocessing": preset("grey28", (1, 12, 12)).to_dict()})


def test_region_model_loads_in_onnxruntime():
    m = region_model()
    out = m.run(np.zeros((2, 1, 12, 12), np.float32))[m.output_name]
    assert out.shape == (2, 2)


@pytest.mark.parametrize("incremental", [False, True])
def test_occluding_the_informative_region_drops_the_class(incremental):
    m = region_model()
    image = np.zeros((1, 12, 12), np.float32)
    image[0][REGION] = 1.0
    res = occ.Occlusion(m, window=4, stride=2, layer="relu", incremental=incremental).run(image[None], target=0)[0]
    # grey28 has no mean: the grey is the mid-grey pixel 0.5
    z0 = 0.25 * 16  # unoccluded: 4 > 3, class 0 wins
    assert res.base_probability == pytest.approx(1 / (1 + np.exp(3 - z0)), rel=1e-6)
    assert res.base_top_class == 0
    ys, xs = list(res.ys), list(res.xs)
    assert ys == xs == [0, 2, 4, 6, 8]
    i, j = ys.index(4), xs.index(4)
    # the window exactly on the region: z0 = 0.25 * 16 * 0.5 = 2 < 3, class 1 wins
    assert res.probability[i, j] == pytest.approx(1 / (1 + np.exp(3 - 2.0)), rel=1e-6)
    assert res.top_class[i, j] == 1
    # windows that do not touch the region leave the probability exactly as it was
    for a, y in enumerate(ys):
        for b, x in enumerate(xs):
            overlap = max(0, min(y + 4, 8) - max(y, 4)) * max(0, min(x + 4, 8) - max(x, 4))
            expected_z0 = 0.25 * (16 - overlap * 0.5)
            assert res.probability[a, b] == pytest.approx(1 / (1 + np.exp(3 - expected_z0)), rel=1e-6)
            if overlap == 0:
                assert res.probability[a, b] == pytest.approx(res.base_probability, abs=1e-7)
                assert res.top_class[a, b] == 0
    # total activation of the (single) relu map: region pixels 1 -> 0.5, background 0 -> 0.5
    assert res.channel == 0 and res.base_activation == pytest.approx(16.0)
    for a, y in enumerate(ys):
        for b, x in enumerate(xs):
            occluded = image.copy()
            occluded[:, y:y + 4, x:x + 4] = 0.5
            assert res.activation[a, b] == pytest.approx(occluded.sum(), abs=1e-5)
    assert res.summary()["min_probability_window"] == [4, 4]


def test_grey_comes_from_the_preprocessing_mean():
    m = region_model()
    m.sidecar["preprocessing"] = preset("grey28", (1, 12, 12), mean=[0.3], raw_scale=1.0).to_dict()
    image = np.zeros((1, 12, 12), np.float32)
    image[0][REGION] = 1.0
    res = occ.Occlusion(m, window=4, stride=4, layer=False).run(image[None], target=0)[0]
    # with a mean, the grey is the mean pixel: 0 in input space, so the region sum drops to 0
    assert res.probability[1, 1] == pytest.approx(1 / (1 + np.exp(3.0)), rel=1e-6)
    assert res.activation is None


def chain_model(seed=0):
    """3×20×20: conv(5, s2, p2) relu LRN maxpool(3, s2, ceil, p1) conv(3, p2, dil 2, group 2) relu
    maxpool(2) avgpool(1) conv(1) → fc → softmax: pads, ceil mode, dilation, groups, LRN."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["data", "c1.w", "c1.b"], ["conv1"], name="conv1", kernel_shape=[5, 5],
                         strides=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("LRN", ["relu1"], ["norm1"], name="norm1", size=3, alpha=1e-2, beta=0.75, bias=1.0),
        helper.make_node("MaxPool", ["norm1"], ["pool1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], ceil_mode=1),
        helper.make_node("Conv", ["pool1", "c2.w", "c2.b"], ["conv2"], name="conv2", kernel_shape=[3, 3],
                         pads=[2, 2, 2, 2], dilations=[2, 2], group=2),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Mul", ["relu2", "scale"], ["scaled2"], name="scaled2"),
        helper.make_node("MaxPool", ["scaled2"], ["pool2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool2"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc"], name="fc", transB=1),
        helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1),
    ]
    inits = {"c1.w": rng.standard_normal((6, 3, 5, 5)) * 0.3, "c1.b": rng.standard_normal(6) * 0.1,
             "c2.w": rng.standard_normal((8, 3, 3, 3)) * 0.3, "c2.b": rng.standard_normal(8) * 0.1,
             "scale": np.full((1, 8, 1, 1), 1.5), "fc.w": rng.standard_normal((5, 8 * 3 * 3)) * 0.3,
             "fc.b": np.zeros(5)}
    proto = _graph(nodes, inits, (3, 20, 20), "prob", 5)
    return Model(proto, name="chain", sidecar={"preprocessing": preset("imagenet", (3, 20, 20)).to_dict()})


def _brute_force(model, image, ys, xs, window, fill, tap, channel):
    copies = []
    for y in ys:
        for x in xs:
            c = image.copy()
            c[:, y:y + window, x:x + window] = fill[:, y:y + window, x:x + window]
            copies.append(c)
    out = model.run(np.stack(copies), [tap, model.output_name])
    prob = probabilities(model, out[model.output_name])
    act = out[tap][:, channel].reshape(len(copies), -1).astype(np.float64).sum(1)
    return prob, act


@pytest.mark.parametrize("layer", ["relu1", "norm1", "relu2", "pool2", "fc"])
def test_incremental_path_equals_the_whole_network(layer):
    m = chain_model()
    rng = np.random.default_rng(1)
    image = rng.standard_normal((3, 20, 20)).astype(np.float32)
    window, stride = 5, 3
    inc = occ.Occlusion(m, window=window, stride=stride, layer=layer, incremental=True, batch_size=7)
    res = inc.run(image[None])[0]
    plan = next(iter(inc._plans.values()))
    # every local op before the flatten is evaluated on rectangles
    assert [s.output for s in plan.stages] == ["norm1", "pool1", "scaled2", "pool2"]
    plain = occ.Occlusion(m, window=window, stride=stride, layer=layer, incremental=False).run(image[None])[0]
    fill = np.broadcast_to(input_space(m).grey_, image.shape).astype(np.float32)
    prob, act = _brute_force(m, image, res.ys, res.xs, window, fill, m.layer(layer).tensor, res.channel)
    shape = res.probability.shape
    assert shape == (6, 6)  # windows at 0, 3, ..., 15: the last one touches the border
    for r in (res, plain):
        np.testing.assert_allclose(r.probability, prob[:, res.target].reshape(shape), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(r.top_class, np.argmax(prob, axis=1).reshape(shape))
        np.testing.assert_allclose(r.activation, act.reshape(shape), rtol=1e-5, atol=1e-5)
    assert plain.channel == res.channel


def test_auto_mode_skips_work_only_when_it_pays_and_stays_exact():
    m = chain_model(seed=3)
    image = np.random.default_rng(2).standard_normal((3, 20, 20)).astype(np.float32)
    auto = occ.Occlusion(m, window=3, stride=4, layer="relu2")
    res = auto.run(image[None])[0]
    plan = next(iter(auto._plans.values()))
    assert plan.costs[plan.depth] <= 0.9 * plan.costs[0] or plan.depth == 0
    ref = occ.Occlusion(m, window=3, stride=4, layer="relu2", incremental=False).run(image[None])[0]
    np.testing.assert_allclose(res.probability, ref.probability, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.activation, ref.activation, rtol=1e-5, atol=1e-5)


def test_outputs_are_deterministic_and_channel_target_overrides():
    m = chain_model()
    image = np.random.default_rng(5).standard_normal((3, 20, 20)).astype(np.float32)
    o = occ.Occlusion(m, window=6, stride=5, layer="relu2", channel=3, incremental=True)
    a, b = o.run(image[None], target=2)[0], o.run(image[None], target=2)[0]
    assert a.target == 2 and a.channel == 3
    for field in ("probability", "top_class", "top_probability", "activation"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_a_batch_is_its_images_one_by_one_and_sessions_live_in_the_model_cache():
    m = chain_model()
    x = np.random.default_rng(7).standard_normal((3, 3, 20, 20)).astype(np.float32)
    o = occ.Occlusion(m, window=5, stride=4, layer="relu2", incremental=True, batch_size=5)
    res = o.run(x, target=[0, 3, 1])
    assert len(res) == 3 and [r.target for r in res] == [0, 3, 1]
    assert res.plan == o.plan_.describe()
    stage_keys = [k for k in m._sessions if k[0] == "graph"]
    assert stage_keys and all(k[1][0][0] == "occlusion" for k in stage_keys)
    fresh = Model(m.proto, name="again", sidecar=m.sidecar)
    for i, t in enumerate([0, 3, 1]):
        one = occ.Occlusion(fresh, window=5, stride=4, layer="relu2", incremental=False).run(x[i:i + 1], target=t)[0]
        np.testing.assert_allclose(res[i].probability, one.probability, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res[i].activation, one.activation, rtol=1e-5, atol=1e-5)
        assert res[i].channel == one.channel
    # a second analysis on the same model reuses the sessions instead of building new ones
    before = len(m._sessions)
    occ.Occlusion(m, window=5, stride=4, layer="relu2", incremental=True, batch_size=5).run(x[:1])
    assert len(m._sessions) == before


def test_errors_are_one_line():
    m = region_model()
    with pytest.raises(CnnvisError, match="window"):
        occ.Occlusion(m, window=13, stride=1).run(np.zeros((1, 1, 12, 12), np.float32))
    with pytest.raises(CnnvisError, match="expects"):
        occ.Occlusion(m, window=3).run(np.zeros((1, 1, 10, 10), np.float32))
    with pytest.raises(CnnvisError, match="class"):
        occ.Occlusion(m, window=4, layer=False).run(np.zeros((1, 1, 12, 12), np.float32), target=7)
    with pytest.raises(CnnvisError, match="unknown layer"):
        occ.Occlusion(m, window=4, layer="nope").run(np.zeros((1, 1, 12, 12), np.float32))


def test_coverage_mean_by_hand():
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = occ.coverage_mean(values, np.array([0, 1]), np.array([0, 2]), (2, 2), (4, 5))
    expected = np.array([[1, 1, 2, 2, np.nan],
                         [2, 2, 3, 3, np.nan],
                         [3, 3, 4, 4, np.nan],
                         [np.nan] * 5])
    np.testing.assert_allclose(out, expected)


def test_nearest_window_classes_gives_each_pixel_the_class_of_the_nearest_window_centre():
    top = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    res = occ.OcclusionMaps(target=0, window=(3, 3), stride=(2, 2), ys=np.array([0, 2, 4]), xs=np.array([0, 2, 4]),
                            probability=np.zeros((3, 3)), top_class=top, top_probability=np.zeros((3, 3)),
                            base_probability=1.0, base_top_class=0, image_hw=(7, 7))
    # centres at 1, 3, 5; pixel rows 2 and 4 lie halfway between two centres: the first window wins
    nearest = [0, 0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(res.nearest_window_classes(), top[np.ix_(nearest, nearest)])


def test_cli_occlusion_files_match_the_api_and_rerun_identically(tmp_path):
    import json

    from cnnvis.cli import main

    m = chain_model()
    path = tmp_path / "chain.onnx"
    path.write_bytes(onnx.load_from_string(m.proto.SerializeToString()).SerializeToString())
    (tmp_path / "chain.onnx.json").write_text(json.dumps(m.sidecar))
    x = np.random.default_rng(4).standard_normal((2, 3, 20, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["occlusion", "--model", str(path), "--input-array", str(tmp_path / "x.npy"), "--out", str(out),
                     "--window", "5", "--stride", "3", "--layer", "relu2", "--class", "1"]) == 0
        outs.append(out)
    manifest = json.loads((outs[0] / "manifest.json").read_text())["runs"]["occlusion"]
    files = {f["path"] for f in manifest["files"]}
    for name in ("probability.npy", "top_class.npy", "activation.npy", "probability_overlay.png",
                 "activation_overlay.png", "top_class.png", "figure.png"):
        assert f"x[0]/{name}" in files and f"x[1]/{name}" in files
    assert manifest["params"]["window"] == [5, 5] and manifest["params"]["class"] == 1
    ref = occ.Occlusion(Model.from_file(path), window=5, stride=3, layer="relu2", incremental=False).run(x[1:2], target=1)[0]
    np.testing.assert_allclose(np.load(outs[0] / "x[1]/probability.npy"), ref.probability, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(outs[0] / "x[1]/activation.npy"), ref.activation, rtol=1e-5, atol=1e-5)
    summary = json.loads((outs[0] / "occlusion.json").read_text())
    assert [s["target"] for s in summary["images"]] == [1, 1]
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    # the pictures show the maps: each window's cell of probability.png is jet of its min-max
    # scaled probability, each cell of top_class.png the tab20 colour of its class (classes in order)
    from matplotlib import colormaps
    from PIL import Image

    prob, top = np.load(outs[0] / "x[1]/probability.npy"), np.load(outs[0] / "x[1]/top_class.npy")
    for png, expected in (
            ("probability.png", colormaps["jet"]((prob - prob.min()) / (prob.max() - prob.min()))[..., :3]),
            ("top_class.png", np.array([colormaps["tab20"](sorted(set(top.ravel().tolist())).index(k))[:3]
                                        for k in top.ravel()]).reshape(*top.shape, 3))):
        pic = np.asarray(Image.open(outs[0] / "x[1]" / png).convert("RGB")).astype(int)
        zoom = pic.shape[0] // prob.shape[0]
        assert pic.shape[:2] == (zoom * prob.shape[0], zoom * prob.shape[1]) and zoom * max(prob.shape) >= 224
        np.testing.assert_allclose(pic[zoom // 2::zoom, zoom // 2::zoom], np.rint(255 * expected), atol=1)
    # the default window and stride scale with the input (35 and 8 at 227)
    assert main(["occlusion", "--model", str(path), "--input-array", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "default"), "--layer", "none"]) == 0
    params = json.loads((tmp_path / "default" / "manifest.json").read_text())["runs"]["occlusion"]["params"]
    assert params["window"] == [3, 3] and params["stride"] == [1, 1]
    assert main(["occlusion", "--model", str(path), "--input-array", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "bad"), "--window", "30"]) == 2


def test_windows_cover_every_pixel_when_the_stride_does_not_divide():
    ys, xs = occ.window_positions((224, 224), (35, 35), (8, 8))
    assert ys[0] == 0 and ys[-1] == 224 - 35 and np.all(np.diff(ys) > 0)
    assert ys[-2] == 184 and len(ys) == 25  # 0..184 by 8, then 189 flush with the edge
    ys, _ = occ.window_positions((227, 227), (35, 35), (8, 8))
    assert len(ys) == 25 and ys[-1] == 192  # the stride lands on the edge: no extra window


def lp_pool_model(seed=0):
    """3×16×16: conv(3, p1) relu LpPool(3, s2, p1, p=2) relu conv(1) → fc → softmax."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["data", "c1.w", "c1.b"], ["conv1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("LpPool", ["relu1"], ["lp"], name="lp", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], p=2),
        helper.make_node("Conv", ["lp", "c2.w", "c2.b"], ["conv2"], name="conv2", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Flatten", ["relu2"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc"], name="fc", transB=1),
        helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1),
    ]
    inits = {"c1.w": rng.standard_normal((4, 3, 3, 3)) * 0.3, "c1.b": rng.standard_normal(4) * 0.1,
             "c2.w": rng.standard_normal((5, 4, 1, 1)) * 0.3, "c2.b": rng.standard_normal(5) * 0.1,
             "fc.w": rng.standard_normal((3, 5 * 8 * 8)) * 0.3, "fc.b": np.zeros(3)}
    proto = _graph(nodes, inits, (3, 16, 16), "prob", 3)
    return Model(proto, name="lp", sidecar={"preprocessing": preset("imagenet", (3, 16, 16)).to_dict()})


def test_lp_pool_is_computed_on_rectangles_and_equals_the_whole_network():
    """LpPool is a sliding window op whose padding reads as zeros (ops.PAD_VALUES): the
    incremental plan goes through it (it used to stop at it) and gives the brute-force numbers."""
    m = lp_pool_model()
    image = np.random.default_rng(4).standard_normal((3, 16, 16)).astype(np.float32)
    window, stride = 4, 3
    inc = occ.Occlusion(m, window=window, stride=stride, layer="relu2", incremental=True, batch_size=6)
    res = inc.run(image[None])[0]
    plan = next(iter(inc._plans.values()))
    assert [s.output for s in plan.stages] == ["relu1", "lp", "relu2"]
    fill = np.broadcast_to(input_space(m).grey_, image.shape).astype(np.float32)
    prob, act = _brute_force(m, image, res.ys, res.xs, window, fill, "relu2", res.channel)
    shape = res.probability.shape
    assert shape == (5, 5)
    np.testing.assert_allclose(res.probability, prob[:, res.target].reshape(shape), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(res.top_class, np.argmax(prob, axis=1).reshape(shape))
    np.testing.assert_allclose(res.activation, act.reshape(shape), rtol=1e-5, atol=1e-5)
