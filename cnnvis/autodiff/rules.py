"""Backward rules, one function per ONNX op.

A rule receives a :class:`RuleContext` (the forward node, the gradients of its outputs, static
shapes) and returns, for each input of the node, the name of its gradient tensor or ``None``.

Conventions:

* Static shapes come from running the forward once at batch size 2; tensors that carry the batch
  (``ctx.batched``) have it on axis 0 and the graph keeps it symbolic (``Reshape`` with 0 = copy).
* Gradients of batched tensors are naturally per sample. Gradients of constants (weights) are
  the batch sum, or in ``per_sample`` mode one gradient per sample, shape ``(N, *weight.shape)``.
* ``rule`` changes only the rectifiers: ``deconvnet`` rectifies the backward signal itself
  (Zeiler & Fergus), ``guided`` keeps the exact gradient but zeroes negative backward signals.
  Everything else (convolutions, pooling switches, LRN, ...) is the exact gradient under all rules.

How ``deconvnet`` and ``guided`` treat the ops (g: the backward signal reaching the op; the
README's table, written by :func:`markdown_table`, lists every op with a rule):

================  =======================================  =======================================
op                ``deconvnet``                            ``guided``
================  =======================================  =======================================
Relu              relu(g), the forward mask ignored        g * [x > 0], then negatives zeroed
LeakyRelu, PRelu  the forward function applied to g        relu(g), then the forward slope
Clip with min 0   relu(g)                                  g * [min <= x <= max], then negatives
(ReLU6)                                                    zeroed
any other op      the exact gradient: smooth activations   the exact gradient
                  (HardSwish, Gelu, Mish, SiLU as
                  Sigmoid * x ...) are not rectifiers
================  =======================================  =======================================
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .. import ops
from ..errors import CnnvisError
from ..onnxgraph import lrn_attributes, lrn_windows, write_lrn

RULES = ("gradient", "deconvnet", "guided")


class RuleContext:
    def __init__(self, node, builder, shapes, batched, rule, per_sample, need, grads_out, request_output):
        self.node = node
        self.b = builder
        self.shapes = shapes
        self.batched = batched
        self.rule = rule
        self.per_sample = per_sample
        self.need = need
        self.g = grads_out
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self._request_output = request_output

    # ----------------------------------------------------------------- facts
    @property
    def x(self):
        return self.node.input

    @property
    def y(self):
        return self.node.output

    def attr(self, name, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def shape(self, name):
        return tuple(self.shapes[name])

    def rank(self, name):
        return len(self.shapes[name])

    def is_batched(self, name):
        return name in self.batched

    def fail(self, what: str):
        return CnnvisError(f"node {self.node.name or self.node.output[0]!r} ({self.node.op_type}): {what}")

    def known_value(self, name):
        """The value of ``name`` if it is an initializer or the output of a Constant node, else None."""
        value = self.b.known_constants.get(name)
        node = self.b.producer.get(name) if value is None else None
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            from onnx import numpy_helper

            attr = node.attribute[0]
            raw = helper.get_attribute_value(attr)
            value = numpy_helper.to_array(raw) if attr.name in ("value", "sparse_value") else np.asarray(raw)
        return value

    def constant_value(self, name):
        """The value of a constant input (an initializer after constant folding, or a Constant node)."""
        value = self.known_value(name)
        if value is None:
            raise self.fail(f"input {name!r} must be a constant (initializer) to differentiate this node")
        return value

    def output_grad(self, i: int = 0):
        """The gradient of output i, zeros when the objective does not depend on it."""
        if self.g[i] is not None:
            return self.g[i]
        return self.b.zeros_like_shape(self.b.shape_of(self.y[i]))

    def request_output(self, index: int) -> str:
        """Ask the forward node for an optional output (e.g. MaxPool's Indices) and return its name."""
        return self._request_output(self.node, index)

    # ------------------------------------------------------------- reduction
    def reduce_to(self, g, g_shape, target, virtual_shape=None):
        """Sum a broadcast gradient ``g`` (static shape ``g_shape``) down to the shape of ``target``.

        ``virtual_shape`` is the shape ``target`` had when broadcast (a promoted MatMul vector).
        For a constant ``target`` in per-sample mode the batch axis 0 is kept and the result has
        shape ``(N, *target.shape)``.
        """
        b = self.b
        t_shape = self.shape(target)
        v_shape = tuple(virtual_shape) if virtual_shape is not None else t_shape
        g_shape = tuple(g_shape)
        lead = len(g_shape) - len(v_shape)
        aligned = (1,) * lead + v_shape
        axes = [i for i in range(len(g_shape)) if i < lead or (aligned[i] == 1 and g_shape[i] != 1)]
        keep_batch = self.per_sample and not self.is_batched(target)
        if keep_batch:
            axes = [a for a in axes if a != 0]
        elif not axes and g_shape == t_shape:
            return g
        reduced = b.reduce_sum(g, axes, keepdims=1)
        if keep_batch:
            return b.reshape(reduced, [0] + list(t_shape))
        if self.is_batched(target):
            return b.reshape(reduced, b.shape_of(target))
        return b.reshape(reduced, list(t_shape))

    def sum_over_batch(self, per_sample_grad):
        """Turn a per-sample weight gradient (N, ...) into the batch sum unless per-sample is asked."""
        if self.per_sample:
            return per_sample_grad
        return self.b.reduce_sum(per_sample_grad, [0], keepdims=0)


_RULE_TABLE: dict = {}
_RULE_NOTES: dict = {}  # op -> (what it supports, deconvnet behaviour, guided behaviour)

EXACT = "exact gradient"

#: Commands that need no gradients, so they run on a model with an op that has no backward rule.
GRADIENT_FREE_COMMANDS = ("activations", "volume", "order", "render", "occlusion", "invariance", "filters", "layers")


def rule(*op_types, note: str = "", deconvnet: str = EXACT, guided: str = EXACT):
    """Register a backward rule for ``op_types``; ``note`` says what of the op it covers, and
    ``deconvnet`` / ``guided`` what the other rules do there (the README's table reads these)."""
    def deco(fn):
        for op in op_types:
            _RULE_TABLE[op] = fn
            _RULE_NOTES[op] = (note, deconvnet, guided)
        return fn
    return deco


def supported_ops():
    return sorted(_RULE_TABLE)


def markdown_table() -> str:
    """The README's table of ops with backward rules (also ``cnnvis gradcheck --list-ops``): one row
    per op (ONNX domain)."""
    lines = ["| op | covers | `deconvnet` | `guided` |", "| --- | --- | --- | --- |"]
    for op in supported_ops():
        note, deconv, guided = _RULE_NOTES[op]
        lines.append(f"| {op} | {note or 'all of the op'} | {deconv} | {guided} |")
    return "\n".join(lines) + "\n"


def backward(ctx: RuleContext):
    fn = _RULE_TABLE.get(ctx.node.op_type)
    if fn is None or ctx.node.domain not in ("", "ai.onnx"):
        domain = f" in domain {ctx.node.domain!r}" if ctx.node.domain not in ("", "ai.onnx") else ""
        raise ctx.fail(f"no backward rule for this op{domain} (it lies between the objective and a requested "
                       "gradient); gradient methods cannot run on this model, these commands need no gradients: "
                       f"{', '.join(GRADIENT_FREE_COMMANDS)}; ops with rules: supported_ops() (the gradcheck command "
                       "lists them)")
    grads = fn(ctx)
    return list(grads) + [None] * (len(ctx.node.input) - len(grads))


# ============================================================ pass-through and shape ops

@rule("Identity", "Dropout", note="Dropout as in inference (the identity)")
def _identity(ctx):
    return [ctx.output_grad(0)]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze", note="shapes computed at run time too")
def _reshape_like(ctx):
    b = ctx.b
    if ctx.is_batched(ctx.x[0]):
        return [b.reshape(ctx.output_grad(0), b.shape_of(ctx.x[0]))]
    if ctx.per_sample:
        return [b.reshape(ctx.output_grad(0), [0] + list(ctx.shape(ctx.x[0])))]
    return [b.reshape(ctx.output_grad(0), list(ctx.shape(ctx.x[0])))]


@rule("Expand")
def _expand(ctx):
    return [ctx.reduce_to(ctx.output_grad(0), ctx.shape(ctx.y[0]), ctx.x[0])]


@rule("Transpose")
def _transpose(ctx):
    rank = ctx.rank(ctx.x[0])
    perm = ctx.attr("perm", list(range(rank))[::-1])
    inverse = np.argsort(perm, kind="stable").tolist()
    if ctx.per_sample and not ctx.is_batched(ctx.x[0]):
        inverse = [0] + [p + 1 for p in inverse]
    return [ctx.b.transpose(ctx.output_grad(0), inverse)]


def _static_axis(ctx, axis, rank, what):
    axis = axis + rank if axis < 0 else axis
    if axis == 0 and ctx.is_batched(ctx.y[0]):
        raise ctx.fail(f"{what} along the batch axis cannot be differentiated per sample")
    return axis


@rule("Concat", note="not along the batch axis")
def _concat(ctx):
    b = ctx.b
    rank = ctx.rank(ctx.y[0])
    axis = _static_axis(ctx, ctx.attr("axis"), rank, "Concat")
    sizes = [ctx.shape(x)[axis] for x in ctx.x]
    parts = b.op("Split", [ctx.output_grad(0), b.ints(sizes)], n_outputs=len(sizes), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p if need else None for p, need in zip(parts, ctx.need)]


@rule("Split", note="not along the batch axis")
def _split(ctx):
    rank = ctx.rank(ctx.x[0])
    axis = _static_axis(ctx, ctx.attr("axis", 0), rank, "Split")
    grads = [ctx.output_grad(i) for i in range(len(ctx.y))]
    return [ctx.b.op("Concat", grads, axis=axis)]


def _slice_indices(start, end, step, dim):
    return list(range(*slice(int(start), int(end), int(step)).indices(int(dim))))


@rule("Slice", note="constant starts, ends, axes, steps")
def _slice(ctx):
    b = ctx.b
    x = ctx.x[0]
    shape = ctx.shape(x)
    rank = len(shape)
    starts = ctx.constant_value(ctx.x[1]).tolist()
    ends = ctx.constant_value(ctx.x[2]).tolist()
    axes = ctx.constant_value(ctx.x[3]).tolist() if len(ctx.x) > 3 and ctx.x[3] else list(range(len(starts)))
    steps = ctx.constant_value(ctx.x[4]).tolist() if len(ctx.x) > 4 and ctx.x[4] else [1] * len(starts)
    g = ctx.output_grad(0)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + rank if axis < 0 else axis
        dim = shape[axis]
        idx = _slice_indices(start, end, step, dim)
        if axis == 0 and ctx.is_batched(x):
            if idx == list(range(dim)) and int(end) >= dim:  # a full slice of the batch is a no-op
                continue
            raise ctx.fail("Slice along the batch axis cannot be differentiated per sample")
        if idx == list(range(dim)):
            continue
        if idx and step == 1:
            pads = [0] * (2 * rank)
            pads[axis] = idx[0]
            pads[rank + axis] = dim - idx[-1] - 1
            g = b.op("Pad", [g, b.ints(pads)])
            continue
        # General steps: gather from the gradient padded with one zero slice; unselected input
        # positions point at that zero slice.
        pads = [0] * (2 * rank)
        pads[rank + axis] = 1
        padded = b.op("Pad", [g, b.ints(pads)])
        inverse = np.full(dim, len(idx), dtype=np.int64)
        inverse[np.asarray(idx, dtype=np.int64)] = np.arange(len(idx))
        g = b.op("Gather", [padded, b.const(inverse)], axis=axis)
    return [g]


@rule("Pad", note="mode constant, constant pads (and axes)")
def _pad(ctx):
    b = ctx.b
    mode = ctx.attr("mode", "constant")
    if mode != "constant":
        raise ctx.fail(f"Pad mode {mode!r} is not supported (only 'constant')")
    if len(ctx.need) > 2 and ctx.need[2]:
        raise ctx.fail("the gradient of Pad's constant value is not supported")
    x = ctx.x[0]
    rank = ctx.rank(x)
    pads = ctx.constant_value(ctx.x[1]).astype(np.int64).tolist()
    if len(ctx.x) > 3 and ctx.x[3]:  # opset 18: pads for the listed axes only
        axes = [int(a) + rank if int(a) < 0 else int(a) for a in ctx.constant_value(ctx.x[3]).reshape(-1)]
        full = [0] * (2 * rank)
        for k, a in enumerate(axes):
            full[a], full[rank + a] = pads[k], pads[len(axes) + k]
        pads = full
    out_shape = ctx.shape(ctx.y[0])
    begin, end = pads[:rank], pads[rank:]
    g = ctx.output_grad(0)
    if any(p > 0 for p in begin + end):
        starts = [max(p, 0) for p in begin]
        ends = [out_shape[i] - max(end[i], 0) for i in range(rank)]
        if ctx.is_batched(x):
            starts[0], ends[0] = 0, np.iinfo(np.int64).max
        g = b.op("Slice", [g, b.ints(starts), b.ints(ends), b.ints(list(range(rank)))])
    if any(p < 0 for p in begin + end):
        g = b.op("Pad", [g, b.ints([max(-p, 0) for p in begin + end])])
    return [g]


# ================================================================ elementwise arithmetic

def _binary_shapes(ctx):
    return ctx.shape(ctx.y[0])


@rule("Add")
def _add(ctx):
    g, out = ctx.output_grad(0), _binary_shapes(ctx)
    return [ctx.reduce_to(g, out, ctx.x[i]) if ctx.need[i] else None for i in range(2)]


@rule("Sub")
def _sub(ctx):
    g, out = ctx.output_grad(0), _binary_shapes(ctx)
    da = ctx.reduce_to(g, out, ctx.x[0]) if ctx.need[0] else None
    db = ctx.reduce_to(ctx.b.neg(g), out, ctx.x[1]) if ctx.need[1] else None
    return [da, db]


@rule("Mul")
def _mul(ctx):
    b, (a, c) = ctx.b, ctx.x
    g, out = ctx.output_grad(0), _binary_shapes(ctx)
    da = ctx.reduce_to(b.mul(g, c), out, a) if ctx.need[0] else None
    dc = ctx.reduce_to(b.mul(g, a), out, c) if ctx.need[1] else None
    return [da, dc]


@rule("Div")
def _div(ctx):
    b, (a, c) = ctx.b, ctx.x
    g, out = ctx.output_grad(0), _binary_shapes(ctx)
    da = ctx.reduce_to(b.div(g, c), out, a) if ctx.need[0] else None
    # d(a/c)/dc = -(a/c)/c = -y/c
    dc = ctx.reduce_to(b.neg(b.div(b.mul(g, ctx.y[0]), c)), out, c) if ctx.need[1] else None
    return [da, dc]


@rule("Pow", note="base and exponent")
def _pow(ctx):
    b, (a, e) = ctx.b, ctx.x
    g, out = ctx.output_grad(0), _binary_shapes(ctx)
    da = db = None
    if ctx.need[0]:
        exponent_minus_one = b.sub(e, b.op("CastLike", [b.scalar(1.0), e]))
        da_full = b.mul(g, b.mul(e, b.op("Pow", [a, exponent_minus_one])))
        da = ctx.reduce_to(da_full, out, a)
    if ctx.need[1]:
        db = ctx.reduce_to(b.mul(g, b.mul(ctx.y[0], b.op("Log", [a]))), out, e)
    return [da, db]


@rule("Sqrt")
def _sqrt(ctx):
    b = ctx.b
    return [b.div(ctx.output_grad(0), b.mul(ctx.y[0], b.scalar(2.0)))]


@rule("Sigmoid")
def _sigmoid(ctx):
    b, y = ctx.b, ctx.y[0]
    return [b.mul(ctx.output_grad(0), b.mul(y, b.sub(b.scalar(1.0), y)))]


@rule("Tanh")
def _tanh(ctx):
    b, y = ctx.b, ctx.y[0]
    return [b.mul(ctx.output_grad(0), b.sub(b.scalar(1.0), b.mul(y, y)))]


@rule("Clip", note="no gradient for the bounds",
      deconvnet="min exactly 0 (ReLU6): relu of the backward signal; else exact",
      guided="min exactly 0 (ReLU6): exact, then negative signals zeroed; else exact")
def _clip(ctx):
    """Exact: g where min <= x <= max. With a lower bound of exactly 0 (ReLU6) Clip is a
    rectifier: ``deconvnet`` passes relu(g) (the backward signal rectified, the forward ignored),
    ``guided`` the exact gradient with negative values zeroed."""
    b, x = ctx.b, ctx.x[0]
    g = ctx.output_grad(0)
    if any(ctx.need[1:]):
        raise ctx.fail("gradients of Clip's min/max are not supported")
    lo = ctx.x[1] if len(ctx.x) > 1 and ctx.x[1] else None
    hi = ctx.x[2] if len(ctx.x) > 2 and ctx.x[2] else None
    lo_value = ctx.known_value(lo) if lo is not None else None
    rectifier = (ctx.rule != "gradient" and lo_value is not None and np.size(lo_value) == 1
                 and float(np.asarray(lo_value).reshape(-1)[0]) == 0.0)
    if rectifier and ctx.rule == "deconvnet":
        return [b.op("Relu", [g])]
    inside = None
    if lo is not None:
        inside = b.op("GreaterOrEqual", [x, lo])
    if hi is not None:
        below = b.op("LessOrEqual", [x, hi])
        inside = below if inside is None else b.op("And", [inside, below])
    passed = g if inside is None else b.mul(g, b.mask(inside))
    return [b.op("Relu", [passed]) if rectifier else passed]


# ============================================================================ rectifiers

@rule("Relu", deconvnet="relu of the backward signal (forward mask ignored)", guided="exact, then negative signals zeroed")
def _relu(ctx):
    b, g = ctx.b, ctx.output_grad(0)
    if ctx.rule == "gradient" and ctx.y[0] in b.premasked:
        return [g]  # the MaxPool reading this Relu applied the mask on its smaller tensor
    if ctx.rule == "deconvnet":
        return [b.op("Relu", [g])]
    # the mask from the output (y > 0 exactly where x > 0) leaves x to the Relu alone, so
    # onnxruntime can fuse the producing Conv with the Relu
    passed = b.mul(g, b.mask(b.op("Greater", [ctx.y[0], b.scalar(0.0)])))
    if ctx.rule == "guided":
        passed = b.op("Relu", [passed])
    return [passed]


def _leaky_backward(ctx, slope):
    b, x, g = ctx.b, ctx.x[0], ctx.output_grad(0)
    if ctx.rule == "deconvnet":
        # the forward nonlinearity applied to the backward signal
        return b.op("Where", [b.op("Greater", [g, b.scalar(0.0)]), g, b.mul(g, slope)])
    positive = b.op("Greater", [x, b.scalar(0.0)])
    if ctx.rule == "guided":
        g = b.op("Relu", [g])
    return b.op("Where", [positive, g, b.mul(g, slope)])


@rule("LeakyRelu", deconvnet="the forward function applied to the backward signal",
      guided="negative signals zeroed, then the forward mask/slope")
def _leaky_relu(ctx):
    return [_leaky_backward(ctx, ctx.b.scalar(float(ctx.attr("alpha", 0.01))))]


@rule("PRelu", note="input and slope", deconvnet="the forward function applied to the backward signal",
      guided="negative signals zeroed, then the forward mask/slope")
def _prelu(ctx):
    b, (x, slope) = ctx.b, ctx.x
    dx = _leaky_backward(ctx, slope) if ctx.need[0] else None
    dslope = None
    if ctx.need[1]:
        g = ctx.output_grad(0)
        negative_part = b.op("Where", [b.op("Greater", [x, b.scalar(0.0)]), b.scalar(0.0), b.mul(g, x)])
        dslope = ctx.reduce_to(negative_part, ctx.shape(ctx.y[0]), slope)
    return [dx, dslope]


# ================================================================ softmax family

@rule("Softmax", note="one axis (opset 13 semantics)")
def _softmax(ctx):
    b, y, g = ctx.b, ctx.y[0], ctx.output_grad(0)
    axis = ctx.attr("axis", -1)
    dot = b.reduce_sum(b.mul(g, y), [axis], keepdims=1)
    return [b.mul(y, b.sub(g, dot))]


@rule("LogSoftmax", note="one axis (opset 13 semantics)")
def _log_softmax(ctx):
    b, y, g = ctx.b, ctx.y[0], ctx.output_grad(0)
    axis = ctx.attr("axis", -1)
    total = b.reduce_sum(g, [axis], keepdims=1)
    return [b.sub(g, b.mul(b.op("Exp", [y]), total))]


# ================================================================ linear layers

@rule("Gemm", note="alpha, beta, transA, transB, broadcast C")
def _gemm(ctx):
    b = ctx.b
    a, w = ctx.x[0], ctx.x[1]
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    g = ctx.output_grad(0)
    grads = [None, None, None]
    if ctx.need[0]:
        # dA' = alpha g B'^T ; B'^T is B when transB else B^T
        da = b.op("Gemm", [g, w], alpha=alpha, transB=0 if trans_b else 1)
        if ctx.per_sample and not ctx.is_batched(a):
            raise ctx.fail("per-sample gradients of Gemm's first input need it to carry the batch")
        grads[0] = b.transpose(da, [1, 0]) if trans_a else da
    if ctx.need[1]:
        if ctx.per_sample and not ctx.is_batched(w):
            if trans_a or not ctx.is_batched(a):
                raise ctx.fail("per-sample weight gradients need the batch on axis 0 of input A")
            # per-sample outer products: (N,K,1) @ (N,1,M), or (N,M,1) @ (N,1,K) with transB
            if trans_b:
                dw = b.op("MatMul", [b.unsqueeze(g, [2]), b.unsqueeze(a, [1])])
            else:
                dw = b.op("MatMul", [b.unsqueeze(a, [2]), b.unsqueeze(g, [1])])
            grads[1] = b.scale(dw, alpha)
        else:
            # dB' = alpha A'^T g ; A'^T is A when transA else A^T
            dbp = b.op("Gemm", [a, g], alpha=alpha, transA=0 if trans_a else 1)
            grads[1] = b.transpose(dbp, [1, 0]) if trans_b else dbp
    if len(ctx.x) > 2 and ctx.x[2] and ctx.need[2]:
        grads[2] = ctx.reduce_to(b.scale(g, beta), ctx.shape(ctx.y[0]), ctx.x[2])
    return grads


def _swap_last(b, name, rank):
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return b.transpose(name, perm)


@rule("MatMul", note="broadcast batch axes, 1-D operands")
def _matmul(ctx):
    b = ctx.b
    a, w = ctx.x
    a_shape, w_shape = ctx.shape(a), ctx.shape(w)
    g = ctx.output_grad(0)
    g_shape = list(ctx.shape(ctx.y[0]))
    # 1-D operands are promoted to matrices, as the op itself does; g gets the promoted axes back.
    a_p = (1,) + a_shape if len(a_shape) == 1 else a_shape
    w_p = w_shape + (1,) if len(w_shape) == 1 else w_shape
    a2 = b.unsqueeze(a, [0]) if len(a_shape) == 1 else a
    w2 = b.unsqueeze(w, [1]) if len(w_shape) == 1 else w
    if len(a_shape) == 1:
        g = b.unsqueeze(g, [len(g_shape) - (0 if len(w_shape) == 1 else 1)])
        g_shape.insert(len(g_shape) - (0 if len(w_shape) == 1 else 1), 1)
    if len(w_shape) == 1:
        g = b.unsqueeze(g, [len(g_shape)])
        g_shape.append(1)
    da = dw = None
    if ctx.need[0]:
        full = b.op("MatMul", [g, _swap_last(b, w2, len(w_p))])
        da = ctx.reduce_to(full, g_shape[:-1] + [w_p[-2]], a, virtual_shape=a_p)
    if ctx.need[1]:
        if ctx.per_sample and not ctx.is_batched(w) and len(a_shape) == 2 and ctx.is_batched(a):
            # the batch is the row axis of A: per-sample outer products
            dw = b.op("MatMul", [b.unsqueeze(a, [2]), b.unsqueeze(g, [1])])
            dw = b.reshape(dw, [0] + list(w_shape))
        else:
            full = b.op("MatMul", [_swap_last(b, a2, len(a_p)), g])
            dw = ctx.reduce_to(full, g_shape[:-2] + [a_p[-1], g_shape[-1]], w, virtual_shape=w_p)
    return [da, dw]


# ================================================================== convolution

def _spatial_attrs(ctx, x_shape, w_shape=None):
    """kernel, strides, dilations, pads (lists) of a Conv or pool node as onnxruntime runs it
    (:func:`cnnvis.ops.window`: ``auto_pad`` resolved, a pool's SAME pads sized by its undilated
    kernel)."""
    win = ops.window(ctx.node, x_shape, w_shape, attrs=ctx.attrs)
    return list(win.kernel), list(win.strides), list(win.dilations), list(win.pads)


def _flipped_swapped_kernel(b, w, w_shape, group):
    """For each group, swap in/out channels and flip the kernel in space: (C, M/g, *k)."""
    m, cg = w_shape[0], w_shape[1]
    k = list(w_shape[2:])
    spatial = len(k)
    mg = m // group
    r = b.reshape(w, [group, mg, cg] + k)
    r = b.transpose(r, [0, 2, 1] + [3 + i for i in range(spatial)])
    r = b.reshape(r, [group * cg, mg] + k)
    axes = list(range(2, 2 + spatial))
    big = np.iinfo(np.int64).max
    return b.op("Slice", [r, b.ints([-1] * spatial), b.ints([-big] * spatial), b.ints(axes), b.ints([-1] * spatial)])


def conv_input_grad(ctx, g, x_shape, y_shape, w, w_shape, strides, dilations, pads, group):
    b = ctx.b
    spatial = len(x_shape) - 2
    k = list(w_shape[2:])
    edge = [dilations[i] * (k[i] - 1) for i in range(spatial)]
    new_pads = [edge[i] - pads[i] for i in range(spatial)] + [edge[i] - pads[spatial + i] for i in range(spatial)]
    if all(s == 1 for s in strides) and all(p >= 0 for p in new_pads):
        # a plain Conv with the flipped kernel: faster than ConvTranspose in onnxruntime
        wf = _flipped_swapped_kernel(b, w, w_shape, group)
        return b.op("Conv", [g, wf], pads=new_pads, dilations=dilations, group=group, strides=[1] * spatial)
    out_pad = []
    for i in range(spatial):
        covered = strides[i] * (y_shape[2 + i] - 1) + edge[i] + 1
        out_pad.append(x_shape[2 + i] + pads[i] + pads[spatial + i] - covered)
    return b.op("ConvTranspose", [g, w], strides=strides, pads=pads, dilations=dilations, group=group,
                output_padding=out_pad, kernel_shape=k)


def unfold(ctx, x, x_shape, kernel, strides, dilations, pads, out_spatial=None):
    """(N, C, *S) -> (N, C*prod(k), *out): each output channel picks one kernel tap of one channel.

    Returns (columns, order): ``order`` is None when the columns come in (channel, tap) order, else
    the column of each (channel, tap) of one group's channels (see :func:`_unfold_space_to_depth`).
    """
    b = ctx.b
    c = x_shape[1]
    taps = int(np.prod(kernel))
    spatial = len(kernel)
    if taps == 1 and all(s == 1 for s in strides) and not any(pads):
        return x, None
    if out_spatial is not None and _space_to_depth_pays(kernel, strides, dilations):
        return _unfold_space_to_depth(ctx, x, x_shape, kernel, strides, pads, out_spatial)
    eye = np.eye(taps, dtype=b.dtype).reshape([taps, 1] + list(kernel))
    one_hot = np.tile(eye, (c, 1) + (1,) * spatial)
    return b.op("Conv", [x, b.const(one_hot, hint="unfold_kernel")], group=c, strides=strides,
                dilations=dilations, pads=pads, kernel_shape=list(kernel)), None


def _space_to_depth_pays(kernel, strides, dilations):
    # onnxruntime runs the one-hot depthwise Conv as im2col times an identity matrix: taps^2
    # multiply-adds per output. A strided big kernel is better unfolded as a stride-1 small one on
    # space-to-depth blocks, if the rounded-up kernel does not add many columns.
    if len(kernel) != 2 or all(s == 1 for s in strides) or any(d != 1 for d in dilations):
        return False
    taps = kernel[0] * kernel[1]
    blocks = [-(-k // s) * s for k, s in zip(kernel, strides)]
    return taps >= 25 and blocks[0] * blocks[1] <= 1.35 * taps


def _unfold_space_to_depth(ctx, x, x_shape, kernel, strides, pads, out_spatial):
    """Unfold of a strided 2-D conv: tap i = a*s + r is tap a of the stride-1 conv on block offset r.

    The input is padded/cropped to whole s x s blocks, rearranged to (N, C*sh*sw, Hs, Ws) and
    unfolded with an (ah, aw) = ceil(k/s) kernel at stride 1. Columns come in (channel, rh, rw, ah,
    aw) order; taps beyond the kernel (a*s + r >= k) are extra columns that ``order`` skips.
    """
    b = ctx.b
    n_c = x_shape[1]
    (kh, kw), (sh, sw) = kernel, strides
    ah, aw = -(-kh // sh), -(-kw // sw)
    hs, ws = out_spatial[0] - 1 + ah, out_spatial[1] - 1 + aw
    ends = [hs * sh - pads[0] - x_shape[2], ws * sw - pads[1] - x_shape[3]]
    xp = b.op("Pad", [x, b.ints([0, 0, pads[0], pads[1], 0, 0, max(ends[0], 0), max(ends[1], 0)])])
    if min(ends) < 0:  # windows never reach the cropped end
        xp = b.op("Slice", [xp, b.ints([0, 0]), b.ints([hs * sh, ws * sw]), b.ints([2, 3])])
    # (N, C, hs*sh, ws*sw) -> (N, C*sh*sw, hs, ws) in two 4-D transposes (onnxruntime's 6-D
    # transpose is four times slower)
    rows_first = b.transpose(b.reshape(xp, [-1, hs, sh, ws * sw]), [0, 2, 1, 3])
    blocks = b.transpose(b.reshape(rows_first, [-1, hs, ws, sw]), [0, 3, 1, 2])
    blocks = b.reshape(blocks, [-1, n_c * sh * sw, hs, ws])
    small_taps = ah * aw
    eye = np.eye(small_taps, dtype=b.dtype).reshape(small_taps, 1, ah, aw)
    one_hot = np.tile(eye, (n_c * sh * sw, 1, 1, 1))
    cols = b.op("Conv", [blocks, b.const(one_hot, hint="unfold_kernel")], group=n_c * sh * sw,
                kernel_shape=[ah, aw])
    return cols, _space_to_depth_order(x_shape[1], kernel, strides)


def _space_to_depth_order(channels, kernel, strides):
    (kh, kw), (sh, sw) = kernel, strides
    ah, aw = -(-kh // sh), -(-kw // sw)
    order = []
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                (ai, ri), (aj, rj) = divmod(i, sh), divmod(j, sw)
                order.append((((c * sh + ri) * sw + rj) * ah + ai) * aw + aj)
    return np.asarray(order, dtype=np.int64)


def conv_weight_grad_per_sample(ctx, x, x_shape, g, w_shape, strides, dilations, pads, group, out_spatial=None):
    """dL_n/dW for every sample n: unfold of the input, then a batched MatMul with the output gradient."""
    b = ctx.b
    m, cg = w_shape[0], w_shape[1]
    k = list(w_shape[2:])
    taps = int(np.prod(k))
    cols, order = unfold(ctx, x, x_shape, k, strides, dilations, pads, out_spatial)
    cols = b.reshape(cols, [0, group, -1, int(np.prod(out_spatial)) if out_spatial else -1])
    gr = b.reshape(g, [0, group, m // group, -1])
    dw = b.op("MatMul", [gr, b.transpose(cols, [0, 1, 3, 2])])
    if order is not None:
        # one group's column order is every group's (channels of a group are contiguous)
        dw = b.op("Gather", [dw, b.const(order[:cg * taps])], axis=3)
    return b.reshape(dw, [0, m, cg] + k)


def conv_weight_grad_grouped(ctx, x, x_shape, g, y_shape, w_shape, strides, dilations, pads, group, n):
    """dL_n/dW for a batch of exactly ``n`` samples as one grouped convolution.

    dW[n, o, c, k] = sum_i g[n, o, i] * x[n, c, s*i + d*k]: a convolution of sample n's input
    (channels as the batch) with its own output gradient as the kernel, dilated by the stride s
    and moved with stride d. One group per (sample, conv group), so ``group`` is n times the conv's:
    the graph then serves only batches of n. onnxruntime unfolds one group at a time, in cache,
    where the unfold-and-MatMul form writes the whole unfolded batch to memory first.
    """
    b = ctx.b
    m, cg = w_shape[0], w_shape[1]
    kernel, out_spatial = list(w_shape[2:]), list(y_shape[2:])
    # (N, G*cg, *S) -> (cg, N*G, *S): the batch is a group's input channel, the channels (sample, group)
    xt = b.transpose(b.reshape(x, [n * group, cg, -1]), [1, 0, 2])
    xt = b.reshape(xt, [cg, n * group] + list(x_shape[2:]))
    kernels = b.reshape(g, [n * m, 1] + out_spatial)
    out = b.op("Conv", [xt, kernels], group=n * group, strides=list(dilations), dilations=list(strides),
               pads=list(pads), kernel_shape=out_spatial)
    out = _crop_taps(b, out, x_shape, out_spatial, kernel, strides, dilations, pads)
    # (cg, N*M, *k) -> (N, M, cg, *k)
    out = b.transpose(b.reshape(out, [cg, n * m, -1]), [1, 0, 2])
    return b.reshape(out, [n, m, cg] + kernel)


def _summed_by_conv_pays(b, kernel, strides, dilations, channels_per_group):
    # Measured on the demo network's conv2 (5x5, 24 channels a group, 14x14, batch 32): 14 ms as a
    # convolution against 20 ms unfolded, in a one-thread session; onnxruntime spreads this
    # convolution badly over threads, so with more threads the unfold stays faster.
    taps = int(np.prod(kernel))
    return (b.backend == "onnxruntime" and b.session_threads == 1 and taps >= 25 and channels_per_group >= 16
            and all(s == 1 for s in strides) and all(d == 1 for d in dilations))


def conv_weight_grad_summed(ctx, x, x_shape, g, y_shape, w_shape, strides, dilations, pads, group):
    """dL/dW summed over the batch as one convolution: the output gradient is the kernel.

    dW[o, c, k] = sum_{n, i} g[n, o, i] * x[n, c, s*i + d*k] convolves the input, with its channels as
    the batch and its samples as the channels, with g as an (O, N, *out) kernel dilated by s.
    """
    b = ctx.b
    cg = w_shape[1]
    kernel, out_spatial = list(w_shape[2:]), list(y_shape[2:])
    spatial = len(kernel)
    # (N, G*cg, *S) -> (cg, G*N, *S)
    xt = b.transpose(b.reshape(x, [0, group, cg, -1]), [2, 1, 0, 3])
    xt = b.reshape(xt, [cg, -1] + list(x_shape[2:]))
    kernels = b.transpose(g, [1, 0] + list(range(2, 2 + spatial)))
    out = b.op("Conv", [xt, kernels], group=group, strides=list(dilations), dilations=list(strides),
               pads=list(pads), kernel_shape=out_spatial)
    out = _crop_taps(b, out, x_shape, out_spatial, kernel, strides, dilations, pads)
    return b.transpose(out, [1, 0] + list(range(2, 2 + spatial)))


def _crop_taps(b, out, x_shape, out_spatial, kernel, strides, dilations, pads):
    """Drop the taps past the kernel that a weight gradient computed as a convolution also gives
    (windows beyond the forward conv's last one)."""
    spatial = len(kernel)
    reach = [(x_shape[2 + i] + pads[i] + pads[i + spatial] - (strides[i] * (out_spatial[i] - 1) + 1)) // dilations[i] + 1
             for i in range(spatial)]
    if reach == kernel:
        return out
    return b.op("Slice", [out, b.ints([0] * spatial), b.ints(kernel), b.ints(list(range(2, 2 + spatial)))])


@rule("Conv", note="pads, strides, dilations, groups, auto_pad")
def _conv(ctx):
    b = ctx.b
    x, w = ctx.x[0], ctx.x[1]
    x_shape, w_shape, y_shape = ctx.shape(x), ctx.shape(w), ctx.shape(ctx.y[0])
    group = int(ctx.attr("group", 1))
    kernel, strides, dilations, pads = _spatial_attrs(ctx, x_shape, w_shape)
    g = ctx.output_grad(0)
    grads = [None, None, None]
    if ctx.need[0]:
        grads[0] = conv_input_grad(ctx, g, x_shape, y_shape, w, w_shape, strides, dilations, pads, group)
    if ctx.need[1]:
        if ctx.is_batched(w) or not ctx.is_batched(x):
            raise ctx.fail("weight gradients need a constant weight and a batched input")
        # per node: only big strided kernels have the faster fixed-batch form
        grouped_pays = ctx.per_sample and b.backend == "onnxruntime" and _space_to_depth_pays(kernel, strides, dilations)
        b.wants_static_batch = b.wants_static_batch or grouped_pays
        if grouped_pays and b.static_batch:
            grads[1] = conv_weight_grad_grouped(ctx, x, x_shape, g, y_shape, w_shape, strides, dilations, pads,
                                                group, b.static_batch)
        elif not ctx.per_sample and _summed_by_conv_pays(b, kernel, strides, dilations, w_shape[1]):
            grads[1] = conv_weight_grad_summed(ctx, x, x_shape, g, y_shape, w_shape, strides, dilations, pads, group)
        else:
            per = conv_weight_grad_per_sample(ctx, x, x_shape, g, w_shape, strides, dilations, pads, group,
                                              out_spatial=y_shape[2:])
            grads[1] = ctx.sum_over_batch(per)
    if len(ctx.x) > 2 and ctx.x[2] and ctx.need[2]:
        per = b.reduce_sum(g, list(range(2, len(y_shape))), keepdims=0)
        grads[2] = ctx.sum_over_batch(per)
    return grads


# ====================================================================== pooling

def _premaskable_relu_output(ctx, x):
    """The Relu output whose backward mask a MaxPool reading ``x`` may apply on its own output.

    That is ``x`` itself, or the input of an across-channel LRN producing ``x``: with a positive
    bias the LRN keeps zeros zero and positives positive, and where its input is zero its input
    gradient is zero once the routed gradient is (dx = g / d - c * x * window(...)). Each tensor on
    the way must feed nothing else and have no gradient of its own asked for.
    """
    b = ctx.b

    def private(t):
        return b.consumers.get(t) == 1 and t not in b.protected

    node = b.producer.get(x)
    if node is not None and node.op_type == "LRN" and private(x):
        _, alpha, _, bias = lrn_attributes(node)
        if bias <= 0 or alpha < 0:
            return None
        x = node.input[0]
        node = b.producer.get(x)
    if node is not None and node.op_type == "Relu" and private(x):
        return x
    return None


@rule("MaxPool", note="storage_order 0; ties: the first maximum of the window")
def _maxpool(ctx):
    b, x = ctx.b, ctx.x[0]
    if int(ctx.attr("storage_order", 0)) != 0:
        raise ctx.fail("MaxPool with storage_order=1 is not supported")
    indices = ctx.request_output(1)
    g = ctx.output_grad(0)
    rectified = _premaskable_relu_output(ctx, x) if ctx.rule == "gradient" else None
    if rectified is not None:
        # Fold the Relu's backward mask into the pooled gradient (4x smaller here): a window's
        # switch holds a positive value exactly when the window's maximum is positive.
        g = b.mul(g, b.mask(b.op("Greater", [ctx.y[0], b.scalar(0.0)])))
        b.premasked.add(rectified)
    flat_size = b.reshape(b.op("Size", [x]), [1])
    zeros = b.zeros_like_shape(flat_size)
    flat = b.op("ScatterElements", [zeros, b.reshape(indices, [-1]), b.reshape(g, [-1])],
                axis=0, reduction="add")
    return [b.reshape(flat, b.shape_of(x))]


@rule("AveragePool", note="pads, ceil_mode, count_include_pad, dilations")
def _avgpool(ctx):
    b, x = ctx.b, ctx.x[0]
    x_shape, y_shape = ctx.shape(x), ctx.shape(ctx.y[0])
    spatial = len(x_shape) - 2
    kernel, strides, dilations, pads = _spatial_attrs(ctx, x_shape)
    include = int(ctx.attr("count_include_pad", 0))
    inv = np.ones([1, 1] + list(y_shape[2:]), dtype=np.float64)
    for i in range(spatial):
        div = ops.average_pool_divisors(x_shape[2 + i], y_shape[2 + i], kernel[i], strides[i], pads[i],
                                        pads[spatial + i], include, dilations[i])
        shape = [1] * (2 + spatial)
        shape[2 + i] = -1
        inv = inv / div.reshape(shape)
    g = b.mul(ctx.output_grad(0), b.const(inv.astype(b.dtype), hint="avgpool_inv_divisor"))
    g = b.reshape(g, [-1, 1] + list(y_shape[2:]))
    end_pads, out_pad = [], []
    for i in range(spatial):
        covered = strides[i] * (y_shape[2 + i] - 1) + (kernel[i] - 1) * dilations[i] + 1
        extra = covered - pads[i] - x_shape[2 + i]
        end_pads.append(max(extra, 0))
        out_pad.append(max(-extra, 0))
    ones = b.const(np.ones([1, 1] + list(kernel), dtype=b.dtype), hint="avgpool_ones")
    dilated = {"dilations": dilations} if any(d != 1 for d in dilations) else {}  # (opset 19 pools)
    dx = b.op("ConvTranspose", [g, ones], strides=strides, pads=list(pads[:spatial]) + end_pads,
              output_padding=out_pad, kernel_shape=list(kernel), **dilated)
    return [b.reshape(dx, b.shape_of(x))]


@rule("GlobalAveragePool")
def _global_avgpool(ctx):
    b, x = ctx.b, ctx.x[0]
    count = float(np.prod(ctx.shape(x)[2:]))
    return [b.op("Expand", [b.scale(ctx.output_grad(0), 1.0 / count), b.shape_of(x)])]


@rule("GlobalMaxPool", note="ties: the first maximum")
def _global_maxpool(ctx):
    b, x = ctx.b, ctx.x[0]
    flat = b.reshape(x, [0, 0, -1])
    first = b.op("ArgMax", [flat], axis=2, keepdims=1, select_last_index=0)
    zeros = b.zeros_like_shape(b.shape_of(flat))
    routed = b.op("ScatterElements", [zeros, first, b.reshape(ctx.output_grad(0), [0, 0, 1])], axis=2)
    return [b.reshape(routed, b.shape_of(x))]


# ======================================================================= normalisation

def channel_window_mean(b, t, shape, size, before, after):
    """Mean of ``t`` (static shape N x C x ...) over ``size`` consecutive channels, zeros outside."""
    c = shape[1]
    if b.backend == "reference":
        # onnx's reference AveragePool loops in Python; its Conv is cnnvis's fast one (backend.py)
        r = b.reshape(t, [0, 1, c, -1])
        window = b.const(np.full((1, 1, size, 1), 1.0 / size), hint="lrn_window")
        m = b.op("Conv", [r, window], pads=[before, 0, after, 0], kernel_shape=[size, 1])
    else:
        # a (size, 1, 1) AveragePool over (C, S0, rest): onnxruntime's fastest channel window,
        # several times faster than a 1-channel Conv or its own LRN kernel
        s0 = shape[2] if len(shape) > 2 else 1
        r = b.reshape(t, [0, 1, c, s0, -1])
        m = b.op("AveragePool", [r], kernel_shape=[size, 1, 1], pads=[before, 0, 0, after, 0, 0],
                 count_include_pad=1)
    return b.reshape(m, [0] + list(shape[1:]))


def expand_lrn(b, node, x_shape):
    """Write an LRN node out (:func:`cnnvis.onnxgraph.write_lrn`) in the forward graph: the same
    function as the op, faster in onnxruntime, and it keeps s and s**beta (names in
    ``b.lrn_parts`` when the backward rule asked for them) for the backward pass.
    """
    size = lrn_attributes(node)[0]
    before, after = lrn_windows(size)
    s_name, d_name = b.lrn_parts.get(node.output[0], (None, None))
    write_lrn(b, node, lambda t: channel_window_mean(b, t, x_shape, size, before, after), s_name, d_name)


@rule("LRN", note="across channels")
def _lrn(ctx):
    """y = x / d, d = s^beta, s = bias + alpha/size * sum_{window} x^2 (window over channels).

    dx_j = g_j / d_j - 2 alpha beta / size * x_j * sum_{i: j in window(i)} g_i y_i / s_i;
    s and d come from the expanded forward (:func:`expand_lrn`).
    """
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    size, alpha, beta, _ = lrn_attributes(ctx.node)
    if y not in b.lrn_parts:
        b.lrn_parts[y] = (b.fresh("lrn_s"), b.fresh("lrn_s_pow_beta"))
    s, d = b.lrn_parts[y]
    g = ctx.output_grad(0)
    before, after = lrn_windows(size)
    # input j appears in the windows of channels j-after .. j+before: the transposed window
    back = channel_window_mean(b, b.div(b.mul(g, y), s), ctx.shape(x), size, after, before)
    return [b.sub(b.div(g, d), b.mul(x, b.scale(back, 2.0 * alpha * beta)))]


@rule("BatchNormalization", note="inference mode; input and all four parameters")
def _batchnorm(ctx):
    b = ctx.b
    if int(ctx.attr("training_mode", 0)):
        raise ctx.fail("BatchNormalization in training mode is not supported (inference only)")
    x, scale, bias, mean, var = ctx.x[:5]
    rank = ctx.rank(x)
    c = ctx.shape(x)[1]
    eps = float(ctx.attr("epsilon", 1e-5))
    col = [c] + [1] * (rank - 2)
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.add(var, b.scalar(eps))])])
    inv_col = b.reshape(inv_std, col)
    g = ctx.output_grad(0)
    grads = [None] * 5
    if ctx.need[0]:
        grads[0] = b.mul(g, b.mul(b.reshape(scale, col), inv_col))

    def per_channel(t):
        axes = [a for a in range(rank) if a != 1 and not (a == 0 and ctx.per_sample)]
        return b.reduce_sum(t, axes, keepdims=0)

    centered = b.sub(x, b.reshape(mean, col))
    if ctx.need[1]:
        grads[1] = per_channel(b.mul(g, b.mul(centered, inv_col)))
    if ctx.need[2] or ctx.need[3]:
        g_sum = per_channel(g)
        if ctx.need[2]:
            grads[2] = g_sum
        if ctx.need[3]:
            grads[3] = b.neg(b.mul(g_sum, b.mul(scale, inv_std)))
    if ctx.need[4]:
        cubed = b.mul(inv_std, b.mul(inv_std, inv_std))
        grads[4] = b.mul(per_channel(b.mul(g, centered)), b.mul(scale, b.scale(cubed, -0.5)))
    return grads


# ===================================================================== pointwise functions
# Exact gradients under every rule: deconvnet and guided change only the rectifiers (Relu,
# LeakyRelu, PRelu, and Clip with a lower bound 0 such as ReLU6), as Captum's do.

def _pointwise(ctx, derivative):
    """g * f'(x) for a one-input pointwise op; ``derivative`` is a tensor name of f'(x)."""
    return [ctx.b.mul(ctx.output_grad(0), derivative)]


@rule("Neg")
def _neg(ctx):
    return [ctx.b.neg(ctx.output_grad(0))]


@rule("Exp")
def _exp(ctx):
    return _pointwise(ctx, ctx.y[0])


@rule("Log")
def _log(ctx):
    return [ctx.b.div(ctx.output_grad(0), ctx.x[0])]


@rule("Reciprocal")
def _reciprocal(ctx):
    b, y = ctx.b, ctx.y[0]
    return [b.neg(b.mul(ctx.output_grad(0), b.mul(y, y)))]


@rule("Abs")
def _abs(ctx):
    """sign(x) (0 at x = 0)."""
    return _pointwise(ctx, ctx.b.op("Sign", [ctx.x[0]]))


@rule("Erf")
def _erf(ctx):
    """2 / sqrt(pi) * exp(-x^2)."""
    b, x = ctx.b, ctx.x[0]
    return _pointwise(ctx, b.scale(b.op("Exp", [b.neg(b.mul(x, x))]), 2.0 / np.sqrt(np.pi)))


def _normal_cdf_and_pdf(b, x):
    cdf = b.scale(b.add(b.op("Erf", [b.scale(x, 1.0 / np.sqrt(2.0))]), b.scalar(1.0)), 0.5)
    pdf = b.scale(b.op("Exp", [b.scale(b.mul(x, x), -0.5)]), 1.0 / np.sqrt(2.0 * np.pi))
    return cdf, pdf


@rule("Gelu", note="approximate none and tanh (opset 20)")
def _gelu(ctx):
    """approximate='none': Phi(x) + x phi(x); 'tanh': the derivative of 0.5 x (1 + tanh(u))."""
    b, x = ctx.b, ctx.x[0]
    approximate = ctx.attr("approximate", "none")
    if approximate == "none":
        cdf, pdf = _normal_cdf_and_pdf(b, x)
        return _pointwise(ctx, b.add(cdf, b.mul(x, pdf)))
    if approximate != "tanh":
        raise ctx.fail(f"Gelu approximate={approximate!r} is not supported (expected 'none' or 'tanh')")
    c, k = np.sqrt(2.0 / np.pi), 0.044715
    x2 = b.mul(x, x)
    u = b.scale(b.mul(x, b.add(b.scale(x2, k), b.scalar(1.0))), c)
    t = b.op("Tanh", [u])
    du = b.scale(b.add(b.scale(x2, 3.0 * k), b.scalar(1.0)), c)
    # 0.5 (1 + t) + 0.5 x (1 - t^2) du
    left = b.scale(b.add(t, b.scalar(1.0)), 0.5)
    right = b.scale(b.mul(x, b.mul(b.sub(b.scalar(1.0), b.mul(t, t)), du)), 0.5)
    return _pointwise(ctx, b.add(left, right))


@rule("HardSigmoid")
def _hard_sigmoid(ctx):
    """alpha where 0 < alpha x + beta < 1, else 0."""
    b, y = ctx.b, ctx.y[0]
    alpha = float(ctx.attr("alpha", 0.2))
    inside = b.op("And", [b.op("Greater", [y, b.scalar(0.0)]), b.op("Less", [y, b.scalar(1.0)])])
    return _pointwise(ctx, b.scale(b.mask(inside), alpha))


# HardSwish's alpha as ONNX defines the op: its function body is HardSigmoid with the float attribute
# alpha = 1/6, i.e. float32(1/6) = 0.1666666716..., which is what onnx's reference evaluator computes
# in float64 (a float32 graph cannot tell it from 1/6: 2 alpha and 0.5 / alpha round to float32(1/3)
# and 3.0)
HARD_SWISH_ALPHA = float(np.float32(1.0 / 6.0))


@rule("HardSwish")
def _hard_swish(ctx):
    """y = x * clip(alpha x + 1/2, 0, 1) (alpha: HARD_SWISH_ALPHA, ~1/6): 0 below -1/(2 alpha) ~ -3,
    1 above 1/(2 alpha), 2 alpha x + 1/2 between."""
    b, x = ctx.b, ctx.x[0]
    bound = 0.5 / HARD_SWISH_ALPHA
    ramp = b.add(b.scale(x, 2.0 * HARD_SWISH_ALPHA), b.scalar(0.5))
    inside = b.op("And", [b.op("Greater", [x, b.scalar(-bound)]), b.op("Less", [x, b.scalar(bound)])])
    above = b.mask(b.op("GreaterOrEqual", [x, b.scalar(bound)]))
    return _pointwise(ctx, b.add(b.mul(b.mask(inside), ramp), above))


@rule("Elu")
def _elu(ctx):
    """1 for x > 0, y + alpha below."""
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    alpha = float(ctx.attr("alpha", 1.0))
    positive = b.op("Greater", [x, b.scalar(0.0)])
    return _pointwise(ctx, b.op("Where", [positive, b.scalar(1.0), b.add(y, b.scalar(alpha))]))


@rule("Selu")
def _selu(ctx):
    """gamma for x > 0, y + gamma alpha below."""
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    positive = b.op("Greater", [x, b.scalar(0.0)])
    return _pointwise(ctx, b.op("Where", [positive, b.scalar(gamma), b.add(y, b.scalar(gamma * alpha))]))


@rule("Softplus")
def _softplus(ctx):
    """sigmoid(x)."""
    return _pointwise(ctx, ctx.b.op("Sigmoid", [ctx.x[0]]))


@rule("Softsign")
def _softsign(ctx):
    """1 / (1 + |x|)^2."""
    b = ctx.b
    d = b.add(b.op("Abs", [ctx.x[0]]), b.scalar(1.0))
    return [b.div(ctx.output_grad(0), b.mul(d, d))]


@rule("Mish")
def _mish(ctx):
    """y = x tanh(softplus(x)): tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)."""
    b, x = ctx.b, ctx.x[0]
    t = b.op("Tanh", [b.op("Softplus", [x])])
    rest = b.mul(b.mul(x, b.op("Sigmoid", [x])), b.sub(b.scalar(1.0), b.mul(t, t)))
    return _pointwise(ctx, b.add(t, rest))


@rule("Cast", note="between float types (to integers: no gradient)")
def _cast(ctx):
    """Between float types: the gradient cast back to the input's type. To an integer or bool
    type the output is piecewise constant and passes no gradient."""
    to = int(ctx.attr("to"))
    if to not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return [None]
    return [ctx.b.op("CastLike", [ctx.output_grad(0), ctx.x[0]])]


# ============================================================== variadic and selection ops

@rule("Sum")
def _sum(ctx):
    g, out = ctx.output_grad(0), ctx.shape(ctx.y[0])
    return [ctx.reduce_to(g, out, x) if need else None for x, need in zip(ctx.x, ctx.need)]


@rule("Mean")
def _mean(ctx):
    g, out = ctx.b.scale(ctx.output_grad(0), 1.0 / len(ctx.x)), ctx.shape(ctx.y[0])
    return [ctx.reduce_to(g, out, x) if need else None for x, need in zip(ctx.x, ctx.need)]


@rule("Max", "Min", note="broadcasting; ties: the first input")
def _max_min(ctx):
    """The output's gradient goes to the first input equal to the output (ties: the first one,
    in input order, as MaxPool's switch is the first maximum)."""
    b, y, g = ctx.b, ctx.y[0], ctx.output_grad(0)
    out = ctx.shape(y)
    taken = None
    grads = []
    for x, need in zip(ctx.x, ctx.need):
        hit = b.op("Equal", [x, y])
        mine = hit if taken is None else b.op("And", [hit, b.op("Not", [taken])])
        taken = hit if taken is None else b.op("Or", [taken, hit])
        grads.append(ctx.reduce_to(b.mul(g, b.mask(mine)), out, x) if need else None)
    return grads


@rule("Where", note="the condition gets no gradient")
def _where(ctx):
    """The condition (a bool tensor, constant or computed) selects which input gets the gradient."""
    b, g, out = ctx.b, ctx.output_grad(0), ctx.shape(ctx.y[0])
    cond = ctx.x[0]
    zero = b.scalar(0.0)
    dx = ctx.reduce_to(b.op("Where", [cond, g, zero]), out, ctx.x[1]) if ctx.need[1] else None
    dy = ctx.reduce_to(b.op("Where", [cond, zero, g]), out, ctx.x[2]) if ctx.need[2] else None
    return [None, dx, dy]


def _normalized_indices(ctx, indices, dim):
    idx = np.asarray(indices, dtype=np.int64)
    idx = np.where(idx < 0, idx + dim, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= dim):
        raise ctx.fail(f"indices out of range for an axis of size {dim}")
    return idx


def _gather_axis_indices(ctx):
    """The normalized axis and constant indices of a Gather-like node whose data input is not
    gathered along the batch axis: (shape of the data, its rank, axis, indices)."""
    x = ctx.x[0]
    shape = ctx.shape(x)
    rank = len(shape)
    axis = int(ctx.attr("axis", 0))
    axis = axis + rank if axis < 0 else axis
    if axis == 0 and ctx.is_batched(x):
        raise ctx.fail(f"{ctx.node.op_type} along the batch axis cannot be differentiated per sample")
    return shape, rank, axis, _normalized_indices(ctx, ctx.constant_value(ctx.x[1]), shape[axis])


def _move_axis_last(b, t, axis, rank):
    perm = [a for a in range(rank) if a != axis] + [axis]
    return b.transpose(t, perm), np.argsort(perm, kind="stable").tolist()


@rule("Gather", note="constant indices, not along the batch axis")
def _gather(ctx):
    """Constant indices: each input position reads back, by a Gather along the axis, the gradient
    of the output position that picked it, or a zero appended along the axis where none did. A
    position picked k times is summed over k such Gathers (repeated indices add up). Memory and work
    grow with the axis, not with its square (a dynamo export's per-image as_strided permutes whole
    feature maps along one axis)."""
    b, x = ctx.b, ctx.x[0]
    shape, rank, axis, idx = _gather_axis_indices(ctx)
    picked = idx.reshape(-1)
    # gradient (.., *idx.shape, ..) -> (.., picked, ..) -> one zero appended along the axis
    g_shape = [0 if (a == 0 and ctx.is_batched(x)) else shape[a] for a in range(axis)]
    g_shape += [picked.size] + list(shape[axis + 1:])
    pads = np.zeros(2 * rank, np.int64)
    pads[rank + axis] = 1
    g = b.op("Pad", [b.reshape(ctx.output_grad(0), g_shape), b.ints(pads)], mode="constant")
    order = np.argsort(picked, kind="stable")
    positions = picked[order]
    occurrence = np.arange(picked.size) - np.searchsorted(positions, positions, side="left")
    dx = None
    for k in range(int(occurrence.max()) + 1 if picked.size else 1):
        source = np.full(shape[axis], picked.size, np.int64)  # the appended zero
        mine = occurrence == k
        source[positions[mine]] = order[mine]
        term = b.op("Gather", [g, b.const(source, hint="gather_source")], axis=axis)
        dx = term if dx is None else b.add(dx, term)
    return [dx]


@rule("GatherElements", note="constant indices, not along the batch axis")
def _gather_elements(ctx):
    """Constant indices: the gradient scattered back with addition (repeated indices add up)."""
    b, x = ctx.b, ctx.x[0]
    _, _, axis, idx = _gather_axis_indices(ctx)
    zeros = b.zeros_like_shape(b.shape_of(x))
    return [b.op("ScatterElements", [zeros, b.const(idx), ctx.output_grad(0)], axis=axis, reduction="add")]


# ======================================================================== reductions

def _reduce_axes(ctx):
    """The normalized, sorted reduced axes of a Reduce* node (attribute before opset 18 — 13 for
    ReduceSum —, input after), or None for the identity (noop_with_empty_axes and no axes)."""
    x = ctx.x[0]
    rank = ctx.rank(x)
    if len(ctx.x) > 1 and ctx.x[1]:
        axes = ctx.constant_value(ctx.x[1]).reshape(-1).tolist()
    else:
        axes = ctx.attr("axes")
    if not axes:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            return None
        axes = list(range(rank))
    axes = sorted({int(a) + rank if int(a) < 0 else int(a) for a in axes})
    if 0 in axes and ctx.is_batched(x):
        raise ctx.fail(f"{ctx.node.op_type} over the batch axis cannot be differentiated per sample")
    return axes


def _reduced_kept(ctx, t, axes):
    """The output-shaped tensor ``t`` reshaped to the input's rank with reduced axes of size 1."""
    x_shape = ctx.shape(ctx.x[0])
    shape = [1 if a in axes else d for a, d in enumerate(x_shape)]
    if ctx.is_batched(ctx.x[0]):
        shape[0] = 0
    return ctx.b.reshape(t, shape)


@rule("ReduceSum", "ReduceMean", "ReduceL2", "ReduceL1", "ReduceSumSquare", "ReduceLogSumExp",
      note="axes as attribute or input (opset 18), not over the batch")
@rule("ReduceMax", "ReduceMin", note="axes as attribute or input (opset 18), not over the batch; ties share evenly")
def _reduce(ctx):
    """Sum, Mean: broadcast back (divided by the count); Max, Min: shared evenly among the tied
    extremes; L2: x / y (0 where y = 0); L1: sign(x); SumSquare: 2x; LogSumExp: exp(x - y)."""
    b, x, op = ctx.b, ctx.x[0], ctx.node.op_type
    axes = _reduce_axes(ctx)
    if axes is None:
        return [ctx.output_grad(0)]
    shape = ctx.shape(x)
    g = b.op("Expand", [_reduced_kept(ctx, ctx.output_grad(0), axes), b.shape_of(x)])
    if op == "ReduceSum":
        return [g]
    if op == "ReduceMean":
        return [b.scale(g, 1.0 / float(np.prod([shape[a] for a in axes])))]
    if op == "ReduceSumSquare":
        return [b.mul(g, b.scale(x, 2.0))]
    if op == "ReduceL1":
        return [b.mul(g, b.op("Sign", [x]))]
    y = _reduced_kept(ctx, ctx.y[0], axes)
    if op == "ReduceLogSumExp":
        return [b.mul(g, b.op("Exp", [b.sub(x, y)]))]
    if op == "ReduceL2":
        ratio = b.op("Where", [b.op("Equal", [y, b.scalar(0.0)]), b.scalar(0.0), b.div(x, y)])
        return [b.mul(g, ratio)]
    hit = b.mask(b.op("Equal", [x, y]))  # ReduceMax / ReduceMin
    return [b.mul(g, b.div(hit, b.reduce_sum(hit, axes, keepdims=1)))]


# ===================================================================== normalisation layers

def _standardize_backward(b, x, gh, axes, count, eps):
    """dx of xhat = (x - mean) / sqrt(var + eps) (over ``axes``) given gh = dL/dxhat:
    (gh - mean(gh) - xhat mean(gh xhat)) / sqrt(var + eps)."""
    def mean(t):
        return b.scale(b.reduce_sum(t, axes, keepdims=1), 1.0 / count)

    centered = b.sub(x, mean(x))
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.add(mean(b.mul(centered, centered)), b.scalar(eps))])])
    xhat = b.mul(centered, inv_std)
    inner = b.sub(b.sub(gh, mean(gh)), b.mul(xhat, mean(b.mul(gh, xhat))))
    return b.mul(inner, inv_std), xhat


