import json
import os

import numpy as np
import pytest

from cnnvis.errors import CnnvisError
from cnnvis.manifest import RunOutput, atomic_path, ensure_writable_dir, save_npy, write_json


def test_run_output_commits_files_and_manifest(tmp_path):
    with RunOutput(tmp_path, "demo", params={"k": 3}, inputs=["a.png"], model={"name": "m"}) as run:
        save_npy(run.path("x/arr.npy", kind="stack", layer="conv1"), np.arange(4))
        assert not (tmp_path / "x" / "arr.npy").exists()  # staged, not yet visible
    np.testing.assert_array_equal(np.load(tmp_path / "x" / "arr.npy"), np.arange(4))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    rec = manifest["runs"]["demo"]
    assert rec["params"] == {"k": 3} and rec["inputs"] == ["a.png"]
    assert rec["files"] == [{"path": "x/arr.npy", "kind": "stack", "layer": "conv1"}]
    assert rec["wall_time_s"] >= 0
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging left


def test_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RunOutput(tmp_path, "demo") as run:
            save_npy(run.path("arr.npy", kind="stack"), np.arange(4))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_second_command_merges_into_manifest(tmp_path):
    for cmd in ("a", "b", "a"):
        with RunOutput(tmp_path, cmd) as run:
            write_json(run.path(f"{cmd}.json", kind="table"), {"cmd": cmd})
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())["runs"]) == ["a", "b"]


def test_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CnnvisError, match=r"^out=.*file/sub: cannot write there \(.*file is a file, not a folder\)$") as err:
        ensure_writable_dir(blocker / "sub")
    assert err.value.params == ("out",)


def test_atomic_path_removes_temp_on_error(tmp_path):
    target = tmp_path / "t.bin"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError
    assert os.listdir(tmp_path) == []


def test_same_command_with_other_parameters_keeps_both_records(tmp_path):
    for k in (1, 2, 1):
        with RunOutput(tmp_path, "order", params={"method": f"m{k}"}) as run:
            write_json(run.path(f"order_m{k}.json", kind="table"), {"k": k})
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert len(runs) == 2 and runs["order"]["params"] == {"method": "m1"}
    (other,) = [key for key in runs if key != "order"]
    assert other.startswith("order [") and runs[other]["params"] == {"method": "m2"}


