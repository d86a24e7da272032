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
    with pytest.raises(CnnvisError, match=r"--out .*file.*cannot write"):
        ensure_writable_dir(blocker / "sub")


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