def _no_statistics_gradients(ctx):
    if any(g is not None for g in ctx.g[1:]):
        raise ctx.fail("gradients through the mean / inverse standard deviation outputs are not supported")


@rule("LayerNormalization", note="input, scale, bias (not the mean/inv-std outputs)")
def _layer_norm(ctx):
    """y = xhat * scale + bias, xhat standardized over axes [axis, rank)."""
    b = ctx.b
    _no_statistics_gradients(ctx)
    x, scale = ctx.x[0], ctx.x[1]
    shape = ctx.shape(x)
    rank = len(shape)
    axis = int(ctx.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    if axis == 0 and ctx.is_batched(x):
        raise ctx.fail("LayerNormalization over the batch axis cannot be differentiated per sample")
    axes = list(range(axis, rank))
    count = float(np.prod(shape[axis:]))
    g, out = ctx.output_grad(0), ctx.shape(ctx.y[0])
    dx, xhat = _standardize_backward(b, x, b.mul(g, scale), axes, count, float(ctx.attr("epsilon", 1e-5)))
    grads = [dx if ctx.need[0] else None]
    grads.append(ctx.reduce_to(b.mul(g, xhat), out, scale) if ctx.need[1] else None)
    if len(ctx.x) > 2 and ctx.x[2]:
        grads.append(ctx.reduce_to(g, out, ctx.x[2]) if ctx.need[2] else None)
    return grads


def _channel_param_grad(ctx, t, c, name):
    """Per-channel parameter gradient of the (N, C, ...) tensor t: summed over all but the
    channel axis (the batch kept per sample for a constant parameter)."""
    b = ctx.b
    per = b.reduce_sum(b.reshape(t, [0, c, -1]), [2], keepdims=0)
    if ctx.per_sample and not ctx.is_batched(name):
        return b.reshape(per, [0] + list(ctx.shape(name)))
    return b.reshape(b.reduce_sum(per, [0], keepdims=0), list(ctx.shape(name)))


@rule("InstanceNormalization", note="input, scale, bias")
def _instance_norm(ctx):
    """y = xhat * scale[c] + bias[c], xhat standardized over the spatial axes of each (n, c)."""
    b = ctx.b
    x, scale, bias = ctx.x[:3]
    shape = ctx.shape(x)
    c = shape[1]
    col = [c] + [1] * (len(shape) - 2)
    axes = list(range(2, len(shape)))
    g = ctx.output_grad(0)
    dx, xhat = _standardize_backward(b, x, b.mul(g, b.reshape(scale, col)), axes,
                                     float(np.prod(shape[2:])), float(ctx.attr("epsilon", 1e-5)))
    return [dx if ctx.need[0] else None,
            _channel_param_grad(ctx, b.mul(g, xhat), c, scale) if ctx.need[1] else None,
            _channel_param_grad(ctx, g, c, bias) if ctx.need[2] else None]


@rule("GroupNormalization", note="scale per group (opset 18) or per channel (opset 21)")
def _group_norm(ctx):
    """xhat standardized over each group of C/num_groups channels and space; scale and bias per
    channel (opset 21) or per group (opset 18, told apart by their length)."""
    b = ctx.b
    x, scale, bias = ctx.x[:3]
    shape = ctx.shape(x)
    c, groups = shape[1], int(ctx.attr("num_groups"))
    per_group = ctx.shape(scale)[0] == groups and groups != c
    per = c // groups
    g = ctx.output_grad(0)
    grouped = [0, groups, -1]
    if per_group:  # scale[k] for the channels of group k: standardize in (N, G, rest)
        param_col = [groups, 1]
        gs = b.reshape(g, grouped)
        gh = b.mul(gs, b.reshape(scale, param_col))
    else:
        gh = b.reshape(b.mul(g, b.reshape(scale, [c] + [1] * (len(shape) - 2))), grouped)
    count = float(per * np.prod(shape[2:]))
    dx, xhat = _standardize_backward(b, b.reshape(x, grouped), gh, [2], count, float(ctx.attr("epsilon", 1e-5)))
    grads = [b.reshape(dx, b.shape_of(x)) if ctx.need[0] else None]
    if per_group:
        def param(t, name):
            per_s = b.reduce_sum(t, [2], keepdims=0)  # (N, G)
            if ctx.per_sample and not ctx.is_batched(name):
                return per_s
            return b.reduce_sum(per_s, [0], keepdims=0)

        grads.append(param(b.mul(gs, xhat), scale) if ctx.need[1] else None)
        grads.append(param(gs, bias) if ctx.need[2] else None)
    else:
        xhat_full = b.reshape(xhat, b.shape_of(x))
        grads.append(_channel_param_grad(ctx, b.mul(g, xhat_full), c, scale) if ctx.need[1] else None)
        grads.append(_channel_param_grad(ctx, g, c, bias) if ctx.need[2] else None)
    return grads


# ==================================================================== transposed convolution

def _conv_transpose_pads(ctx, x_shape, w_shape, y_shape, strides, dilations):
    """The begin/end pads of a ConvTranspose (explicit, or from output_shape / auto_pad as the
    ONNX spec distributes total = s (in - 1) + output_padding + (k - 1) d + 1 - out)."""
    spatial = len(x_shape) - 2
    out_pad = list(ctx.attr("output_padding") or [0] * spatial)
    auto_pad = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    explicit = ctx.attr("pads")
    if auto_pad == "NOTSET" and explicit and not ctx.attr("output_shape"):
        return list(explicit), out_pad
    if auto_pad == "VALID" or (auto_pad == "NOTSET" and not ctx.attr("output_shape")):
        return [0] * (2 * spatial), out_pad
    totals = ops.transpose_pad_totals(x_shape[2:], w_shape[2:], strides, dilations, out_pad, y_shape[2:])
    pads = ops.split_pads(auto_pad, totals)
    return pads, out_pad


@rule("ConvTranspose", note="pads, output_padding, output_shape, auto_pad, strides, dilations, groups")
def _conv_transpose(ctx):
    """The adjoint of Conv: dx = Conv(g, W) with the same strides, dilations, pads and groups;
    dW as a Conv weight gradient with the roles of input and output gradient swapped."""
    b = ctx.b
    x, w = ctx.x[0], ctx.x[1]
    x_shape, w_shape, y_shape = ctx.shape(x), ctx.shape(w), ctx.shape(ctx.y[0])
    spatial = len(x_shape) - 2
    group = int(ctx.attr("group", 1))
    strides = list(ctx.attr("strides") or [1] * spatial)
    dilations = list(ctx.attr("dilations") or [1] * spatial)
    pads, _ = _conv_transpose_pads(ctx, x_shape, w_shape, y_shape, strides, dilations)
    if any(p < 0 for p in pads):
        raise ctx.fail("ConvTranspose with an output larger than its full extent (negative pads) is not supported")
    g = ctx.output_grad(0)
    grads = [None, None, None]
    if ctx.need[0]:
        grads[0] = b.op("Conv", [g, w], strides=strides, dilations=dilations, pads=pads, group=group,
                        kernel_shape=list(w_shape[2:]))
    if ctx.need[1]:
        if ctx.is_batched(w) or not ctx.is_batched(x):
            raise ctx.fail("weight gradients need a constant weight and a batched input")
        per = conv_weight_grad_per_sample(ctx, g, y_shape, x, w_shape, strides, dilations, pads, group,
                                          out_spatial=x_shape[2:])
        grads[1] = ctx.sum_over_batch(per)
    if len(ctx.x) > 2 and ctx.x[2] and ctx.need[2]:
        grads[2] = ctx.sum_over_batch(b.reduce_sum(g, list(range(2, len(y_shape))), keepdims=0))
    return grads


# ========================================================================= Resize, Tile

def resize_source_coordinates(mode, out, size, scale):
    """Where output positions 0..out-1 sample the input axis of length ``size``
    (the ONNX coordinate_transformation_mode formulas)."""
    i = np.arange(out, dtype=np.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if mode == "align_corners":
        return i * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    if mode == "asymmetric":
        return i / scale
    if mode == "half_pixel_symmetric":
        adjustment = out / (size * scale)
        offset = size / 2.0 * (1.0 - adjustment)
        return offset + (i + 0.5) / scale - 0.5
    raise ValueError(mode)


def resize_matrix(mode, nearest_mode, transform, out, size, scale):
    """The (out, size) matrix of a nearest or linear Resize along one axis: y = M @ x."""
    src = resize_source_coordinates(transform, out, size, scale)
    m = np.zeros((out, size), dtype=np.float64)
    rows = np.arange(out)
    if mode == "nearest":
        if nearest_mode == "round_prefer_floor":
            pick = np.where(src - np.floor(src) == 0.5, np.floor(src), np.round(src))
        elif nearest_mode == "round_prefer_ceil":
            pick = np.where(src - np.floor(src) == 0.5, np.ceil(src), np.round(src))
        elif nearest_mode == "floor":
            pick = np.floor(src)
        elif nearest_mode == "ceil":
            pick = np.ceil(src)
        else:
            raise ValueError(nearest_mode)
        m[rows, np.clip(pick, 0, size - 1).astype(np.int64)] = 1.0
        return m
    src = np.clip(src, 0, size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    frac = src - lo
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


@rule("Resize", note="nearest and linear, constant scales or sizes; not cubic, antialias, tf_crop_and_resize")
def _resize(ctx):
    """Nearest and (bi/tri)linear Resize are separable linear maps y = M x per resized axis; the
    gradient applies M^T axis by axis (M from the coordinate transformation formulas)."""
    b, x = ctx.b, ctx.x[0]
    mode = ctx.attr("mode", "nearest")
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
    nearest_mode = ctx.attr("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise ctx.fail(f"Resize mode {mode!r} is not supported (only 'nearest' and 'linear')")
    if int(ctx.attr("antialias", 0)) and mode == "linear":
        raise ctx.fail("Resize with antialias=1 is not supported")
    if transform == "tf_crop_and_resize":
        raise ctx.fail("Resize with coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
    x_shape, y_shape = ctx.shape(x), ctx.shape(ctx.y[0])
    rank = len(x_shape)
    axes = ctx.attr("axes")
    axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes] if axes else list(range(rank))
    scales = None
    if len(ctx.x) > 2 and ctx.x[2]:
        value = ctx.constant_value(ctx.x[2]).reshape(-1)
        if value.size:
            scales = dict(zip(axes, value.astype(np.float64).tolist()))
    if scales is None:  # from sizes: out / in, or one scale for all axes with keep_aspect_ratio_policy
        ratios = {a: y_shape[a] / x_shape[a] for a in axes}
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
        if policy in ("not_larger", "not_smaller"):
            one = (min if policy == "not_larger" else max)(ratios.values())
            ratios = {a: one for a in axes}
        scales = ratios
    g = ctx.output_grad(0)
    for a in range(rank):
        scale = scales.get(a, 1.0)
        if x_shape[a] == y_shape[a] and scale == 1.0:
            continue
        if a == 0 and ctx.is_batched(x):
            raise ctx.fail("Resize along the batch axis cannot be differentiated per sample")
        m = resize_matrix(mode, nearest_mode, transform, y_shape[a], x_shape[a], scale)
        if a == rank - 1:
            g = b.op("MatMul", [g, b.const(m.astype(b.dtype), hint="resize_matrix")])
        else:
            last, inverse = _move_axis_last(b, g, a, rank)
            g = b.transpose(b.op("MatMul", [last, b.const(m.astype(b.dtype), hint="resize_matrix")]), inverse)
    return [g]


@rule("Tile", note="constant repeats, 1 on the batch axis")
def _tile(ctx):
    """Each input element appears once per repeat: sum the gradient over the copies."""
    b, x = ctx.b, ctx.x[0]
    shape = ctx.shape(x)
    repeats = ctx.constant_value(ctx.x[1]).reshape(-1).astype(np.int64).tolist()
    batched = ctx.is_batched(x)
    if batched and repeats[0] != 1:
        raise ctx.fail("Tile along the batch axis cannot be differentiated per sample")
    split = []
    for a, (r, d) in enumerate(zip(repeats, shape)):
        split += [0, 1] if (a == 0 and batched) else [r, d]
    g = b.reshape(ctx.output_grad(0), split)
    g = b.reduce_sum(g, [2 * a for a in range(len(shape)) if repeats[a] != 1], keepdims=1)
    return [b.reshape(g, b.shape_of(x))]


# ============================================================================== Einsum

def _einsum_terms(ctx):
    equation = ctx.attr("equation").replace(" ", "")
    if "..." in equation:
        raise ctx.fail(f"Einsum {equation!r}: ellipses are not supported")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:
        letters = "".join(terms)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != 2:
        raise ctx.fail(f"Einsum {equation!r}: only two-operand equations are supported")
    for t in terms:
        if len(set(t)) != len(t):
            raise ctx.fail(f"Einsum {equation!r}: repeated subscripts in one operand (diagonals) are not supported")
    return terms, out


@rule("Einsum", note="two operands, no ellipsis or repeated subscripts")
def _einsum(ctx):
    """Two operands: the gradient of one is the Einsum of the output gradient with the other,
    broadcast over subscripts only that operand has."""
    b = ctx.b
    (ta, tb), out = _einsum_terms(ctx)
    g = ctx.output_grad(0)
    grads = []
    for k, (mine, other, name) in enumerate(((ta, tb, ctx.x[0]), (tb, ta, ctx.x[1]))):
        if not ctx.need[k]:
            grads.append(None)
            continue
        reachable = [c for c in mine if c in out or c in other]
        result = "".join(reachable)
        lead = ""
        if ctx.per_sample and not ctx.is_batched(name):
            lead = (ta, tb)[1 - k][0]  # the batched operand's batch subscript stays
            if lead in mine or lead not in out:
                raise ctx.fail(f"Einsum: per-sample gradients of {name!r} need the batch subscript in the output only")
        d = b.op("Einsum", [g, ctx.x[1 - k]], equation=f"{out},{other}->{lead}{result}")
        if len(reachable) < len(mine):  # subscripts summed in this operand alone: broadcast back
            shape = ctx.shape(name)
            kept = [0] if lead else []
            kept += [shape[i] if c in reachable else 1 for i, c in enumerate(mine)]
            d = b.reshape(d, kept)
            target = ([1] if lead else []) + list(shape)
            d = b.op("Expand", [d, b.ints(target)])
        grads.append(d)
    return grads


# ======================================================= block rearrangements (pure permutations)

def _block_layout(ctx):
    """(6-D view of the input, the transpose applied to it) of a DepthToSpace / SpaceToDepth."""
    n, c, h, w = ctx.shape(ctx.x[0])
    b = int(ctx.attr("blocksize"))
    if ctx.node.op_type == "SpaceToDepth":
        return [c, h // b, b, w // b, b], [0, 3, 5, 1, 2, 4]
    if ctx.attr("mode", "DCR") == "DCR":
        return [b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
    return [c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]


@rule("DepthToSpace", "SpaceToDepth", note="DCR and CRD modes")
def _depth_space(ctx):
    """A reshape, a transpose and a reshape: the gradient undoes them in reverse order."""
    b = ctx.b
    view, perm = _block_layout(ctx)
    moved = [0] + [view[p - 1] for p in perm[1:]]
    g = b.reshape(ctx.output_grad(0), moved)
    g = b.transpose(g, np.argsort(perm, kind="stable").tolist())
    return [b.reshape(g, b.shape_of(ctx.x[0]))]
