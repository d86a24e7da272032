"""Deconvnet projections against a numpy deconvnet written out here, and the deconv command."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis import deconv
from cnnvis.analysis.receptive import receptive_field
from cnnvis.cli import main
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model
from cnnvis.preprocess import Preprocessing

RNG = np.random.default_rng(7)
W1 = RNG.normal(size=(3, 3, 3, 3)).astype(np.float32)
B1 = RNG.normal(scale=0.1, size=3).astype(np.float32)
W2 = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
B2 = RNG.normal(scale=0.1, size=4).astype(np.float32)


def tiny_proto():
    """data 3×8×8 → conv1 (3 maps, 3×3, pad 1) → relu1 → pool1 (max 2×2, stride 2) → conv2 (4 maps,
    3×3, pad 1) → relu2 → global average → fc-less 'prob' (Flatten)."""
    nodes = [helper.make_node("Conv", ["data", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["pool1", "w2", "b2"], ["conv2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["prob"], name="flat")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in {"w1": W1, "b1": B1, "w2": W2, "b2": B2}.items()])
    return make_model(graph)


@pytest.fixture(scope="module")
def tiny():
    return Model(tiny_proto(), name="tiny")


# ----------------------------------------------------------------- the numpy deconvnet

def conv_f64(x, w, b):
    """3×3 cross-correlation with padding 1 (C×H×W → O×H×W), as ONNX Conv defines it."""
    c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((w.shape[0], h, wd))
    for o in range(w.shape[0]):
        for i in range(h):
            for j in range(wd):
                out[o, i, j] = np.sum(w[o] * xp[:, i:i + 3, j:j + 3]) + b[o]
    return out


def conv_transposed_f64(s, w):
    """The deconvnet's filtering: each output position sends s·W back over its 3×3 window."""
    o, h, wd = s.shape
    back = np.zeros((w.shape[1], h + 2, wd + 2))
    for oo in range(o):
        for i in range(h):
            for j in range(wd):
                back[:, i:i + 3, j:j + 3] += s[oo, i, j] * w[oo]
    return back[:, 1:-1, 1:-1]


