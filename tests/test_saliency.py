"""Saliency maps against hand computations: vanilla gradient and guided backpropagation of a
conv → relu → fc model, Grad-CAM at a pooled layer, bilinear upsampling, and the CLI."""
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis import saliency as sal
from cnnvis.cli import main
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model

RNG = np.random.default_rng(0)
W_CONV = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)
B_CONV = np.array([0.1, -0.2, 0.05], np.float32)
W_FC = RNG.standard_normal((4, 3 * 3 * 3)).astype(np.float32)
B_FC = RNG.standard_normal(4).astype(np.float32)


def hand_model(softmax=True):
    """2×6×6 → conv 3×3 pad 1 (3 maps) → relu → maxpool 2 → flatten → fc (4 classes) [→ softmax]."""
    nodes = [helper.make_node("Conv", ["data", "cw", "cb"], ["conv"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("MaxPool", ["relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["fc"], name="fc", transB=1)]
    out = "fc"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1))
        out = "prob"
    inits = [numpy_helper.from_array(v, k) for k, v in (("cw", W_CONV), ("cb", B_CONV), ("fw", W_FC), ("fb", B_FC))]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4])], inits)
    return make_model(graph)


def _conv(x):
    """float64 reference of the conv (pad 1) for one image 2×6×6."""
    p = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    out = np.empty((3, 6, 6))
    for o in range(3):
        for i in range(6):
            for j in range(6):
                out[o, i, j] = (p[:, i:i + 3, j:j + 3] * W_CONV[o]).sum() + B_CONV[o]
    return out


def _pool_forward(r):
    pooled = r.reshape(3, 3, 2, 3, 2).max(axis=(2, 4))
    # the position each max came from (first in row-major order on ties)
    arg = r.reshape(3, 3, 2, 3, 2).transpose(0, 1, 3, 2, 4).reshape(3, 3, 3, 4).argmax(-1)
    return pooled, arg


