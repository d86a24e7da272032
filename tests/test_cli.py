"""The CLI surface: core commands, numbered scripts, bad input (one line, exit 2, nothing written)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from cnnvis import nets
from cnnvis.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    b = nets.NetBuilder((3, 16, 16), seed=5)
    b.conv("conv1", 6, 3, pad=1)
    b.relu("relu1")
    b.max_pool("pool1", 2, 2)
    b.fc("fc1", 4)
    b.softmax("prob")
    path = d / "tiny.onnx"
    path.write_bytes(b.build("tiny").SerializeToString())
    (d / "tiny.onnx.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"], "trained": False,
                                                   "preprocessing": {"preset": "raw"}}))
    rng = np.random.default_rng(0)
    imgs = d / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return {"model": str(path), "imgs": imgs, "dir": d}


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())


def test_layers_table_and_json(tiny, capsys):
    code, out, _ = run(["layers", "--model", tiny["model"]], capsys)
    assert code == 0
    assert re.search(r"conv1\s+Conv\s+6×16×16\s+6×3×3×3\s+6\s+168\s+", out)
    assert "UNTRAINED" in out
    code, out, _ = run(["layers", "--model", tiny["model"], "--json"], capsys)
    data = json.loads(out)
    assert [layer["name"] for layer in data["layers"]][:3] == ["conv1", "relu1", "pool1"]


def test_activations_writes_grids_stacks_and_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "act"
    code, _, err = run(["activations", str(tiny["imgs"]), "--model", tiny["model"], "--layer", "conv1",
                        "--layer", "prob", "--out", str(out)], capsys)
    assert code == 0, err
    assert "UNTRAINED" in err
    for i in range(3):
        for name in ("conv1.png", "conv1.npy", "prob.png", "prob.npy", "activations.h5"):
            assert (out / f"im{i}" / name).is_file()
    stack = np.load(out / "im0" / "conv1.npy")
    assert stack.shape == (6, 16, 16)
    with h5py.File(out / "im0" / "activations.h5") as h5:
        np.testing.assert_array_equal(h5["conv1"][()], stack)
        assert h5.attrs["image"] == "im0"
        assert json.loads(h5.attrs["preprocessing"])["preset"] == "raw" and h5.attrs["model_sha256"]
    manifest = json.loads((out / "manifest.json").read_text())["runs"]["activations"]
    assert manifest["params"]["layers"] == ["conv1", "prob"]
    assert {f["kind"] for f in manifest["files"]} == {"grid", "stack", "stack-hdf5"}
    assert manifest["model"]["sha256"] and manifest["model"]["trained"] is False
    # the picture: tile k of the grid (2 rows × 3 columns, 1-pixel separators) is channel k of the
    # stack, min-max scaled on its own, through viridis
    from matplotlib import colormaps

    grid = next(f["grid"] for f in manifest["files"] if f["path"] == "im0/conv1.npy")
    assert (grid["rows"], grid["cols"]) == (2, 3)
    img = np.asarray(Image.open(out / "im0" / "conv1.png").convert("RGB")).astype(int)
    s = grid["scale"]
    assert img.shape == ((2 * 16 + 1) * s, (3 * 16 + 2) * s, 3)
    for k in range(6):
        r, c = divmod(k, 3)
        tile = img[r * 17 * s:(r * 17 + 16) * s:s, c * 17 * s:(c * 17 + 16) * s:s]
        m = stack[k].astype(np.float64)
        norm = (m - m.min()) / (m.max() - m.min())
        np.testing.assert_allclose(tile, np.rint(colormaps["viridis"](norm)[..., :3] * 255), atol=1)


def test_rerun_gives_identical_files(tiny, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert run(["activations", str(tiny["imgs"]), "--model", tiny["model"], "--out", str(out)], capsys)[0] == 0
    names = [f for f in files_under(a) if f != "manifest.json"]
    assert names == [f for f in files_under(b) if f != "manifest.json"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_input_array_equals_images(tiny, tmp_path, capsys):
    from cnnvis import preprocess
    from cnnvis.model import Model

    model = Model.from_file(tiny["model"])
    files = preprocess.list_images([tiny["imgs"]])
    x = preprocess.load_batch(files, preprocess.for_model(model))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "arr"
    assert run(["activations", "--input-array", str(tmp_path / "x.npy"), "--model", tiny["model"],
                "--layer", "conv1", "--out", str(out)], capsys)[0] == 0
    np.testing.assert_array_equal(np.load(out / "x[1]" / "conv1.npy"), model.run(x, ["conv1"])["conv1"][1])
    # both at once: one line, exit 2, nothing written (the images used to be silently ignored)
    code, _, err = run(["activations", "--input-array", str(tmp_path / "x.npy"), str(files[0]), "--model", tiny["model"],
                        "--out", str(tmp_path / "both")], capsys)
    assert code == 2 and "give either images or --input-array, not both" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "both").exists()


def test_filters_picture(tiny, tmp_path, capsys):
    out = tmp_path / "f"
    assert run(["filters", "--model", tiny["model"], "--out", str(out)], capsys)[0] == 0
    img = np.asarray(Image.open(out / "conv1_filters.png").convert("RGB")).astype(int)
    from onnx import numpy_helper

    from cnnvis.model import Model
    from cnnvis.onnxgraph import initializer_map

    model = Model.from_file(tiny["model"])
    weights = numpy_helper.to_array(initializer_map(model.proto)[model.layer("conv1").weight])
    np.testing.assert_array_equal(np.load(out / "conv1_weights.npy"), weights)
    # tile k (2×3 grid, 1-pixel separators) is filter k as RGB (input channels 0, 1, 2 of the
    # 'raw' RGB preset), min-max scaled over the whole filter
    files = json.loads((out / "manifest.json").read_text())["runs"]["filters"]["files"]
    grid = next(f["grid"] for f in files if f["path"] == "conv1_weights.npy")
    s = grid["scale"]
    assert (grid["rows"], grid["cols"]) == (2, 3) and img.shape == (7 * s, 11 * s, 3)
    for k in range(6):
        r, c = divmod(k, 3)
        tile = img[r * 4 * s:(r * 4 + 3) * s:s, c * 4 * s:(c * 4 + 3) * s:s]
        w = weights[k].astype(np.float64)
        expected = np.rint(255 * (w - w.min()) / (w.max() - w.min())).transpose(1, 2, 0)
        np.testing.assert_allclose(tile, expected, atol=1)


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "text", "empty-folder", "unknown-layer",
                                  "bad-array-shape", "bad-array-dtype", "not-onnx", "unwritable-out"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    model = tiny["model"]
    inputs = [str(tiny["imgs"] / "im0.png")]
    extra = []
    expect = None
    if case == "missing":
        inputs = [str(tmp_path / "nope.png")]
        expect = "nope.png"
    elif case == "corrupt":
        (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
        inputs, expect = [str(tmp_path / "c.png")], "c.png"
    elif case == "truncated":
        data = (tiny["imgs"] / "im0.png").read_bytes()
        (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
        inputs, expect = [str(tmp_path / "t.png")], "t.png"
    elif case == "text":
        (tmp_path / "notes.jpg").write_text("not an image")
        inputs, expect = [str(tmp_path / "notes.jpg")], "notes.jpg"
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        inputs, expect = [str(tmp_path / "empty")], "empty"
    elif case == "unknown-layer":
        extra, expect = ["--layer", "conv9"], "unknown layer 'conv9'.*closest: conv1"
    elif case == "bad-array-shape":
        np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
        inputs, extra, expect = [], ["--input-array", str(tmp_path / "x.npy")], r"x.npy.*3.*16.*16"
    elif case == "bad-array-dtype":
        np.save(tmp_path / "x.npy", np.zeros((2, 3, 16, 16), np.int32))
        inputs, extra, expect = [], ["--input-array", str(tmp_path / "x.npy")], r"x.npy.*(dtype|float)"
    elif case == "not-onnx":
        (tmp_path / "m.onnx").write_bytes(b"nonsense")
        model, expect = str(tmp_path / "m.onnx"), "m.onnx: not an ONNX model"
    elif case == "unwritable-out":
        (tmp_path / "blocker").write_text("x")
        out, expect = tmp_path / "blocker" / "sub", "--out"
    code, stdout, err = run(["activations", *inputs, "--model", model, "--out", str(out), *extra], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "note:" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(expect, lines[0]), lines[0]
    if out.exists():
        assert files_under(out) == [] and [p for p in os.listdir(out) if p.startswith(".")] == []


def test_debug_shows_the_traceback(tiny, tmp_path):
    with pytest.raises(Exception, match="conv9"):
        main(["activations", str(tiny["imgs"]), "--model", tiny["model"], "--layer", "conv9",
              "--out", str(tmp_path / "o"), "--debug"])


def test_every_numbered_script_wraps_a_registered_command():
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert len(scripts) >= 20
    wrapped = set()
    for script in scripts:
        text = script.read_text()
        m = re.search(r'main\(\["([a-z0-9-]+)"', text)
        assert m, f"{script.name} is not a thin wrapper of cnnvis.cli.main"
        assert m.group(1) in commands, f"{script.name} wraps unknown command {m.group(1)}"
        assert len([line for line in text.splitlines() if line.strip()]) <= 10, f"{script.name} holds logic"
        wrapped.add(m.group(1))
    assert commands <= wrapped, f"commands without a script: {sorted(commands - wrapped)}"


def test_script_and_module_entry_points_run(tiny):
    for argv in ([sys.executable, str(ROOT / "scripts" / "19_layers.py"), "--model", tiny["model"]],
                 [sys.executable, "-m", "cnnvis", "layers", "--model", tiny["model"]]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tiny["dir"], timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        assert "conv1" in proc.stdout


def test_import_cnnvis_stays_light():
    code = ("import sys, cnnvis, cnnvis.cli; cnnvis.cli.build_parser(); "
            "heavy = [m for m in ('numpy', 'onnxruntime', 'pyvista', 'vtk', 'matplotlib', 'sklearn', 'torch') if m in sys.modules]; "
            "print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"heavy modules imported: {proc.stdout}"


def test_inputs_list_chunks_and_subsets_of_images_and_arrays(tiny, tmp_path):
    import argparse

    from cnnvis.cli.common import Inputs
    from cnnvis import load_model

    model = load_model(tiny["model"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b", "a", "c"):
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    args = argparse.Namespace(images=[str(folder)], input_array=None, preprocess=None, batch_size=2)
    inputs = Inputs(args, model)
    assert inputs.names == ["a", "b", "c"] and len(inputs) == 3 and inputs.sources == [str(folder)]
    whole = inputs.load(range(3))
    chunks = list(inputs.chunks(1, 1))
    assert [n for n, _ in chunks] == [["b"], ["c"]]
    np.testing.assert_array_equal(np.concatenate([b for _, b in chunks]), whole[1:])
    np.testing.assert_array_equal(inputs.load([2, 0]), whole[[2, 0]])
    np.save(tmp_path / "x.npy", whole)
    args = argparse.Namespace(images=[], input_array=str(tmp_path / "x.npy"), preprocess=None, batch_size=2)
    arrays = Inputs(args, model)
    assert arrays.names == ["x[0]", "x[1]", "x[2]"] and arrays.sources == [str(tmp_path / "x.npy")]
    assert [len(b) for _, b in arrays.chunks(0, 2)] == [2, 1]
    assert set(arrays.fingerprint()) == {"input_array", "sha256"}


def test_unique_names_never_collide_across_chunks():
    from cnnvis.cli.common import unique_names

    used = {}
    first = unique_names(["cat", "cat_2"], used)
    second = unique_names(["cat", "dog/1"], used)
    assert first == ["cat", "cat_2"] and second == ["cat_3", "dog_1"]
    assert len(set(first + second)) == 4


def test_output_names_are_safe_for_any_input_name(tmp_path):
    from cnnvis.cli.common import MAX_NAME_BYTES, safe_name, unique_names

    cases = {
        "..": "_..", ".": "_.", "...": "_...", ".hidden": "_.hidden", "-rf": "_-rf", "--out": "_--out",
        "a\nb\r\tc": "a_b__c", "a/b\\c": "a_b_c", "\x00\x1b[0m": "__[0m", "": "_",
        "cat": "cat", "conv1.weight": "conv1.weight", "x[0]": "x[0]",  # ordinary names unchanged
        "Ka\u0308se": "K\u00e4se", "\u732b": "\u732b",  # Unicode kept, NFC: one spelling, one folder
        "a\u202eb": "a_b",  # a right-to-left override is not a letter
        "a\udcffb": "a_b",  # an undecodable byte of a file name (os.fsdecode's surrogate escape)
    }
    for given, expected in cases.items():
        assert safe_name(given) == expected, given
    long_a, long_b = "\u00e9" * 300 + "a", "\u00e9" * 300 + "b"
    cut_a, cut_b = safe_name(long_a), safe_name(long_b)
    assert cut_a != cut_b and len(cut_a.encode()) <= MAX_NAME_BYTES and cut_a.startswith("\u00e9" * 50)
    assert safe_name(long_a) == cut_a  # stable across runs
    names = unique_names(["..", ".", "Cat", "cat", "-x", "a\nb", long_a, long_b, "\u732b"], {})
    assert names[:4] == ["_..", "_.", "Cat", "cat_2"]
    for name in names:  # every one is a plain, distinct entry of one folder
        (tmp_path / name).mkdir()
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    assert len(list(tmp_path.iterdir())) == len(names)
