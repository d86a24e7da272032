"""Atomic writes and the run manifest.

Every command writes its files through a :class:`RunOutput`: files are first written into a
staging folder inside ``--out`` and moved into place only when the whole command succeeded, so a
failed run leaves no half-written output. ``manifest.json`` records, per command, the inputs,
parameters, model, wall time and every output file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import CnnvisError

MANIFEST_NAME = "manifest.json"


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj):
    """Convert numpy scalars/arrays and paths so that json.dumps accepts them."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_json(obj) -> str:
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"


def write_json(path, obj) -> Path:
    return write_text(path, dumps_json(obj))


def save_npy(path, array) -> Path:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def load_npy(path, what: str, expected: str | None = None, mmap: bool = False):
    """A user's ``.npy`` file as an array: never unpickles, and an unreadable, empty, truncated,
    pickled or ``.npz`` file is one CnnvisError naming ``what``, the path and ``expected``."""
    import numpy as np

    path = Path(path)
    tail = f"; expected {expected}" if expected else ""
    _check_npy_header(path, what, tail, mmap)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CnnvisError(f"{what} {path}: not a readable .npy array ({reason}){tail}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise CnnvisError(f"{what} {path}: an .npz archive, not a single .npy array{tail}")
    return array


def _check_npy_header(path: Path, what: str, tail: str, mmap: bool) -> None:
    """Before ``np.load``: the size an ``.npy`` header claims must be in the file (a header claiming
    1e11 images over a few bytes is refused, not allocated) and, unless memory-mapped, within the
    memory budget (cnnvis.limits). Files that are not plain ``.npy`` are left to ``np.load``."""
    import numpy as np

    from . import limits

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=10000)
            start = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError, SyntaxError, TypeError):
        return  # np.load says what is wrong, in its words
    if dtype.hasobject:
        return
    count = 1
    for d in shape:
        count *= int(d)
    nbytes = count * dtype.itemsize
    shown = " x ".join(map(str, shape)) or "scalar"
    if start + nbytes > size:
        raise CnnvisError(f"{what} {path}: not a readable .npy array (its header claims {shown} {dtype}, "
                          f"{nbytes:,} bytes, but the file holds {size - start:,} bytes of data){tail}")
    if not mmap:
        limits.check(nbytes, f"{what} {path}: a {shown} {dtype} array")


def list_files(items, suffixes, what: str, label: str = "") -> list:
    """User files from files and folders, in the given order: a folder gives its files whose suffix
    is in ``suffixes`` (lower case, not recursive), sorted by name; a file named explicitly is kept
    whatever its suffix. A missing path, or a folder without such files, is a CnnvisError
    ``"<label> <path>: ..."`` naming ``what`` (e.g. "image files")."""
    prefix = f"{label} " if label else ""
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted((c for c in p.iterdir() if c.is_file() and c.suffix.lower() in suffixes),
                           key=lambda c: c.name)
            if not found:
                raise CnnvisError(f"{prefix}{p}: folder has no {what}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CnnvisError(f"{prefix}{p}: no such file or folder")
    return files


def ensure_writable_dir(out) -> Path:
    """Create ``out`` if needed and check that files can be written there (one-line error if not)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cnnvis-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CnnvisError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


class RunOutput:
    """Collects one command's output files in a staging folder and commits them together.

    Use as a context manager::

        with RunOutput(out, "activations", params={...}) as run:
            path = run.path("conv1/grid.png", kind="grid", layer="conv1", image="cat.jpg")
            save_png(path, ...)

    On success every staged file is moved into ``out`` and ``out/manifest.json`` is updated with
    this command's entry; on an exception the staging folder is removed and ``out`` is untouched.
    """

    def __init__(self, out, command: str, params: dict | None = None, inputs=None, model=None):
        self.out = ensure_writable_dir(out)
        self.command = command
        self.params = dict(params or {})
        self.inputs = [str(i) for i in (inputs or [])]
        self.model = model  # dict with name/sha256/... or None
        self.files: list[dict] = []
        self.extra: dict = {}
        self._stage: Path | None = None
        self._t0 = None

    def __enter__(self):
        self._stage = Path(tempfile.mkdtemp(prefix=".cnnvis-stage-", dir=self.out))
        self._t0 = time.perf_counter()
        return self

    def path(self, relpath, kind: str, **meta) -> Path:
        """A staging path for output ``relpath`` (relative to ``out``), recorded in the manifest."""
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"output path must be relative to --out: {relpath}")
        entry = {"path": rel.as_posix(), "kind": kind}
        entry.update({k: v for k, v in meta.items() if v is not None})
        self.files = [f for f in self.files if f["path"] != entry["path"]] + [entry]
        target = self._stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self._stage, ignore_errors=True)
        return False

    def _commit(self):
        from . import __version__

        for entry in self.files:
            src = self._stage / entry["path"]
            if not src.exists():
                raise RuntimeError(f"output {entry['path']} was registered but never written")
        for entry in self.files:
            src = self._stage / entry["path"]
            dst = self.out / entry["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        record = {
            "command": self.command,
            "params": self.params,
            "inputs": self.inputs,
            "model": self.model,
            "files": sorted(self.files, key=lambda f: f["path"]),
            "wall_time_s": round(time.perf_counter() - self._t0, 3),
        }
        record.update(self.extra)
        manifest_path = self.out / MANIFEST_NAME
        manifest = read_manifest(manifest_path) if manifest_path.exists() else {}
        runs = manifest.get("runs", {})
        runs[run_key(runs, self.command, record["params"])] = record
        write_json(manifest_path, {"cnnvis_version": __version__, "runs": runs})


def run_key(runs: dict, command: str, params: dict) -> str:
    """The key of a run in ``manifest.json``: the command name; a run of the same command with other
    parameters in the same folder gets ``command [hash of its parameters]``, so that neither run's
    record is lost. A rerun with the same parameters replaces its own record."""
    params = to_jsonable(params)
    if command not in runs or to_jsonable(runs[command].get("params")) == params:
        return command
    digest = hashlib.sha256(dumps_json(params).encode()).hexdigest()[:8]
    return f"{command} [{digest}]"


def read_manifest(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CnnvisError(f"{path}: not a readable cnnvis manifest ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs", {}), dict):
        raise CnnvisError(f"{path}: not a cnnvis manifest (no 'runs' object)")
    return data
