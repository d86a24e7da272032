"""Finite-difference check of the gradient engine, in float64.

The model is cast to float64 and run by onnx's reference evaluator (onnxruntime's CPU provider has
no float64 Conv/pooling/LRN). Central differences of the total objective (sum over the batch, mean
for cross-entropy) are compared with the engine's batch gradients on randomly sampled entries.
Relative error = max |analytic - numeric| / largest |numeric| or |analytic| among the sampled entries.

Kinks: where a central difference straddles a non-differentiable point (a max-pool or Max tie, a
Relu/Clip/HardSwish... input at its bound, Abs at 0) it measures neither one-sided derivative. The
check reads, at x + h and x - h, every decision such a point takes (pooling switches, the side of
each bound); an entry whose two evaluations decide differently sits on a kink: it is reported and
excluded, and other entries are drawn in its place (at most ``KINK_BUDGET`` times ``samples``
entries evaluated in all), so the verdict rests on entries away from kinks.

Float32 models: the rule check runs the engine's gradient graph in float64 too (onnx's reference
evaluator) and compares that with the central differences: the rules against the function, at
the same precision. The float32 gradient is compared with the float64 gradient apart, as a
precision note, with the count of decisions (Relu signs, pool switches, bounds: the same points
as the kinks) the float32 forward takes differently from the float64 one: where one differs, the
float32 gradient is the exact gradient of a slightly different function and may be far from the
float64 one although every rule is right. :meth:`GradcheckReport.failure` is the verdict: the
rule check above the tolerance fails, so does a float32 gradient further than the tolerance from
the float64 gradient while no decision differs (nothing in the precision explains it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import CnnvisError
from .backend import Runner
from .engine import GradientEngine, _as_model, index_feed, seed_feed
from ..onnxgraph import real_inputs
from .rules import HARD_SWISH_ALPHA
from .graph import OBJECTIVE_OUTPUT, build_objective_graph, model_dtype, prepare_forward


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


KINK_BUDGET = 10  # at most this many times ``samples`` entries evaluated, replacements for kinks included


@dataclass
class GradcheckReport:
    wrt: str
    entries: np.ndarray  # flat indices checked (away from kinks)
    analytic: np.ndarray
    numeric: np.ndarray
    max_abs_error: float
    max_rel_error: float  # nan when every sampled entry sits on a kink
    kinked: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # excluded entries
    kinked_numeric: np.ndarray = field(default_factory=lambda: np.zeros(0))  # their central differences
    # float32 models: ``analytic`` is the engine's float64 gradient; the float32 one against it
    # (max |g32 - g64| over the whole tensor / largest |g64| or |g32|) and the forward decisions
    # that differ between float32 and float64, of ``decisions`` in all
    float32_rel_error: float | None = None
    decisions_differ: int | None = None
    decisions: int | None = None

    @property
    def sampled(self) -> int:
        return len(self.entries) + len(self.kinked)

    @property
    def kink_note(self) -> str:
        """'' without kinks, else '; k of N sampled entries sit on a kink (...); excluded'."""
        if not len(self.kinked):
            return ""
        return (f"; {len(self.kinked)} of {self.sampled} sampled entries sit on a kink (a tie or bound "
                "under the finite difference); excluded")

    @property
    def precision_note(self) -> str:
        """'' for a float64 model, else '; float32 gradient vs float64 gradient: ...'."""
        if self.float32_rel_error is None:
            return ""
        return (f"; float32 gradient vs float64 gradient (same rules): relative distance "
                f"{self.float32_rel_error:.3g}, {self.decisions_differ} of {self.decisions} forward decisions "
                "(Relu signs, pool switches, bounds) differ between float32 and float64")

    def failure(self, tolerance: float) -> str:
        """'' when the check passes at ``tolerance``, else why it fails (one line)."""
        if np.isnan(self.max_rel_error):
            return "every sampled entry sits on a kink, no verdict (other inputs or more --samples)"
        if not self.max_rel_error <= tolerance:
            return f"relative error {self.max_rel_error:.3g} > tolerance {tolerance:g}"
        if self.float32_rel_error is not None and not self.float32_rel_error <= tolerance and not self.decisions_differ:
            return (f"float32 gradient {self.float32_rel_error:.3g} from the float64 gradient (> tolerance "
                    f"{tolerance:g}) with no forward decision differing")
        return ""

    def __str__(self):
        return (f"{self.wrt}: {len(self.entries)} entries, max abs error {self.max_abs_error:.3g}, "
                f"max relative error {self.max_rel_error:.3g}{self.kink_note}{self.precision_note}")


def gradcheck(model, x, wrt, objective: str = "logit", target=None, index=None, seed=None, labels=None,
              samples: int = 20, eps: float = 1e-6, rng_seed: int = 0, backend: str = "auto",
              analytic=None) -> dict:
    """Compare the engine's gradients with float64 central differences; returns wrt -> GradcheckReport.

    ``analytic`` (wrt -> batch gradient) skips running the engine and is compared as it is;
    otherwise a :class:`GradientEngine` on ``model`` (batch-summed weight gradients) provides them,
    and for a model not in float64 the same engine on the float64 model (reference backend) gives
    the gradient checked, the model's own one going to the precision note (see the module doc).
    """
    model = _as_model(model)
    wrt = [wrt] if isinstance(wrt, str) else list(wrt)
    x = np.asarray(x)
    low = None  # wrt -> the model's own (float32) gradient, when the check runs in float64
    if analytic is None:
        engine = GradientEngine(model, wrt, objective=objective, target=target, per_sample=False, backend=backend)
        analytic = dict(engine.run(x, index=index, seed=seed, labels=labels))
        # every engine, evaluator and graph holds its own copy of the weights (float64 ones twice the
        # file's size): each is dropped once used, so a full-size network holds a few copies at a time
        del engine
        if model_dtype(model) != np.float64:
            low = analytic
            engine64 = GradientEngine(to_float64(model), wrt, objective=objective, target=target, per_sample=False,
                                      backend="reference")
            analytic = dict(engine64.run(x.astype(np.float64), index=index, seed=seed, labels=labels))
            del engine64
            flipped, n_decisions = _decisions_differ(model, x)
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
        decisions = _decision_outputs(obj_model, [image, free])
        runner = Runner(obj_model, backend="reference")
        outputs = [OBJECTIVE_OUTPUT, *decisions]
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

        def rows_objective(sample_ids, free_values):
            """Objective and decisions per row: image/index/seed of ``sample_ids`` with the free
            tensor's values."""
            parts = []
            for start in range(0, len(sample_ids), 16):
                ids = sample_ids[start:start + 16]
                feeds = {k: v[ids] for k, v in per_image.items()}
                feeds[free] = free_values[start:start + 16]
                res = runner(feeds, outputs)
                parts.append([res[o] for o in outputs])
            return [np.concatenate([p[i] for p in parts]) for i in range(len(outputs))]

        def differ(plus, minus, rows):
            """Which of ``rows`` rows (axis 0) decide differently in the two evaluations."""
            out = np.zeros(rows, dtype=bool)
            for a, b in zip(plus, minus):
                out |= (a != b).reshape(len(a), -1).any(axis=1)
            return out

        def central_differences(picked):
            """(numeric derivative, on a kink) for the flat entries ``picked``."""
            steps = np.array([eps * max(1.0, abs(float(base.flat[e]))) for e in picked])
            k = len(picked)
            if w not in inits:  # batched tensor: an entry belongs to one image, the others cancel
                ids, rows = [], []
                for e, h in zip(picked, steps):
                    idx = np.unravel_index(e, base.shape)
                    for sign in (1.0, -1.0):
                        row = base[idx[0]].copy()
                        row[idx[1:]] += sign * h
                        ids.append(idx[0])
                        rows.append(row)
                res = rows_objective(np.array(ids), np.stack(rows))
                pm = res[0].reshape(k, 2)
                kink = differ([d[0::2] for d in res[1:]], [d[1::2] for d in res[1:]], k)
                return (pm[:, 0] - pm[:, 1]) / (2 * steps) * scale, kink
            if conv is not None:
                conv_out, conv_in = values[conv.output[0]], values[conv.input[0]]
                ids = np.tile(np.arange(n), 2 * k)
                rows = []
                for e, h in zip(picked, steps):
                    delta = _conv_response(conv, conv_in, base.shape, e)
                    rows.extend([conv_out + h * delta, conv_out - h * delta])
                res = rows_objective(ids, np.concatenate(rows))
                pm = res[0].reshape(k, 2, n).sum(axis=2)
                by_entry = [d.reshape(k, 2, -1) for d in res[1:]]
                kink = differ([d[:, 0] for d in by_entry], [d[:, 1] for d in by_entry], k)
                return (pm[:, 0] - pm[:, 1]) / (2 * steps) * scale, kink

            def total(value):
                feeds = dict(per_image)
                feeds[w] = value
                res = runner(feeds, outputs)
                return float(np.sum(res[OBJECTIVE_OUTPUT])) * scale, [res[d].reshape(1, -1) for d in decisions]

            numeric, kink = np.empty(k), np.zeros(k, dtype=bool)
            for j, (e, h) in enumerate(zip(picked, steps)):
                plus, minus = base.copy(), base.copy()
                plus.flat[e] += h
                minus.flat[e] -= h
                (fp, dp), (fm, dm) = total(plus), total(minus)
                numeric[j] = (fp - fm) / (2 * h)
                kink[j] = bool(differ(dp, dm, 1)[0])
            return numeric, kink

        numeric, kink = central_differences(entries)
        kinked, kinked_numeric = entries[kink], numeric[kink]
        entries, numeric = entries[~kink], numeric[~kink]
        evaluated = count
        while True:  # replacements for the entries on a kink, twice as many drawn
            missing = count - len(entries)
            pool = np.setdiff1d(np.arange(base.size), np.concatenate([entries, kinked]))
            room = KINK_BUDGET * count - evaluated
            if missing == 0 or not len(pool) or room <= 0:
                break
            extra = rng.choice(pool, size=min(2 * missing, len(pool), room), replace=False)
            evaluated += len(extra)
            more, more_kink = central_differences(extra)
            clean = np.flatnonzero(~more_kink)[:missing]  # in the order drawn
            last = clean[-1] + 1 if len(clean) == missing else len(extra)  # entries past it stay unused
            kinked = np.concatenate([kinked, extra[:last][more_kink[:last]]])
            kinked_numeric = np.concatenate([kinked_numeric, more[:last][more_kink[:last]]])
            order = np.argsort(np.concatenate([entries, extra[clean]]), kind="stable")
            entries = np.concatenate([entries, extra[clean]])[order]
            numeric = np.concatenate([numeric, more[clean]])[order]
        order = np.argsort(kinked, kind="stable")
        kinked, kinked_numeric = kinked[order].astype(np.int64), kinked_numeric[order]
        picked = a.reshape(-1)[entries]
        err = np.abs(picked - numeric)
        magnitude = max(float(np.max(np.abs(numeric), initial=0.0)), float(np.max(np.abs(picked), initial=0.0)))
        max_abs = float(err.max(initial=0.0))
        if not len(entries):
            rel = float("nan")  # nothing away from kinks: no verdict
        else:
            rel = max_abs / magnitude if magnitude > 0 else (0.0 if max_abs == 0 else float("inf"))
        reports[w] = GradcheckReport(w, entries, picked, numeric, max_abs, rel, kinked, kinked_numeric)
        if low is not None:
            g32 = np.asarray(low[w], dtype=np.float64)
            top = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(g32), initial=0.0)))
            dist = float(np.max(np.abs(g32 - a), initial=0.0))
            reports[w].float32_rel_error = dist / top if top > 0 else 0.0
            reports[w].decisions_differ, reports[w].decisions = flipped, n_decisions
        del runner, obj_model  # before the next wrt's graph and evaluator are built
    return reports


