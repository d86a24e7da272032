"""`cnnvis evolution`: checkpoint order, grid layout (rows = maps, columns = checkpoints), contents."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cnnvis.cli import main
from cnnvis.cli.projections import checkpoint_files
from cnnvis.errors import CnnvisError
from cnnvis.onnxgraph import make_model


def checkpoint(weights, maps=3):
    """grey 1×10×10 → conv1 (maps × 3×3, pad 1) → relu1 → GAP → Flatten."""
    nodes = [helper.make_node("Conv", ["data", "w"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["relu1"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["prob"], name="flat")]
    graph = helper.make_graph(nodes, "ckpt", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 1, 10, 10])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", maps])],
                              [numpy_helper.from_array(weights.astype(np.float32), "w")])
    return make_model(graph)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    rng = np.random.default_rng(0)
    weights = {}
    for epoch in (10, 1, 2):  # written out of order; "ep10" sorts before "ep2" by name
        w = rng.normal(size=(3, 1, 3, 3))
        weights[epoch] = w
        onnx.save(checkpoint(w), folder / f"ep{epoch}.onnx")
    x = rng.uniform(size=(5, 1, 10, 10)).astype(np.float32)
    np.save(folder / "x.npy", x)
    return folder, weights, x


def _relu_conv(x, w):
    xp = np.pad(x[:, 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((len(x), len(w), 10, 10))
    for i in range(3):
        for j in range(3):
            out += np.einsum("m,nhw->nmhw", w[:, 0, i, j], xp[:, i:i + 10, j:j + 10])
    return np.maximum(out, 0)


def test_checkpoint_order(ckpts, tmp_path):
    folder, _, _ = ckpts
    assert [n for n, _ in checkpoint_files([folder])] == [1, 2, 10]
    assert [p.name for _, p in checkpoint_files([folder / "ep10.onnx", folder / "ep2.onnx"])] == ["ep2.onnx", "ep10.onnx"]
    (tmp_path / "final.onnx").write_bytes((folder / "ep1.onnx").read_bytes())
    with pytest.raises(CnnvisError, match="expected a number in the file name"):
        checkpoint_files([tmp_path / "final.onnx"])
    with pytest.raises(CnnvisError, match="no such file"):
        checkpoint_files([tmp_path / "missing.onnx"])


def test_evolution_grid(ckpts, tmp_path, capsys):
    folder, weights, x = ckpts
    out = tmp_path / "out"
    argv = ["evolution", "--checkpoints", str(folder), "--input-array", str(folder / "x.npy"),
            "--layer", "relu1", "--maps", "all", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((out / "relu1_evolution.json").read_text())
    assert [c["number"] for c in data["checkpoints"]] == [1, 2, 10]
    assert data["grid"]["rows"] == 3 and data["grid"]["cols"] == 3  # rows = maps, cols = checkpoints
    proj = np.load(out / "relu1_evolution.npy")
    assert proj.shape == (3, 3, 1, 3, 3)  # maps × checkpoints × C × receptive field
    for col, epoch in enumerate([1, 2, 10]):
        acts = _relu_conv(x, weights[epoch])
        for m in range(3):
            rec = data["checkpoints"][col]["records"][m]
            flat = acts[:, m].reshape(-1)
            best = int(np.argmax(flat))  # first maximum in (image, y, x) order
            assert (rec["image"], rec["y"], rec["x"]) == (best // 100, best // 10 % 10, best % 10)
            np.testing.assert_allclose(rec["value"], flat[best], rtol=1e-5)
            # a first-layer projection is the unit's filter scaled by its activation (cropped at borders)
            want = rec["value"] * weights[epoch][m, 0]
            crop = proj[m, col, 0]
            inside = ~np.isnan(crop)
            assert inside.sum() >= 4  # a border crop keeps most of a 3x3 filter
            np.testing.assert_allclose(crop[inside], want[inside], rtol=1e-5, atol=1e-6)
    # pixel check of the layout: the bottom-right pixel of tile (map m, checkpoint c) shows
    # that tile's normalised bottom-right value (labels are written top-left)
    png = np.asarray(Image.open(out / "relu1_evolution.png").convert("L"), dtype=np.float64)
    scale, pad = data["grid"]["scale"], 2
    assert png.shape == ((3 * 3 + 2 * pad) * scale, (3 * 3 + 2 * pad) * scale)
    checked = 0
    for m in range(3):
        for col in range(3):
            tile = proj[m, col, 0]
            if np.isnan(tile[2, 2]):
                continue
            checked += 1
            lo, hi = np.nanmin(tile), np.nanmax(tile)
            y = (m * (3 + pad) + 3) * scale - 1
            xx = (col * (3 + pad) + 3) * scale - 1
            expected = 0 if hi == lo else round((tile[2, 2] - lo) / (hi - lo) * 255)  # a dead map is black
            assert abs(png[y, xx] - expected) <= 1
    assert checked >= 3
    first = (out / "relu1_evolution.png").read_bytes(), (out / "relu1_evolution.npy").read_bytes()
    assert main(argv) == 0
    assert ((out / "relu1_evolution.png").read_bytes(), (out / "relu1_evolution.npy").read_bytes()) == first


def test_evolution_refuses_other_architectures(ckpts, tmp_path, capsys):
    folder, _, _ = ckpts
    onnx.save(checkpoint(np.ones((4, 1, 3, 3)), maps=4), tmp_path / "ep3.onnx")
    code = main(["evolution", "-c", str(folder / "ep1.onnx"), str(tmp_path / "ep3.onnx"), "--input-array",
                 str(folder / "x.npy"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "ep3.onnx: a different architecture" in err
