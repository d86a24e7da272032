"""GradientEngine: build a gradient graph once, run it on batches of images.

    engine = GradientEngine(model, wrt=["data", "conv1_W"], objective="logit")
    result = engine.run(x, index=281)        # result["conv1_W"]: N x 96 x 3 x 11 x 11
    result.objective                         # the objective's value per image

One engine serves every class, unit and seed (they are graph inputs). Graphs are built per input
shape and cached; large batches are run in chunks of ``batch_size`` images. Where a backward rule
has a faster form for a fixed batch size (per-sample weight gradients of a big strided kernel, e.g.
AlexNet's conv1), full chunks run in a second graph built for exactly ``batch_size`` images.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os

import numpy as np
import onnx

from ..errors import CnnvisError
from ..model import SessionCache, chunk_bounds
from ..onnxgraph import select_providers
from .backend import Runner, resolve_backend
from .graph import OBJECTIVE_OUTPUT, OBJECTIVES, GradientGraph, build_gradient_graph, model_dtype

_MAX_SPECIALISED = 2  # batch-specialised graphs kept per engine (each session holds the weights)


class GradientResult(dict):
    """Gradients by ``wrt`` name, plus ``objective`` (value per sample) and extra forward ``outputs``."""

    def __init__(self, grads, objective, outputs):
        super().__init__(grads)
        self.objective = objective
        self.outputs = outputs


def _as_model(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from ..onnxgraph import fold_constants

        try:
            return fold_constants(onnx.load(str(model)))
        except CnnvisError:
            raise
        except Exception as exc:  # unreadable or invalid file: one line for the user
            raise CnnvisError(f"{model}: not a readable ONNX model ({exc})") from None
    raise CnnvisError(f"model: expected an onnx ModelProto or a path, got {type(model).__name__}")


class GradientEngine:
    """Gradients of a per-sample objective with respect to inputs, activations and weights.

    Parameters
    ----------
    model : onnx.ModelProto or path (constants folded, weights as initializers, one image input).
    wrt : tensor name or list of names: the image input, any intermediate tensor, any initializer.
    objective : one of :data:`OBJECTIVES` (``unit``, ``channel_sum``, ``channel_mean``,
        ``channel_max``, ``logit``, ``probability``, ``log_probability``, ``seed``, ``cross_entropy``).
    target : the tensor the objective reads (default: the pre-softmax tensor for ``logit``,
        ``log_probability`` and ``cross_entropy``, the softmax output for ``probability``).
    rule : ``gradient`` (exact), ``deconvnet`` (Zeiler & Fergus) or ``guided`` (guided backprop).
    per_sample : weight gradients per sample, ``N x *weight.shape``; otherwise the batch sum (what
        Caffe stores). Input/activation gradients are always per sample. For ``cross_entropy``
        every gradient is of the batch mean loss (per-sample ones are each image's share, so they
        still sum to the batch gradient); ``result.objective`` holds each image's loss.
    training : replace Dropout by multiplication with fed masks (see :meth:`dropout_masks`).
    weights_as_inputs : let :meth:`run` override initializers through ``params`` (default: training).
    outputs : extra forward tensors to return in ``result.outputs``.
    batch_size : images per onnxruntime call; bounds memory.
    device, threads : onnxruntime session options; backend: ``auto`` (onnxruntime for float32,
        onnx's reference evaluator for float64), ``onnxruntime`` or ``reference``.
    workers : data parallelism (onnxruntime on CPU only). Each chunk of ``batch_size`` images is split
        into this many parts, run at the same time in separate sessions that share the ``threads``
        (default: all cores) between them. Small graphs keep the cores busier this way than with
        one session's intra-op threads (training the demo network: 8% faster with 2, about 20%
        with the one-thread form of its conv2 weight gradient that one-thread sessions get).
        Batch sums are summed over parts in float64, and with several workers the graphs are not
        specialised to a batch size (see the module docstring), so results differ from
        ``workers=1`` in the last bits; the same ``workers`` repeats exactly. Capped at ``threads``.
    sessions : where the onnxruntime sessions come from: ``sessions(key, build, threads, device)``
        returns the session of ``build()``'s graph, cached under ``key``, and ``sessions.drop(keep)``
        forgets those whose key fails ``keep`` (graphs the engine evicted). ``Model.gradient_engine``
        passes its model's session cache (:meth:`cnnvis.model.Model.session`); None (an engine made
        from a bare graph): a :class:`cnnvis.model.SessionCache` of the engine's own, the class the
        model's cache is.
    """

    def __init__(self, model, wrt, objective: str = "logit", target=None, rule: str = "gradient",
                 per_sample: bool = True, training: bool = False, weights_as_inputs=None, outputs=(),
                 batch_size: int = 32, device: str = "auto", threads=None, backend: str = "auto",
                 workers: int = 1, sessions=None):
        self.model = _as_model(model)
        self.wrt = [wrt] if isinstance(wrt, str) else list(wrt)
        self.objective = objective
        self.target = target
        self.rule = rule
        self.per_sample = per_sample
        self.training = training
        self.weights_as_inputs = training if weights_as_inputs is None else weights_as_inputs
        self.outputs = list(outputs)
        self.batch_size = batch_size
        self.device = device
        self.threads = threads
        self.backend = backend
        self.sessions = SessionCache() if sessions is None else sessions
        if objective not in OBJECTIVES:
            raise CnnvisError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if int(batch_size) < 1:
            raise CnnvisError(f"batch_size {batch_size}: expected a positive integer")
        if int(workers) < 1:
            raise CnnvisError(f"workers {workers}: expected a positive integer")
        self.workers = workers
        self.dtype_ = model_dtype(self.model)
        self.backend_ = resolve_backend(backend, self.dtype_)
        self.workers_ = int(workers)
        if self.backend_ != "onnxruntime":
            self.workers_ = 1  # onnx's reference evaluator runs Python under the GIL: parts would take turns
        elif self.workers_ > 1 and select_providers(device)[0] != "CPUExecutionProvider":
            self.workers_ = 1  # a GPU runs the whole chunk at once
        if threads:
            self.workers_ = min(self.workers_, int(threads))  # never more cores than asked for
        self._built = {}  # (sample shape, batch or None) -> GradientGraph
        self._specialised = []  # keys of batch-specialised graphs, oldest first
        self._runners = {}  # graph key -> its Runners, one per worker (views of self.sessions' sessions)
        self._pool = None

    # ------------------------------------------------------------------ graphs
    def graph(self, sample_shape, batch: int | None = None):
        """The built :class:`GradientGraph` for one per-sample input shape (cached): for any batch
        size, or specialised to ``batch`` images (see ``GradientGraph.batch_specialisable``)."""
        key = (tuple(int(d) for d in sample_shape), int(batch) if batch else None)
        general = self._built.get((key[0], None))
        if general is not None and not general.batch_specialisable:
            return general
        if key not in self._built:
            gg = build_gradient_graph(
                self.model, key[0], self.wrt, objective=self.objective, target=self.target, rule=self.rule,
                per_sample=self.per_sample, training=self.training, weights_as_inputs=self.weights_as_inputs,
                outputs=self.outputs, backend=self.backend_, batch=key[1], session_threads=self._session_threads())
            self._built[key] = gg
            if key[1] is not None and gg.static_batch is None:
                self._built[(key[0], None)] = gg  # no rule used the batch size: the graph serves any
            elif key[1] is not None:
                # a specialised graph serves one chunk size (the engine's batch_size, unless a run
                # asks for another): keep the latest few
                self._specialised.append(key)
                while len(self._specialised) > _MAX_SPECIALISED:
                    old = self._specialised.pop(0)
                    self._built.pop(old, None)
                    self._runners.pop(old, None)
                    self.sessions.drop(lambda k, old=old: k[:2] != old)
        return self._built[key]

    def graph_info(self, sample_shape) -> GradientGraph:
        """A graph built for this per-sample shape, for what it describes (target, shapes, which
        gradients are per sample): any one already built, else the general one."""
        shape = tuple(int(d) for d in sample_shape)
        for (built_shape, _), gg in self._built.items():
            if built_shape == shape:
                return gg
        return self.graph(shape)

    def _session_threads(self):
        """Intra-op threads of each session (None: onnxruntime's default, one per core)."""
        if self.workers_ > 1:
            return max(1, int(self.threads or os.cpu_count() or 1) // self.workers_)
        return int(self.threads) if self.threads else (1 if os.cpu_count() == 1 else None)

    def _runners_for(self, gg: GradientGraph) -> list:
        """The sessions running ``gg``, one per worker (created on first use)."""
        key = (gg.sample_shape, gg.static_batch)
        for stale in [k for k in self._runners if k not in self._built]:  # their graph was evicted
            del self._runners[stale]
            self.sessions.drop(lambda k, stale=stale: k[:2] != stale)
        if key not in self._runners:
            threads = self._session_threads()
            if self.backend_ == "onnxruntime":
                # the session cache (the model's, or the engine's own) holds them, one per worker
                self._runners[key] = [Runner(gg.model, session=self.sessions((*key, w), lambda: gg.model, threads, self.device))
                                      for w in range(self.workers_)]
            else:  # onnx's reference evaluator (float64): no onnxruntime session
                self._runners[key] = [Runner(gg.model, backend=self.backend_)]
        return self._runners[key]

    def dropout_masks(self, n: int, sample_shape, rng) -> dict:
        """Random 0/1 dropout masks for ``n`` samples (keep probability 1 - ratio), by mask input name."""
        gg = self.graph_info(sample_shape)
        return {name: (rng.random((n, *shape)) >= ratio).astype(self.dtype_)
                for name, (shape, ratio) in gg.dropout_masks.items()}

    # --------------------------------------------------------------------- run
    def run(self, x, index=None, seed=None, labels=None, masks=None, params=None, batch_size=None) -> GradientResult:
        """Gradients for the images ``x`` (N x C x H x W).

        ``index``: the class (``logit``/``probability``/``log_probability``), channel
        (``channel_*``) or unit (``unit``: a flat index or a (c, y, x) tuple) — one for all
        images or one per image. ``seed``: for ``objective='seed'``, the target-shaped tensor
        whose dot product with the target is differentiated. ``labels``: for ``cross_entropy``.
        """
        x = np.asarray(x)
        if x.ndim < 2:
            raise CnnvisError(f"input: expected a batch N x C x H x W, got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=self.dtype_)
        n = x.shape[0]
        bs = int(batch_size or self.batch_size)
        # full chunks run in a graph specialised to the chunk size when that is faster; a shorter
        # last chunk runs in the graph for any batch size
        if self.per_sample and self.workers_ == 1 and n >= bs:
            full = self.graph(x.shape[1:], batch=bs)
            gg = self.graph(x.shape[1:]) if full.static_batch and n % bs else full
        else:
            gg = full = self.graph(x.shape[1:])
        feeds_all = {}
        if "index" in gg.runtime_inputs:
            value = labels if self.objective == "cross_entropy" and labels is not None else index
            feeds_all[gg.runtime_inputs["index"]] = index_feed(self.objective, value, n, gg.target, gg.target_shape)
        if "seed" in gg.runtime_inputs:
            feeds_all[gg.runtime_inputs["seed"]] = seed_feed(seed, n, gg.target, gg.target_shape, self.dtype_)
        if gg.dropout_masks:
            feeds_all.update(self._mask_feeds(masks, n, gg))
        # weights the built graph does not read (e.g. a replaced Dropout's ratio) change nothing
        graph_inputs = {i.name for i in gg.model.graph.input}
        fixed = {k: v for k, v in self._param_feeds(params).items() if k in graph_inputs}
        per_sample_out = {w: [] for w in gg.wrt if w in gg.batched_wrt or gg.per_sample}
        summed = {w: None for w in gg.wrt if w not in per_sample_out}
        objective, extra = [], {o: [] for o in gg.extra_outputs}
        wanted = [OBJECTIVE_OUTPUT] + [gg.grad_outputs[w] for w in gg.wrt] + gg.extra_outputs

        def feeds_of(start, stop):
            feeds = {gg.input_name: x[start:stop]}
            feeds.update({k: v[start:stop] for k, v in feeds_all.items()})
            feeds.update(fixed)
            return feeds

        parts = chunk_bounds(n, bs, self.workers_)
        graphs = [full if stop - start == bs else gg for start, stop in parts]
        for out in self._run_parts(graphs, parts, feeds_of, wanted):
            objective.append(out[OBJECTIVE_OUTPUT])
            for w in gg.wrt:
                g = out[gg.grad_outputs[w]]
                if w in per_sample_out:
                    per_sample_out[w].append(g)
                else:
                    summed[w] = g.astype(np.float64) if summed[w] is None else summed[w] + g
            for o in gg.extra_outputs:
                extra[o].append(out[o])
        # cross-entropy is the mean over the whole batch (not over a chunk): scale everything by 1/N
        mean = 1.0 / n if self.objective == "cross_entropy" else 1.0
        grads = {w: np.concatenate(parts) for w, parts in per_sample_out.items()}
        if mean != 1.0:
            grads = {w: (g * mean).astype(self.dtype_) for w, g in grads.items()}
        grads.update({w: (s * mean).astype(self.dtype_) for w, s in summed.items()})
        return GradientResult({w: grads[w] for w in gg.wrt}, np.concatenate(objective),
                              {o: np.concatenate(v) for o, v in extra.items()})

    __call__ = run

    def _run_parts(self, graphs, parts, feeds_of, wanted):
        """Outputs of every (start, stop) part, each in its graph, in order; with several workers,
        up to that many parts at a time (then every part is in the same graph)."""
        if self.workers_ == 1:
            for graph, (start, stop) in zip(graphs, parts):
                yield self._runners_for(graph)[0](feeds_of(start, stop), wanted)
            return
        runners = self._runners_for(graphs[0])
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(len(runners), thread_name_prefix="cnnvis-worker")
        for i in range(0, len(parts), len(runners)):
            futures = [self._pool.submit(runner, feeds_of(*part), wanted)
                       for runner, part in zip(runners, parts[i:i + len(runners)])]
            for future in futures:
                yield future.result()

    # ---------------------------------------------------------------- feeds
    def _mask_feeds(self, masks, n, gg):
        if masks is None:
            raise CnnvisError(f"training graph: pass masks= for {', '.join(gg.dropout_masks)} "
                              "(see GradientEngine.dropout_masks)")
        feeds = {}
        for name, (shape, _) in gg.dropout_masks.items():
            if name not in masks:
                raise CnnvisError(f"masks: missing {name!r}")
            arr = np.asarray(masks[name], dtype=self.dtype_)
            if arr.shape != (n, *shape):
                raise CnnvisError(f"masks[{name!r}]: expected shape {(n, *shape)}, got {arr.shape}")
            feeds[name] = arr
        return feeds

    def _param_feeds(self, params):
        if not params:
            return {}
        if not self.weights_as_inputs:
            raise CnnvisError("params: build the engine with weights_as_inputs=True (or training=True) to override weights")
        inits = {i.name: tuple(i.dims) for i in self.model.graph.initializer}
        feeds = {}
        for name, value in params.items():
            if name not in inits:
                from ..errors import unknown_name_error

                raise unknown_name_error("weight", name, inits)
            arr = np.array(value, dtype=self.dtype_, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if arr.shape != inits[name]:
                raise CnnvisError(f"params[{name!r}]: expected shape {inits[name]}, got {arr.shape}")
            feeds[name] = arr
        return feeds


def index_feed(objective, index, n, target, shape):
    """The int64 (N,) index input: class, channel or flat unit index per image."""
    what = "labels" if objective == "cross_entropy" else "index"
    if index is None:
        raise CnnvisError(f"objective {objective!r} needs {what}= (one value or one per image)")
    shape = tuple(shape)
    size = int(np.prod(shape)) if shape else 1
    if objective.startswith("channel_"):
        size = shape[0]
    arr = np.asarray(index)
    if objective == "unit" and (isinstance(index, tuple) or arr.ndim == 2):
        # a (c, y, x) tuple for every image, or one row of coordinates per image
        rows = np.broadcast_to(arr.reshape(1, -1), (n, arr.size)) if isinstance(index, tuple) else arr
        if rows.shape != (n, len(shape)):
            raise CnnvisError(f"index: expected {len(shape)} coordinates for target {target!r} of "
                              f"per-sample shape {tuple(shape)} (one tuple, or {n} rows), got {arr.shape}")
        for axis, dim in enumerate(shape):
            bad = (rows[:, axis] < 0) | (rows[:, axis] >= dim)
            if bad.any():
                raise CnnvisError(f"index: coordinate {axis} must be in [0, {dim}) for target "
                                  f"{target!r} of shape {tuple(shape)}, got {int(rows[bad, axis][0])}")
        return np.ravel_multi_index(tuple(rows.T.astype(np.int64)), shape).astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise CnnvisError(f"{what}: expected integers, got {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n, int(arr), dtype=np.int64)
    if arr.shape != (n,):
        raise CnnvisError(f"{what}: expected one value or {n} values (one per image), got shape {arr.shape}")
    if (arr < 0).any() or (arr >= size).any():
        raise CnnvisError(f"{what}: values must be in [0, {size}) for target {target!r} "
                          f"(per-sample shape {tuple(shape)}), got {int(arr[(arr < 0) | (arr >= size)][0])}")
    return arr.astype(np.int64)


def seed_feed(seed, n, target, shape, dtype):
    """The seed input: one target-shaped tensor per image (or one for all)."""
    if seed is None:
        raise CnnvisError("objective 'seed' needs seed= (an array shaped like the target)")
    arr = np.asarray(seed, dtype=dtype)
    shape = tuple(shape)
    if arr.shape == shape:
        arr = np.broadcast_to(arr, (n, *shape))
    if arr.shape != (n, *shape):
        raise CnnvisError(f"seed: expected shape {(n, *shape)} or {shape} for target {target!r}, got {arr.shape}")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------- cached engines

_ENGINES: "collections.OrderedDict" = collections.OrderedDict()
_MAX_ENGINES = 8


def model_fingerprint(model: onnx.ModelProto) -> str:
    return hashlib.sha1(model.SerializeToString(deterministic=True)).hexdigest()


def cached_engine(model, wrt, **options) -> GradientEngine:
    """A GradientEngine shared by calls with the same model and options (a small LRU cache).

    For a bare ModelProto or path (it fingerprints the model by serialising it, every call); code
    holding a :class:`cnnvis.model.Model` asks ``model.gradient_engine(...)`` instead."""
    model = _as_model(model)
    wrt = [wrt] if isinstance(wrt, str) else list(wrt)
    key = (model_fingerprint(model), tuple(wrt), tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key in _ENGINES:
        _ENGINES.move_to_end(key)
        return _ENGINES[key]
    engine = GradientEngine(model, wrt, **options)
    _ENGINES[key] = engine
    while len(_ENGINES) > _MAX_ENGINES:
        _ENGINES.popitem(last=False)
    return engine


def gradients(model, x, wrt, index=None, seed=None, labels=None, **options) -> GradientResult:
    """One-call form: ``gradients(model, x, wrt="data", objective="logit", index=281)``."""
    return cached_engine(model, wrt, **options).run(x, index=index, seed=seed, labels=labels)
