"""Facts about ONNX ops, in one place.

Which ops are pointwise over space, which see the whole image, which carry a layer's weights,
which pass values through unchanged, which slide one window over their input and what their
padding reads as, which compute shapes rather than features, which have backward rules; and the
geometry of windowed ops (kernel, strides, dilations, pads, with ``auto_pad`` resolved by one
formula, and the output sizes onnxruntime gives them). The model's layer table and shape
inference, receptive fields, occlusion, invariance, the gradient rules and the Caffe writer read
these instead of keeping their own lists.

Conventions: "pointwise" means pointwise over *space* — the output at an image position depends
only on inputs at that position (so LRN, which mixes channels, is pointwise); "global" means every
output element may depend on every input position.
"""
from __future__ import annotations

import dataclasses
import types

import numpy as np
from onnx import TensorProto, helper

from .errors import CnnvisError

#: ONNX element types of floating-point tensors (the types a feature map can have)
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})

#: ops with a sliding window over the spatial axes
WINDOW_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool"})
#: window ops whose output position ``o`` reads one window of the input, from ``o * stride - pad_begin``
#: over the dilated extent (a depthwise or grouped Conv too): receptive fields chain them, occlusion
#: computes them on rectangles. Not ConvTranspose: it spreads each *input* position over a window
#: of the output. Not the global pools: they are :data:`GLOBAL_OPS`
SLIDING_WINDOW_OPS = WINDOW_OPS - {"ConvTranspose"}
#: what the padding of a sliding window op reads as, where it is one value: zeros for a convolution
#: and an Lp pool (|0|^p adds nothing to the sum), -inf for a max pool (padding never wins). Not
#: AveragePool: its divisor counts or skips the padding depending on the position
PAD_VALUES = types.MappingProxyType({"Conv": 0.0, "LpPool": 0.0, "MaxPool": -np.inf})

#: pointwise ops with one data input (input 0); any further inputs are parameters (Clip's bounds,
#: BatchNormalization's statistics, Dropout's ratio)
UNARY_POINTWISE_OPS = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Mish", "Gelu", "Clip", "Identity", "Dropout", "Cast", "CastLike",
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Sign", "Not",
    "Sin", "Cos", "IsNaN", "IsInf", "BatchNormalization",
    "LRN",  # across channels: still one spatial position
})
#: elementwise arithmetic over several float inputs with numpy broadcasting
ARITHMETIC_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})
#: every elementwise op over several inputs with numpy broadcasting (also selections and comparisons)
BROADCAST_OPS = ARITHMETIC_OPS | {"Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or",
                                  "Xor", "Mod", "BitShift"}
#: every op that does not mix spatial positions
POINTWISE_OPS = UNARY_POINTWISE_OPS | BROADCAST_OPS

#: ops after which every unit sees the whole image, whatever their attributes
GLOBAL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Gemm", "Flatten",
                        "InstanceNormalization", "GroupNormalization", "LpNormalization"})
#: ops that mix positions along the axes their attributes or operands name (a reduction over the
#: channels, a softmax over classes, a MatMul over the last axis): pointwise or global depending
#: on where the spatial axes are
AXIS_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                      "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "Softmax",
                      "LogSoftmax", "Hardmax", "LayerNormalization", "MatMul"})
#: ops carrying a layer's weights (the first constant input names the layer)
PARAM_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "PRelu",
                       "InstanceNormalization", "LayerNormalization", "GroupNormalization"})

#: activation functions: their output is what a user calls a layer's feature maps
ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid",
                            "Tanh", "Clip", "HardSwish", "Gelu", "Mish", "Softplus"})