def test_load_npy_refuses_every_bad_file_in_one_line(bad_npy_files):
    from cnnvis.manifest import load_npy

    for name, path in bad_npy_files.items():
        for mmap in (False, True):
            with pytest.raises(CnnvisError) as info:
                load_npy(path, "--thing", "a 2-D array", mmap=mmap)
            msg = str(info.value)
            assert msg.startswith(f"--thing {path}: ") and msg.endswith("; expected a 2-D array") and "\n" not in msg
            assert ("an .npz archive" if name == "archive" else "not a readable .npy array") in msg
    np.save(path.parent / "ok.npy", np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(load_npy(path.parent / "ok.npy", "--thing"), np.arange(6.0).reshape(2, 3))


def test_list_files_expands_folders_by_suffix_and_keeps_named_files(tmp_path):
    from cnnvis.manifest import list_files

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in ("b.onnx", "A.ONNX", "notes.txt"):
        (folder / name).write_text("x")
    (folder / "sub.onnx").mkdir()  # a folder is not a file, whatever its name
    named = tmp_path / "final.bin"
    named.write_text("x")
    files = list_files([named, folder], (".onnx",), ".onnx files")
    assert [f.name for f in files] == ["final.bin", "A.ONNX", "b.onnx"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnnvisError, match=r"^--checkpoints .*empty: folder has no \.onnx files$"):
        list_files([tmp_path / "empty"], (".onnx",), ".onnx files", label="--checkpoints")
    with pytest.raises(CnnvisError, match=r"^.*missing: no such file or folder$"):
        list_files([tmp_path / "missing"], (".onnx",), ".onnx files")


# ------------------------------------------------------------------ crash-safe commits
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A run writing n files "f<i>.txt" whose text is "<tag> <i>", in its own process.
WRITER = """
import sys
from cnnvis.manifest import RunOutput
out, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with RunOutput(out, "writer", params={"files": "f<i>.txt"}) as run:
    for i in range(n):
        run.path(f"d{i % 3}/f{i}.txt", kind="text").write_text(f"{tag} {i}")
"""


def _writer(out, tag, n, pause=None, mark=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if pause:
        env.update(CNNVIS_TEST_COMMIT_PAUSE=str(pause), CNNVIS_TEST_COMMIT_MARK=str(mark))
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), tag, str(n)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def default_sigint():
    """In the child: Ctrl-C as a terminal sends it. A suite started in the background by a shell
    inherits SIGINT ignored, and so would the child, which then never sees the test's SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _snapshot(out):
    """Every file under ``out`` (hidden ones included) with its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def _wait_for(mark, lines, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if mark.exists() and len(mark.read_text().splitlines()) >= lines:
            return mark.read_text().splitlines()
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the commit never reached the pause")


def _old_run(out):
    proc = _writer(out, "old", 6)
    assert proc.wait(60) == 0, proc.communicate()
    return _snapshot(out)


def _paused_commit(out, tag, n, seconds, step):
    """A run of ``n`` files tagged ``tag`` into ``out`` whose commit pauses ``seconds`` after its
    ``step``-th step; returns (its process, the steps marked) once it is there."""
    mark = out.parent / "mark"
    proc = _writer(out, tag, n, pause=f"{seconds}@{step}", mark=mark)
    return proc, _wait_for(mark, step, proc)


def _run_files(files):
    """The files of a snapshot under the writer's folders d0, d1, d2."""
    return {k: v for k, v in files.items() if k.startswith("d")}


def _written(tag, n):
    """What the writer writes: f<i>.txt in d<i % 3>, holding "<tag> <i>"."""
    return {f"d{i % 3}/f{i}.txt": f"{tag} {i}".encode() for i in range(n)}


def test_sigkill_between_moves_is_rolled_back_at_next_start(tmp_path):
    out = tmp_path / "out"
    old = _old_run(out)
    proc, steps = _paused_commit(out, "new", 6, 30, 8)  # 6 old files aside, 2 new ones moved in
    assert steps == ["aside"] * 6 + ["moved"] * 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    # the folder is now half-done: 2 new files, 4 missing, the manifest still the old one
    assert (out / "d0" / "f0.txt").read_text() == "new 0" and not (out / "d2" / "f2.txt").exists()
    with RunOutput(out, "other") as run:  # any next start mends it (rollback: no commit point yet)
        run.path("other.txt", kind="text").write_text("x")
    now = _snapshot(out)
    now.pop("other.txt")
    manifest = json.loads(now.pop("manifest.json"))
    old_manifest = json.loads(old.pop("manifest.json"))
    assert now == old  # every file of the old run back, byte for byte, nothing else left
    assert manifest["runs"]["writer"] == old_manifest["runs"]["writer"]


def test_sigkill_after_the_commit_point_is_completed_at_next_start(tmp_path):
    out = tmp_path / "out"
    _old_run(out)
    (out / "d1" / "extra.txt").write_text("not cnnvis's")  # a user's file is never touched
    proc, steps = _paused_commit(out, "new", 4, 30, 6 + 4 + 1)  # the old run's f4, f5 are dropped
    assert steps[-1] == "committed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert [p for p in os.listdir(out) if p.startswith(".cnnvis-stage-")]  # the aside files wait
    with RunOutput(out, "other") as run:
        run.path("other.txt", kind="text").write_text("x")
    files = _snapshot(out)
    assert _run_files(files) == {**_written("new", 4), "d1/extra.txt": b"not cnnvis's"}
    assert [k for k in files if k.startswith(".")] == []
    runs = json.loads(files["manifest.json"])["runs"]
    assert [f["path"] for f in runs["writer"]["files"]] == sorted(_written("new", 4))


def test_sigint_during_the_moves_waits_for_the_commit(tmp_path):
    out = tmp_path / "out"
    _old_run(out)
    proc, _ = _paused_commit(out, "new", 6, 2, 3)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert proc.returncode != 0  # interrupted, but only once the commit was whole
    files = _snapshot(out)
    assert _run_files(files) == _written("new", 6)
    assert [k for k in files if k.startswith(".")] == []


def test_a_concurrent_commit_waits_for_the_lock(tmp_path):
    out = tmp_path / "out"
    _old_run(out)
    first, _ = _paused_commit(out, "first", 6, 1, 1)
    second = _writer(out, "second", 6)
    assert first.wait(60) == 0 and second.wait(60) == 0
    files = _snapshot(out)
    assert _run_files(files) == _written("second", 6)


@pytest.mark.parametrize("kind", ["garbage", "folder", "list"])
def test_corrupt_manifest_is_one_line_before_anything_moves(tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "manifest.json"
    if kind == "folder":
        target.mkdir()
    else:
        target.write_text("{not json" if kind == "garbage" else '{"runs": [1, 2]}')
    with pytest.raises(CnnvisError) as info:
        with RunOutput(out, "demo") as run:
            run.path("a.txt", kind="text").write_text("a")
    assert "manifest.json" in str(info.value) and "\n" not in str(info.value)
    assert sorted(os.listdir(out)) == ["manifest.json"]


def test_other_parameters_writing_all_of_a_runs_files_replace_that_run(tmp_path):
    with RunOutput(tmp_path, "order", params={"method": "a"}) as run:
        run.path("order.json", kind="table").write_text("a")
    with RunOutput(tmp_path, "order", params={"method": "b"}) as run:
        run.path("order.json", kind="table").write_text("b")
        run.path("order.png", kind="plot").write_text("b")
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert list(runs) == ["order"] and runs["order"]["params"] == {"method": "b"}  # a's record went with its file
    assert (tmp_path / "order.json").read_text() == "b"


def test_other_parameters_overwriting_part_of_a_run_are_refused(tmp_path):
    with RunOutput(tmp_path, "activations", params={"layers": ["conv1", "conv2"]}) as run:
        for layer in ("conv1", "conv2"):
            run.path(f"cat/{layer}.png", kind="grid").write_text(layer)
    with RunOutput(tmp_path, "filters", params={}) as run:
        run.path("conv1_filters.png", kind="filters").write_text("f")
    before = _snapshot(tmp_path)
    with pytest.raises(CnnvisError) as info:
        with RunOutput(tmp_path, "activations", params={"layers": ["conv2"]}) as run:
            run.path("cat/conv2.png", kind="grid").write_text("new")
    assert str(info.value) == (
        f"out={tmp_path}: holds a run of the same command with other parameters ('activations' in "
        "manifest.json) with files this run would overwrite (cat/conv2.png) and others it would not; write "
        "to another folder, or remove that folder's results first")
    assert info.value.params == ("out",)
    with pytest.raises(CnnvisError, match=r"holds a filters run \('filters' in manifest.json\)"):
        with RunOutput(tmp_path, "other", params={}) as run:
            run.path("conv1_filters.png", kind="plot").write_text("x")
    assert _snapshot(tmp_path) == before  # nothing moved, no record changed


def test_a_rerun_replaces_its_previous_files_as_a_whole(tmp_path):
    with RunOutput(tmp_path, "demo") as run:
        for name in ("cat", "dog"):
            run.path(f"{name}/x.txt", kind="text").write_text(name)
    with RunOutput(tmp_path, "demo") as run:
        run.path("cat/x.txt", kind="text").write_text("cat2")
    assert _snapshot(tmp_path).keys() == {"cat/x.txt", "manifest.json"}  # dog/ went with its run
    assert (tmp_path / "cat" / "x.txt").read_text() == "cat2"


def test_stale_stages_and_parts_of_dead_processes_are_removed(tmp_path):
    import fcntl

    with RunOutput(tmp_path, "demo") as run:
        run.path("sub/a.txt", kind="text").write_text("a")
    stale = tmp_path / ".cnnvis-stage-dead"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "a.txt").write_text("left by a killed run")
    (tmp_path / "sub" / ".x.png.abc.part").write_text("half")  # beside the run's files
    (tmp_path / ".top.json.abc.part").write_text("half")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".user.part").write_text("not in a folder cnnvis writes: left alone")
    live = tmp_path / ".y.png.def.part"
    live.write_text("being written")
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live writer's temp file stays
        with RunOutput(tmp_path, "demo") as run:
            run.path("sub/a.txt", kind="text").write_text("a")
    assert sorted(_snapshot(tmp_path)) == [".y.png.def.part", "manifest.json", "other/.user.part", "sub/a.txt"]


def test_a_file_where_an_output_folder_goes_is_one_line(tmp_path):
    (tmp_path / "cat").write_text("I am a file")
    with pytest.raises(CnnvisError, match=r"cat: a file is where a folder must go \(for output cat/x\.txt\)$"):
        with RunOutput(tmp_path, "demo") as run:
            run.path("cat/x.txt", kind="text").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["cat"]


# ------------------------------------------------------------------ full disks
def test_enospc_while_writing_is_one_line_and_keeps_the_earlier_run(tmp_path, monkeypatch):
    import errno as errno_

    with RunOutput(tmp_path, "demo") as run:
        save_npy(run.path("a.npy", kind="stack"), np.arange(3))
    before = _snapshot(tmp_path)
    real_save = np.save

    def full_disk(f, *args, **kwargs):
        real_save(f, np.zeros(2), allow_pickle=False)  # half written, then the disk is full
        raise OSError(errno_.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(CnnvisError) as info:
        with RunOutput(tmp_path, "demo") as run:
            save_npy(run.path("sub/a.npy", kind="stack"), np.arange(3))
    assert str(info.value) == f"no space left on device writing {tmp_path / 'sub' / 'a.npy'}"
    assert _snapshot(tmp_path) == before


def _small_tmpfs(tmp_path, size="256k"):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    return mount


def test_a_full_disk_under_hdf5_is_one_line_no_crash_and_keeps_the_earlier_run(tmp_path):
    """`cnnvis activations` writes gzip'd HDF5 stacks: on a full disk HDF5's failed flush used to
    leave half-closed handles that crashed the interpreter (SIGSEGV, exit -11)."""
    from cnnvis.nets import NetBuilder

    b = NetBuilder((3, 64, 64), seed=0)
    b.conv("conv1", 64, 3, pad=1)
    b.relu("relu1")
    b.fc("fc1", 5)
    b.softmax("prob")
    model = tmp_path / "tiny.onnx"
    model.write_bytes(b.build("tiny").SerializeToString())
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32))
    mount = _small_tmpfs(tmp_path, "512k")
    try:
        with RunOutput(mount, "activations") as run:
            run.path("earlier.txt", kind="text").write_text("kept")
        before = _snapshot(mount)
        proc = subprocess.run([sys.executable, "-m", "cnnvis", "activations", "--model", str(model),
                               "--input-array", str(x), "--out", str(mount)],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr  # a user error, not a crash
        assert proc.stderr.startswith("cnnvis activations: error: no space left on device writing ")
        assert len(proc.stderr.strip().splitlines()) == 1 and ".cnnvis-stage" not in proc.stderr
        assert _snapshot(mount) == before  # nothing partial, the earlier run intact
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_hdf5_file_writes_the_bytes_hdf5_writes_directly(tmp_path):
    import h5py

    from cnnvis.manifest import hdf5_file

    data = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    with h5py.File(tmp_path / "direct.h5", "w") as f:
        f.attrs["image"] = "cat"
        f.create_dataset("conv1", data=data, compression="gzip", compression_opts=4, shuffle=True)
    with hdf5_file(tmp_path / "mem.h5") as f:
        f.attrs["image"] = "cat"
        f.create_dataset("conv1", data=data, compression="gzip", compression_opts=4, shuffle=True)
    assert (tmp_path / "mem.h5").read_bytes() == (tmp_path / "direct.h5").read_bytes()


def test_an_os_error_in_the_middle_of_the_moves_rolls_back_in_one_line(tmp_path, monkeypatch):
    import errno as errno_

    from cnnvis import manifest

    out = tmp_path / "out"
    with RunOutput(out, "writer") as run:
        for i in range(4):
            run.path(f"d/f{i}.txt", kind="text").write_text(f"old {i}")
    before = _snapshot(out)
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith("f2.txt") and ".aside" not in str(dst) and ".aside" not in str(src):
            raise OSError(errno_.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(manifest.os, "replace", failing)
    with pytest.raises(CnnvisError) as info:
        with RunOutput(out, "writer") as run:
            for i in range(4):
                run.path(f"d/f{i}.txt", kind="text").write_text(f"new {i}")
    assert str(info.value) == f"no space left on device writing {out / 'd' / 'f2.txt'}"
    assert _snapshot(out) == before  # f0, f1 had been moved in: rolled back, the old run whole


def test_replacing_one_run_then_rerunning_another_keeps_one_record_each(tmp_path):
    # "m1" and "m2" coexist; a run of m2 that writes all of m1's files replaces m1; a rerun of m2
    # then finds its own record (not a second one)
    def run(method, files):
        with RunOutput(tmp_path, "order", params={"method": method}) as r:
            for f in files:
                r.path(f, kind="table").write_text(method)

    run("m1", ["a.json"])
    run("m2", ["b.json"])
    run("m2", ["a.json", "b.json"])
    run("m2", ["a.json", "b.json"])
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert len(runs) == 1 and [r["params"] for r in runs.values()] == [{"method": "m2"}]
    assert sorted(f["path"] for f in next(iter(runs.values()))["files"]) == ["a.json", "b.json"]


def test_load_npy_checks_the_header_before_allocating(tmp_path):
    """A header claiming 1e11 images over 1000 bytes is refused without allocating (MemoryError
    before); a complete file over the memory budget is refused unless memory-mapped."""
    import numpy as np

    from cnnvis import limits
    from cnnvis.manifest import load_npy

    bomb = tmp_path / "bomb.npy"
    with open(bomb, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10 ** 11, 1, 28, 28)})
        f.write(b"\0" * 1000)
    with pytest.raises(CnnvisError, match=r"^--x .*bomb\.npy: not a readable \.npy array \(its header claims "
                                          r"100000000000 x 1 x 28 x 28 float32, 313,600,000,000,000 bytes, "
                                          r"but the file holds 1,000 bytes of data\)"):
        load_npy(bomb, "--x")
    ok = tmp_path / "ok.npy"
    np.save(ok, np.arange(1000, dtype=np.float64))
    with limits.memory_limit_set(7999):
        with pytest.raises(CnnvisError, match=r"ok\.npy: a 1000 float64 array: needs 8,000 B, more than the memory limit 7,999 B"):
            load_npy(ok, "--x")
        assert load_npy(ok, "--x", mmap=True)[999] == 999.0  # a memory map is not read at once
    with limits.memory_limit_set(8000):
        assert load_npy(ok, "--x").sum() == 499500.0
