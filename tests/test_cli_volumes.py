"""`cnnvis volume`, `cnnvis order`, `cnnvis render` on a tiny ONNX model built here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.cli import main
from cnnvis.export import volumes as V
from cnnvis.onnxgraph import make_model

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(size=(6, 3, 3, 3)).astype(np.float32)
BIAS = RNG.normal(size=6).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A conv (6 maps, 3×3, pad 1) → ReLU → global pool classifier on 3×10×12 inputs."""
    folder = tmp_path_factory.mktemp("tiny")
    nodes = [helper.make_node("Conv", ["data", "w", "b"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["relu1"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["prob"], name="flat")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 10, 12])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS, "b")])
    path = folder / "tiny.onnx"
    onnx.save(make_model(graph), path)
    batch = np.random.default_rng(1).normal(size=(3, 3, 10, 12)).astype(np.float32)
    np.save(folder / "x.npy", batch)
    return path, folder / "x.npy", batch


def conv1_f64(x):
    """3×3 convolution with padding 1 in float64 (cross-correlation, as ONNX defines it)."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((6, 10, 12))
    for i in range(3):
        for j in range(3):
            out += np.einsum("oc,chw->ohw", WEIGHT[:, :, i, j].astype(np.float64),
                             xp[:, i:i + 10, j:j + 12])
    return out + BIAS[:, None, None]


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tiny_model_loads_in_onnxruntime(tiny):
    import onnxruntime as ort

    path, _, batch = tiny
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"data": batch[:1]})[0].shape == (1, 6)


def test_volume_from_model_matches_float64_convolution(tiny, tmp_path, capsys):
    model, x_path, batch = tiny
    code, out, err = _run(["volume", "--model", str(model), "--input-array", str(x_path),
                           "--spacing", "1", "1", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    folder = tmp_path / "x[1]"
    assert sorted(p.name for p in folder.iterdir()) == [
        "conv1.hd", "conv1.hdf", "conv1.npy", "conv1.vox", "conv1.vti", "conv1_paraview.py"]
    ref = conv1_f64(batch[1])
    for suffix in (".hdf", ".vti", ".npy"):
        vol = V.read_volume(folder / f"conv1{suffix}")
        assert vol.values.shape == (6, 10, 12)
        np.testing.assert_allclose(vol.values, ref, rtol=0, atol=1e-5)
    meta = V.read_volume(folder / "conv1.hdf").metadata
    assert meta["layer"] == "conv1" and meta["image"] == "x[1]" and meta["model"] == "tiny.onnx"
    assert V.read_volume(folder / "conv1.vti").spacing == (1.0, 1.0, 2.0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["runs"]["volume"]["files"]}
    assert "x[0]/conv1_paraview.py" in paths and "x[2]/conv1.hd" in paths and len(paths) == 18


def test_volume_reduce_mean_and_layer_choice(tiny, tmp_path, capsys):
    model, x_path, batch = tiny
    code, _, err = _run(["volume", "--model", str(model), "--input-array", str(x_path),
                         "--layer", "relu1", "--reduce", "mean", "-f", "npy",
                         "--batch-size", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    ref = np.mean([np.maximum(conv1_f64(img), 0) for img in batch], axis=0)
    np.testing.assert_allclose(np.load(tmp_path / "mean" / "relu1.npy"), ref, atol=1e-5)


def test_volume_from_images(tiny, tmp_path, capsys):
    from PIL import Image

    model, _, _ = tiny
    image = tmp_path / "in" / "pic.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image)
    code, _, err = _run(["volume", "--model", str(model), str(image), "-f", "hdf",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    from cnnvis import preprocess
    from cnnvis.model import Model

    batch = preprocess.load_batch([image], preprocess.for_model(Model.from_file(model)))
    values = V.read_volume(tmp_path / "out" / "pic" / "conv1.hdf").values
    assert values.shape == (6, 10, 12)
    np.testing.assert_allclose(values, conv1_f64(batch[0]), rtol=0, atol=1e-5)


def test_order_of_a_stack_array_and_reuse_of_its_permutation(tmp_path, capsys):
    from cnnvis.analysis.ordering import order_stack

    rng = np.random.default_rng(3)
    stack = rng.normal(size=(3, 5, 6))[np.repeat(np.arange(3), 4)] + 0.05 * rng.normal(size=(12, 5, 6))
    stack = stack[rng.permutation(12)].astype(np.float32)
    np.save(tmp_path / "stack.npy", stack)
    code, out, err = _run(["order", "--input-array", str(tmp_path / "stack.npy"), "--method",
                           "kmeans-maps", "-k", "3", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "kmeans-maps smoothness" in out
    folder = tmp_path / "o" / "stack" / "kmeans-maps"
    result = json.loads((folder / "order.json").read_text())
    expected = order_stack(stack, "kmeans-maps", n_clusters=3)
    assert result["permutation"] == expected["permutation"]
    assert result["smoothness"] == pytest.approx(expected["smoothness"], rel=1e-6)
    assert result["cluster_sizes"] == [4, 4, 4]
    np.testing.assert_array_equal(np.load(folder / "volume_ordered.npy"),
                                  stack[result["permutation"]])
    assert V.read_volume(folder / "volume_ordered.hdf").metadata["ordering"] == "kmeans-maps"
    assert (folder / "before_after.png").stat().st_size > 0
    code, _, err = _run(["volume", "--volume", str(tmp_path / "stack.npy"), "--permutation",
                         str(folder / "order.json"), "-f", "hdf", "--out", str(tmp_path / "v")],
                        capsys)
    assert code == 0, err
    vol = V.read_volume(tmp_path / "v" / "stack" / "volume.hdf")
    np.testing.assert_array_equal(vol.values, stack[result["permutation"]])
    np.testing.assert_array_equal(vol.arrays["channel"][:, 0, 0], result["permutation"])


def test_order_rows_writes_the_slice_picture(tiny, tmp_path, capsys):
    model, x_path, _ = tiny
    code, _, err = _run(["order", "--model", str(model), "--input-array", str(x_path),
                         "--method", "kmeans-rows", "-k", "2", "--row", "3", "-f", "npy",
                         "--out", str(tmp_path)], capsys)
    assert code == 0, err
    folder = tmp_path / "x[0]" / "kmeans-rows"
    assert sorted(p.name for p in folder.iterdir()) == [
        "before_after.png", "conv1_ordered.npy", "order.json", "slice_row3.png"]
    assert json.loads((folder / "order.json").read_text())["row"] == 3


def test_weight_array_volume_with_tiles_layout(tmp_path, capsys):
    np.save(tmp_path / "grad.npy", WEIGHT)  # 6×3×3×3, like conv1 weight gradients
    code, _, err = _run(["volume", "--volume", str(tmp_path / "grad.npy"), "--layout", "tiles",
                         "--normalization", "symmetric", "-f", "vti", "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 0, err
    vol = V.read_volume(tmp_path / "o" / "grad" / "volume.vti")
    assert vol.values.shape == (6, 3, 9)
    np.testing.assert_array_equal(vol.values[4, :, 3:6], WEIGHT[4, 1])


def test_render_command(tmp_path, capsys):
    from cnnvis.export.render import gl_problem

    problem = gl_problem()
    if problem:
        pytest.skip(f"no OpenGL here: {problem}")
    stack = np.random.default_rng(4).random((5, 8, 9)).astype(np.float32)
    V.write_volume(tmp_path / "s.hdf", stack, metadata={"layer": "conv1"})
    code, out, err = _run(["render", "--volume", str(tmp_path / "s.hdf"), "--mode", "slices",
                           "--mode", "threshold", "--gif", "--frames", "2", "--window-size",
                           "96", "96", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "r" / "s").iterdir())
    assert names == ["conv1_slices.png", "conv1_slices_orbit.gif", "conv1_threshold.png"]


def test_render_show_opens_a_window_per_stack_and_mode_and_writes_nothing(tmp_path, x_display):
    """--show on a real X server (Xvfb): the window is drawn (its content captured where the
    interactive loop would start), once per mode, and no file is written."""
    import os

    stack = np.zeros((4, 12, 14), np.float32)
    stack[:, 2:6, 3:8] = 1.0
    np.save(tmp_path / "s.npy", stack)
    shots = tmp_path / "shots"
    shots.mkdir()
    code = (
        "import sys, numpy as np, pyvista as pv\n"
        "count, interactive_show = [], pv.Plotter.show\n"
        "def show(self, *args, **kwargs):\n"
        "    assert not self.off_screen and not args and not kwargs\n"
        "    interactive_show(self, interactive=False, auto_close=False)  # draw, but no event loop\n"
        "    np.save(f'{sys.argv[1]}/{len(count)}.npy', self.screenshot(return_img=True))\n"
        "    count.append(1)\n"
        "pv.Plotter.show = show\n"
        "from cnnvis.cli import main\n"
        "sys.exit(main(sys.argv[2:]))\n")
    env = {k: v for k, v in os.environ.items() if k != "VTK_DEFAULT_OPENGL_WINDOW"}
    env.update(DISPLAY=x_display, PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", code, str(shots), "render", "--input-array", str(tmp_path / "s.npy"),
                           "--show", "--mode", "slices", "--mode", "threshold", "--window-size", "160", "120",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode == 2 and "OpenGL libraries for a window are missing" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-2000:]
    pictures = [np.load(shots / f"{i}.npy") for i in range(2)]
    assert sorted(p.name for p in shots.iterdir()) == ["0.npy", "1.npy"]
    for picture in pictures:
        assert picture.shape[:2] == (120, 160) and picture[..., :3].std() > 10  # drawn, not blank
    # the threshold window shows the block's cells (the only coloured things above the colour
    # bar) in the upper left of the drawing, where the block is in the stack (rows 2-5 of 12,
    # columns 3-7 of 14), also under the default oblique camera
    rgb = pictures[1][:90, :, :3].astype(int)  # rows 90 and below: the colour bar and its labels
    (top, left), (bottom, right) = (f(np.argwhere(rgb.max(axis=2) < 235), axis=0) for f in (np.min, np.max))
    ys, xs = np.nonzero(np.ptp(rgb, axis=2) > 60)
    assert ys.size > 200
    assert (xs.mean() - left) / (right - left) < 0.4 and (ys.mean() - top) / (bottom - top) < 0.45
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["order", "--method", "kmeans-maps", "-k", "9"], "--clusters 9: more clusters than the 7"),
    (["order", "--method", "pca-rows", "--row", "5"], "--row 5: the maps of stack have 5 rows"),
    (["volume", "--spacing", "1", "0", "1"], "spacing"),
    (["volume", "--threshold", "3"], "--threshold: expected a number in [0, 1], got '3'"),
])
def test_bad_arguments_fail_with_one_line_and_no_files(tmp_path, capsys, argv, message):
    np.save(tmp_path / "stack.npy", np.random.default_rng(5).normal(size=(7, 5, 6)))
    out = tmp_path / "out"
    code, _, err = _run([*argv, "--input-array", str(tmp_path / "stack.npy"), "--out", str(out)],
                        capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_sources(tiny, tmp_path, capsys):
    model, x_path, _ = tiny
    code, _, err = _run(["render", "--model", str(model), "--layer", "flat", "--input-array",
                         str(x_path), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--layer flat: outputs shape (6,) per image" in err
    code, _, err = _run(["volume", "--volume", str(tmp_path / "none.vox"), "--out",
                         str(tmp_path / "b")], capsys)
    assert code == 2 and "--volume" in err and "no such file" in err
    code, _, err = _run(["volume", "--volume", str(x_path), str(x_path), "--out",
                         str(tmp_path / "c")], capsys)
    assert code == 2 and "not both" in err
    (tmp_path / "p.json").write_text('{"permutation": [0, 1]}')
    code, _, err = _run(["volume", "--model", str(model), "--input-array", str(x_path),
                         "--permutation", str(tmp_path / "p.json"), "--out", str(tmp_path / "d")],
                        capsys)
    assert code == 2 and "expected a permutation of 0..5" in err
    assert not list((tmp_path / "d").iterdir())


def test_scripts_are_thin_wrappers(tmp_path):
    np.save(tmp_path / "stack.npy", np.random.default_rng(6).normal(size=(6, 4, 5)))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "04_pca_order.py"), "--input-array",
                          str(tmp_path / "stack.npy"), "-f", "npy", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "stack" / "pca-maps" / "order.json").is_file()
    for name in ("02_export_volumes.py", "03_kmeans_order.py", "07_render_3d.py"):
        text = (ROOT / "scripts" / name).read_text()
        assert "from cnnvis.cli import main" in text and "sys.exit(main([" in text


def _format_choices(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if a.dest == "format")


def test_cli_volume_formats_are_the_registry():
    from cnnvis.cli import build_parser

    parser = build_parser()
    for command in ("volume", "order", "conv-gradients", "compare-classes"):
        action = _format_choices(parser, command)
        assert list(action.choices) == ["hdf", "vti", "vox", "npy"] == list(V.FORMATS), command
        assert "default: all of hdf, vti, vox, npy" in action.help


def test_a_format_added_to_the_registry_is_written_read_and_offered_by_the_cli(tmp_path, monkeypatch):
    """One registry entry (with its writer and reader) is all the CLI needs: ``--format``, the
    default of every format, the written files with their companions and the manifest's kinds."""
    def write_txt(path, prep):
        nz, ny, nx = prep.values.shape
        V.write_text(path, "\n".join(" ".join(repr(float(v)) for v in row)
                                      for row in prep.values.reshape(nz * ny, nx)) + "\n")
        V.write_text(path.with_name(path.stem + ".shape"), f"{nz} {ny} {nx}\n")
        return [path, path.with_name(path.stem + ".shape")]

    def read_txt(path):
        nz, ny, nx = (int(v) for v in path.with_name(path.stem + ".shape").read_text().split())
        return V.VolumeData(values=np.loadtxt(path, ndmin=2).reshape(nz, ny, nx))

    monkeypatch.setitem(V.FORMATS, "txt", V.VolumeFormat("txt", ".txt", write_txt, read_txt, "text volume",
                                                         ((".shape", "its shape"),)))
    stack = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) / 7.0
    np.save(tmp_path / "s.npy", stack)
    assert V.format_of(tmp_path / "a.txt") == "txt"
    assert V.companion_paths(tmp_path / "a.txt") == [tmp_path / "a.shape"]
    assert V.file_notes()[".txt"] == "text volume" and V.file_notes()[".shape"] == "its shape"
    code = main(["volume", "--input-array", str(tmp_path / "s.npy"), "-f", "txt", "-f", "npy",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "o" / "s").iterdir())
    assert written == ["volume.npy", "volume.shape", "volume.txt"]
    np.testing.assert_array_equal(V.read_stack(tmp_path / "o" / "s" / "volume.txt"), stack)
    kinds = {e["path"]: e["kind"] for e in json.loads((tmp_path / "o" / "manifest.json").read_text())
             ["runs"]["volume"]["files"]}
    assert kinds["s/volume.txt"] == "volume-txt" and kinds["s/volume.shape"] == "volume-txt-companion"
    every = V.write_volumes(tmp_path / "all", stack)  # the default: every format, the new one too
    assert [p.name for p in every] == ["all.hdf", "all_paraview.py", "all.vti", "all.vox", "all.hd",
                                       "all.npy", "all.txt", "all.shape"]