#: ops producing feature maps (the default layer of occlusion and invariance): a convolution, an
#: activation, a normalisation. (Mul and Add are not: a Mul by a constant is a rescaling; SiLU's
#: x·sigmoid(x) and a residual sum need the graph around them to be told apart.)
FEATURE_OPS = frozenset({"Conv", "BatchNormalization"}) | ACTIVATION_OPS
#: ops whose outputs ``activations`` shows by default (every layer but the bookkeeping ones:
#: reshapes, transposes, dropout, shape arithmetic)
DISPLAY_OPS = FEATURE_OPS | {"Add", "ConvTranspose", "LRN", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                             "Gemm", "MatMul", "Softmax", "Concat", "LayerNormalization", "InstanceNormalization",
                             "GroupNormalization", "ReduceMean"}

#: ops that pass their first input's values through unchanged, only regrouped or relabelled
#: (Dropout at inference): their output shows what the layer before it shows, in another layout
VALUE_PRESERVING_OPS = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"})

#: ops whose output depends on the *shape* of their input, never its values: the roots of the
#: shape-computing subgraphs (Shape → Gather → Concat → Reshape) that exporters write
SHAPE_SOURCE_OPS = frozenset({"Shape", "Size"})


def attributes(node) -> dict:
    """A node's attributes as Python values; strings decoded (``auto_pad`` reads ``'SAME_UPPER'``)."""
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def is_float(elem_type: int) -> bool:
    return int(elem_type) in FLOAT_TYPES


def has_backward_rule(op_type: str) -> bool:
    """Whether the gradient engine can differentiate ``op_type`` (read from its rule table)."""
    return op_type in backward_rule_ops()


def backward_rule_ops() -> list:
    """The ops with backward rules, sorted (the rule table in :mod:`cnnvis.autodiff.rules`)."""
    from .autodiff.rules import supported_ops

    return supported_ops()


def data_tensors(proto) -> set:
    """Tensors whose values depend on the values of the graph's runtime inputs.

    A tensor computed only from the input's *shape* (through Shape or Size) and constants is not
    one: the int64 shape arithmetic of exported models, and also a float ConstantOfShape or a Cast
    of a shape. Those never are layers, are never tapped, and gradients pass around them.
    """
    inits = {i.name for i in proto.graph.initializer}
    data = {i.name for i in proto.graph.input if i.name not in inits}
    for node in proto.graph.node:
        if node.op_type in SHAPE_SOURCE_OPS:
            continue
        if any(i in data for i in node.input if i):
            data.update(o for o in node.output if o)
    return data


def feature_tensors(proto, elem_types: dict) -> set:
    """Float tensors that depend on the input's values (``elem_types``: tensor -> ONNX elem type,
    e.g. from :func:`cnnvis.onnxgraph.static_types`); tensors of unknown type count as features."""
    return {t for t in data_tensors(proto) if is_float(elem_types.get(t, TensorProto.FLOAT))}


# ------------------------------------------------------------------------------- window geometry

def split_pads(auto_pad: str, totals) -> list:
    """``[begin..., end...]`` pads sharing each axis's total padding in two: the odd pixel at the
    end for SAME_UPPER, at the beginning otherwise (SAME_LOWER, and a ConvTranspose sized by
    ``output_shape``). A negative total (an output longer than the window reaches) stays negative."""
    n = len(totals)
    pads = [0] * (2 * n)
    for i, total in enumerate(totals):
        small = int(total) // 2
        pads[i], pads[n + i] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
    return pads


