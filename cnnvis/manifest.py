"""Atomic writes and the run manifest.

Every command writes its files through a :class:`RunOutput`: files are first written into a
staging folder inside ``--out`` and moved into place only when the whole command succeeded, so a
failed run leaves no half-written output. ``manifest.json`` records, per command, the inputs,
parameters, model, wall time and every output file.

The commit into ``--out`` is crash-safe:

* it holds an exclusive ``flock`` on the ``--out`` folder itself (nothing is left behind), so two
  commits into one folder never interleave;
* ``manifest.json`` is read and checked before anything moves, and written last (atomically): the
  rename of the new manifest is the commit point;
* the files of the previous run it replaces are moved aside into the staging folder, the new ones
  moved in, and the old ones dropped only after the manifest names the new run. A journal in the
  staging folder (``.commit.json``) lets the next :class:`RunOutput` on that folder finish the job
  of a process killed in between: before the commit point it rolls back (the previous run's files
  return), after it it rolls forward. SIGINT/SIGTERM are held back during the moves;
* a staging folder whose owner died (no process holds its lock) and ``.part`` files whose writer
  died are removed at the next start;
* a run of a command that already has a run with other parameters in the folder keeps both
  records when their files are distinct, replaces that run (record and files) when it writes all
  of its files again, and is refused (one line, nothing moved) when it would overwrite only some
  of them, or another command's files: a manifest never describes files another run replaced;
* a rerun (same command, same parameters) replaces its previous files as a whole: files the new
  run no longer makes are removed with the old ones;
* an OS error while writing (no space left, quota, read-only, file too large) is one line naming
  the file; the staging folder is removed and the previous run stays intact.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

from .errors import CnnvisError

MANIFEST_NAME = "manifest.json"
STAGE_PREFIX = ".cnnvis-stage-"
JOURNAL_NAME = ".commit.json"      # inside a staging folder: a commit in progress
NEW_MANIFEST = ".manifest.json"    # inside a staging folder: the manifest the commit will install
ASIDE_NAME = ".aside"              # inside a staging folder: the replaced run's files
PART_SUFFIX = ".part"

#: OS errors that mean "the disk/folder cannot take this write", reported in one line
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's limit",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")


def file_hash(path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """The hex digest of a file's bytes (``algo``: any hashlib name), read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    return file_hash(path, "sha256", chunk)


def write_error_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one HDF5 spells inside its message
    (h5py raises OSError or RuntimeError with "errno = 28" in the text)."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return exc.errno
    if isinstance(exc, (OSError, RuntimeError)):
        found = _ERRNO_IN_TEXT.search(str(exc))
        if found and int(found.group(1)) in _WRITE_ERRNOS:
            return int(found.group(1))
    return None


def write_error(exc: BaseException, path, params=()) -> CnnvisError | None:
    """A one-line CnnvisError for a failed write of ``path`` (None when ``exc`` is not one);
    ``params``: the parameters ``path`` names as ``name=value``."""
    code = write_error_errno(exc)
    if code is None:
        return None
    return CnnvisError(f"{_WRITE_ERRNOS[code]} writing {path}", params=params)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary ``.<name>.XXXX.part`` file is locked (flock) while it exists, so a later run can
    tell a dead writer's leftover from a file being written (:func:`remove_stale_parts`). An OS
    error such as ENOSPC becomes one CnnvisError naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise (write_error(exc, path) or _folder_error(exc, path)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            error = write_error(exc, path)
            if error is None:
                raise
            raise error from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)


def _folder_error(exc: OSError, path: Path) -> Exception:
    """A file sitting where a folder must go (or the reverse) is the user's problem: one line."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        blocker = file_in_the_way(path)
        if blocker is not None and blocker != path:
            return CnnvisError(f"{blocker}: a file is where a folder must go (writing {path})")
        return CnnvisError(f"{path}: cannot write there ({exc.strerror or exc})")
    return exc


@contextlib.contextmanager
def hdf5_file(path, shown=None):
    """A new HDF5 file at ``path``, built in memory (h5py's ``core`` driver, no backing store) and
    written in one piece when the block succeeds: a full disk is then an ordinary write error (one
    CnnvisError naming ``shown``, default ``path``), never a failed flush inside HDF5, whose
    half-closed handles crashed the interpreter (SIGSEGV) when they were freed. The bytes are those
    HDF5 writes to a file directly."""
    import h5py

    shown = path if shown is None else shown
    f = h5py.File(str(path), "w", driver="core", backing_store=False)
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    try:
        with open(path, "wb") as out:
            out.write(image)
    except OSError as exc:
        raise (write_error(exc, shown) or exc) from None


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


def file_in_the_way(folder) -> Path | None:
    """The first path on the way to ``folder`` (itself included) that exists and is not a folder
    (a file, a fifo, a dangling symlink), or None: where creating ``folder`` would fail."""
    folder = Path(folder)
    return next((p for p in [*reversed(folder.parents), folder]
                 if (p.exists() or p.is_symlink()) and not p.is_dir()), None)


def check_output_folders(folders) -> None:
    """Before a command that writes into several ``--out`` folders (run-all's steps) starts: a
    file sitting where one of them must go is one CnnvisError naming it, before anything runs
    or moves."""
    for folder in folders:
        blocker = file_in_the_way(folder)
        if blocker is not None:
            where = "an output folder" if blocker == Path(folder) else f"the output folder {folder}"
            raise CnnvisError(f"{blocker}: a file is where {where} must go; move it away or write to another output folder")


def ensure_writable_dir(out) -> Path:
    """Create ``out`` if needed and check that files can be written there (one-line error if not)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cnnvis-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        blocker = file_in_the_way(out)
        if blocker is not None:
            raise CnnvisError(f"out={out}: cannot write there ({blocker} is a file, not a folder)",
                              params="out") from None
        raise CnnvisError(f"out={out}: cannot write there ({exc.strerror or exc})", params="out") from None
    return out


class RunOutput:
    """Collects one command's output files in a staging folder and commits them together.

    Use as a context manager::

        with RunOutput(out, "activations", params={...}) as run:
            path = run.path("conv1/grid.png", kind="grid", layer="conv1", image="cat.jpg")
            save_png(path, ...)

    On success every staged file is moved into ``out`` and ``out/manifest.json`` is updated with
    this command's entry (see the module docstring for how the commit survives crashes); on an
    exception the staging folder is removed and ``out`` is untouched.
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
        self._stage_fd: int | None = None
        self._t0 = None

    def __enter__(self):
        with folder_lock(self.out):
            recover(self.out)
            read_manifest_in(self.out)  # a corrupt manifest fails now, before any work
            try:
                self._stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=self.out))
            except OSError as exc:
                raise (write_error(exc, self.out) or exc) from None
            # held while this run lives: a later run removes the folder only once its owner is gone
            self._stage_fd = os.open(self._stage, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._stage_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._t0 = time.perf_counter()
        return self

    def path(self, relpath, kind: str, **meta) -> Path:
        """A staging path for output ``relpath`` (relative to ``out``), recorded in the manifest."""
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] in _RESERVED \
                or rel.parts[0].startswith(".cnnvis"):
            raise ValueError(f"output path must be relative to the out folder: {relpath}")
        entry = {"path": rel.as_posix(), "kind": kind}
        entry.update({k: v for k, v in meta.items() if v is not None})
        self.files = [f for f in self.files if f["path"] != entry["path"]] + [entry]
        target = self._stage / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (write_error(exc, self.out / rel) or exc) from None
        return target

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        except Exception as error:
            restated = self._restated(error)
            if restated is None:
                raise
            raise restated from None
        finally:
            shutil.rmtree(self._stage, ignore_errors=True)
            os.close(self._stage_fd)
        if exc_type is not None and issubclass(exc_type, Exception):
            restated = self._restated(exc)
            if restated is not None:
                raise restated from None
        return False

    def _restated(self, error: BaseException) -> CnnvisError | None:
        """A failed write as one line naming where the file was going (not the staging folder);
        None for other errors."""
        if isinstance(error, CnnvisError):
            if str(self._stage) in str(error):
                return CnnvisError(str(error).replace(str(self._stage), str(self.out)))
            return None
        if isinstance(error, (OSError, RuntimeError)):
            filename = getattr(error, "filename", None)
            return write_error(error, self._shown(filename), params=() if filename else "out")
        return None

    def _shown(self, filename) -> str:
        """Where a failed write was going, said as the final path under ``out``."""
        if not filename:
            return f"into out={self.out}"
        try:
            return str(self.out / Path(filename).relative_to(self._stage))
        except ValueError:
            return str(filename)

    def _commit(self):
        from . import __version__

        for entry in self.files:
            src = self._stage / entry["path"]
            if not src.is_file():
                raise RuntimeError(f"output {entry['path']} was registered but never written")
        record = {
            "command": self.command,
            "params": self.params,
            "inputs": self.inputs,
            "model": self.model,
            "files": sorted(self.files, key=lambda f: f["path"]),
            "wall_time_s": round(time.perf_counter() - self._t0, 3),
        }
        record.update(self.extra)
        with folder_lock(self.out):
            manifest = read_manifest_in(self.out)  # checked before anything moves
            runs = dict(manifest.get("runs", {}))
            new_paths = [f["path"] for f in record["files"]]
            for other in _superseded(self.out, runs, record):
                del runs[other]
            key = _own_key(runs, record) or run_key(runs, self.command, record["params"])
            kept = {p for k, r in runs.items() if k != key for p in _record_paths(r)}
            drop = sorted(p for p in _record_paths(runs.get(key, {}))
                          if p not in new_paths and p not in kept and _through_real_folders(self.out, p)
                          and ((self.out / p).is_symlink() or not (self.out / p).is_dir()))  # files only
            for rel in new_paths:
                _check_destination(self.out, rel)
            runs[key] = record
            write_json(self._stage / NEW_MANIFEST, {"cnnvis_version": __version__, "runs": runs})
            existed = [p for p in [*new_paths, *drop] if (self.out / p).exists() or (self.out / p).is_symlink()]
            write_json(self._stage / JOURNAL_NAME, {"new": new_paths, "drop": drop, "existed": existed})
            with _signals_held():
                try:
                    _apply(self.out, self._stage, new_paths, drop)
                except BaseException:
                    _roll_back(self.out, self._stage)
                    raise
            _finish(self._stage)
            _remove_empty_folders(self.out, drop)


_RESERVED = {MANIFEST_NAME, JOURNAL_NAME, NEW_MANIFEST, ASIDE_NAME}


def _remove_empty_folders(out: Path, rels) -> None:
    """Folders that only held a replaced run's dropped files go with them."""
    for rel in rels:
        for parent in Path(rel).parents:
            if parent == Path("."):
                break
            try:
                (out / parent).rmdir()
            except OSError:
                break


def _record_paths(record) -> list:
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list):
        return []
    return [f["path"] for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)
            and _safe_rel(f["path"])]


def _safe_rel(rel: str) -> bool:
    """A manifest path cnnvis may move: relative, no ``..``, not one of cnnvis's own names."""
    parts = Path(rel).parts
    return (bool(parts) and not Path(rel).is_absolute() and ".." not in parts and parts[0] not in _RESERVED
            and not parts[0].startswith(".cnnvis"))


def _through_real_folders(out: Path, rel: str) -> bool:
    """Whether every folder on the way from ``out`` to ``rel`` is a real folder (no symlink that
    could lead a move outside ``out``)."""
    p = out
    for part in Path(rel).parts[:-1]:
        p = p / part
        if p.is_symlink() or not p.is_dir():
            return False
    return True


def _own_key(runs: dict, record: dict) -> str | None:
    """The key of this run's previous record (same command, same parameters), if there is one."""
    params = to_jsonable(record["params"])
    return next((k for k, r in sorted(runs.items())
                 if r.get("command", k) == record["command"] and to_jsonable(r.get("params")) == params), None)


def _superseded(out: Path, runs: dict, record: dict) -> list:
    """The keys of other runs this run replaces, or a refusal: a run of the same command (with
    other parameters) all of whose files this run writes again is replaced as a whole (its record
    goes); a run only some of whose files this run would overwrite — or another command's — is a
    one-line refusal, since its record would then describe files it did not write."""
    new_paths = {f["path"] for f in record["files"]}
    same_params = to_jsonable(record["params"])
    replaced = []
    for other_key, other in sorted(runs.items()):
        if other.get("command", other_key) == record["command"] and to_jsonable(other.get("params")) == same_params:
            continue  # a rerun: replaces its own record (run_key) and files
        theirs = set(_record_paths(other))
        shared = sorted(new_paths & theirs)
        if not shared:
            continue
        if other.get("command") == record["command"] and theirs <= new_paths:
            replaced.append(other_key)
            continue
        what = ("a run of the same command with other parameters" if other.get("command") == record["command"]
                else f"a {other.get('command', other_key)} run")
        more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
        raise CnnvisError(f"out={out}: holds {what} ({other_key!r} in {MANIFEST_NAME}) with files this run "
                          f"would overwrite ({shared[0]}{more}) and others it would not; write to another "
                          "folder, or remove that folder's results first", params="out")
    return replaced


def _check_destination(out: Path, rel: str) -> None:
    """A file where a folder must go, or a folder where a file must go: one line, nothing moved."""
    target = out / rel
    for parent in reversed(target.relative_to(out).parents):
        p = out / parent
        if parent == Path("."):
            continue
        if p.is_symlink():
            raise CnnvisError(f"{p}: a symlink is where the output folder for {rel} must go; remove it")
        if p.exists() and not p.is_dir():
            raise CnnvisError(f"{p}: a file is where a folder must go (for output {rel})")
    if target.is_dir() and not target.is_symlink():
        raise CnnvisError(f"{target}: a folder is where output file {rel} must go")


def _apply(out: Path, stage: Path, new_paths, drop) -> None:
    """Move the replaced files aside, the new ones in, then install the new manifest (the commit
    point). ``_pause`` is a test hook: a killed process between two moves is what recovery mends."""
    aside = stage / ASIDE_NAME
    for rel in [*new_paths, *drop]:
        dst = out / rel
        if dst.exists() or dst.is_symlink():
            (aside / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(dst, aside / rel)
            _pause("aside")
    for rel in new_paths:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, dst)
        _pause("moved")
    os.replace(stage / NEW_MANIFEST, out / MANIFEST_NAME)
    _pause("committed")


def _pause(step: str) -> None:
    """Test hook: ``CNNVIS_TEST_COMMIT_PAUSE=<seconds>[@<n>]`` sleeps after every move of a commit
    (or only after the n-th, 1-based) while a test kills the process; ``CNNVIS_TEST_COMMIT_MARK=<file>``
    gets one line per move, written before the sleep."""
    spec = os.environ.get("CNNVIS_TEST_COMMIT_PAUSE")
    if not spec:
        return
    delay, _, at = spec.partition("@")
    done = 1
    mark = os.environ.get("CNNVIS_TEST_COMMIT_MARK")
    if mark:
        with open(mark, "a+") as f:
            f.write(step + "\n")
            f.seek(0)
            done = len(f.read().splitlines())
    if not at or int(at) == done:
        time.sleep(float(delay))


