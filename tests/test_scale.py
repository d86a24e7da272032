"""cnnvis.scale and the --dask paths: on a LocalCluster of 2 worker processes on loopback, the
distributed runs write the one-process files byte for byte; worker and client faults; unreadable
images skipped; the merges against independent references."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnnvis import cli, scale
from cnnvis.analysis import stats
from cnnvis.analysis.topk import TopK
from cnnvis.errors import CnnvisError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (one thread each) on 127.0.0.1, no dashboard."""
    import logging

    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      silence_logs=logging.ERROR, **scale.local_dashboard(False))
    client = Client(lc)
    yield client
    client.close()
    lc.close()


def _images(folder: Path, n: int, seed: int, size: int = 28) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"im{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("scale") / "images", 40, seed=1)


def _files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _manifest_without_times(data: bytes) -> dict:
    manifest = json.loads(data)
    for run in manifest["runs"].values():
        run.pop("wall_time_s")
    return manifest


def assert_same_outputs(one: Path, two: Path, other_inputs: bool = False) -> None:
    """Every file byte for byte, manifest.json up to wall times; ``other_inputs``: the runs were
    given other files or folders (their names in the manifest and the top-k state aside)."""
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    for rel in a:
        if rel == "manifest.json":
            ma, mb = _manifest_without_times(a[rel]), _manifest_without_times(b[rel])
            if other_inputs:
                for m in (ma, mb):
                    for run in m["runs"].values():
                        run.pop("inputs")
                        run.pop("skipped", None)
            assert ma == mb
        elif rel == "topk_state.json" and other_inputs:
            sa, sb = json.loads(a[rel]), json.loads(b[rel])
            assert sa.pop("fingerprint")["images"] != sb.pop("fingerprint")["images"]
            sa.pop("skipped", None), sb.pop("skipped", None)
            assert sa == sb
        else:
            assert a[rel] == b[rel], rel


def _address(client) -> str:
    return client.scheduler.address


# ----------------------------------------------------------------------------- merges (no cluster)


def test_merge_topk_equals_one_stream_for_any_split():
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 4, size=(23, 3, 2, 2)).astype(np.float32)  # many ties on purpose
    whole = TopK(5).update(acts)
    for cuts in ([4, 9, 17], [1], [11, 12, 13, 20], [5, 10, 15, 20]):
        parts = []
        for lo, hi in zip([0, *cuts], [*cuts, len(acts)]):
            part = TopK(5).update(acts[lo:hi])
            parts.append((part.map_shape_, part.values_, part.images_ + lo, part.positions_))
        for order in (parts, parts[::-1]):  # order of arrival does not matter either
            merged = scale.merge_topk(order, 5)
            np.testing.assert_array_equal(merged.values_, whole.values_)
            np.testing.assert_array_equal(merged.images_, whole.images_)
            np.testing.assert_array_equal(merged.positions_, whole.positions_)
    # independent check of the tie order on map 0: sort (−value, image, position) by hand
    flat = [(-acts[i, 0].reshape(-1)[p], i, p) for i in range(len(acts)) for p in range(4)]
    best = sorted(flat)[:5]
    assert [(int(i), int(p)) for _, i, p in best] == list(zip(whole.images_[0].tolist(),
                                                               whole.positions_[0].tolist()))


def test_compact_topk_renumbers_to_readable_images():
    top = TopK(2).update(np.array([[5.0], [1.0], [7.0]], np.float32)[:, :, None, None])
    top.images_ = np.array([[4, 0]])  # input positions 4 and 0 of 0, 2, 4 readable
    scale.compact_topk(top, [0, 2, 4], ["a", "c", "e"])
    assert top.images_.tolist() == [[2, 0]] and top.image_names_ == ["a", "c", "e"]


def test_running_moments_merge_is_update_and_matches_numpy():
    rng = np.random.default_rng(3)
    chunks = [rng.normal(size=(n, 4, 3)) * 3 + 1 for n in (5, 1, 8, 3)]
    a, b = stats.RunningMoments(), stats.RunningMoments()
    for c in chunks:
        a.update(c)
        b.merge(*stats.batch_moments(c))
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.var(), b.var())  # bit for bit
    allx = np.concatenate(chunks)
    np.testing.assert_allclose(b.mean, allx.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.var(1), allx.var(axis=0, ddof=1), rtol=1e-11)