def same_pad_totals(sizes, kernel, strides, dilations) -> list:
    """Per axis, the total padding a SAME_UPPER / SAME_LOWER window op (Conv, pools) needs for its
    ``ceil(size / stride)`` outputs: ``(out - 1) * stride + (kernel - 1) * dilation + 1 - size``.
    Not clamped: negative when the stride skips more of the input than the last window needs."""
    totals = []
    for i in range(len(sizes)):
        out = -(-int(sizes[i]) // strides[i])
        totals.append((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - int(sizes[i]))
    return totals


def same_pads(auto_pad: str, sizes, kernel, strides, dilations) -> list:
    """``[begin..., end...]`` pads of a SAME_UPPER / SAME_LOWER window op (Conv, pools).

    The output is ``ceil(size / stride)`` long; the total padding that needs
    (:func:`same_pad_totals`, at least 0) is split in two with the odd pixel at the end
    (SAME_UPPER) or at the beginning (SAME_LOWER).
    """
    return split_pads(auto_pad, [max(t, 0) for t in same_pad_totals(sizes, kernel, strides, dilations)])


def same_pool_output_size(size, kernel, stride, dilation=1) -> int:
    """onnxruntime's output length of a SAME_UPPER / SAME_LOWER pool along one axis.

    onnxruntime pads a pool by the *undilated* kernel's :func:`same_pad_totals` (not clamped at 0)
    and divides ``size + total - extent`` by the stride truncating toward zero (C++), where
    ``extent = (kernel - 1) * dilation + 1``. Undilated, that is the ONNX specification's
    ``ceil(size / stride)``; a dilated pool's output is shorter (onnx shape inference and onnx's
    reference evaluator still say ``ceil(size / stride)``).
    """
    total = same_pad_totals([size], [kernel], [stride], [1])[0]
    span = int(size) + total - ((kernel - 1) * dilation + 1)
    return (span // stride if span >= 0 else -(-span // stride)) + 1


def transpose_pad_totals(sizes, kernel, strides, dilations, output_padding, out_sizes=None) -> list:
    """Per axis, the total padding of a ConvTranspose with output length ``out`` (ONNX
    specification): ``stride * (size - 1) + output_padding + (kernel - 1) * dilation + 1 - out``;
    ``out`` is ``out_sizes`` (an ``output_shape``, or the length the op produced) or else
    ``size * stride`` (SAME auto padding). Not clamped: a negative total is an output longer than
    the transposed window reaches."""
    totals = []
    for i in range(len(sizes)):
        out = int(out_sizes[i]) if out_sizes is not None else int(sizes[i]) * strides[i]
        totals.append(strides[i] * (int(sizes[i]) - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
                      - out)
    return totals


def transpose_same_pads(auto_pad: str, sizes, kernel, strides, dilations, output_padding) -> list:
    """``[begin..., end...]`` pads of a SAME ConvTranspose (ONNX specification: the output is
    ``size * stride`` long, the total padding is :func:`transpose_pad_totals` at least 0; SAME_UPPER
    puts the smaller half first)."""
    totals = transpose_pad_totals(sizes, kernel, strides, dilations, output_padding)
    return split_pads(auto_pad, [max(t, 0) for t in totals])


@dataclasses.dataclass(frozen=True)
class Window:
    """The geometry of a windowed op with ``auto_pad`` resolved: per spatial axis ``kernel``,
    ``strides``, ``dilations``, and ``pads`` as ONNX orders them (all begins, then all ends)."""

    kernel: tuple
    strides: tuple
    dilations: tuple
    pads: tuple
    auto_pad: str = "NOTSET"
    ceil_mode: bool = False

    @property
    def spatial(self) -> int:
        return len(self.kernel)

    @property
    def pads_begin(self) -> tuple:
        return self.pads[:self.spatial]

    @property
    def pads_end(self) -> tuple:
        return self.pads[self.spatial:]

    @property
    def extent(self) -> tuple:
        """The dilated window's extent per axis, ``(kernel - 1) * dilation + 1``."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))


def _node_label(node) -> str:
    return f"node {node.name or (node.output[0] if node.output else '?')!r} ({node.op_type})"


def window(node, in_shape=None, weight_shape=None, attrs=None) -> Window:
    """The :class:`Window` of a Conv, ConvTranspose or pool node, as onnxruntime runs it.

    ``in_shape`` (N, C, spatial...) is needed only for SAME auto padding; ``weight_shape`` gives a
    Conv's kernel when the node has no ``kernel_shape``. ``attrs`` may pass already-read
    attributes (a dict as :func:`attributes` returns, or with byte strings).
    """
    a = attributes(node) if attrs is None else {k: (v.decode() if isinstance(v, bytes) else v)
                                                for k, v in attrs.items()}
    kernel = list(a.get("kernel_shape") or [])
    if not kernel and node.op_type in ("Conv", "ConvTranspose") and weight_shape is not None \
            and None not in tuple(weight_shape)[2:]:
        kernel = list(weight_shape)[2:]
    if not kernel:
        raise CnnvisError(f"{_node_label(node)}: no kernel_shape attribute and no constant weight to read it from")
    n = len(kernel)
    strides = list(a.get("strides") or [1] * n)
    dilations = list(a.get("dilations") or [1] * n)
    pads = list(a.get("pads") or [0] * (2 * n))
    auto_pad = a.get("auto_pad") or "NOTSET"
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = tuple(in_shape)[2:] if in_shape is not None else ()
        if len(sizes) != n or None in sizes:
            raise CnnvisError(f"{_node_label(node)}: auto_pad {auto_pad} needs a static input shape")
        if node.op_type == "ConvTranspose":
            out_pad = list(a.get("output_padding") or [0] * n)
            pads = transpose_same_pads(auto_pad, sizes, kernel, strides, dilations, out_pad)
        elif node.op_type in POOL_OPS:
            # onnxruntime sizes a pool's SAME pads by the undilated kernel (the windows stay dilated)
            pads = same_pads(auto_pad, sizes, kernel, strides, [1] * n)
        else:
            pads = same_pads(auto_pad, sizes, kernel, strides, dilations)
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    elif auto_pad != "NOTSET":
        raise CnnvisError(f"{_node_label(node)}: unknown auto_pad {auto_pad!r}")
    return Window(kernel=tuple(int(k) for k in kernel), strides=tuple(int(s) for s in strides),
                  dilations=tuple(int(d) for d in dilations), pads=tuple(int(p) for p in pads),
                  auto_pad=auto_pad, ceil_mode=bool(a.get("ceil_mode", 0)))


def pool_output_size(size, kernel, stride, pad_begin, pad_end, ceil_mode, dilation=1):
    """onnxruntime's pooled length; with ceil_mode a window starting in the end padding is dropped."""
    span = size + pad_begin + pad_end - ((kernel - 1) * dilation + 1)
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def floor_mode_pads(win: Window, sizes) -> tuple:
    """``(out_sizes, pads)``: onnxruntime's output sizes of a ceil-mode pool ``win`` over ``sizes``,
    and the pads (begin unchanged, end adjusted) with which the same pool in floor mode has exactly
    those windows (onnx shape inference and onnxruntime then agree on the size)."""
    n = win.spatial
    out = [pool_output_size(int(sizes[i]), win.kernel[i], win.strides[i], win.pads[i], win.pads[n + i], True,
                            win.dilations[i]) for i in range(n)]
    end = [max(0, (out[i] - 1) * win.strides[i] + win.extent[i] - int(sizes[i]) - win.pads[i]) for i in range(n)]
    return out, list(win.pads[:n]) + end


def average_pool_divisors(size, out, kernel, stride, pad_begin, pad_end, count_include_pad, dilation=1):
    """Per-output-position divisor of AveragePool along one axis, as onnxruntime (and Caffe)
    divide: of a window's taps ``start + j * dilation`` (``start = i * stride - pad_begin``, j < kernel)
    count those before ``size + pad_end`` (``count_include_pad``), or only those inside the image.
    float64, length ``out``."""
    div = np.empty(out, dtype=np.float64)
    for i in range(out):
        taps = i * stride - pad_begin + dilation * np.arange(kernel)
        inside = (taps >= 0) & (taps < size) if not count_include_pad else taps < size + pad_end
        div[i] = np.count_nonzero(inside)
    return div
