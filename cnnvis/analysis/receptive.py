"""Receptive fields: which input pixels a unit of a layer can see.

Along each spatial axis, unit ``i`` of a layer sees the input pixels
``offset + i * stride ... offset + i * stride + size - 1`` (the offset is negative when padding
lets the window start before the image). The three numbers come from the chain of Conv and pooling
ops between the input and the layer: an op with kernel ``k``, stride ``s``, padding ``p`` and
dilation ``d`` applied to a tensor whose units have field (size, stride, offset) gives

    size'   = size + (k - 1) * d * stride
    stride' = s * stride
    offset' = offset - p * stride

Elementwise and per-position ops (ReLU, LRN across channels, BatchNorm, Dropout, ...) keep the
field; ops joining several branches (Add, Concat, Max...) take the union; fully connected and
global ops see the whole input (``is_global``).
"""
from __future__ import annotations

import dataclasses
import weakref

import numpy as np
from onnx import helper, numpy_helper

from .. import ops
from ..errors import CnnvisError

#: ops that do not mix spatial positions
POINTWISE_OPS = ops.POINTWISE_OPS
#: ops after which every unit sees the whole input
GLOBAL_OPS = ops.GLOBAL_OPS | {"Reshape", "MatMul", "ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "Squeeze",
                               "Unsqueeze", "Transpose", "LogSoftmax", "Softmax"}
