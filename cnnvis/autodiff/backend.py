"""Running gradient graphs: onnxruntime, or onnx's reference evaluator for float64.

onnxruntime's CPU provider has no float64 Conv, ConvTranspose, AveragePool, LRN or global pooling,
so float64 graphs (used to check gradients to 1e-6) run in ``onnx.reference.ReferenceEvaluator``.
Its MaxPool disagrees with onnxruntime on ceil-mode output sizes and on tie-breaking, so it gets
an implementation with onnxruntime's semantics: the output length drops a window that would start
in the end padding, padding never wins, and on ties the first element in row-major order of the
window is the switch. Its ConvTranspose is wrong for group > 1 (run group by group here) and
its LRN sums over the wrong axis (replaced); its Conv is replaced by a faster one; its Erf (and
the Gelu function built on it) computes in float32 (replaced).

These replacements are the independent reference the rules are checked against, so they share
no code with the rules: window geometry (pads, auto_pad, pooled lengths) is written here again
from the ONNX spec and onnxruntime's behaviour (:func:`window_pads`, :func:`pooled_length`), and
tests/test_autodiff_gradcheck.py compares every replacement with onnxruntime's forward.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx

from ..onnxgraph import create_session, real_inputs

BACKENDS = ("auto", "onnxruntime", "reference")


def resolve_backend(backend: str, dtype) -> str:
    if backend not in BACKENDS:
        from ..errors import CnnvisError

        raise CnnvisError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "reference" if np.dtype(dtype) == np.float64 else "onnxruntime"
    return backend


def window_pads(in_spatial, kernel, strides, dilations, pads=None, auto_pad="NOTSET"):
    """Begin and end pads [b0, b1, ..., e0, e1, ...] of a sliding window (Conv, MaxPool).

    SAME_UPPER / SAME_LOWER: the output is ceil(in / stride) long and the missing extent
    total = (out - 1) * stride + (k - 1) * dilation + 1 - in is split with the odd unit at the end
    (UPPER) or at the beginning (LOWER); VALID: none; otherwise the ``pads`` given (default none).
    """
    nd = len(in_spatial)
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
            out = (size + s - 1) // s
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            half, odd = divmod(total, 2)
            begin.append(half if auto_pad == "SAME_UPPER" else half + odd)
            end.append(half + odd if auto_pad == "SAME_UPPER" else half)
        return begin + end
    if auto_pad == "VALID" or not pads:
        return [0] * (2 * nd)
    return [int(p) for p in pads]


def pooled_length(size, k, s, d, pad_begin, pad_end, ceil_mode):
    """Windows along one axis: floor or ceil of (padded extent - window span) / stride, plus one;
    in ceil mode onnxruntime drops a last window that would start past the input and the begin
    padding."""
    span = (k - 1) * d + 1
    room = size + pad_begin + pad_end - span
    count = (-(-room // s) if ceil_mode else room // s) + 1
    if ceil_mode and (count - 1) * s >= size + pad_begin:
        count -= 1
    return count


def maxpool_first_max(x, kernel, strides, pads, dilations, ceil_mode):
    """MaxPool with flat indices over the whole tensor (N, C, *spatial), first maximum on ties."""
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    nd = len(spatial)
    out = [pooled_length(spatial[i], kernel[i], strides[i], dilations[i], pads[i], pads[nd + i], ceil_mode)
           for i in range(nd)]
    pad_end = [max(0, (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i] - pads[i])
               for i in range(nd)]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pad_end[i]) for i in range(nd)], constant_values=-np.inf)
    best = np.full((n, c, *out), -np.inf, dtype=x.dtype)
    best_flat = np.zeros((n, c, *out), dtype=np.int64)
    grids = np.meshgrid(*[np.arange(o) for o in out], indexing="ij")
    base = (np.arange(n)[:, None] * c + np.arange(c)[None, :]).reshape(n, c, *([1] * nd)) * int(np.prod(spatial))
    for offset in itertools.product(*[range(k) for k in kernel]):  # row-major order within the window
        sl = tuple(slice(offset[i] * dilations[i], offset[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                   for i in range(nd))
        values = padded[(slice(None), slice(None)) + sl]
        coords = [grids[i] * strides[i] + offset[i] * dilations[i] - pads[i] for i in range(nd)]
        inside = np.ones(out, dtype=bool)
        for i in range(nd):
            inside &= (coords[i] >= 0) & (coords[i] < spatial[i])
        flat = np.ravel_multi_index([np.clip(coords[i], 0, spatial[i] - 1) for i in range(nd)], spatial)
        better = (values > best) & inside
        best = np.where(better, values, best)
        best_flat = np.where(better, base + flat, best_flat)
    return best, best_flat


def conv_transpose_pads_for(in_spatial, kernel, strides, dilations, output_padding, out_spatial):
    """The pads of a ConvTranspose sized by output_shape (auto_pad NOTSET): the extent
    total = s (in - 1) + output_padding + (k - 1) d + 1 - out, the larger half at the beginning."""
    nd = len(in_spatial)
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    output_padding = list(output_padding or [0] * nd)
    begin, end = [], []
    for i in range(nd):
        total = strides[i] * (in_spatial[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - out_spatial[i]
        begin.append(total - total // 2)
        end.append(total // 2)
    return begin + end


def window_geometry(x_shape, kernel, strides=None, dilations=None, pads=None, auto_pad="NOTSET"):
    """(kernel, strides, dilations, pads) of a Conv or MaxPool node's attributes, defaults filled."""
    nd = len(x_shape) - 2
    kernel = [int(k) for k in kernel]
    strides = [int(s) for s in strides] if strides else [1] * nd
    dilations = [int(d) for d in dilations] if dilations else [1] * nd
    return kernel, strides, dilations, window_pads(x_shape[2:], kernel, strides, dilations, pads, auto_pad or "NOTSET")