def test_shards_are_whole_chunks_and_cover_the_list():
    shards = scale.make_shards([f"f{i}" for i in range(23)], shard_size=6, batch_size=4, group=1, first_index=3)
    assert [len(s) for s in shards] == [8, 8, 7]
    assert [s.start for s in shards] == [0, 8, 16] and [s.index for s in shards] == [3, 4, 5]
    assert sum((s.paths for s in shards), []) == [os.path.abspath(f"f{i}") for i in range(23)]  # absolute
    assert all(s.group == 1 for s in shards)


def test_cli_default_shard_size_is_scales():
    from cnnvis.cli import cluster as cli_cluster

    assert cli_cluster.DEFAULT_SHARD_SIZE == scale.DEFAULT_SHARD_SIZE


def test_shard_store_round_trip_and_restart(tmp_path):
    store = scale.ShardStore(tmp_path, "topk", {"a": 1})
    store.save(2, {"n": 3, "skipped": []}, {"x": np.arange(4, dtype=np.float32)})
    assert store.done() == {2}
    res = store.load(2)
    assert res.meta["n"] == 3 and res.arrays["x"].dtype == np.float32 and res.arrays["x"].tolist() == [0, 1, 2, 3]
    assert scale.ShardStore(tmp_path, "topk", {"a": 1}).done() == {2}  # same fingerprint: same folder
    assert scale.ShardStore(tmp_path, "topk", {"a": 2}).done() == set()  # another run: its own folder
    assert scale.ShardStore(tmp_path, "topk", {"a": 1}, restart=True).done() == set()
    (store.folder / "shard-000007.npz").write_bytes(b"truncated")
    with pytest.raises(CnnvisError, match="shard-000007.npz: unreadable shard result"):
        store.load(7)


@pytest.mark.parametrize("address, message", [("local:0", "N >= 1"), ("local", "local:N"),
                                              ("nowhere", "scheduler address")])
def test_bad_addresses(address, message):
    with pytest.raises(CnnvisError, match=message):
        scale.parse_address(address)
    assert scale.parse_address("tcp://10.0.0.1:8786") == ("remote", "tcp://10.0.0.1:8786")
    assert scale.parse_address("local:3") == ("local", 3)


def test_worker_model_checks_sha256():
    from cnnvis import registry

    name = registry.default_model_name()
    model = registry.load(name)
    assert scale.worker_model(scale.model_ref(name, None, "cpu", 1, model.sha256)).sha256 == model.sha256
    with pytest.raises(CnnvisError, match="a different file"):
        scale.worker_model(scale.model_ref(name, None, "cpu", 1, "0" * 64))


def test_dask_refuses_input_arrays(tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 1, 28, 28), np.float32))
    assert cli.main(["topk", "--input-array", str(x), "--dask", "local:1", "--out", str(tmp_path / "o")]) == 2
    assert "never pixels" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- on the cluster


def test_topk_on_cluster_equals_one_process(cluster, images, tmp_path):
    common = ["topk", str(images), "--batch-size", "4", "--k", "3", "--layer", "conv2", "--maps", "0-5"]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "two"), "--dask", _address(cluster), "--shard-size", "6"]) == 0
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / scale.STATE_DIR).exists()  # merged: the shard results are gone


def test_compare_classes_on_cluster_equals_one_process(cluster, tmp_path):
    common = ["compare-classes", "--permutations", "49", "--batch-size", "4", "--check-numerical", "2",
              "--max-vectors-per-group", "6", "--format", "npy", "--no-progress", "--neuron", "Shirt",
              "--similar", "T-shirt/top", "--dissimilar", "Trouser"]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "two"), "--dask", _address(cluster), "--shard-size", "4"]) == 0
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["gradcheck"]["entries"] == 2 and summary["cosine"]["kept_per_group"]["reference"] == 6