WINDOW_OPS = ops.WINDOW_OPS - {"ConvTranspose"}


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of a layer's units, per spatial axis (height, width).

    ``size``: pixels a unit sees; ``stride``: pixels between neighbouring units; ``offset``: input
    coordinate of the first pixel seen by unit 0 (negative with padding). ``input_hw`` is the
    input's height and width; ``is_global`` means every unit sees the whole input.
    """

    layer: str
    size: tuple
    stride: tuple
    offset: tuple
    input_hw: tuple
    is_global: bool = False

    def box(self, y: int, x: int) -> tuple:
        """(top, left, bottom, right) of unit (y, x) in input pixels, ends exclusive, not clipped."""
        if self.is_global:
            return (0, 0, *self.input_hw)
        top = self.offset[0] + int(y) * self.stride[0]
        left = self.offset[1] + int(x) * self.stride[1]
        return (top, left, top + self.size[0], left + self.size[1])

    def clipped_box(self, y: int, x: int) -> tuple:
        """:meth:`box` clipped to the image."""
        top, left, bottom, right = self.box(y, x)
        h, w = self.input_hw
        return (max(top, 0), max(left, 0), min(bottom, h), min(right, w))

    @property
    def patch_hw(self) -> tuple:
        """Height and width of a patch as :meth:`patch` returns it."""
        return tuple(self.input_hw) if self.is_global else tuple(self.size)

    def patch(self, array, y: int, x: int, fill: float = np.nan) -> np.ndarray:
        """The part of ``array`` (…×H×W, input-sized) under unit (y, x), always ``patch_hw`` in size:
        positions outside the image are ``fill`` (so that patches of border units line up)."""
        array = np.asarray(array)
        h, w = self.input_hw
        if array.shape[-2:] != (h, w):
            raise CnnvisError(f"receptive field of {self.layer}: expected an array ending in {h}×{w}, "
                              f"got shape {array.shape}")
        top, left, bottom, right = self.box(y, x)
        ph, pw = self.patch_hw
        dtype = np.result_type(array.dtype, np.float32 if np.isnan(fill) else array.dtype)
        out = np.full((*array.shape[:-2], ph, pw), fill, dtype=dtype)
        ct, cl, cb, cr = self.clipped_box(y, x)
        if cb > ct and cr > cl:
            out[..., ct - top:cb - top, cl - left:cr - left] = array[..., ct:cb, cl:cr]
        return out

    def as_dict(self) -> dict:
        return {"layer": self.layer, "size": list(self.size), "stride": list(self.stride),
                "offset": list(self.offset), "input_hw": list(self.input_hw), "global": self.is_global}


@dataclasses.dataclass(frozen=True)
class _Field:
    size: tuple
    stride: tuple
    offset: tuple
    is_global: bool = False

    def window(self, kernel, strides, pads_begin, dilations) -> "_Field":
        if self.is_global:
            return self
        return _Field(
            size=tuple(self.size[i] + (kernel[i] - 1) * dilations[i] * self.stride[i] for i in range(2)),
            stride=tuple(strides[i] * self.stride[i] for i in range(2)),
            offset=tuple(self.offset[i] - pads_begin[i] * self.stride[i] for i in range(2)))


def _union(fields, node) -> _Field:
    if any(f.is_global for f in fields):
        return next(f for f in fields if f.is_global)
    strides = {f.stride for f in fields}
    if len(strides) > 1:
        raise CnnvisError(f"node {node.name or node.output[0]!r} ({node.op_type}): joins branches with "
                          f"different strides {sorted(strides)}; no single receptive field per unit")
    starts = [min(f.offset[i] for f in fields) for i in range(2)]
    ends = [max(f.offset[i] + f.size[i] for f in fields) for i in range(2)]
    return _Field(size=tuple(ends[i] - starts[i] for i in range(2)), stride=fields[0].stride,
                  offset=tuple(starts))


def _window_params(node, in_shape, weight_shape=None):
    win = ops.window(node, in_shape, weight_shape)
    if win.spatial != 2:
        raise CnnvisError(f"node {node.name or node.output[0]!r} ({node.op_type}): {win.spatial}-D window; "
                          "receptive fields are computed for 2-D images")
    return list(win.kernel), list(win.strides), list(win.pads_begin), list(win.dilations)


def graph_receptive_fields(proto, input_shape) -> dict:
    """``{tensor: _Field}`` for every tensor of ``proto`` that depends on its image input."""
    from ..onnxgraph import real_inputs, static_shapes

    shapes = None
    image = real_inputs(proto)[0].name
    constants = {i.name: i for i in proto.graph.initializer}
    fields = {image: _Field(size=(1, 1), stride=(1, 1), offset=(0, 0))}
    for node in proto.graph.node:
        ins = [fields[i] for i in node.input if i in fields]
        if not ins:
            continue
        op = node.op_type
        if op in WINDOW_OPS:
            if shapes is None:
                shapes = static_shapes(proto, (1, *input_shape))
            weight_shape = shapes.get(node.input[1]) if len(node.input) > 1 else None
            kernel, strides, pads, dil = _window_params(node, shapes.get(node.input[0]), weight_shape)
            out = ins[0].window(kernel, strides, pads, dil)
        elif op == "Pad":
            out = _pad_field(node, ins[0], constants)
        elif op in POINTWISE_OPS or op == "Concat" and _concat_axis(node) == 1:
            out = ins[0] if len(ins) == 1 else _union(ins, node)
        elif op in GLOBAL_OPS or op == "Concat":
            out = _Field(size=(0, 0), stride=(0, 0), offset=(0, 0), is_global=True)
        else:
            raise CnnvisError(f"node {node.name or node.output[0]!r}: op {op} is not known to the receptive "
                              "field computation (known: windows, pointwise and global ops)")
        for o in node.output:
            if o:
                fields[o] = out
    return fields


def _concat_axis(node):
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return None


def _pad_field(node, field, constants):
    if field.is_global:
        return field
    pads = None
    if len(node.input) > 1 and node.input[1] in constants:
        pads = numpy_helper.to_array(constants[node.input[1]]).astype(int).tolist()
    else:
        for a in node.attribute:
            if a.name == "pads":
                pads = list(a.ints)
    if not pads or len(pads) != 8 or len(node.input) > 3 and node.input[3]:
        raise CnnvisError(f"node {node.name or node.output[0]!r} (Pad): needs constant 4-D pads for its "
                          "receptive field")
    begin = (pads[2], pads[3])
    return _Field(size=field.size, stride=field.stride,
                  offset=tuple(field.offset[i] - begin[i] * field.stride[i] for i in range(2)))


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def receptive_field(model, layer: str) -> ReceptiveField:
    """The receptive field of ``layer``'s units in the input of a :class:`cnnvis.model.Model`.

    ``layer`` is a layer name, tensor name or ``input``. Errors name the op that has no defined
    receptive field (e.g. a ConvTranspose).
    """
    fields = _CACHE.get(model)
    if fields is None:
        fields = graph_receptive_fields(model.proto, model.input_shape)
        _CACHE[model] = fields
    tensor = model.tensor_name(layer)
    name = layer if tensor == model.input_name else model.layer(layer).name
    if tensor not in fields:
        raise CnnvisError(f"layer {name}: does not depend on the input {model.input_name!r}")
    f = fields[tensor]
    hw = tuple(int(d) for d in model.input_shape[1:])
    if f.is_global:
        return ReceptiveField(name, size=hw, stride=(0, 0), offset=(0, 0), input_hw=hw, is_global=True)
    return ReceptiveField(name, size=tuple(f.size), stride=tuple(f.stride), offset=tuple(f.offset), input_hw=hw)