def _input_grad(x, k, guided):
    """d logit_k / d input by hand: fc → unpool → relu rule → conv transposed."""
    conv = _conv(x)
    relu = np.maximum(conv, 0)
    _, arg = _pool_forward(relu)
    g_pool = W_FC[k].astype(np.float64).reshape(3, 3, 3)
    g_relu = np.zeros((3, 6, 6))
    for c in range(3):
        for i in range(3):
            for j in range(3):
                a = arg[c, i, j]
                g_relu[c, 2 * i + a // 2, 2 * j + a % 2] += g_pool[c, i, j]
    g_conv = g_relu * (conv > 0)
    if guided:
        g_conv = g_conv * (g_relu > 0)
    g_in = np.zeros((2, 8, 8))
    for o in range(3):
        for i in range(6):
            for j in range(6):
                g_in[:, i:i + 3, j:j + 3] += g_conv[o, i, j] * W_CONV[o]
    return g_in[:, 1:7, 1:7]


@pytest.fixture(scope="module")
def model():
    return Model(hand_model(), name="hand")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((3, 2, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("method", ["gradient", "guided"])
def test_gradient_methods_equal_hand_backprop(model, images, method):
    res = sal.Saliency(model, method=method).run(images, target=[0, 2, 3])
    assert res.targets.tolist() == [0, 2, 3]
    for n, k in enumerate([0, 2, 3]):
        expected = _input_grad(images[n], k, guided=method == "guided")
        np.testing.assert_allclose(res.gradient[n], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.heatmap[n], np.abs(expected).max(axis=0), rtol=1e-4, atol=1e-5)
    # probabilities passed in (one forward pass for several methods) give the same result
    given = sal.Saliency(model, method=method).run(images, target=[0, 2, 3], probs=model.predict(images))
    np.testing.assert_array_equal(given.gradient, res.gradient)
    np.testing.assert_allclose(given.probability, res.probability, rtol=1e-6)
    with pytest.raises(CnnvisError, match="probs: 2 rows for 3 images"):
        sal.Saliency(model, method=method).run(images, probs=model.predict(images)[:2])


def test_gradcam_equals_hand_computation(model, images):
    res = sal.Saliency(model, method="gradcam", layer="pool").run(images)
    assert res.layer == "pool" and res.cam.shape == (3, 3, 3) and res.heatmap.shape == (3, 6, 6)
    logits = []
    for n in range(3):
        pooled, _ = _pool_forward(np.maximum(_conv(images[n]), 0))
        logits.append(W_FC @ pooled.ravel() + B_FC)
        k = int(np.argmax(logits[-1]))  # default: the predicted class
        assert res.targets[n] == k
        # d logit_k / d pool = W_FC[k] (the fc reads the pooled maps directly)
        weights = W_FC[k].astype(np.float64).reshape(3, 9).mean(axis=1)
        cam = np.maximum(np.tensordot(weights, pooled, axes=1), 0)
        np.testing.assert_allclose(res.cam[n], cam, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.heatmap[n], sal.upsample_bilinear(cam, (6, 6)), rtol=1e-5, atol=1e-6)
    probs = np.exp(np.array(logits) - np.max(logits, axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(res.probability, probs[np.arange(3), res.targets], rtol=1e-5)


def test_gradcam_without_softmax_in_the_graph(images):
    m = Model(hand_model(softmax=False), name="logits")
    a = sal.Saliency(m, method="gradcam", layer="relu").run(images, target=1)
    b = sal.Saliency(Model(hand_model(), name="hand"), method="gradcam", layer="relu").run(images, target=1)
    np.testing.assert_allclose(a.cam, b.cam, rtol=1e-6, atol=1e-7)
    # float32 softmax in the graph vs float64 here: equal to float32 resolution
    np.testing.assert_allclose(a.probability, b.probability, rtol=1e-6, atol=1e-7)


def test_upsample_bilinear_by_hand():
    m = np.array([[0.0, 4.0], [8.0, 12.0]])
    out = sal.upsample_bilinear(m, (4, 4))
    row0 = [0.0, 1.0, 3.0, 4.0]  # sources -0.25→0, 0.25, 0.75, 1.25→1
    np.testing.assert_allclose(out[0], row0)
    np.testing.assert_allclose(out[:, 0], [0.0, 2.0, 6.0, 8.0])
    np.testing.assert_allclose(out[1, 1], 0.75 * 0.75 * 0 + 0.75 * 0.25 * 4 + 0.25 * 0.75 * 8 + 0.25 * 0.25 * 12)
    same = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(sal.upsample_bilinear(same, (3, 4)), same)
    assert sal.upsample_bilinear(np.ones((2, 3, 3)), (7, 5)).shape == (2, 7, 5)


def test_bad_method_layer_and_class(model, images):
    with pytest.raises(CnnvisError, match="method"):
        sal.Saliency(model, method="lrp").run(images)
    with pytest.raises(CnnvisError, match="C×H×W"):
        sal.Saliency(model, method="gradcam", layer="fc").run(images)
    with pytest.raises(CnnvisError, match="class"):
        sal.Saliency(model).run(images, target=9)


def test_constructor_only_stores_its_parameters(model):
    s = sal.Saliency(model, method="lrp", layer="nope", batch_size=3)  # checked by run(), not here
    assert s.get_params() == {"method": "lrp", "layer": "nope", "batch_size": 3} and s.model is model


def test_cli_saliency_writes_maps_deterministically(tmp_path):
    # the CLI shows 1- or 3-channel inputs: a 1-channel copy of the hand model
    one = _one_channel_model()
    path = tmp_path / "one.onnx"
    path.write_bytes(one.SerializeToString())
    x = np.random.default_rng(3).standard_normal((2, 1, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        code = main(["saliency", "--model", str(path), "--input-array", str(tmp_path / "x.npy"), "--out", str(out),
                     "--layer", "relu"])
        assert code == 0
        outs.append(out)
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    files = {f["path"] for f in manifest["runs"]["saliency"]["files"]}
    for method in ("gradient", "guided", "gradcam"):
        assert f"x[0]/{method}_overlay.png" in files and f"x[1]/{method}_heatmap.npy" in files
    assert "x[0]/gradcam_cam.npy" in files and "x[0]/guided_gradient.png" in files
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    summary = json.loads((outs[0] / "saliency.json").read_text())
    m = Model(one, name="one")
    ref = sal.Saliency(m, method="gradcam", layer="relu").run(x)
    assert [r["class"] for r in summary["images"]] == ref.targets.tolist()
    np.testing.assert_allclose(np.load(outs[0] / "x[1]/gradcam_heatmap.npy"), ref.heatmap[1], rtol=1e-6)
    # each heat map picture is its map: every pixel's cell is jet of the min-max scaled value
    from matplotlib import colormaps
    from PIL import Image

    for method in ("gradient", "guided", "gradcam"):
        heat = np.load(outs[0] / f"x[1]/{method}_heatmap.npy").astype(np.float64)
        pic = np.asarray(Image.open(outs[0] / f"x[1]/{method}_heatmap.png").convert("RGB")).astype(int)
        zoom = pic.shape[0] // 6
        assert pic.shape[:2] == (6 * zoom, 6 * zoom) and 6 * zoom >= 224
        expected = colormaps["jet"]((heat - heat.min()) / (heat.max() - heat.min()))[..., :3]
        np.testing.assert_allclose(pic[zoom // 2::zoom, zoom // 2::zoom], np.rint(255 * expected), atol=1)
    assert main(["saliency", "--model", str(path), "--input-array", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "bad"), "--layer", "fc"]) == 2


def _one_channel_model():
    m = hand_model()
    for init in m.graph.initializer:
        if init.name == "cw":
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(W_CONV[:, :1]), "cw"))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    return m
