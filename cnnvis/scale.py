"""Dataset-scale runs on a Dask cluster (``dask.distributed``): shards of the input list, a model
loaded once per worker process, partial results merged in input order, resumable.

What goes over the network: each task is a :class:`Shard` (a list of image *paths* and where they
start in the input list) and a small job dict (a :class:`ModelRef` naming the model by path or
registry name with its sha256, the preprocessing as a dict, the analysis parameters). Workers read
the images themselves (a shared file system, or the same paths on every machine) and send back
partial results: top-k candidates, float64 moments per chunk, per-image vectors. Pixels never
travel.

Each partial result is written by the client, atomically, to ``--out/.cnnvis-shards/<command>-
<fingerprint>/shard-NNNNNN.npz`` as it arrives (:class:`ShardStore`). A client killed mid-run
loses nothing that was recorded: the rerun with the same ``--out`` submits only the missing shards.
A worker killed mid-run is Dask's to handle: the scheduler reruns its tasks on another worker
(tasks are pure functions of their shard). Results are merged in shard order after all shards are
recorded, so the merge does not depend on which worker finished first.

Worker functions take a shard and return ``(meta, arrays)``; the analyses they call are reached
through small adapters here (:func:`topk_shard`, :func:`class_gradient_shard`,
:func:`channel_stats_shard`), so a change of an analysis' call shape is one place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CnnvisError

#: images per shard (rounded up to a multiple of --batch-size)
DEFAULT_SHARD_SIZE = 256
#: the state folder inside --out that holds recorded shard results
STATE_DIR = ".cnnvis-shards"
SHARD_VERSION = 1


# ----------------------------------------------------------------------------- model on the workers


@dataclass(frozen=True)
class ModelRef:
    """How a worker loads the client's model: registry name or file path (absolute when it is a
    file), Caffe weights, device, onnxruntime threads, and the sha256 it must have."""

    spec: str
    weights: str | None
    device: str
    threads: int | None
    sha256: str


def model_ref(spec, weights, device, threads, sha256) -> ModelRef:
    def absolute(p):
        return None if p is None else (os.path.abspath(p) if os.path.exists(p) else str(p))

    return ModelRef(absolute(spec), absolute(weights), device, threads, sha256)


_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()


def worker_model(ref: ModelRef):
    """The model of ``ref``, loaded once per worker thread (once per process with the default one
    thread per worker) and kept, with its onnxruntime sessions and gradient engines, for every
    later shard; its sha256 must be the client's. Threads do not share one: the model's lazily
    built sessions and engines are not guarded for concurrent first use."""
    key = (ref, threading.get_ident())
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            from . import registry

            model = registry.load(ref.spec, weights=ref.weights, device=ref.device, threads=ref.threads)
            if model.sha256 != ref.sha256:
                import socket

                raise CnnvisError(f"model {ref.spec}: sha256 {model.sha256[:16]}… on worker {socket.gethostname()}, "
                                  f"{ref.sha256[:16]}… on the client (a different file)")
            _MODELS[key] = model
    return model


# ----------------------------------------------------------------------------- shards


@dataclass
class Shard:
    """Consecutive inputs: ``paths`` are inputs ``start`` … ``start + len(paths) - 1`` of the input
    list (of group ``group`` for compare-classes); ``named``: the input positions among them of
    files the user named explicitly (read or fail, never skipped)."""

    index: int
    start: int
    paths: list
    group: int = 0
    named: tuple = ()

    def __len__(self):
        return len(self.paths)


def make_shards(paths, shard_size: int, batch_size: int, group: int = 0, first_index: int = 0,
                named=()) -> list:
    """Shards of at most ``shard_size`` paths, a multiple of ``batch_size`` each, so that a shard's
    chunks are the chunks the one-process run makes. Paths are made absolute (workers elsewhere
    do not share the client's working folder). ``named``: input positions of files named
    explicitly (:func:`cnnvis.preprocess.named_positions`)."""
    size = max(1, -(-int(shard_size) // int(batch_size))) * int(batch_size)
    paths = [os.path.abspath(p) for p in paths]
    named = sorted(int(i) for i in named)
    return [Shard(first_index + i, s, paths[s:s + size], group, tuple(n for n in named if s <= n < s + size))
            for i, s in enumerate(range(0, len(paths), size))]


def shard_chunks(shard: Shard, preprocessing, batch_size: int, skipped: list):
    """``(positions, batch)`` per ``batch_size`` run of the shard's paths: the input-list positions
    of the images read and their N×C×H×W array, read by :func:`cnnvis.preprocess.read_chunk` (the
    one-process runs' reader: unreadable images are left out and appended to ``skipped`` as
    ``[position, path, reason]``; an unreadable file named explicitly is an error)."""
    from .preprocess import read_chunk

    for s in range(0, len(shard.paths), batch_size):
        positions, batch = read_chunk(shard.paths[s:s + batch_size], preprocessing, shard.start + s, skipped,
                                      shard.named)
        if batch is not None:
            yield positions, batch


def _preprocessing(job):
    from .preprocess import Preprocessing

    return Preprocessing.from_dict(job["preprocessing"])


# ----------------------------------------------------------------------------- worker functions


def topk_shard(job: dict, shard: Shard):
    """Top-k candidates of one shard: per map the k best (value, input position, flat position)."""
    from .analysis.topk import TopActivations

    model = worker_model(job["model"])
    skipped, positions = [], []

    def chunks():
        for pos, x in shard_chunks(shard, _preprocessing(job), job["batch_size"], skipped):
            positions.extend(pos)
            yield [str(p) for p in pos], x

    top = TopActivations(model, job["layer"], k=job["k"], batch_size=job["batch_size"]).run(chunks())
    meta = {"n": len(shard), "skipped": skipped, "readable": len(positions),
            "map_shape": None if top.map_shape_ is None else list(top.map_shape_)}
    if top.map_shape_ is None:
        return meta, {}
    pos = np.asarray(positions, np.int64)
    return meta, {"values": top.values_, "images": pos[top.images_], "positions": top.positions_,
                  "readable": pos}


def class_gradient_shard(job: dict, shard: Shard):
    """Per chunk of one shard of one group: what ClassComparison keeps of it (moments, importance,
    the gradient vectors of images among the group's first ``cap``, per-image numbers)."""
    from .analysis import class_gradients as cgm

    model = worker_model(job["model"])
    cg = cgm.ClassGradients(model, job["layer"], job["batch_size"])
    skipped, arrays, chunks = [], {}, []
    for j, (pos, x) in enumerate(shard_chunks(shard, _preprocessing(job), job["batch_size"], skipped)):
        batch = cg.run(x, target=job["neuron"])
        summary = cgm.summarize_chunk(batch, [str(p) for p in pos], pos, job["cap"])
        chunks.append(len(pos))
        arrays[f"{j}.positions"] = np.asarray(pos, np.int64)
        for name, value in summary.arrays().items():
            arrays[f"{j}.{name}"] = value
    return {"n": len(shard), "skipped": skipped, "chunks": chunks, "readable": int(sum(chunks))}, arrays


def channel_stats_shard(job: dict, shard: Shard):
    """Per chunk of one shard: per-channel moments, maxima and active counts of each layer."""
    from .analysis import activations

    model = worker_model(job["model"])
    analysis = activations.Activations(model, job["layers"], batch_size=job["batch_size"])
    skipped, arrays, chunks = [], {}, []
    for j, (pos, x) in enumerate(shard_chunks(shard, _preprocessing(job), job["batch_size"], skipped)):
        part = activations.channel_moments(analysis.run(x).values)
        chunks.append(len(pos))
        for layer, values in part.items():
            for name, value in values.items():
                arrays[f"{j}.{layer}.{name}"] = np.asarray(value)
    return {"n": len(shard), "skipped": skipped, "chunks": chunks, "readable": int(sum(chunks))}, arrays


def conv_gradient_shard(job: dict, shard: Shard):
    """Per chunk of one shard: each image's gradient of a class logit w.r.t. a conv layer's
    weights, the class differentiated and the logits (what conv-gradients writes per image)."""
    from .analysis import class_gradients as cgm

    model = worker_model(job["model"])
    cg = cgm.ClassGradients(model, job["layer"], job["batch_size"])
    skipped, arrays, chunks = [], {}, []
    for j, (pos, x) in enumerate(shard_chunks(shard, _preprocessing(job), job["batch_size"], skipped)):
        batch = cg.run(x, job["target"])
        chunks.append(len(pos))
        arrays.update({f"{j}.positions": np.asarray(pos, np.int64), f"{j}.gradients": batch.gradients,
                       f"{j}.targets": batch.targets, f"{j}.logits": batch.logits})
    return {"n": len(shard), "skipped": skipped, "chunks": chunks, "readable": int(sum(chunks))}, arrays


def occlusion_shard(job: dict, shard: Shard):
    """Per image of one shard: its occlusion maps (``cnnvis.analysis.occlusion.Occlusion.run``)."""
    from .analysis import occlusion

    model = worker_model(job["model"])
    pre = _preprocessing(job)
    analysis = occlusion.Occlusion(model, preprocessing=pre, batch_size=job["batch_size"], **job["options"])
    skipped, arrays, chunks, records = [], {}, [], []
    for j, (pos, x) in enumerate(shard_chunks(shard, pre, job["batch_size"], skipped)):
        chunks.append(len(pos))
        arrays[f"{j}.positions"] = np.asarray(pos, np.int64)
        for i, res in enumerate(analysis.run(x, target=job["target"])):
            meta, values = record_of(res)
            records.append(meta)
            arrays.update({f"{j}.{i}.{k}": v for k, v in values.items()})
    plan = getattr(analysis, "plan_", None)
    return {"n": len(shard), "skipped": skipped, "chunks": chunks, "readable": int(sum(chunks)),
            "records": records, "incremental": plan.describe() if plan is not None else None}, arrays


def record_of(result):
    """A dataclass result as ``(JSON meta, arrays)`` (no pickles); :func:`from_record` rebuilds it."""
    import dataclasses

    meta, arrays = {"tuples": []}, {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif isinstance(value, tuple):
            meta["tuples"].append(f.name)
            meta[f.name] = [_plain(v) for v in value]
        else:
            meta[f.name] = _plain(value)
    return meta, arrays


def _plain(value):
    """A numpy scalar as the Python number JSON keeps exactly (float64 and integers round-trip)."""
    return value.item() if isinstance(value, np.generic) else value


def from_record(cls, meta: dict, arrays: dict):
    import dataclasses

    values = {}
    for f in dataclasses.fields(cls):
        if f.name in arrays:
            values[f.name] = arrays[f.name]
        elif f.name in meta:
            v = meta[f.name]
            values[f.name] = tuple(v) if f.name in meta["tuples"] else v
    return cls(**values)


# ----------------------------------------------------------------------------- recorded shards


@dataclass
class ShardResult:
    meta: dict
    arrays: dict = field(default_factory=dict)


class ShardStore:
    """Shard results recorded in ``--out/.cnnvis-shards/<command>-<digest>/`` (digest of the run's
    fingerprint: model, parameters, input list, shard layout), one atomic ``.npz`` per shard (no
    pickles: the meta is JSON stored as bytes)."""

    def __init__(self, out, command: str, fingerprint: dict, restart: bool = False):
        from .manifest import ensure_writable_dir

        text = json.dumps(fingerprint, sort_keys=True, default=str)
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.root = ensure_writable_dir(out) / STATE_DIR
        self.folder = self.root / f"{command}-{self.digest}"
        if restart and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        from .manifest import write_text

        if not (self.folder / "fingerprint.json").exists():
            write_text(self.folder / "fingerprint.json", json.dumps(fingerprint, sort_keys=True, indent=1,
                                                                     default=str) + "\n")

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.npz"

    def done(self) -> set:
        out = set()
        for p in self.folder.glob("shard-*.npz"):
            m = re.fullmatch(r"shard-(\d+)\.npz", p.name)
            if m:
                out.add(int(m.group(1)))
        return out

    def save(self, index: int, meta: dict, arrays: dict) -> None:
        from .manifest import atomic_path

        blob = json.dumps({"version": SHARD_VERSION, **meta}, sort_keys=True).encode("utf-8")
        with atomic_path(self.path(index)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, __meta__=np.frombuffer(blob, np.uint8), **arrays)

    def load(self, index: int) -> ShardResult:
        path = self.path(index)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["__meta__"]).decode("utf-8"))
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
        except (OSError, ValueError, KeyError) as exc:
            raise CnnvisError(f"{path}: unreadable shard result ({exc}); rerun with restart=True",
                              params="restart") from None
        if meta.get("version") != SHARD_VERSION:
            raise CnnvisError(f"{path}: shard result version {meta.get('version')!r}, expected {SHARD_VERSION}; "
                              "rerun with restart=True", params="restart")
        return ShardResult(meta, arrays)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only when no other run's shards are left


def input_digest(paths) -> str:
    """sha256 of the input list (paths in order): part of a run's fingerprint."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the cluster


@dataclass
class ClusterOptions:
    address: str
    threads: int = 1
    shard_size: int = DEFAULT_SHARD_SIZE
    dashboard: bool = False
    progress: bool = True
    debug: bool = False  # local workers log their errors (a task's traceback) only with --debug


def parse_address(address: str):
    """``("local", N)`` for ``local:N``, else ``("remote", address)`` (a scheduler address)."""
    text = str(address).strip()
    m = re.fullmatch(r"local:(\d+)", text)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise CnnvisError(f"Dask address {address}: local:N needs N >= 1 worker processes")
        return "local", n
    if text.startswith("local"):
        raise CnnvisError(f"Dask address {address}: expected local:N (N worker processes) or a scheduler "
                          "address like tcp://host:8786")
    if not re.fullmatch(r"(tcp|tls|ucx|inproc|ws|wss)://\S+|[\w.\-]+:\d+", text):
        raise CnnvisError(f"Dask address {address}: expected a scheduler address like tcp://host:8786, or local:N")
    return "remote", text


@contextlib.contextmanager
def connect(options: ClusterOptions, label: str = "cnnvis"):
    """A ``distributed.Client``: on a LocalCluster of N worker processes on 127.0.0.1 for
    ``local:N`` (``options.threads`` threads each; dashboard only when asked; their logs, which
    would print a failed task's traceback, silenced unless ``options.debug``), else on the
    scheduler at the address. Prints the dashboard address when there is one."""
    import logging

    from distributed import Client, LocalCluster

    kind, where = parse_address(options.address)
    cluster = None
    try:
        if kind == "local":
            cluster = LocalCluster(n_workers=where, threads_per_worker=int(options.threads), processes=True,
                                   host="127.0.0.1", silence_logs=logging.ERROR if options.debug else logging.CRITICAL,
                                   **local_dashboard(options.dashboard))
            client = Client(cluster)
        else:
            try:
                client = Client(where, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise CnnvisError(f"Dask address {where}: no Dask scheduler answers there ({exc})") from None
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    try:
        link = client.dashboard_link if (kind == "remote" or options.dashboard) else None
        if link and kind == "local":
            import importlib.util

            if importlib.util.find_spec("bokeh") is None:  # distributed serves no dashboard without it
                link = f"{link} (not served: the dashboard needs `pip install bokeh`)"
        n_workers = len(client.scheduler_info().get("workers", {}))
        print(f"{label}: Dask cluster {options.address}: {n_workers} worker(s)"
              + (f"; dashboard {link}" if link else ""), file=sys.stderr)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def local_dashboard(on: bool) -> dict:
    """LocalCluster arguments for its scheduler's HTTP server: on a free loopback port either way
    (the scheduler always serves its health routes; a fixed :8787 clashes with other clusters),
    with the dashboard pages only when ``on``."""
    return {"dashboard_address": "127.0.0.1:0", "scheduler_kwargs": {"dashboard": bool(on)}}


def run_shards(client, fn, job: dict, shards: list, store: ShardStore, label: str, progress: bool = True) -> None:
    """Run ``fn(job, shard)`` for every shard not yet in ``store``, recording each result as it
    arrives; one progress bar of images (done, img/s, ETA)."""
    from distributed import KilledWorker, as_completed
    from tqdm import tqdm

    done = store.done()
    todo = [s for s in shards if s.index not in done]
    if done:
        print(f"{label}: resuming: {len(shards) - len(todo)} of {len(shards)} shard(s) already recorded in "
              f"{store.folder}", file=sys.stderr)
    total = sum(len(s) for s in shards)
    initial = total - sum(len(s) for s in todo)
    with tqdm(total=total, initial=initial, unit="img", desc=label, disable=not progress, smoothing=0.1) as bar:
        if not todo:
            return
        futures = [client.submit(fn, job, s, key=f"{label.replace(' ', '-')}-{store.digest}-{s.index}", pure=False)
                   for s in todo]
        sizes = {f.key: (s.index, len(s)) for f, s in zip(futures, todo)}
        try:
            for future, (meta, arrays) in as_completed(futures, with_results=True):
                index, n = sizes[future.key]
                store.save(index, meta, arrays)
                bar.update(n)
                future.release()
        except KilledWorker as exc:  # the same shard took down several workers in turn
            client.cancel(futures)
            shard = next((s for f, s in zip(futures, todo) if f.key == getattr(exc, "task", None)), None)
            where = f" (shard {shard.index}, from {shard.paths[0]})" if shard is not None else ""
            raise CnnvisError(f"Dask: a task took down {getattr(exc, 'allowed_failures', '?')} workers in turn"
                              f"{where}; the shards recorded so far are kept in {store.folder}") from None
        except BaseException:
            client.cancel(futures)
            raise


def results(store: ShardStore, shards: list):
    """The recorded results of ``shards``, in shard order (one in memory at a time)."""
    for s in shards:
        yield s, store.load(s.index)


# ----------------------------------------------------------------------------- merges


def merge_topk(parts, k: int):
    """One TopK from shard candidates ``(map_shape, values, images, positions)`` (images are input
    positions), merged in the given order with :class:`TopK`'s own tie order (value descending,
    then image, then position): exactly the one-process top-k."""
    from .analysis.topk import TopK

    top = TopK(k)
    for shape, values, images, positions in parts:
        if top.map_shape_ is None:
            top.map_shape_ = tuple(int(d) for d in shape)
            c = top.map_shape_[0]
            top.values_ = np.zeros((c, 0), np.float32)
            top.images_ = np.zeros((c, 0), np.int64)
            top.positions_ = np.zeros((c, 0), np.int64)
        elif tuple(shape) != tuple(top.map_shape_):
            raise CnnvisError(f"top-k: shard maps of shape {tuple(shape)} after {tuple(top.map_shape_)}")
        top._merge(values, images, positions)
    return top


def compact_topk(top, readable, names):
    """``top`` (image indices = input positions) re-indexed to the readable images only, whose
    names are ``names``: what the one-process run over the readable images gives."""
    readable = np.asarray(readable, np.int64)
    if top.images_ is not None and top.images_.size:
        top.images_ = np.searchsorted(readable, top.images_).astype(np.int64)
    top.image_names_ = list(names)
    return top