def _png_header(width: int, height: int, colour_type: int) -> bytes:
    """A PNG of one IHDR (8-bit, ``colour_type``) and a few bytes of data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_files(folder: Path, good: Path) -> dict:
    """Unreadable files in ``folder``: name → what is wrong (a zero-byte .jpg, a truncated PNG, a
    text file named .png, a PNG of an unknown colour type)."""
    files = {"zero": b"", "truncated": good.read_bytes()[:60], "text": b"not an image\n",
             "colour-type": _png_header(4, 4, 5)}
    names = {}
    for (what, data), name in zip(files.items(), ("a.jpg", "b.png", "c.png", "d.png")):
        (folder / f"im0003{name}").write_bytes(data)
        names[f"im0003{name}"] = what
    return names


@pytest.fixture(scope="module")
def mixed(images, tmp_path_factory):
    """10 good images and 5 unreadable files (a whole chunk of 4 of them, at batch size 4, and an
    image header claiming 60000×60000 pixels, over the memory budget, in the last chunk)."""
    import shutil

    root = tmp_path_factory.mktemp("mixed")
    for folder in ("good", "mixed"):
        (root / folder).mkdir()
        for f in sorted(images.glob("*.png"))[:10]:
            shutil.copy(f, root / folder / f.name)
    bad = _bad_files(root / "mixed", root / "good" / "im0002.png")
    (root / "mixed" / "im0009z.png").write_bytes(_png_header(60000, 60000, 0))
    bad["im0009z.png"] = "too large"
    return root / "mixed", root / "good", bad


def _skipped(out: Path, command: str) -> dict:
    return json.loads((out / "manifest.json").read_text())["runs"][command]["skipped"]


def _same_files_both_ways(cluster, argv, out: Path, shard_size: int, command: str) -> dict:
    """``argv`` run in one process (``out/one``) and on the cluster (``out/two``): the same files;
    returns the one-process run's ``skipped`` record."""
    assert cli.main(argv + ["--out", str(out / "one")]) == 0
    assert cli.main(argv + ["--out", str(out / "two"), "--dask", _address(cluster), "--shard-size", str(shard_size),
                            "--no-progress"]) == 0
    assert_same_outputs(out / "one", out / "two")
    return _skipped(out / "one", command)


def test_unreadable_images_are_skipped_and_listed(cluster, mixed, tmp_path, capsys):
    """One process and the cluster skip the same files, list them (count, position, path, reason)
    and write the same files; the records are those of a run that never saw them."""
    folder, good, bad = mixed
    common = ["topk", "--batch-size", "4", "--k", "2", "--layer", "conv1", "--maps", "0-3"]
    assert cli.main(common + [str(folder), "--out", str(tmp_path / "one")]) == 0
    assert "skipped 5 unreadable image(s)" in capsys.readouterr().err
    skipped = _skipped(tmp_path / "one", "topk")
    assert skipped["count"] == 5
    assert [Path(f["path"]).name for f in skipped["files"]] == sorted(bad)
    assert [f["position"] for f in skipped["files"]] == [4, 5, 6, 7, 14]
    assert all(f["path"] == str(folder.resolve() / Path(f["path"]).name) for f in skipped["files"])
    assert all("not a readable image" in f["reason"] for f in skipped["files"][:4])
    assert cli.main(common + [str(folder), "--out", str(tmp_path / "two"), "--dask", _address(cluster),
                              "--shard-size", "8", "--no-progress"]) == 0
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    assert cli.main(common + [str(good), "--out", str(tmp_path / "good")]) == 0
    assert_same_outputs(tmp_path / "good", tmp_path / "one", other_inputs=True)
    records = json.loads((tmp_path / "one" / "conv1_top2.json").read_text())
    assert records["n_images"] == 10


