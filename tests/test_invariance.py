"""Invariance sweeps: exact transforms by hand, distance 0 at the identity and growing for a model
that is not invariant, default layers, and the CLI tables."""
import csv
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis import invariance as inv
from cnnvis.cli import main
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.nets import NetBuilder
from cnnvis.onnxgraph import make_model
from cnnvis.preprocess import preset


def identity_model(size=21):
    """1×S×S → relu(1×1 conv, weight 1) → flatten → fc: layer 'relu' is the image itself."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["data", "cw", "cb"], ["conv"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    inits = {"cw": np.ones((1, 1, 1, 1)), "cb": np.zeros(1), "fw": rng.standard_normal((3, size * size)) * 0.1,
             "fb": np.zeros(3)}
    graph = helper.make_graph(
        nodes, "id", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    proto = make_model(graph)
    side = {"preprocessing": preset("grey28", (1, size, size), mean=[0.5]).to_dict()}
    return Model(proto, name="id", sidecar=side), proto


def blob(size=21, sy=2.0, sx=4.0):
    """An elongated Gaussian centred in the image (not rotation invariant)."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return np.exp(-(yy ** 2) / (2 * sy ** 2) - (xx ** 2) / (2 * sx ** 2))[None].astype(np.float32)


def test_identity_transforms_return_the_input_exactly():
    x = np.random.default_rng(0).standard_normal((3, 9, 11)).astype(np.float32)
    for kind, amount in (("translation", 0), ("scale", 1.0), ("rotation", 0.0), ("rotation", 360.0)):
        assert np.array_equal(inv.transform_image(x, kind, amount, fill=7.0), x), (kind, amount)


def test_translation_scale_rotation_by_hand():
    x = np.arange(25, dtype=np.float32).reshape(1, 5, 5)
    down = inv.transform_image(x, "translation", 2, fill=-1.0)
    assert (down[0, :2] == -1).all() and np.array_equal(down[0, 2:], x[0, :3])
    right = inv.transform_image(x, "translation", -1, fill=-1.0, axis="horizontal")
    assert np.array_equal(right[0, :, :4], x[0, :, 1:]) and (right[0, :, 4] == -1).all()
    # enlarged twice about the centre (2, 2): output pixel (0, 0) reads input (1, 1)
    big = inv.transform_image(x, "scale", 2.0, fill=-1.0)
    assert big[0, 0, 0] == x[0, 1, 1] and big[0, 2, 2] == x[0, 2, 2] and big[0, 4, 4] == x[0, 3, 3]
    assert big[0, 1, 1] == pytest.approx((x[0, 1, 1] + x[0, 1, 2] + x[0, 2, 1] + x[0, 2, 2]) / 4)
    # a quarter turn counter-clockwise: the top-centre pixel goes to the left-centre
    dot = np.zeros((1, 5, 5), np.float32)
    dot[0, 0, 2] = 1.0
    turned = inv.transform_image(dot, "rotation", 90, fill=0.0)
    expected = np.zeros((1, 5, 5), np.float32)
    expected[0, 2, 0] = 1.0
    np.testing.assert_array_equal(turned, expected)
    np.testing.assert_array_equal(inv.transform_image(x, "rotation", 180, fill=0.0), x[:, ::-1, ::-1])
    with pytest.raises(CnnvisError, match="scale"):
        inv.transform_image(x, "scale", 0.0)
    with pytest.raises(CnnvisError, match="transform"):
        inv.transform_image(x, "shear", 1.0)


def test_feature_distance_by_hand():
    ref = np.array([3.0, 4.0])
    d = inv.feature_distance(np.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]]), ref)
    np.testing.assert_allclose(d, [0.0, 1.0, 1.0])
    assert inv.feature_distance(np.zeros((1, 2)), np.zeros(2)).tolist() == [0.0]