def maxpool_switches_f64(r):
    """2×2/2 max pooling: values and the (row, col) of the first maximum in row-major order."""
    c, h, w = r.shape
    pooled = np.zeros((c, h // 2, w // 2))
    switch = np.zeros((c, h // 2, w // 2, 2), int)
    for cc in range(c):
        for i in range(h // 2):
            for j in range(w // 2):
                win = r[cc, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                k = int(np.argmax(win))
                pooled[cc, i, j] = win.flat[k]
                switch[cc, i, j] = (2 * i + k // 2, 2 * j + k % 2)
    return pooled, switch


def unpool_f64(s, switch, shape):
    out = np.zeros(shape)
    c, h, w = s.shape
    for cc in range(c):
        for i in range(h):
            for j in range(w):
                y, x = switch[cc, i, j]
                out[cc, y, x] += s[cc, i, j]
    return out


def numpy_deconvnet(x, layer, unit):
    """Keep activation ``unit`` of ``layer`` (pool1 or relu2), zero the rest, project to pixels."""
    x = x.astype(np.float64)
    r1 = np.maximum(conv_f64(x, W1.astype(np.float64), B1.astype(np.float64)), 0)
    p1, switch = maxpool_switches_f64(r1)
    r2 = np.maximum(conv_f64(p1, W2.astype(np.float64), B2.astype(np.float64)), 0)
    c, y, xx = unit
    if layer == "relu2":
        s = np.zeros_like(r2)
        s[c, y, xx] = r2[c, y, xx]
        s = np.maximum(s, 0)                             # relu2: rectify the backward signal
        s = conv_transposed_f64(s, W2.astype(np.float64))  # conv2 with transposed filters -> pool1
    else:
        s = np.zeros_like(p1)
        s[c, y, xx] = p1[c, y, xx]
    s = unpool_f64(s, switch, r1.shape)                 # pool1: put it back where the max was
    s = np.maximum(s, 0)                                 # relu1: rectify
    return conv_transposed_f64(s, W1.astype(np.float64))  # conv1 transposed -> pixels


# ------------------------------------------------------------------------------ tests

def test_projection_equals_hand_computed_deconvnet(tiny):
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    acts = tiny.run(x, ["pool1", "relu2"])
    checked = 0
    for i in range(2):
        for layer in ("pool1", "relu2"):
            a = acts[layer][i]
            for flat in np.argsort(-a.reshape(-1), kind="stable")[:2]:  # the two strongest units
                unit = tuple(int(v) for v in np.unravel_index(flat, a.shape))
                assert a[unit] > 0
                got = deconv.Deconvnet(tiny, layer).run(x[i:i + 1], target=[unit]).projections[0]
                want = numpy_deconvnet(x[i], layer, unit)
                assert np.abs(want).max() > 0
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
                checked += 1
    assert checked == 8


def test_deconvnet_differs_from_gradient_where_signal_is_rectified(tiny):
    """At relu2 → conv2ᵀ the signal has negative parts; the deconvnet rectifies them at relu1
    whatever the forward sign, the gradient masks by the forward sign: the results differ."""
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    acts = tiny.run(x, ["relu2"])["relu2"][0]
    unit = np.unravel_index(np.argmax(acts), acts.shape)
    deconvnet = deconv.Deconvnet(tiny, "relu2").run(x, target=[unit]).projections[0]
    gradient = deconv.Deconvnet(tiny, "relu2", rule="gradient").run(x, target=[unit]).projections[0]
    np.testing.assert_allclose(deconvnet, numpy_deconvnet(x[0], "relu2", unit), rtol=1e-5,
                               atol=1e-5 * np.abs(deconvnet).max())
    assert np.abs(deconvnet - gradient).max() > 1e-3 * np.abs(deconvnet).max()


def test_batched_maps_equal_one_by_one_and_scale_with_value(tiny):
    img = RNG.normal(size=(3, 8, 8)).astype(np.float32)
    res = deconv.Deconvnet(tiny, "relu2", batch_size=3).run(img[None])  # 4 maps over two engine calls
    acts = tiny.run(img[None], ["relu2"])["relu2"][0]
    assert res.units[:, 0].tolist() == [0, 1, 2, 3] and res.images.tolist() == [0, 0, 0, 0]
    for k, (m, y, xx) in enumerate(res.units):
        flat = acts[m].reshape(-1)
        assert (y, xx) == divmod(int(np.argmax(flat)), acts.shape[2])
        assert res.values[k] == acts[m, y, xx]
        one = deconv.Deconvnet(tiny, "relu2").run(img[None], target=[(m, y, xx)]).projections[0]
        np.testing.assert_allclose(res.projections[k], one, rtol=1e-6, atol=1e-7)
        if acts[m, y, xx] > 0:
            np.testing.assert_allclose(res.projections[k], numpy_deconvnet(img, "relu2", (m, y, xx)),
                                       rtol=1e-5, atol=1e-5 * np.abs(one).max())
    # a seed twice as large gives twice the projection (positively homogeneous)
    unit = tuple(res.units[0])
    double = deconv.Deconvnet(tiny, "relu2").run(img[None], target=[unit], values=[2 * res.values[0]]).projections[0]
    np.testing.assert_allclose(double, 2 * res.projections[0], rtol=1e-6, atol=1e-7)
    fixed = deconv.Deconvnet(tiny, "relu2", maps=[2], position=(1, 3)).run(img[None])
    assert fixed.units.tolist() == [[2, 1, 3]]
    # a batch of images: each image's rows are those of the image alone, image by image
    other = RNG.normal(size=(3, 8, 8)).astype(np.float32)
    both = deconv.Deconvnet(tiny, "relu2", maps=[1, 3], batch_size=3).run(np.stack([img, other]))
    assert both.images.tolist() == [0, 0, 1, 1]
    alone = deconv.Deconvnet(tiny, "relu2", maps=[1, 3]).run(other[None])
    np.testing.assert_array_equal(both.units[2:], alone.units)
    np.testing.assert_allclose(both.projections[2:], alone.projections, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(both.projections[:2], res.projections[[1, 3]], rtol=1e-6, atol=1e-7)


def test_bad_units_and_layers(tiny):
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(CnnvisError, match="unit map 4: must be in"):
        deconv.Deconvnet(tiny, "relu2").run(x, target=[(4, 0, 0)])
    with pytest.raises(CnnvisError, match="unit y 5"):
        deconv.Deconvnet(tiny, "relu2").run(x, target=[(0, 5, 0)])
    with pytest.raises(CnnvisError, match="unknown layer"):
        deconv.Deconvnet(tiny, "conv9").run(x, target=[(0, 0, 0)])
    with pytest.raises(CnnvisError, match="map 7: layer relu2 has maps 0..3"):
        deconv.Deconvnet(tiny, "relu2", maps=[7]).run(x)
    with pytest.raises(CnnvisError, match="^rule='magic': expected one of deconvnet, guided, gradient$") as err:
        deconv.Deconvnet(tiny, "relu2", rule="magic").run(x, target=[(0, 0, 0)])
    assert err.value.params == ("rule",)


def test_deprocess_inverts_the_documented_pipeline():
    pre = Preprocessing(size=(4, 5), channels=3, channel_order="BGR", raw_scale=255.0,
                        mean=(104.0, 117.0, 123.0), std=(2.0, 3.0, 4.0))
    pixels = np.random.default_rng(0).uniform(size=(4, 5, 3))
    x = (pixels[..., ::-1].transpose(2, 0, 1) * 255.0 - np.array([104.0, 117.0, 123.0])[:, None, None]) \
        / np.array([2.0, 3.0, 4.0])[:, None, None]
    np.testing.assert_allclose(pre.to_display(x), pixels, atol=1e-12)
    grey = Preprocessing(size=(4, 5), channels=1, mean=(0.5,), std=(0.25,))
    g = np.random.default_rng(1).uniform(size=(4, 5))
    np.testing.assert_allclose(grey.to_display(((g - 0.5) / 0.25)[None]), g, atol=1e-12)


def test_deconv_command_outputs(tiny, tmp_path, capsys):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_proto(), model_path)
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    argv = ["deconv", "--model", str(model_path), "--input-array", str(tmp_path / "x.npy"), "--layer", "relu2",
            "--maps", "0,2-3", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["manifest.json", "x[0]/relu2_deconv.json", "x[0]/relu2_deconv.png", "x[0]/relu2_projections.npy",
                     "x[1]/relu2_deconv.json", "x[1]/relu2_deconv.png", "x[1]/relu2_projections.npy"]
    rec = json.loads((out / "x[1]/relu2_deconv.json").read_text())
    assert [r["map"] for r in rec["records"]] == [0, 2, 3]
    proj = np.load(out / "x[1]/relu2_projections.npy")
    assert proj.shape == (3, 3, 8, 8)
    for r, p in zip(rec["records"], proj):
        want = deconv.Deconvnet(tiny, "relu2").run(x[1:2], target=[(r["map"], r["y"], r["x"])]).projections[0]
        np.testing.assert_allclose(p, want, rtol=1e-6, atol=1e-7)
    field = receptive_field(tiny, "relu2")
    assert rec["receptive_field"] == field.as_dict()
    # the picture: block i (grid of blocks, 4-pixel separators) starts with the projection under
    # unit i's receptive field as RGB, min-max scaled; outside the image white (the label's corner aside)
    from PIL import Image

    pic = np.asarray(Image.open(out / "x[1]/relu2_deconv.png").convert("RGB")).astype(int)
    z, cols = rec["grid"]["scale"], rec["grid"]["cols"]
    (top0, left0, bottom0, right0) = rec["records"][0]["box"]
    h, w = bottom0 - top0, right0 - left0
    live = 0
    for i, (r, p) in enumerate(zip(rec["records"], proj)):
        top, left, bottom, right = r["box"]
        crop = np.full((3, h, w), np.nan)
        ys, xs = slice(max(top, 0), min(bottom, 8)), slice(max(left, 0), min(right, 8))
        crop[:, ys.start - top:ys.stop - top, xs.start - left:xs.stop - left] = p[:, ys, xs]
        lo, hi = np.nanmin(crop), np.nanmax(crop)
        live += bool(hi > lo)
        if hi > lo:
            expected = np.where(np.isnan(crop), 255, np.rint(255 * (crop - lo) / (hi - lo)))
        else:  # a dead unit's projection is zero: the whole tile black, its outside too (normalize's 0)
            expected = np.zeros_like(crop)
        expected = expected.transpose(1, 2, 0)
        by, bx = divmod(i, cols)
        y0, x0 = by * (h + 4), bx * (2 * w + 3 + 4)
        shown = pic[y0 * z + z // 2:(y0 + h) * z:z, x0 * z + z // 2:(x0 + w) * z:z]
        keep = np.ones((h, w), bool)
        keep[:2, :2] = False
        np.testing.assert_allclose(shown[keep], expected[keep], atol=1)
    assert live >= 2
    first = {f: (out / f).read_bytes() for f in files if f != "manifest.json"}
    assert main(argv) == 0
    assert all((out / f).read_bytes() == b for f, b in first.items())  # deterministic
    code = main(argv[:-2] + ["--maps", "9", "--out", str(out)])
    assert code == 2 and "--maps 9" in capsys.readouterr().err