def _reference_ops():
    from onnx.reference.op_run import OpRun

    class MaxPool(OpRun):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
                 storage_order=None, strides=None):
            kernel, st, dil, pd = window_geometry(x.shape, kernel_shape, strides, dilations, pads, auto_pad)
            if auto_pad in ("SAME_UPPER", "SAME_LOWER", b"SAME_UPPER", b"SAME_LOWER"):
                # onnxruntime's pooling sizes SAME pads by the undilated kernel (its Conv refuses
                # dilation with SAME); the windows themselves stay dilated
                pd = window_pads(x.shape[2:], kernel, st, [1] * len(kernel), None, auto_pad)
            y, idx = maxpool_first_max(x, kernel, st, pd, dil, int(ceil_mode or 0))
            return (y.astype(x.dtype), idx)

    from onnx.reference.ops.op_conv_transpose import ConvTranspose as _RefConvTranspose

    class ConvTranspose(_RefConvTranspose):
        # the reference implementation mixes up output channels when group > 1 (run group by group
        # here) and fails with output_shape (given here as the pads it implies)
        def _run(self, X, W, B=None, group=None, **attrs):
            group = int(group or 1)
            if attrs.get("output_shape") is not None and (attrs.get("auto_pad") or "NOTSET") in ("NOTSET", b"NOTSET"):
                attrs = dict(attrs)
                out_shape = [int(v) for v in attrs.pop("output_shape")][-(X.ndim - 2):]
                attrs["pads"] = conv_transpose_pads_for(X.shape[2:], W.shape[2:], attrs.get("strides"),
                                                        attrs.get("dilations"), attrs.get("output_padding"), out_shape)
            if group == 1:
                return super()._run(X, W, B, group=1, **attrs)
            cin, cout = X.shape[1] // group, W.shape[1]
            parts = []
            for gi in range(group):
                bias = None if B is None else B[gi * cout:(gi + 1) * cout]
                parts.append(super()._run(X[:, gi * cin:(gi + 1) * cin], W[gi * cin:(gi + 1) * cin], bias,
                                          group=1, **attrs)[0])
            return (np.concatenate(parts, axis=1),)

    class LRN(OpRun):
        # the reference implementation loops over the batch axis instead of the channels
        op_domain = ""

        def _run(self, x, alpha=None, beta=None, bias=None, size=None):
            lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
            sq = x * x
            window = np.zeros_like(x)
            for c in range(x.shape[1]):
                window[:, c] = sq[:, max(0, c - lo):min(x.shape[1], c + hi + 1)].sum(axis=1)
            return ((x / (bias + (alpha / size) * window) ** beta).astype(x.dtype),)

    class Conv(OpRun):
        # the reference Conv loops in Python; this im2col + BLAS version keeps float64 checks of
        # full-size networks (AlexNet) to seconds
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            kernel, st, dil, pd = window_geometry(X.shape, kernel_shape or W.shape[2:], strides, dilations, pads,
                                                  auto_pad)
            return (conv_nd(X, W, B, kernel, st, dil, pd, int(group or 1)),)

    class Erf(OpRun):
        # the reference implementation computes in float32 whatever the input type
        op_domain = ""

        def _run(self, x):
            import math

            return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)

    class Gelu(OpRun):
        # a function op: its body would run in a nested evaluator with the float32 Erf above
        op_domain = ""

        def _run(self, x, approximate=None):
            import math

            if (approximate or "none") == "tanh":
                y = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
            else:
                y = 0.5 * x * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2.0)))
            return (y.astype(x.dtype),)

    return [MaxPool, ConvTranspose, LRN, Conv, Erf, Gelu]