def test_one_process_topk_resumes_past_unreadable_files(mixed, tmp_path):
    """--max-chunks 2 stops after the chunk that follows the all-unreadable one; the rerun
    continues after the files already read or skipped and writes the uninterrupted run's files."""
    from cnnvis.cli.projections import INCOMPLETE

    folder, _, _ = mixed
    common = ["topk", str(folder), "--batch-size", "4", "--k", "2", "--layer", "conv1", "--maps", "0-3"]
    assert cli.main(common + ["--out", str(tmp_path / "once")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "twice"), "--max-chunks", "2"]) == INCOMPLETE
    state = json.loads((tmp_path / "twice" / "topk_state.json").read_text())
    assert not state["complete"] and [s[0] for s in state["skipped"]] == [4, 5, 6, 7]
    assert len(state["topk"]["images"]) == 8
    assert cli.main(common + ["--out", str(tmp_path / "twice")]) == 0
    assert_same_outputs(tmp_path / "once", tmp_path / "twice")


def test_other_commands_skip_unreadable_files_in_one_process_as_on_cluster(cluster, mixed, tmp_path):
    """activations --stats, conv-gradients and occlusion over a folder with unreadable files: the
    one-process run skips and lists them and writes the cluster run's files."""
    import shutil

    folder, _, bad = mixed
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(folder.glob("im000[0-3]*")):
        shutil.copy(f, few / f.name)  # 4 good, 4 unreadable
    runs = {"activations": (folder, ["--stats", "--batch-size", "4", "--layer", "conv1", "--layer", "fc6"], 5),
            "conv-gradients": (few, ["--batch-size", "2", "-f", "npy", "--top-k", "2"], 4),
            "occlusion": (few, ["--batch-size", "2", "--window", "14", "--stride", "7"], 4)}
    for command, (where, extra, n_bad) in runs.items():
        skipped = _same_files_both_ways(cluster, [command, str(where), *extra], tmp_path / command, 4, command)
        assert skipped["count"] == n_bad
        assert [Path(f["path"]).name for f in skipped["files"]] == sorted(bad)[:n_bad]
    stats = json.loads((tmp_path / "activations" / "one" / "activation_stats.json").read_text())
    assert stats["n_images"] == 10
    summary = json.loads((tmp_path / "occlusion" / "one" / "occlusion.json").read_text())
    assert [s["image"] for s in summary["images"]] == ["im0000", "im0001", "im0002", "im0003"]


def test_compare_classes_skips_unreadable_files_in_one_process_as_on_cluster(cluster, images, tmp_path):
    files = sorted(images.glob("*.png"))
    groups = {}
    for k, role in enumerate(("reference", "similar", "dissimilar")):
        groups[role] = tmp_path / role
        groups[role].mkdir()
        for f in files[4 * k:4 * k + 4]:
            (groups[role] / f.name).write_bytes(f.read_bytes())
    bad_ref = _bad_files(groups["reference"], files[0])
    (groups["similar"] / "im0003a.jpg").write_bytes(b"")
    common = ["compare-classes", "--permutations", "19", "--batch-size", "4", "--format", "npy", "--no-progress",
              "--max-vectors-per-group", "3", "--neuron", "Shirt", "--reference", str(groups["reference"]),
              "--similar", str(groups["similar"]), "--dissimilar", str(groups["dissimilar"])]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "two"), "--dask", _address(cluster), "--shard-size", "4"]) == 0
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    skipped = _skipped(tmp_path / "one", "compare-classes")
    assert skipped["count"] == 5
    assert [(f["group"], Path(f["path"]).name) for f in skipped["files"]] == \
        [("reference", n) for n in sorted(bad_ref)] + [("similar", "im0003a.jpg")]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["counts"] == {"reference": 4, "similar": 4, "dissimilar": 4}


