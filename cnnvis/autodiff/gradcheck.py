"""Finite-difference check of the gradient engine, in float64.

The model is cast to float64 and run by onnx's reference evaluator (onnxruntime's CPU provider has
no float64 Conv/pooling/LRN). Central differences of the total objective (sum over the batch, mean
for cross-entropy) are compared with the engine's batch gradients on randomly sampled entries.
Relative error = max |analytic - numeric| / largest |numeric| or |analytic| among the sampled entries.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import CnnvisError
from .backend import Runner
from .engine import GradientEngine, _as_model, index_feed, seed_feed
from ..onnxgraph import real_inputs
from .graph import OBJECTIVE_OUTPUT, build_objective_graph, prepare_forward


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64 (initializers, inputs, outputs, casts, constants)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return m


@dataclass
class GradcheckReport:
    wrt: str
    entries: np.ndarray  # flat indices checked
    analytic: np.ndarray
    numeric: np.ndarray
    max_abs_error: float
    max_rel_error: float

    def __str__(self):
        return (f"{self.wrt}: {len(self.entries)} entries, max abs error {self.max_abs_error:.3g}, "
                f"max relative error {self.max_rel_error:.3g}")


def gradcheck(model, x, wrt, objective: str = "logit", target=None, index=None, seed=None, labels=None,
              samples: int = 20, eps: float = 1e-6, rng_seed: int = 0, backend: str = "auto",
              analytic=None) -> dict:
    """Compare the engine's gradients with float64 central differences; returns wrt -> GradcheckReport.

    ``analytic`` (wrt -> batch gradient) skips running the engine; otherwise a
    :class:`GradientEngine` on ``model`` (batch-summed weight gradients) provides them.
    """
    model = _as_model(model)
    wrt = [wrt] if isinstance(wrt, str) else list(wrt)
    x = np.asarray(x)
    if analytic is None:
        engine = GradientEngine(model, wrt, objective=objective, target=target, per_sample=False, backend=backend)
        analytic = dict(engine.run(x, index=index, seed=seed, labels=labels))
    forward64 = to_float64(prepare_forward(model))
    x64 = x.astype(np.float64)
    n = x.shape[0]
    rng = np.random.default_rng(rng_seed)
    inits = {i.name: numpy_helper.to_array(i) for i in forward64.graph.initializer}


    image = real_inputs(forward64)[0].name
    reports = {}
    for w in wrt:
        obj_model, runtime, target_name, target_shape = build_objective_graph(
            forward64, x.shape[1:], objective, target, free=[w])
        runner = Runner(obj_model, backend="reference")
        feeds = {image: x64}
        if "index" in runtime:
            value = labels if objective == "cross_entropy" and labels is not None else index
            feeds[runtime["index"]] = index_feed(objective, value, n, target_name, target_shape)
        if "seed" in runtime:
            feeds[runtime["seed"]] = seed_feed(seed, n, target_name, target_shape, np.float64)
        if w == image:
            base = x64
        elif w in inits:
            base = inits[w].astype(np.float64)
        else:
            full = build_objective_graph(forward64, x.shape[1:], objective, target)[0]
            full.graph.output.append(onnx.ValueInfoProto(name=w))
            base = Runner(full, backend="reference")(dict(feeds), [w])[w]
        scale = 1.0 / n if objective == "cross_entropy" else 1.0

        def total(value):
            f = dict(feeds)
            f[w] = value
            return float(np.sum(runner(f, [OBJECTIVE_OUTPUT])[OBJECTIVE_OUTPUT])) * scale

        a = np.asarray(analytic[w], dtype=np.float64)
        if a.shape != base.shape:
            raise CnnvisError(f"gradcheck {w!r}: analytic gradient has shape {a.shape}, expected {base.shape}")
        count = min(int(samples), base.size)
        entries = np.sort(rng.choice(base.size, size=count, replace=False))
        numeric = np.empty(count)
        for k, flat in enumerate(entries):
            h = eps * max(1.0, abs(float(base.flat[flat])))
            plus, minus = base.copy(), base.copy()
            plus.flat[flat] += h
            minus.flat[flat] -= h
            numeric[k] = (total(plus) - total(minus)) / (2 * h)
        picked = a.reshape(-1)[entries]
        err = np.abs(picked - numeric)
        magnitude = max(float(np.max(np.abs(numeric), initial=0.0)), float(np.max(np.abs(picked), initial=0.0)))
        max_abs = float(err.max(initial=0.0))
        rel = max_abs / magnitude if magnitude > 0 else (0.0 if max_abs == 0 else float("inf"))
        reports[w] = GradcheckReport(w, entries, picked, numeric, max_abs, rel)
    return reports