def conv_nd(x, w, b, kernel, strides, dilations, pads, group):
    """N-d convolution (cross-correlation) by sliding windows and tensordot."""
    from numpy.lib.stride_tricks import sliding_window_view

    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    span = [(kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    view = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    view = view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                + tuple(slice(None, None, d) for d in dilations)]
    cg, mg = x.shape[1] // group, w.shape[0] // group
    parts = []
    for gi in range(group):
        v = view[:, gi * cg:(gi + 1) * cg]
        wg = w[gi * mg:(gi + 1) * mg]
        y = np.tensordot(v, wg, axes=([1] + list(range(2 + nd, 2 + 2 * nd)), list(range(1, 2 + nd))))
        parts.append(np.moveaxis(y, -1, 1))
    y = np.concatenate(parts, axis=1) if group > 1 else parts[0]
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nd)
    return np.ascontiguousarray(y.astype(x.dtype))


class Runner:
    """Runs one ONNX model: ``runner(feeds) -> dict name -> array`` for the requested outputs."""

    def __init__(self, model: onnx.ModelProto, backend: str = "onnxruntime", device: str = "auto", threads=None):
        self.backend = backend
        self.output_names = [o.name for o in model.graph.output]
        if backend == "reference":
            from onnx.reference import ReferenceEvaluator

            self._ref = ReferenceEvaluator(model, new_ops=_reference_ops())
            self._sess = None
        else:
            self._sess = create_session(model, device=device, threads=threads)
            self._ref = None

    @property
    def providers(self):
        return self._sess.get_providers() if self._sess is not None else ["onnx.reference"]

    def __call__(self, feeds: dict, outputs=None) -> dict:
        names = list(outputs or self.output_names)
        if self._sess is not None:
            values = self._sess.run(names, feeds)
        else:
            values = self._ref.run(names, feeds)
        return dict(zip(names, values))


def forward_shapes(model: onnx.ModelProto, sample_shape, backend: str, extra_feeds=None, batch: int = 2) -> dict:
    """Shape of every tensor of ``model`` at batch size ``batch``, found by running it once.

    Static inference (:func:`.shapes.inferred_shapes`) is used when it sizes every tensor;
    otherwise the graph is run once on random data.
    """
    from .shapes import inferred_shapes

    if not extra_feeds:
        shapes = inferred_shapes(model, sample_shape, batch)
        if shapes is not None:
            return shapes
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in existing:
                m.graph.output.append(onnx.ValueInfoProto(name=out))
                existing.add(out)
    inp = real_inputs(m)[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    rng = np.random.default_rng(0)
    feeds = {inp.name: rng.standard_normal((batch, *sample_shape)).astype(dtype)}
    feeds.update(extra_feeds or {})
    runner = Runner(m, backend=backend, device="cpu", threads=1)
    values = runner(feeds)
    shapes = {name: tuple(np.shape(v)) for name, v in values.items()}
    shapes[inp.name] = (batch, *sample_shape)
    for init in m.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes
