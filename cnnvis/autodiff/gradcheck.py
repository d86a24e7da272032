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
        if node.op_type == "GroupNormalization":
            # statistics in float64 too (stash_type defaults to float32)
            kept = [a for a in node.attribute if a.name != "stash_type"]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("stash_type", TensorProto.DOUBLE)])
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
    scale = 1.0 / n if objective == "cross_entropy" else 1.0
    reports = {}
    for w in wrt:
        # A weight read only by one Conv is perturbed through that Conv's output, which is exactly
        # linear in it: conv(W + h e) = conv(W) + h conv_e. Perturbed copies then run as one batch.
        conv = _sole_conv_consumer(forward64, w) if w in inits else None
        free = conv.output[0] if conv is not None else w
        upstream = [t for t in conv.input[:1] if t != image] if conv is not None else []
        obj_model, runtime, target_name, target_shape = build_objective_graph(
            forward64, x.shape[1:], objective, target, free=[free], outputs=upstream)
        runner = Runner(obj_model, backend="reference")
        per_image = {image: x64}
        if "index" in runtime:
            value = labels if objective == "cross_entropy" and labels is not None else index
            per_image[runtime["index"]] = index_feed(objective, value, n, target_name, target_shape)
        if "seed" in runtime:
            per_image[runtime["seed"]] = seed_feed(seed, n, target_name, target_shape, np.float64)
        values = {image: x64}
        if w not in inits and w != image:  # an intermediate tensor: its value from the uncut graph
            values.update(_forward_values(forward64, x.shape[1:], objective, target, per_image, [w]))
        if conv is not None:
            if upstream:  # the Conv's input does not depend on the (fed) Conv output
                placeholder = dict(per_image)
                placeholder[free] = np.zeros((n, *_conv_out_shape(obj_model, free)))
                values.update(runner(placeholder, upstream))
            values[free] = _conv_output(conv, values[conv.input[0]], inits)
        base = inits[w].astype(np.float64) if w in inits else values[w]
        a = np.asarray(analytic[w], dtype=np.float64)
        if a.shape != base.shape:
            raise CnnvisError(f"gradcheck {w!r}: analytic gradient has shape {a.shape}, expected {base.shape}")
        count = min(int(samples), base.size)
        entries = np.sort(rng.choice(base.size, size=count, replace=False))
        steps = np.array([eps * max(1.0, abs(float(base.flat[e]))) for e in entries])

        def rows_objective(sample_ids, free_values):
            """Objective per row: image/index/seed of ``sample_ids`` with the free tensor's values."""
            out = []
            for start in range(0, len(sample_ids), 16):
                ids = sample_ids[start:start + 16]
                feeds = {k: v[ids] for k, v in per_image.items()}
                feeds[free] = free_values[start:start + 16]
                out.append(runner(feeds, [OBJECTIVE_OUTPUT])[OBJECTIVE_OUTPUT])
            return np.concatenate(out)

        if w not in inits:  # batched tensor: an entry belongs to one image, the others cancel
            ids, rows = [], []
            for e, h in zip(entries, steps):
                idx = np.unravel_index(e, base.shape)
                for sign in (1.0, -1.0):
                    row = base[idx[0]].copy()
                    row[idx[1:]] += sign * h
                    ids.append(idx[0])
                    rows.append(row)
            values_pm = rows_objective(np.array(ids), np.stack(rows)).reshape(count, 2)
            numeric = (values_pm[:, 0] - values_pm[:, 1]) / (2 * steps) * scale
        elif conv is not None:
            conv_out, conv_in = values[conv.output[0]], values[conv.input[0]]
            ids = np.tile(np.arange(n), 2 * count)
            rows = []
            for e, h in zip(entries, steps):
                delta = _conv_response(conv, conv_in, base.shape, e)
                rows.extend([conv_out + h * delta, conv_out - h * delta])
            values_pm = rows_objective(ids, np.concatenate(rows)).reshape(count, 2, n).sum(axis=2)
            numeric = (values_pm[:, 0] - values_pm[:, 1]) / (2 * steps) * scale
        else:
            def total(value):
                feeds = dict(per_image)
                feeds[w] = value
                return float(np.sum(runner(feeds, [OBJECTIVE_OUTPUT])[OBJECTIVE_OUTPUT])) * scale

            numeric = np.empty(count)
            for k, (e, h) in enumerate(zip(entries, steps)):
                plus, minus = base.copy(), base.copy()
                plus.flat[e] += h
                minus.flat[e] -= h
                numeric[k] = (total(plus) - total(minus)) / (2 * h)
        picked = a.reshape(-1)[entries]
        err = np.abs(picked - numeric)
        magnitude = max(float(np.max(np.abs(numeric), initial=0.0)), float(np.max(np.abs(picked), initial=0.0)))
        max_abs = float(err.max(initial=0.0))
        rel = max_abs / magnitude if magnitude > 0 else (0.0 if max_abs == 0 else float("inf"))
        reports[w] = GradcheckReport(w, entries, picked, numeric, max_abs, rel)
    return reports


def _sole_conv_consumer(model, name):
    users = [node for node in model.graph.node if name in node.input]
    if len(users) == 1 and users[0].op_type == "Conv" and list(users[0].input).index(name) == 1:
        return users[0]
    return None


def _forward_values(model, sample_shape, objective, target, feeds, names):
    if not names:
        return {}
    full = build_objective_graph(model, sample_shape, objective, target)[0]
    for name in names:
        full.graph.output.append(onnx.ValueInfoProto(name=name))
    return Runner(full, backend="reference")(dict(feeds), names)


def _conv_out_shape(model, name):
    for vi in model.graph.input:
        if vi.name == name:
            return tuple(d.dim_value for d in vi.type.tensor_type.shape.dim[1:])
    raise CnnvisError(f"gradcheck: no shape for {name!r}")


def _conv_output(node, conv_in, inits):
    from .backend import _AttrView, conv_nd
    from .rules import _spatial_attrs

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    w = inits[node.input[1]].astype(np.float64)
    bias = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else None
    kernel, strides, dilations, pads = _spatial_attrs(_AttrView(attrs), conv_in.shape, w.shape)
    return conv_nd(conv_in, w, bias, kernel, strides, dilations, pads, int(attrs.get("group", 1)))


def _conv_response(node, conv_in, w_shape, flat):
    """How the Conv output changes per unit change of weight entry ``flat`` (float64, exact)."""
    from .backend import _AttrView, conv_nd
    from .rules import _spatial_attrs

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    group = int(attrs.get("group", 1))
    kernel, strides, dilations, pads = _spatial_attrs(_AttrView(attrs), conv_in.shape, w_shape)
    m = np.unravel_index(flat, w_shape)[0]
    cg, mg = w_shape[1], w_shape[0] // group
    gi = m // mg
    one = np.zeros((1, *w_shape[1:]))
    one.reshape(-1)[flat % int(np.prod(w_shape[1:]))] = 1.0
    channel = conv_nd(conv_in[:, gi * cg:(gi + 1) * cg], one, None, kernel, strides, dilations, pads, 1)
    out = np.zeros((conv_in.shape[0], w_shape[0], *channel.shape[2:]))
    out[:, m] = channel[:, 0]
    return out
