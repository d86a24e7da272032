"""Top-k activations: exact order against a brute-force sort, planted patterns, resumability."""
import csv
import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cnnvis.analysis.topk import TopActivations, TopK, chunk_top
from cnnvis.cli import main
from cnnvis.cli.projections import STATE_FILE, parse_maps
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model

CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.float32)
# (image, y, x, amplitude) of the planted crosses; different amplitudes fix their order
PLANTED = [(4, 9, 5, 1.0), (11, 3, 12, 0.85), (17, 12, 10, 0.7)]


def brute_force(acts, k):
    """Sort every (value, image, position) of each map with Python's sort: the specification."""
    n, c = acts.shape[:2]
    flat = acts.reshape(n, c, -1)
    out = []
    for m in range(c):
        entries = [(-float(flat[i, m, p]), i, p) for i in range(n) for p in range(flat.shape[2])]
        entries.sort()
        out.append([(-v, i, p) for v, i, p in entries[:k]])
    return out


def as_triples(top):
    return [[(float(top.values_[m, r]), int(top.images_[m, r]), int(top.positions_[m, r]))
             for r in range(top.values_.shape[1])] for m in range(top.values_.shape[0])]


def test_chunk_top_matches_sort_with_ties_and_dead_maps():
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 4, size=(6, 50)).astype(np.float32)  # many ties
    flat[2] = 0.0  # a dead map: every entry ties
    flat[3, 7] = 9.0
    for k in (1, 3, 9, 50, 60):
        cols = chunk_top(flat, k)
        for m in range(6):
            want = sorted(range(50), key=lambda j: (-flat[m, j], j))[:k]
            assert cols[m].tolist() == want, (k, m)


@pytest.mark.parametrize("k", [2, 9])
@pytest.mark.parametrize("rising", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 20])
def test_topk_is_independent_of_chunking(chunk, rising, k):
    """Covers both update paths: few candidates above the running k-th values (merged sparsely) and,
    with activations rising image after image, many (the dense per-chunk selection; with k=2 and
    chunks of 7 also after the maps are full)."""
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.normal(size=(20, 5, 3, 4)), 0).round(1).astype(np.float32)  # zeros and ties
    if rising:
        acts *= np.arange(1, 21, dtype=np.float32)[:, None, None, None]
    acts[:, 4] = 0.0
    top = TopK(k)
    for s in range(0, 20, chunk):
        top.update(acts[s:s + chunk], [f"img{i}" for i in range(s, min(s + chunk, 20))])
    assert as_triples(top) == brute_force(acts, k)
    assert top.image_names_ == [f"img{i}" for i in range(20)]
    rec = top.units(1)[0]
    assert rec["name"] == f"img{rec['image']}" and rec["y"] * 4 + rec["x"] == top.positions_[1, 0]


def test_feature_vectors_and_small_streams():
    top = TopK(9).update(np.array([[1.0, 5.0], [3.0, 5.0]], np.float32))
    assert top.map_shape_ == (2, 1, 1) and top.values_.shape == (2, 2)  # fewer units than k
    assert as_triples(top) == [[(3.0, 1, 0), (1.0, 0, 0)], [(5.0, 0, 0), (5.0, 1, 0)]]
    with pytest.raises(CnnvisError, match="NaN or infinity"):
        TopK(2).update(np.array([[[[np.nan]]]], np.float32), ["bad.png"])
    with pytest.raises(CnnvisError, match="maps of shape"):
        top.update(np.zeros((1, 3), np.float32))


def test_state_round_trip_is_exact():
    rng = np.random.default_rng(2)
    top = TopK(4).update(rng.normal(size=(6, 3, 2, 2)).astype(np.float32))
    state = json.loads(json.dumps(top.to_state()))
    back = TopK.from_state(state)
    assert np.array_equal(back.values_, top.values_) and back.values_.dtype == np.float32
    assert np.array_equal(back.images_, top.images_) and np.array_equal(back.positions_, top.positions_)
    import base64

    bad = TopK(4).update(rng.normal(size=(6, 3, 2, 2)).astype(np.float32)).to_state()
    index = np.frombuffer(base64.b64decode(bad["image_index"]), "<i8").copy()
    index[0] = 99  # an image that was never seen
    bad["image_index"] = base64.b64encode(index.tobytes()).decode()
    with pytest.raises(CnnvisError, match="not a valid top-k state"):
        TopK.from_state(bad)
    state["values"] = "not base64!"
    with pytest.raises(CnnvisError, match="not a valid top-k state"):
        TopK.from_state(state)


# ------------------------------------------------------------------ a model with a preferred pattern