def test_image_lists_and_trees_skip_unreadable_files_in_one_process_as_on_cluster(cluster, mixed, tmp_path):
    """--image-list (a missing file among them) and --image-tree: the same files skipped and the
    same outputs with and without --dask."""
    import shutil

    folder, _, bad = mixed
    listed = tmp_path / "list.txt"
    names = [f.name for f in sorted(folder.iterdir())][:9]  # 4 good, 4 unreadable, 1 good
    listed.write_text("".join(f"{folder / n}\n" for n in names) + "gone.png\n")
    tree = tmp_path / "imagenet"
    for i, n in enumerate(names):
        (tree / f"n0{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / n, tree / f"n0{i % 2}" / n)
    runs = {"list": (["activations", "--stats", "--layer", "conv1", "--image-list", str(listed)], "activations", 5),
            "tree": (["topk", "--layer", "conv1", "--maps", "0-1", "--k", "2", "--image-tree", str(tree)], "topk", 4)}
    for label, (argv, command, n_bad) in runs.items():
        skipped = _same_files_both_ways(cluster, argv + ["--batch-size", "2"], tmp_path / label, 2, command)
        assert skipped["count"] == n_bad
        assert sorted(Path(f["path"]).name for f in skipped["files"]) == \
            sorted([n for n in names if n in bad] + (["gone.png"] if label == "list" else []))
    gone = _skipped(tmp_path / "list" / "one", "activations")["files"][-1]
    assert gone["position"] == 9 and "no such image file" in gone["reason"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("cnnvis") and ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_all_unreadable_is_one_line_and_nothing_written(cluster, mixed, tmp_path, capsys):
    folder, good, bad = mixed
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    for name in bad:
        (only_bad / name).write_bytes((folder / name).read_bytes())
    runs = {"topk": ["--batch-size", "4", "--layer", "conv1"], "activations": ["--stats", "--layer", "conv1"],
            "conv-gradients": ["-f", "npy"], "occlusion": ["--window", "14"]}
    for command, extra in runs.items():
        for dask in ([], ["--dask", _address(cluster), "--no-progress"]):
            out = tmp_path / f"{command}{len(dask)}"
            assert cli.main([command, str(only_bad), *extra, *dask, "--out", str(out)]) == 2
            line = _one_error_line(capsys.readouterr().err)
            assert line.startswith(f"cnnvis {command}: error: none of the 5 input image(s) is readable, e.g. ")
            assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], command
    out = tmp_path / "compare"
    assert cli.main(["compare-classes", "--neuron", "Shirt", "--reference", str(good), "--similar", str(only_bad),
                     "--permutations", "9", "--no-progress", "--out", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(
        "cnnvis compare-classes: error: group similar: none of the 5 input image(s) is readable")
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_an_unreadable_file_named_explicitly_is_an_error(cluster, mixed, tmp_path, capsys):
    """A file the user names one by one is read or fails (one line naming it), on a cluster too;
    only the files of folders and image sets are skipped."""
    folder, good, _ = mixed
    argv = ["topk", str(good / "im0000.png"), str(folder / "im0003b.png"), "--layer", "conv1"]
    for dask in ([], ["--dask", _address(cluster), "--no-progress"]):
        out = tmp_path / f"out{len(dask)}"
        assert cli.main(argv + dask + ["--out", str(out)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "im0003b.png: not a readable image" in line
        # no output; a cluster run keeps only the shard results it recorded (for a rerun)
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and scale.STATE_DIR not in p.parts]


def test_a_task_failing_on_a_local_worker_prints_no_traceback(mixed, tmp_path):
    """A local cluster's workers log a failed task with its traceback on the command's stderr; the
    command says one line instead (the workers' log comes back with --debug)."""
    folder, good, _ = mixed
    argv = [sys.executable, "-m", "cnnvis", "topk", str(good / "im0000.png"), str(folder / "im0003b.png"),
            "--layer", "conv1", "--dask", "local:1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = {}
    for debug in ([], ["--debug"]):
        runs[bool(debug)] = subprocess.run(argv + debug + ["--out", str(tmp_path / f"out{len(debug)}")], env=env,
                                           capture_output=True, text=True, timeout=300)
    quiet = runs[False]
    assert quiet.returncode == 2
    errors = [line for line in quiet.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"cnnvis topk: error: {folder / 'im0003b.png'}: not a readable image")
    assert "Traceback" not in quiet.stderr and "Compute Failed" not in quiet.stderr
    assert runs[True].returncode != 0 and "Compute Failed" in runs[True].stderr  # --debug: the workers' log


def test_worker_killed_mid_run_changes_nothing(cluster, tmp_path):
    # larger images decode slowly enough that the run is still going when a worker dies
    folder = _images(tmp_path / "big", 120, seed=2, size=400)
    common = ["topk", str(folder), "--batch-size", "4", "--k", "3", "--layer", "conv1", "--maps", "0-3"]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    result = {}
    run = threading.Thread(target=lambda: result.setdefault("rc", cli.main(
        common + ["--out", str(out), "--dask", _address(cluster), "--shard-size", "4"])))
    pids = cluster.run(os.getpid)
    run.start()
    deadline = time.time() + 60
    done_at_kill = None
    while time.time() < deadline and run.is_alive():
        shards = list((out / scale.STATE_DIR).glob("*/shard-*.npz")) if out.exists() else []
        if shards:
            done_at_kill = len(shards)
            os.kill(sorted(pids.values())[0], signal.SIGKILL)
            break
        time.sleep(0.005)
    run.join(120)
    assert done_at_kill is not None and done_at_kill < 30, "the worker was not killed mid-run"
    assert result["rc"] == 0
    assert_same_outputs(tmp_path / "one", out)
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_client_killed_then_rerun_resumes(cluster, tmp_path):
    folder = _images(tmp_path / "big", 120, seed=3, size=400)
    common = ["topk", str(folder), "--batch-size", "4", "--k", "3", "--layer", "conv1", "--maps", "0-3"]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    dask_args = common + ["--out", str(out), "--dask", _address(cluster), "--shard-size", "4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "cnnvis", *dask_args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    recorded = []
    while time.time() < deadline and proc.poll() is None:
        recorded = list((out / scale.STATE_DIR).glob("*/shard-*.npz")) if out.exists() else []
        if len(recorded) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the client finished before it was killed"
    kept = len(list((out / scale.STATE_DIR).glob("*/shard-*.npz")))
    assert 3 <= kept < 30
    err = _run_capturing_stderr(dask_args)
    assert f"resuming: {kept} of 30 shard(s) already recorded" in err
    assert_same_outputs(tmp_path / "one", out)


def _run_capturing_stderr(argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


def test_dataset_channel_stats_against_numpy():
    from cnnvis.analysis.activations import DatasetChannelStats

    rng = np.random.default_rng(5)
    conv = rng.normal(size=(11, 3, 4, 5)).astype(np.float32)
    fc = rng.normal(size=(11, 6)).astype(np.float32)
    acc = DatasetChannelStats()
    for lo, hi in ((0, 4), (4, 5), (5, 11)):
        acc.update({"conv": conv[lo:hi], "fc": fc[lo:hi]})
    s = acc.summary()
    values = conv.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)  # channel × every value
    np.testing.assert_allclose(s["conv"]["mean"], values.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(s["conv"]["std"], values.std(axis=1), rtol=1e-12)
    assert s["conv"]["max"] == values.max(axis=1).tolist()
    assert s["conv"]["fraction_active"] == ((values > 0).sum(axis=1) / 220).tolist()
    assert s["conv"]["values_per_channel"] == 220 and acc.n_images_ == 11
    np.testing.assert_allclose(s["fc"]["std"], fc.astype(np.float64).std(axis=0), rtol=1e-12)


def test_activation_stats_on_local_cluster_equals_one_process(images, tmp_path):
    common = ["activations", str(images), "--stats", "--batch-size", "4", "--layer", "conv1", "--layer", "fc6"]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "two"), "--dask", "local:2", "--shard-size", "8",
                              "--no-progress"]) == 0
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    data = json.loads((tmp_path / "one" / "activation_stats.json").read_text())
    assert data["n_images"] == 40 and len(data["layers"]["conv1"]["mean"]) == 48


def test_image_tree_on_cluster_equals_the_folders_given_one_process(cluster, images, tmp_path):
    import shutil

    tree = tmp_path / "tree"
    for i, f in enumerate(sorted(images.glob("*.png"))[:12]):
        (tree / ("n02" if i % 3 else "n01")).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tree / ("n02" if i % 3 else "n01") / f.name)
    syn = tmp_path / "synset.txt"
    syn.write_text("n01 first class\nn02 second class\n")
    common = ["topk", "--batch-size", "4", "--k", "2", "--layer", "conv1", "--maps", "0-3"]
    assert cli.main(common + [str(tree / "n01"), str(tree / "n02"), "--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--image-tree", str(tree), "--synsets", str(syn), "--out", str(tmp_path / "two"),
                              "--dask", _address(cluster), "--shard-size", "4", "--no-progress"]) == 0
    assert_same_outputs(tmp_path / "one", tmp_path / "two", other_inputs=True)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["runs"]["topk"]["inputs"] == [str(tree), str(syn)]


def test_per_image_commands_on_cluster_equal_one_process(cluster, images, tmp_path):
    files = [str(p) for p in sorted(images.glob("*.png"))]
    runs = {"conv-gradients": (files[:4], ["-f", "npy", "--top-k", "2"]),
            "occlusion": (files[4:7], ["--window", "14", "--stride", "7"])}
    for command, (few, extra) in runs.items():
        base = [command, *few, "--batch-size", "2", *extra]
        assert cli.main(base + ["--out", str(tmp_path / command / "one")]) == 0
        assert cli.main(base + ["--out", str(tmp_path / command / "two"), "--dask", _address(cluster),
                                "--shard-size", "2", "--no-progress"]) == 0
        assert_same_outputs(tmp_path / command / "one", tmp_path / command / "two")


def test_compare_classes_groups_from_an_image_tree(images, tmp_path):
    import shutil

    from cnnvis import registry

    classes = registry.load(registry.default_model_name()).class_names
    syn = tmp_path / "synset.txt"
    syn.write_text("".join(f"c{i} {name}\n" for i, name in enumerate(classes)))
    files = sorted(images.glob("*.png"))
    for k, folder in enumerate(("c6", "c0", "c1")):  # Shirt, T-shirt/top, Trouser
        (tmp_path / "tree" / folder).mkdir(parents=True)
        for f in files[4 * k:4 * k + 4]:
            shutil.copy(f, tmp_path / "tree" / folder / f.name)
    common = ["compare-classes", "--permutations", "9", "--batch-size", "4", "--format", "npy", "--no-progress"]
    tree = tmp_path / "tree"
    assert cli.main(common + ["--neuron", "Shirt", "--reference", str(tree / "c6"), "--similar", str(tree / "c0"),
                              "--dissimilar", str(tree / "c1"), "--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--neuron", "Shirt", "--similar", classes[0], "--dissimilar", "1",
                              "--image-tree", str(tree), "--synsets", str(syn), "--out", str(tmp_path / "two")]) == 0
    one, two = (json.loads((tmp_path / o / "summary.json").read_text()) for o in ("one", "two"))
    assert one == two and one["counts"] == {"reference": 4, "similar": 4, "dissimilar": 4}
    assert (tmp_path / "one" / "cosine_similarity.npy").read_bytes() == \
        (tmp_path / "two" / "cosine_similarity.npy").read_bytes()


def test_worker_errors_reach_the_client_as_one_line(cluster, images, tmp_path):
    from cnnvis import preprocess, registry

    model = registry.load(registry.default_model_name())
    shards = scale.make_shards(sorted(images.glob("*.png"))[:4], 4, 4)
    job = {"model": scale.model_ref(registry.default_model_name(), None, "cpu", 1, "f" * 64),
           "preprocessing": preprocess.for_model(model).to_dict(), "layer": "conv1", "k": 2, "batch_size": 4}
    store = scale.ShardStore(tmp_path, "topk", {"t": 1})
    with pytest.raises(CnnvisError, match="on the client \\(a different file\\)"):
        scale.run_shards(cluster, scale.topk_shard, job, shards, store, "test", progress=False)
    assert store.done() == set()


def test_dataclass_records_round_trip_exactly(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Result:
        window: tuple
        values: np.ndarray
        score: float
        label: int | None = None

    res = Result((3, 5), np.arange(6, dtype=np.float32).reshape(2, 3) / 7, 0.1 + 0.2, None)
    meta, arrays = scale.record_of(res)
    store = scale.ShardStore(tmp_path, "t", {})
    store.save(0, {"records": [meta]}, arrays)  # through the JSON + .npz file
    back = store.load(0)
    again = scale.from_record(Result, back.meta["records"][0], back.arrays)
    assert again.window == (3, 5) and again.score == 0.1 + 0.2 and again.label is None
    assert again.values.dtype == np.float32 and np.array_equal(again.values, res.values)