def test_distance_is_zero_at_identity_and_grows_for_a_non_invariant_model():
    model, _ = identity_model()
    x = blob()
    amounts = {"translation": [-4, -2, -1, 0, 1, 2, 4], "scale": [0.6, 0.8, 1.0, 1.25, 1.6],
               "rotation": [0, 15, 30, 60, 90]}
    res = inv.Invariance(model, layers=["relu", "fc"], amounts=amounts).run(x[None])[0]
    base_prob = model.predict(x[None])[0]
    for kind, values in amounts.items():
        values = np.asarray(values, float)
        at0 = int(np.flatnonzero(values == (1.0 if kind == "scale" else 0.0))[0])
        for layer in ("relu", "fc"):
            assert res.distance[kind][layer][at0] == 0.0
        assert res.probability[kind][at0] == pytest.approx(base_prob[res.target], rel=1e-6)
        d = res.distance[kind]["relu"]
        # 'relu' is the image (minus the grey of the preprocessing mean, 0.5 here, at uncovered pixels)
        for i, a in enumerate(values):
            fill = 0.0  # the mean of the preprocessing is the grey: 0 in input space
            t = inv.transform_image(x, kind, a, fill=fill)
            assert d[i] == pytest.approx(np.linalg.norm(np.maximum(t, 0) - x) / np.linalg.norm(x), rel=1e-5, abs=1e-7)
        # moving further away from the identity moves the features further away
        order = np.argsort(np.abs(np.log(values)) if kind == "scale" else np.abs(values), kind="stable")
        for side in (values <= (1.0 if kind == "scale" else 0.0), values >= (1.0 if kind == "scale" else 0.0)):
            picked = [i for i in order if side[i]]
            assert np.all(np.diff(d[picked]) > 0), (kind, d[picked])
    rows = res.rows("blob")
    assert len(rows) == 17 and rows[0]["image"] == "blob" and "distance_relu" in rows[0]


def test_transformed_is_the_sweep_that_run_measures():
    model, _ = identity_model()
    x = blob()
    analysis = inv.Invariance(model, layers=["relu"], amounts={"translation": [-3, 0, 5], "scale": [], "rotation": []})
    assert analysis.layer_names() == ["relu"] and list(analysis.sweeps()) == ["translation"]
    batch = analysis.transformed(x, "translation")
    assert batch.shape == (3, *x.shape)
    for t, a in zip(batch, [-3, 0, 5]):
        np.testing.assert_array_equal(t, inv.transform_image(x, "translation", a, fill=0.0))
    # layer 'relu' is the image: run's distances are those of exactly these images
    keeping = inv.Invariance(model, layers=["relu"], amounts={"translation": [-3, 0, 5], "scale": [], "rotation": []},
                             keep_inputs=True)
    res = keeping.run(x[None])[0]
    expected = [np.linalg.norm(np.maximum(t, 0) - x) / np.linalg.norm(x) for t in batch]
    np.testing.assert_allclose(res.distance["translation"]["relu"], expected, rtol=1e-5)
    np.testing.assert_array_equal(res.inputs["translation"], batch)
    assert analysis.run(x[None])[0].inputs is None
    # a batch is its images one by one, each with its own target
    pair = keeping.run(np.stack([x, -x]), target=[0, 1])
    assert len(pair) == 2 and [c.target for c in pair] == [0, 1]
    np.testing.assert_allclose(pair[0].distance["translation"]["relu"], expected, rtol=1e-5)
    alone = keeping.run(-x[None], target=1)[0]
    np.testing.assert_array_equal(pair[1].probability["translation"], alone.probability["translation"])
    np.testing.assert_array_equal(analysis.transformed(x, "rotation", [0.0])[0], x)


def test_default_layers_and_amounts():
    b = NetBuilder((3, 32, 32), seed=0)
    b.conv("conv1", 4, 5, stride=2)
    b.relu("relu1")
    b.max_pool("pool1", 3, 2)
    b.fc("fc6", 8)
    b.relu("relu6")
    b.dropout("drop6")
    b.fc("fc7", 5)
    b.softmax()
    model = Model(b.build("net"), name="net")
    assert inv.default_layers(model) == ["relu1", "relu6"]
    tr = inv.default_amounts("translation", (32, 32))
    assert tr[0] == -8 and tr[-1] == 8 and 0 in tr and np.all(np.diff(tr) > 0)
    assert inv.default_amounts("scale", (32, 32))[0] == 0.6 and 1.0 in inv.default_amounts("scale", (32, 32))
    assert inv.default_amounts("rotation", (32, 32)).tolist() == list(np.arange(0.0, 361.0, 30.0))
    with pytest.raises(CnnvisError, match="transforms"):
        inv.Invariance(model, amounts={"shear": [1]}).sweeps()