def cross_model_proto():
    """grey 1×16×16 → conv1 (map 0: zero-mean cross detector, map 1: box blur; 3×3, pad 1) → relu1 →
    pool1 (max 2×2) → GAP → Flatten."""
    w = np.stack([CROSS - CROSS.mean(), np.full((3, 3), 1 / 9, np.float32)])[:, None]
    nodes = [helper.make_node("Conv", ["data", "w"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["pool1"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["prob"], name="flat")]
    graph = helper.make_graph(nodes, "cross", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 1, 16, 16])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    return make_model(graph)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """20 grey noise images (uint8 PNG), a bright cross planted in 3 of them at known centres."""
    folder = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 0.2, size=(20, 16, 16))
    for i, y, x, amp in PLANTED:
        images[i, y - 1:y + 2, x - 1:x + 2] = np.maximum(images[i, y - 1:y + 2, x - 1:x + 2], amp * CROSS)
    pixels = np.round(images * 255).astype(np.uint8)
    (folder / "imgs").mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(folder / "imgs" / f"im{i:02d}.png")
    onnx.save(cross_model_proto(), folder / "cross.onnx")
    return folder, pixels.astype(np.float32) / 255


def test_planted_crosses_found_exactly(planted):
    folder, pixels = planted
    model = Model(cross_model_proto(), name="cross")
    chunks = (([f"im{i:02d}" for i in range(s, min(s + 6, 20))], pixels[s:s + 6, None]) for s in range(0, 20, 6))
    top = TopActivations(model, "relu1", k=9).run(chunks)
    found = [(r["image"], r["y"], r["x"]) for r in top.units(0)[:3]]
    assert found == [(i, y, x) for i, y, x, _ in PLANTED]
    assert top.units(0)[3]["value"] < 0.5 * top.units(0)[2]["value"]  # the rest is far below
    # one batch instead of chunks: the same top-k (image names are stream positions then)
    whole = TopActivations(model, "relu1", k=9).run(pixels[:, None])
    np.testing.assert_array_equal(whole.values_, top.values_)
    np.testing.assert_array_equal(whole.images_, top.images_)
    np.testing.assert_array_equal(whole.positions_, top.positions_)
    with pytest.raises(CnnvisError, match="^target=0: top-k keeps every map"):
        TopActivations(model, "relu1").run(pixels[:, None], target=0)


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def _outputs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_topk_command_planted_resume_and_determinism(planted, tmp_path, capsys):
    folder, _ = planted
    base = ["topk", str(folder / "imgs"), "--model", str(folder / "cross.onnx"), "--layer", "relu1",
            "--batch-size", "6", "--maps", "all"]
    full = tmp_path / "full"
    code, cap = _run(base + ["--out", str(full)], capsys)
    assert code == 0, cap.err
    files = _outputs(full)
    assert sorted(files) == sorted([STATE_FILE, "relu1_top9.csv", "relu1_top9.json", "relu1_top9.png",
                                    "relu1_top9_projections.npy"])
    data = json.loads(files["relu1_top9.json"])
    top3 = [(r["name"], r["y"], r["x"]) for r in data["records"] if r["map"] == 0][:3]
    assert top3 == [(f"im{i:02d}", y, x) for i, y, x, _ in PLANTED]
    assert data["n_images"] == 20 and len(data["records"]) == 2 * 9
    rows = list(csv.DictReader(files["relu1_top9.csv"].decode().splitlines()))
    assert [(int(r["map"]), int(r["rank"])) for r in rows] == [(m, k) for m in range(2) for k in range(9)]
    assert float(rows[0]["value"]) == data["records"][0]["value"]
    proj = np.load(full / "relu1_top9_projections.npy")
    assert proj.shape == (2, 9, 1, 3, 3)  # maps × k × the 3×3 receptive field
    # the strongest cross unit's projection is the cross detector times its activation
    w0 = (CROSS - CROSS.mean())
    np.testing.assert_allclose(proj[0, 0, 0], data["records"][0]["value"] * w0, rtol=1e-5, atol=1e-6)
    # the picture: map 0's block shows 9 projections (left 3×3 grid) and 9 image patches (right);
    # its first three patches are the planted crosses, ordered by amplitude (patches share one
    # grey scale), and its first projection is the cross detector
    pic = np.asarray(Image.open(full / "relu1_top9.png").convert("L")).astype(int)
    z = data["grid"]["scale"]
    assert data["grid"]["cols"] == 2 and pic.shape == (11 * z, (2 * 25 + 4) * z)

    def tile(x0, t):  # 3×3 tile t of the grid starting at column x0 of the block
        y, x = (t // 3) * 4, x0 + (t % 3) * 4
        return pic[y * z + z // 2:(y + 3) * z:z, x * z + z // 2:(x + 3) * z:z]

    cross = CROSS.astype(bool)
    brightest = []
    for t in range(3):
        patch = tile(14, t)  # right grid: after 11 columns of projections and a 3-column gap
        assert patch[cross].min() > patch[~cross].max(), (t, patch)
        brightest.append(patch[1, 1])
    assert brightest[0] > brightest[1] > brightest[2]  # amplitudes 1.0, 0.85, 0.7 on one scale
    first = tile(0, 0)  # its top-left cell carries the block's label "0"
    assert first[cross].min() == 255 and [first[0, 2], first[2, 0], first[2, 2]] == [0, 0, 0]

    # interrupted after the first chunk, then continued: byte-identical outputs
    part = tmp_path / "part"
    code, cap = _run(base + ["--out", str(part), "--max-chunks", "1"], capsys)
    assert code == 3 and "6 of 20 images done" in cap.err
    assert json.loads((part / STATE_FILE).read_text())["topk"]["images"] == [f"im{i:02d}" for i in range(6)]
    assert not (part / "relu1_top9.json").exists()
    code, cap = _run(base + ["--out", str(part), "--max-chunks", "2"], capsys)
    assert code == 3 and "continuing" in cap.err and "18 of 20" in cap.err
    code, cap = _run(base + ["--out", str(part)], capsys)
    assert code == 0, cap.err
    assert _outputs(part) == files

    # a rerun of a finished run recomputes nothing and writes the same files
    code, cap = _run(base + ["--out", str(full)], capsys)
    assert code == 0 and _outputs(full) == files

    # different arguments refuse the saved state with one line, unless --restart
    code, cap = _run(base + ["--out", str(part), "--k", "4"], capsys)
    assert code == 2 and "saved by a different run (k: 9 there, 4 now)" in cap.err and "--restart" in cap.err
    code, cap = _run(base + ["--out", str(part), "--k", "4", "--restart"], capsys)
    assert code == 0, cap.err
    assert json.loads((part / "relu1_top4.json").read_text())["records"][0]["name"] == "im04"


def test_resume_after_an_exception_in_the_stream():
    """Library level: stop by raising from the per-chunk callback, restore the saved state, continue."""
    model = Model(cross_model_proto(), name="cross")
    x = np.random.default_rng(3).uniform(size=(11, 1, 16, 16)).astype(np.float32)
    chunks = lambda start: ((["i%d" % i for i in range(s, min(s + 4, 11))], x[s:s + 4]) for s in range(start, 11, 4))  # noqa: E731
    full = TopActivations(model, "conv1", k=5).run(chunks(0))
    saved = {}

    def stop_after_first(top):
        saved["state"] = json.dumps(top.to_state())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TopActivations(model, "conv1", k=5, on_chunk=stop_after_first).run(chunks(0))
    restored = TopK.from_state(json.loads(saved["state"]))
    assert restored.n_images_ == 4
    resumed = TopActivations(model, "conv1", k=5).run(chunks(restored.n_images_), resume=restored)
    assert json.dumps(resumed.to_state()) == json.dumps(full.to_state())


def test_parse_maps():
    assert parse_maps("0,3,5-7,3", 10) == [0, 3, 5, 6, 7]
    assert parse_maps("all", 3) == [0, 1, 2]
    assert parse_maps("0-15", 4, default=True) == [0, 1, 2, 3]
    with pytest.raises(CnnvisError, match="map 4 out of range"):
        parse_maps("2-4", 4)
    with pytest.raises(CnnvisError, match="expected 'all'"):
        parse_maps("a-b", 4)


def test_topk_resume_notices_changed_added_and_removed_images(planted, tmp_path, capsys):
    """The saved state fingerprints every image (size, mtime, sha256): an image that changed after
    it was processed is reported in one line, not mixed into the resumed result."""
    import os
    import shutil

    folder, _ = planted
    imgs = tmp_path / "imgs"
    shutil.copytree(folder / "imgs", imgs)
    for png in imgs.iterdir():  # stored uncompressed: a changed pixel keeps the file size
        Image.open(png).save(png, compress_level=0)
    out = tmp_path / "out"
    base = ["topk", str(imgs), "--model", str(folder / "cross.onnx"), "--layer", "relu1", "--batch-size", "6",
            "--maps", "all", "--out", str(out)]
    code, cap = _run(base + ["--max-chunks", "1"], capsys)
    assert code == 3
    saved = json.loads((out / STATE_FILE).read_text())["fingerprint"]["files"]
    assert [f["path"] for f in saved] == [str(imgs / f"im{i:02d}.png") for i in range(20)]
    first = imgs / "im00.png"
    assert saved[0]["size"] == first.stat().st_size and saved[0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()

    # an already-processed image replaced by another of the same size, its mtime put back: the hash tells
    stat = first.stat()
    other = (imgs / "im05.png").read_bytes()
    pixels = np.array(Image.open(first))
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(first, compress_level=0)
    assert first.stat().st_size == stat.st_size  # one pixel's bits: same size, other bytes
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, cap = _run(base, capsys)
    assert code == 2 and len(cap.err.strip().splitlines()) == 1
    assert f"the input images changed since the saved state ({first} was changed)" in cap.err and "--restart" in cap.err
    assert not (out / "relu1_top9.json").exists()  # nothing mixed in
    # an added and a removed image
    (imgs / "im00.png").unlink()
    (imgs / "im99.png").write_bytes(other)
    code, cap = _run(base, capsys)
    assert code == 2 and f"{imgs / 'im99.png'} was added; {first} was removed" in cap.err
    # --restart starts over on the folder as it is now
    code, cap = _run(base + ["--restart"], capsys)
    assert code == 0, cap.err
    assert json.loads((out / "relu1_top9.json").read_text())["n_images"] == 20


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_topk_killed_during_its_commit_ends_like_an_uninterrupted_run(planted, tmp_path, capsys, sig):
    """A kill between two moves of topk's commit: the next run mends the folder (rollback) and
    finishes from the saved state; SIGINT waits for the commit. Either way the files equal an
    uninterrupted run's, and no staging folder or temporary file is left."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    folder, _ = planted
    base = ["topk", str(folder / "imgs"), "--model", str(folder / "cross.onnx"), "--layer", "relu1",
            "--batch-size", "6", "--maps", "all"]
    full = tmp_path / "full"
    assert _run(base + ["--out", str(full)], capsys)[0] == 0
    files = _outputs(full)
    part, mark = tmp_path / "part", tmp_path / "mark"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               CNNVIS_TEST_COMMIT_PAUSE="30@2" if sig == "SIGKILL" else "1@2", CNNVIS_TEST_COMMIT_MARK=str(mark))
    from test_manifest import default_sigint

    proc = subprocess.Popen([sys.executable, "-m", "cnnvis", *base, "--out", str(part)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    t0 = time.time()
    while not (mark.exists() and len(mark.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=60)
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert any(p.name.startswith(".cnnvis-stage-") for p in part.iterdir())  # half done
    else:
        assert proc.returncode == 130  # cnnvis's exit code after Ctrl-C
        assert _outputs(part) == files  # the commit was whole before the interrupt took effect
    code, cap = _run(base + ["--out", str(part)], capsys)
    assert code == 0, cap.err
    assert _outputs(part) == files


# ----------------------------------------------------------------- fields far larger than the image

WIDE_RNG = np.random.default_rng(11)
WIDE_W = [WIDE_RNG.normal(size=s).astype(np.float32) for s in ((4, 3, 5, 5), (4, 4, 5, 5), (4, 4, 5, 5))]
# the chain formula by hand: conv1 (k5 s2 p2) size 5, stride 2, offset -2; conv2 (k5 s2 p2)
# 5 + 4·2 = 13, stride 4, offset -2 - 2·2 = -6; conv3 (k5 s1 p128 d64) 13 + 4·64·4 = 1037, stride 4,
# offset -6 - 128·4 = -518: every unit of relu3 (2×2) sees the whole 8×8 image, 130 times its width
WIDE_SIZE, WIDE_STRIDE, WIDE_OFFSET = 1037, 4, -518


def wide_field_proto():
    """data 3×8×8 → conv1 (4 maps, 5×5, stride 2, pad 2) → relu → conv2 (same) → relu → conv3 (4 maps,
    5×5, dilation 64, pad 128) → relu3 (4×2×2): a receptive field of 1037 pixels on an 8×8 input."""
    nodes = [helper.make_node("Conv", ["data", "w1"], ["c1"], name="conv1", strides=[2, 2], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", strides=[2, 2], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", dilations=[64, 64],
                              pads=[128, 128, 128, 128]),
             helper.make_node("Relu", ["c3"], ["relu3"], name="relu3")]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("relu3", TensorProto.FLOAT, ["N", 4, 2, 2])],
        [numpy_helper.from_array(w, f"w{i + 1}") for i, w in enumerate(WIDE_W)])
    return make_model(graph)


def _traced_main(argv):
    """cli.main under tracemalloc: (exit code, peak bytes of Python/numpy allocations)."""
    import tracemalloc

    tracemalloc.start()
    try:
        code = main(argv)
        return code, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


#: numpy memory the wide-field runs may peak at: a few MiB of 8×8 tiles, model and graphs. One
#: field-sized float64 RGB tile (1037×1037×3×8 B) alone is 24.6 MiB, and the run holds 16 of them
WIDE_PEAK_BYTES = 16 << 20


def _wide_run(tmp_path, command, n_images, extra):
    """``command`` on the wide-field net's relu3, every map, over ``n_images`` random 8×8 images:
    (the images, the output folder, exit code, traced numpy peak)."""
    model_path = tmp_path / "wide.onnx"
    onnx.save(wide_field_proto(), model_path)
    x = WIDE_RNG.normal(size=(n_images, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    code, peak = _traced_main([command, "--model", str(model_path), "--input-array", str(tmp_path / "x.npy"),
                               "--layer", "relu3", "--maps", "all", *extra, "--out", str(out)])
    return x, out, code, peak


def test_topk_tiles_of_a_field_larger_than_the_image(tmp_path, capsys):
    from cnnvis.analysis import deconv

    x, out, code, peak = _wide_run(tmp_path, "topk", 3, ["--k", "4"])
    assert code == 0, capsys.readouterr().err
    assert peak < WIDE_PEAK_BYTES, peak
    rec = json.loads((out / "relu3_top4.json").read_text())
    # the geometry stays the field's: size, stride, offset and each record's unclipped box
    assert rec["receptive_field"] == {"layer": "relu3", "size": [WIDE_SIZE] * 2, "stride": [WIDE_STRIDE] * 2,
                                      "offset": [WIDE_OFFSET] * 2, "input_hw": [8, 8], "global": False,
                                      "patch_hw": [8, 8]}
    for r in rec["records"]:
        top, left = WIDE_OFFSET + WIDE_STRIDE * r["y"], WIDE_OFFSET + WIDE_STRIDE * r["x"]
        assert r["box"] == [top, left, top + WIDE_SIZE, left + WIDE_SIZE]
    with open(out / "relu3_top4.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [[int(row[k]) for k in ("top", "left", "bottom", "right")] for row in rows] == \
        [r["box"] for r in rec["records"]]
    # the tiles are image-sized, and since every unit sees the whole image they are its projection
    raw = np.load(out / "relu3_top4_projections.npy")
    assert raw.shape == (4, 4, 3, 8, 8)
    model = Model(wide_field_proto(), name="wide")
    for r in rec["records"]:
        want = deconv.Deconvnet(model, "relu3").run(x[r["image"]:r["image"] + 1],
                                                    target=[(r["map"], r["y"], r["x"])]).projections[0]
        np.testing.assert_allclose(raw[r["map"], r["rank"]], want, rtol=1e-6, atol=1e-7)
    # the picture: 4 blocks of 2×2 projection tiles and 2×2 patches of 8×8 pixels, not 1037×1037
    pic = Image.open(out / "relu3_top4.png")
    assert max(pic.size) / rec["grid"]["scale"] < 100, (pic.size, rec["grid"])


def test_deconv_tiles_of_a_field_larger_than_the_image(tmp_path, capsys):
    x, out, code, peak = _wide_run(tmp_path, "deconv", 1, [])
    assert code == 0, capsys.readouterr().err
    assert peak < WIDE_PEAK_BYTES, peak
    rec = json.loads((out / "x[0]/relu3_deconv.json").read_text())
    assert rec["receptive_field"]["size"] == [WIDE_SIZE] * 2 and rec["receptive_field"]["patch_hw"] == [8, 8]
    assert max(Image.open(out / "x[0]/relu3_deconv.png").size) / rec["grid"]["scale"] < 100, rec["grid"]


def test_tile_memory_is_checked_against_the_budget():
    from cnnvis import limits
    from cnnvis.analysis.receptive import ReceptiveField
    from cnnvis.cli.projections import TILE_COPIES, check_tiles

    field = ReceptiveField("l", size=(1037, 1037), stride=(4, 4), offset=(-518, -518), input_hw=(64, 48))
    need = 10 * 3 * 64 * 48 * 8 * TILE_COPIES  # tiles cut to the 64×48 image
    with limits.memory_limit_set(need):
        check_tiles(10, 3, field, "--layer l")
    with limits.memory_limit_set(need - 1), pytest.raises(CnnvisError, match="--layer l: 10 projection tiles of 64×48"):
        check_tiles(10, 3, field, "--layer l")