def _roll_back(out: Path, stage: Path) -> None:
    """Undo a commit that did not reach its commit point: new files back into the stage, the
    replaced ones back in place. Idempotent (a crash during it is mended by the next run)."""
    try:
        journal = json.loads((stage / JOURNAL_NAME).read_text(encoding="utf-8"))
        new_paths = [p for p in journal["new"] if _safe_rel(p)]
        drop = [p for p in journal["drop"] if _safe_rel(p)]
        existed = set(journal.get("existed") or [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        new_paths, drop, existed = [], [], set()  # no journal: nothing was moved
    aside = stage / ASIDE_NAME
    for rel in new_paths:
        dst, staged = out / rel, stage / rel
        new_in_place = (aside / rel).exists() or (aside / rel).is_symlink() or rel not in existed
        if not staged.exists() and (dst.exists() or dst.is_symlink()) and new_in_place:
            staged.parent.mkdir(parents=True, exist_ok=True)
            os.replace(dst, staged)
    for rel in [*new_paths, *drop]:
        if (aside / rel).exists() or (aside / rel).is_symlink():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(aside / rel, out / rel)
    _finish(stage)


def _finish(stage: Path) -> None:
    """Drop a staging folder: the journal first, so a crash in between leaves a plain stale stage."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stage / JOURNAL_NAME)
    shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """SIGINT/SIGTERM received during the block take effect when it is done (the moves of a commit
    are not cut in half); a SIGKILL is mended by :func:`recover`. (Handlers, not a signal mask:
    a mask would hold only this thread, and BLAS threads would take the signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:
            old[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in received:
            signal.raise_signal(sig)


@contextlib.contextmanager
def folder_lock(out):
    """An exclusive flock on the folder ``out`` itself (no lock file is left behind)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def recover(out) -> None:
    """Mend what dead processes left in ``out`` (call with :func:`folder_lock` held): a half-done
    commit is rolled back (before its commit point) or completed (after it); staging folders and
    ``.part`` files nobody holds are removed. Live runs' files are left alone."""
    out = Path(out)
    for stage in sorted(out.glob(STAGE_PREFIX + "*")):
        if not stage.is_dir() or stage.is_symlink():
            continue
        try:
            fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's staging folder
            if (stage / JOURNAL_NAME).is_file() and (stage / NEW_MANIFEST).exists():
                _roll_back(out, stage)  # killed before the commit point
            else:
                _finish(stage)  # killed after it (or before committing at all)
        finally:
            os.close(fd)
    remove_stale_parts(out)


def recover_tree(folder) -> None:
    """:func:`recover` every folder under ``folder`` that holds a staging folder (a reader such as
    the report then sees whole runs only, never a half-done commit)."""
    for root, dirs, _ in os.walk(folder):
        if any(d.startswith(STAGE_PREFIX) for d in dirs):
            with folder_lock(root):
                recover(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(STAGE_PREFIX) and not os.path.islink(os.path.join(root, d)))


def remove_stale_parts(folder) -> None:
    """Remove ``.<name>.XXXX.part`` files whose writer is gone (unlocked) from ``folder`` and from
    the folders its manifest's files are in (where cnnvis writes; never a walk of the whole tree,
    ``folder`` may be a big one, e.g. the parent of ``convert-caffe -o``)."""
    folder = Path(folder)
    try:
        manifest = read_manifest_in(folder)
    except CnnvisError:
        manifest = {}
    places = {folder}
    for record in manifest.get("runs", {}).values():
        for rel in _record_paths(record):
            if _through_real_folders(folder, rel):
                places.add((folder / rel).parent)
    for place in sorted(places):
        try:
            names = os.listdir(place)
        except OSError:
            continue
        for name in names:
            if name.startswith(".") and name.endswith(PART_SUFFIX):
                _remove_if_unlocked(place / name)


def _remove_if_unlocked(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live writer's file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)


def run_key(runs: dict, command: str, params: dict) -> str:
    """The key of a run in ``manifest.json``: the command name; a run of the same command with other
    parameters in the same folder gets ``command [hash of its parameters]``, so that neither run's
    record is lost. A rerun with the same parameters replaces its own record."""
    params = to_jsonable(params)
    if command not in runs or to_jsonable(runs[command].get("params")) == params:
        return command
    digest = hashlib.sha256(dumps_json(params).encode()).hexdigest()[:8]
    return f"{command} [{digest}]"


def read_manifest_in(out) -> dict:
    """``out/manifest.json`` checked ({} when there is none)."""
    path = Path(out) / MANIFEST_NAME
    if not (path.exists() or path.is_symlink()):
        return {}
    return read_manifest(path)


#: a manifest larger than this is refused unread (one of 4,301 files is about 0.5 MB)
MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(path) -> dict:
    """A ``manifest.json`` checked: a regular file (not a symlink), at most
    :data:`MAX_MANIFEST_BYTES`, JSON with a ``runs`` object of run records; else one CnnvisError."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CnnvisError(f"{path}: not a cnnvis manifest (not a regular file)")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise CnnvisError(f"{path}: not a cnnvis manifest ({size:,} bytes; at most {MAX_MANIFEST_BYTES:,})")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CnnvisError(f"{path}: not a readable cnnvis manifest ({reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs", {}), dict) or \
            not all(isinstance(r, dict) for r in data.get("runs", {}).values()):
        raise CnnvisError(f"{path}: not a cnnvis manifest (no 'runs' object of run records)")
    return data