def test_cli_invariance_tables_and_determinism(tmp_path):
    _, proto = identity_model(size=16)
    path = tmp_path / "id.onnx"
    path.write_bytes(proto.SerializeToString())
    (tmp_path / "id.onnx.json").write_text(json.dumps(
        {"preprocessing": preset("grey28", (1, 16, 16), mean=[0.5]).to_dict()}))
    x = np.stack([blob(16), blob(16, 3.0, 1.5)])
    np.save(tmp_path / "x.npy", x)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["invariance", "--model", str(path), "--input-array", str(tmp_path / "x.npy"), "--out", str(out),
                     "--translations=-2,0,2", "--scales", "1,1.5", "--rotations", "", "--layer", "relu"]) == 0
        outs.append(out)
    with open(outs[0] / "invariance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (3 + 2)
    assert {r["transform"] for r in rows} == {"translation", "scale"}
    zero = [r for r in rows if r["transform"] == "translation" and float(r["amount"]) == 0]
    assert [float(r["distance_relu"]) for r in zero] == [0.0, 0.0]
    data = json.loads((outs[0] / "invariance.json").read_text())
    assert data["layers"] == ["relu"] and len(data["records"]) == 10
    for name in ("invariance.csv", "invariance.json", "invariance.png", "examples/x[0]_translation.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    # the example tiles show the blob moved down by -2, 0, 2 pixels, then enlarged 1 and 1.5 times
    from PIL import Image

    def tiles(name, n):
        grey = np.asarray(Image.open(outs[0] / "examples" / name).convert("L")).astype(np.float64)
        scale = grey.shape[1] // (n * 16 + n - 1)
        assert grey.shape == (16 * scale, (n * 16 + n - 1) * scale)
        return [grey[scale // 2::scale, t * 17 * scale + scale // 2:(t * 17 + 16) * scale:scale] for t in range(n)]

    def centre_and_spread(tile):
        w = tile - tile.min()
        rows, cols = np.mgrid[:16, :16]
        cy, cx = (w * rows).sum() / w.sum(), (w * cols).sum() / w.sum()
        return cy, cx, (w * (rows - cy) ** 2).sum() / w.sum()

    moved = [centre_and_spread(t) for t in tiles("x[0]_translation.png", 3)]
    np.testing.assert_allclose([m[0] - moved[1][0] for m in moved], [-2.0, 0.0, 2.0], atol=0.25)
    np.testing.assert_allclose([m[1] for m in moved], 7.5, atol=0.25)
    assert abs(moved[1][0] - 7.5) < 0.25  # no shift: the blob stays centred
    one, big = (centre_and_spread(t) for t in tiles("x[0]_scale.png", 2))
    assert big[2] > 1.8 * one[2]  # 1.5 times larger: about 2.25 times the variance along the rows
    assert main(["invariance", "--model", str(path), "--input-array", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "bad"), "--layer", "nope"]) == 2


def test_top_hidden_layer_looks_through_squeeze_and_transpose():
    """conv relu GAP → Transpose → Squeeze → Gemm: the layer feeding the logits is the pooling
    ('gap'), not the Squeeze or Transpose that only relabel its values (ops.VALUE_PRESERVING_OPS);
    the two name the same features, so the distances agree."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["data", "cw", "cb"], ["conv"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
             helper.make_node("Transpose", ["gap"], ["nhwc"], name="nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Squeeze", ["nhwc", "axes"], ["vec"], name="vec"),
             helper.make_node("Gemm", ["vec", "fw", "fb"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in
             {"cw": rng.standard_normal((4, 1, 3, 3)), "cb": np.zeros(4), "fw": rng.standard_normal((3, 4)),
              "fb": np.zeros(3)}.items()]
    inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    graph = helper.make_graph(
        nodes, "sq", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 1, 12, 12])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 3])], inits)
    model = Model(make_model(graph), name="sq",
                  sidecar={"preprocessing": preset("grey28", (1, 12, 12), mean=[0.5]).to_dict()})
    assert [layer.name for layer in model.layers][2:5] == ["gap", "nhwc", "vec"]
    assert inv.top_hidden_layer(model) == "gap"
    assert inv.default_layers(model) == ["relu", "gap"]
    x = blob(12)[None]
    amounts = {"rotation": [0.0, 90.0]}
    pooled = inv.Invariance(model, layers=["gap"], amounts=amounts).run(x, target=0)[0]
    squeezed = inv.Invariance(model, layers=["vec"], amounts=amounts).run(x, target=0)[0]
    np.testing.assert_allclose(pooled.distance["rotation"]["gap"], squeezed.distance["rotation"]["vec"], rtol=1e-6)
    assert pooled.distance["rotation"]["gap"][1] > 0