def _decisions_differ(model, x):
    """(count, total) of the forward's decisions (:func:`_decision_outputs` on the image) that
    the model's own precision (onnxruntime) takes differently from float64 (reference)."""
    forward = prepare_forward(model)
    image = real_inputs(forward)[0].name
    runs = []
    for m, dtype, backend in ((forward, model_dtype(forward), "onnxruntime"),
                              (to_float64(forward), np.float64, "reference")):
        copy = onnx.ModelProto()
        copy.CopyFrom(m)
        names = _decision_outputs(copy, [image], dtype)
        if not names:
            return 0, 0
        res = Runner(copy, backend=backend)({image: x.astype(dtype)}, names)
        runs.append([np.asarray(res[name]) for name in names])
    differ = sum(int(np.count_nonzero(a != b)) for a, b in zip(*runs))
    return differ, sum(a.size for a in runs[0])


#: Ops with points where they are not differentiable, and the decisions taken there: the sign of
#: the input against each bound (Relu ...), the switch (MaxPool), which input wins (Max/Min).
_SIGN_AT_ZERO = {"Relu", "LeakyRelu", "PRelu", "Abs", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sign"}


def _decision_outputs(model, sources, dtype=np.float64):
    """Add to ``model`` outputs holding the decisions of its non-differentiable points that
    depend on ``sources`` (one row per sample); return their names. ``dtype``: the model's floats."""
    from onnx import helper

    g = model.graph
    batched = set(sources)
    for node in g.node:
        if any(i in batched for i in node.input if i):
            batched.update(o for o in node.output if o)
    new_nodes, names, count = [], [], [0]

    def fresh(hint):
        count[0] += 1
        return f"cnnvis_kink/{hint}_{count[0]}"

    def const(value, dtype=dtype):
        name = fresh("const")
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def add(op, inputs, **attrs):
        out = fresh(op.lower())
        new_nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def sign_against(x, bound, scale=1.0):
        shifted = add("Sub", [add("Mul", [x, const(scale)]) if scale != 1.0 else x, const(bound)])
        names.append(add("Sign", [shifted]))

    for node in list(g.node):
        if not node.input or node.input[0] not in batched:
            continue
        op, x = node.op_type, node.input[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op in _SIGN_AT_ZERO:
            names.append(add("Sign", [x]))
        elif op == "Clip":
            for bound in node.input[1:3]:
                if bound:
                    names.append(add("Sign", [add("Sub", [x, bound])]))
        elif op == "HardSigmoid":
            alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
            sign_against(x, -beta, alpha)
            sign_against(x, 1.0 - beta, alpha)
        elif op == "HardSwish":  # clip(alpha x + 1/2, 0, 1), alpha as the op's function body stores it
            sign_against(x, -0.5, HARD_SWISH_ALPHA)
            sign_against(x, 0.5, HARD_SWISH_ALPHA)
        elif op == "MaxPool":
            while len(node.output) < 2:
                node.output.append("")
            if not node.output[1]:
                node.output[1] = fresh("maxpool_switch")
            # the indices count across the batch: within a sample, mod its size
            size = add("ReduceProd", [add("Shape", [x], start=1)], keepdims=1)
            names.append(add("Mod", [node.output[1], size]))
        elif op == "GlobalMaxPool":
            flat = add("Reshape", [x, const([0, 0, -1], np.int64)])
            names.append(add("ArgMax", [flat], axis=2))
        elif op in ("Max", "Min"):
            for i in node.input:
                if i:
                    names.append(add("Equal", [i, node.output[0]]))
        elif op in ("ReduceMax", "ReduceMin"):
            kept = fresh("reduce_kept")
            keep = helper.make_node(op, list(node.input), [kept], name=kept,
                                    **{k: v for k, v in attrs.items() if k != "keepdims"}, keepdims=1)
            new_nodes.append(keep)
            names.append(add("Equal", [x, kept]))
        elif op == "Where" and x in batched:
            names.append(x)
    g.node.extend(new_nodes)
    for name in names:
        g.output.append(onnx.ValueInfoProto(name=name))
    return names


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
    from .backend import conv_nd

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    w = inits[node.input[1]].astype(np.float64)
    bias = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else None
    kernel, strides, dilations, pads = _conv_geometry(attrs, conv_in.shape, w.shape)
    return conv_nd(conv_in, w, bias, kernel, strides, dilations, pads, int(attrs.get("group", 1)))


def _conv_geometry(attrs, x_shape, w_shape):
    """The reference's geometry (not the rules'): see :func:`.backend.window_geometry`."""
    from .backend import window_geometry

    return window_geometry(x_shape, attrs.get("kernel_shape") or w_shape[2:], attrs.get("strides"),
                           attrs.get("dilations"), attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))


def _conv_response(node, conv_in, w_shape, flat):
    """How the Conv output changes per unit change of weight entry ``flat`` (float64, exact)."""
    from .backend import conv_nd

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    group = int(attrs.get("group", 1))
    kernel, strides, dilations, pads = _conv_geometry(attrs, conv_in.shape, w_shape)
    m = np.unravel_index(flat, w_shape)[0]
    cg, mg = w_shape[1], w_shape[0] // group
    gi = m // mg
    one = np.zeros((1, *w_shape[1:]))
    one.reshape(-1)[flat % int(np.prod(w_shape[1:]))] = 1.0
    channel = conv_nd(conv_in[:, gi * cg:(gi + 1) * cg], one, None, kernel, strides, dilations, pads, 1)
    out = np.zeros((conv_in.shape[0], w_shape[0], *channel.shape[2:]))
    out[:, m] = channel[:, 0]
    return out
