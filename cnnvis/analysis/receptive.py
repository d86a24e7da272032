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
field; ops joining several branches (Add, Concat over channels, Max...) take the union; fully
connected and global ops see the whole input (``is_global``). An operand broadcast over space (a
squeeze-and-excitation gate, a global pool's per-channel value) scales a unit without moving its
window, so a Mul or Add with one keeps the spatial operand's field. The spatial axes are followed
through layout changes (Transpose to NHWC and back, channel-shuffle Reshapes that keep H×W
trailing, Split and Concat over channels), and ops that mix positions along named axes (MatMul over
the last axis, LayerNormalization, Reduce*, Softmax) keep the field unless an axis they mix is
spatial. Shape arithmetic (Shape → Gather → Concat → Reshape) is not followed: only the data input
of a Reshape carries a field.

Where no field can be derived from the graph (Resize, ConvTranspose, a Slice or Concat along a
spatial axis, branches with different strides, ...), :func:`receptive_field` takes it from the
gradient's support instead: the input pixels with a nonzero d unit / d input (via the model's
gradient engine) for seeded random inputs, for a central unit and its neighbours.
"""
from __future__ import annotations

import dataclasses
import weakref

import numpy as np
from onnx import helper, numpy_helper

from .. import ops
from ..errors import CnnvisError

#: inputs and outputs of the gradient-support estimate
SUPPORT_IMAGES = 8
SUPPORT_SEED = 0


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
    source: str = "graph"  # or "gradient support" (see the module docstring)

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
        """Height and width of a patch as :meth:`patch` returns it: the field's size, but never more
        than the image's (a field larger than the image is cut to it; the whole input when global)."""
        if self.is_global:
            return tuple(self.input_hw)
        return tuple(min(int(s), int(n)) for s, n in zip(self.size, self.input_hw))

    def patch_origin(self, y: int, x: int) -> tuple:
        """(top, left) input coordinates of the patch of unit (y, x): the box's corner along an axis
        where the field fits in the image (negative where padding lets it start outside), else 0
        (the patch then spans the image along that axis)."""
        if self.is_global:
            return (0, 0)
        box = self.box(y, x)
        return tuple(box[i] if self.size[i] <= self.input_hw[i] else 0 for i in range(2))

    def patch(self, array, y: int, x: int, fill: float = np.nan) -> np.ndarray:
        """The part of ``array`` (…×H×W, input-sized) under unit (y, x), always ``patch_hw`` in size
        (at most H×W) and placed at :meth:`patch_origin`: positions outside the image, or outside the
        field where the patch spans the image, are ``fill`` (so that patches of border units line up)."""
        array = np.asarray(array)
        h, w = self.input_hw
        if array.shape[-2:] != (h, w):
            raise CnnvisError(f"receptive field of {self.layer}: expected an array ending in {h}×{w}, "
                              f"got shape {array.shape}")
        top, left = self.patch_origin(y, x)
        ph, pw = self.patch_hw
        dtype = np.result_type(array.dtype, np.float32 if np.isnan(fill) else array.dtype)
        out = np.full((*array.shape[:-2], ph, pw), fill, dtype=dtype)
        ct, cl, cb, cr = self.clipped_box(y, x)
        if cb > ct and cr > cl:
            out[..., ct - top:cb - top, cl - left:cr - left] = array[..., ct:cb, cl:cr]
        return out

    def as_dict(self) -> dict:
        out = {"layer": self.layer, "size": list(self.size), "stride": list(self.stride),
               "offset": list(self.offset), "input_hw": list(self.input_hw), "global": self.is_global}
        if tuple(self.patch_hw) != tuple(self.size) and not self.is_global:
            out["patch_hw"] = list(self.patch_hw)  # patches cut to the image (see patch_origin)
        if self.source != "graph":
            out["source"] = self.source
        return out


@dataclasses.dataclass(frozen=True)
class _Field:
    size: tuple
    stride: tuple
    offset: tuple
    is_global: bool = False
    axes: tuple = (-2, -1)  # positions of height and width in the tensor, counted from its end

    def window(self, kernel, strides, pads_begin, dilations) -> "_Field":
        if self.is_global:
            return self
        return _Field(
            size=tuple(self.size[i] + (kernel[i] - 1) * dilations[i] * self.stride[i] for i in range(2)),
            stride=tuple(strides[i] * self.stride[i] for i in range(2)),
            offset=tuple(self.offset[i] - pads_begin[i] * self.stride[i] for i in range(2)), axes=self.axes)

    def moved(self, axes) -> "_Field":
        return dataclasses.replace(self, axes=tuple(axes))


_GLOBAL = _Field(size=(0, 0), stride=(0, 0), offset=(0, 0), is_global=True)


class _Unknown(Exception):
    """No field follows from the graph at this node (the reason says why)."""


def _union(fields):
    if any(f.is_global for f in fields):
        return _GLOBAL
    if len({f.axes for f in fields}) > 1:
        raise _Unknown("joins branches whose spatial axes are in different places")
    strides = {f.stride for f in fields}
    if len(strides) > 1:
        raise _Unknown(f"joins branches with different strides {sorted(strides)}")
    starts = [min(f.offset[i] for f in fields) for i in range(2)]
    ends = [max(f.offset[i] + f.size[i] for f in fields) for i in range(2)]
    return _Field(size=tuple(ends[i] - starts[i] for i in range(2)), stride=fields[0].stride,
                  offset=tuple(starts), axes=fields[0].axes)


def _window_params(node, in_shape, weight_shape=None):
    win = ops.window(node, in_shape, weight_shape)
    if win.spatial != 2:
        raise _Unknown(f"{win.spatial}-D window")
    return list(win.kernel), list(win.strides), list(win.pads_begin), list(win.dilations)


def _int_list(node, constants, index, attr):
    """An op's integer list (axes, perm, pads...) from its constant input ``index`` or attribute."""
    if index is not None and len(node.input) > index and node.input[index]:
        if node.input[index] not in constants:
            raise _Unknown(f"input {node.input[index]!r} is computed at run time")
        return [int(v) for v in np.asarray(numpy_helper.to_array(constants[node.input[index]])).reshape(-1)]
    for a in node.attribute:
        if a.name == attr:
            value = helper.get_attribute_value(a)
            return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return None


def _negative(axes, rank):
    return sorted(int(a) - rank if a >= 0 else int(a) for a in axes)


def _after_removing(field, removed, rank):
    """The field once the (non-spatial) axes ``removed`` (negative) are dropped."""
    if field.is_global:
        return field
    return field.moved(tuple(a + sum(1 for r in removed if r > a) for a in field.axes))


def _spatially_broadcast(shape, out_shape, axes) -> bool:
    """Whether an operand of ``shape`` is broadcast over the output's spatial axes (sizes 1 there)."""
    if shape is None or out_shape is None:
        return False
    sizes = [shape[a] if -a <= len(shape) else 1 for a in axes]
    out_sizes = [out_shape[a] if -a <= len(out_shape) else 1 for a in axes]
    return all(s == 1 for s in sizes) and any(o not in (1, None) for o in out_sizes)


def _node_field(node, ins, shapes, constants):
    """The field of ``node``'s outputs from the fields ``ins`` ({input name: field}) of its data inputs."""
    op = node.op_type
    first = ins.get(node.input[0]) if node.input else None
    out_shape = shapes.get(node.output[0])
    if op in ops.GLOBAL_OPS or all(f.is_global for f in ins.values()):
        return _GLOBAL
    if op in ops.SLIDING_WINDOW_OPS or op == "Pad":
        if set(ins) != {node.input[0]}:
            raise _Unknown("its weights or pads are computed from the input")
        if first.axes != (-2, -1) or len(shapes.get(node.input[0]) or ()) != 4:
            raise _Unknown("its window is not over the last two axes of an N×C×H×W tensor")
        if op == "Pad":
            return _pad_field(node, first, constants)
        weight_shape = shapes.get(node.input[1]) if len(node.input) > 1 else None
        return first.window(*_window_params(node, shapes.get(node.input[0]), weight_shape))
    if op in ops.UNARY_POINTWISE_OPS:
        if first is None:
            raise _Unknown("its data input is not the first")
        return first
    if op in ops.BROADCAST_OPS:
        axes = next((f.axes for f in ins.values() if not f.is_global), (-2, -1))
        fields = [f for name, f in ins.items() if not _spatially_broadcast(shapes.get(name), out_shape, axes)]
        fields = fields or list(ins.values())
        return fields[0] if len(fields) == 1 else _union(fields)
    if first is None:
        raise _Unknown("its data input is not the first")
    rank = len(shapes.get(node.input[0]) or ())
    if not rank:
        raise _Unknown("its input has no static shape")
    if op == "Transpose":
        perm = _int_list(node, constants, None, "perm") or list(range(rank))[::-1]
        return first.moved(tuple(perm.index(rank + a) - rank for a in first.axes))
    if op == "Reshape":
        span = -min(first.axes)
        in_shape, out = shapes.get(node.input[0]), out_shape
        if in_shape and out and len(out) >= span and tuple(in_shape[-span:]) == tuple(out[-span:]) \
                and None not in in_shape[-span:]:
            return first  # the trailing axes up to the spatial ones are untouched (a channel shuffle)
        raise _Unknown("reshapes the spatial axes")
    if op in ("Squeeze", "Unsqueeze"):
        axes = _int_list(node, constants, 1, "axes")
        if axes is None and op == "Squeeze":  # every axis of size 1
            axes = [i for i, d in enumerate(shapes.get(node.input[0]) or ()) if d == 1]
        if axes is None:
            raise _Unknown("unsqueezes axes given at run time")
        if op == "Squeeze":
            removed = _negative(axes, rank)
            if set(removed) & set(first.axes):
                raise _Unknown("squeezes a spatial axis")
            return _after_removing(first, removed, rank)
        out_rank = len(out_shape or ()) or rank + len(axes)
        inserted = _negative(axes, out_rank)
        positions = [a for a in range(-out_rank, 0) if a not in inserted]  # output positions of input axes
        return first.moved(tuple(positions[rank + a] for a in first.axes))
    if op in ("Concat", "Split", "Slice", "Tile", "Expand"):
        if op == "Expand":
            return first
        if op == "Slice":
            axes = _int_list(node, constants, 3, "axes")
            axes = list(range(rank)) if axes is None else axes
        elif op == "Tile":
            reps = _int_list(node, constants, 1, "repeats") or []
            axes = [i for i, r in enumerate(reps) if r != 1]
        else:
            axes = [(_int_list(node, constants, None, "axis") or [0 if op == "Split" else 1])[0]]
        if set(_negative(axes, rank)) & set(first.axes):
            raise _Unknown(f"{op.lower()}s along a spatial axis")
        return first if op != "Concat" or len(ins) == 1 else _union(list(ins.values()))
    if op in ops.AXIS_OPS:
        if op == "MatMul":
            if len(ins) > 1:
                raise _Unknown("multiplies two computed tensors")
            mixed = [-1] if node.input[0] in ins else [-2]
            if node.input[0] not in ins:
                first = ins[node.input[1]]
        elif op == "LayerNormalization":
            axis = (_int_list(node, constants, None, "axis") or [-1])[0]
            axis = axis - rank if axis >= 0 else axis
            mixed = list(range(axis, 0))
        elif op in ("Softmax", "LogSoftmax", "Hardmax"):
            mixed = _negative([(_int_list(node, constants, None, "axis") or [-1])[0]], rank)
        else:  # Reduce*, ArgMax, ArgMin
            axes = _int_list(node, constants, 1 if op.startswith("Reduce") else None, "axes")
            if axes is None and op in ("ArgMax", "ArgMin"):
                axes = [(_int_list(node, constants, None, "axis") or [0])[0]]
            if axes is None:
                return _GLOBAL
            mixed = _negative(axes, rank)
            if not set(mixed) & set(first.axes):
                keep = _int_list(node, constants, None, "keepdims")
                return first if keep is None or keep[0] else _after_removing(first, mixed, rank)
        return _GLOBAL if set(mixed) & set(first.axes) else first
    raise _Unknown("op is not known to the receptive field computation")


def graph_receptive_fields(proto, input_shape) -> dict:
    """``{tensor: _Field or _Unknown}`` for every tensor of ``proto`` computed from its image input's
    values (shape arithmetic has no field); an :class:`_Unknown` says why no field follows from the
    graph (and so does every tensor computed from it, unless a global op makes it global)."""
    from ..onnxgraph import real_inputs, static_shapes

    image = real_inputs(proto)[0].name
    constants = {i.name: i for i in proto.graph.initializer}
    data = ops.data_tensors(proto)
    shapes = static_shapes(proto, (1, *input_shape))
    fields = {image: _Field(size=(1, 1), stride=(1, 1), offset=(0, 0))}
    for node in proto.graph.node:
        ins = {i: fields[i] for i in node.input if i in fields}
        if not ins or node.op_type in ops.SHAPE_SOURCE_OPS:
            continue
        unknown = [f for f in ins.values() if isinstance(f, _Unknown)]
        try:
            if unknown:
                if node.op_type not in ops.GLOBAL_OPS:
                    raise unknown[0]
                out = _GLOBAL
            else:
                out = _node_field(node, ins, shapes, constants)
        except _Unknown as exc:
            out = exc if exc in unknown else _Unknown(
                f"node {node.name or node.output[0]!r} ({node.op_type}): {exc}")
        except CnnvisError as exc:
            out = _Unknown(str(exc))
        for o in node.output:
            if o and o in data:
                fields[o] = out
    return fields


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
        raise _Unknown("needs constant 4-D pads")
    begin = (pads[2], pads[3])
    return dataclasses.replace(field, offset=tuple(field.offset[i] - begin[i] * field.stride[i] for i in range(2)))


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def receptive_field(model, layer: str) -> ReceptiveField:
    """The receptive field of ``layer``'s units in the input of a :class:`cnnvis.model.Model`.

    ``layer`` is a layer name, tensor name or ``input``. From the graph where it can be derived,
    else from the gradient's support (:func:`support_field`).
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
    if isinstance(f, _Unknown):
        f = fields[tensor] = support_field(model, name, reason=str(f))
        return f
    if isinstance(f, ReceptiveField):
        return f
    if f.is_global:
        return ReceptiveField(name, size=hw, stride=(0, 0), offset=(0, 0), input_hw=hw, is_global=True)
    return ReceptiveField(name, size=tuple(f.size), stride=tuple(f.stride), offset=tuple(f.offset), input_hw=hw)


def support_field(model, layer: str, reason: str = "") -> ReceptiveField:
    """A layer's receptive field from the gradient's support.

    For a central unit (y, x) of the layer (C×H×W) and its neighbours (y+1, x) and (y, x+1), the
    input pixels with a nonzero gradient of the unit's channels (random ±1 weights) for
    ``SUPPORT_IMAGES`` seeded normal images; the field is their bounding box: size from the central
    unit, stride from the neighbours' shift, offset = top/left - unit * stride. A box that hits both
    sides of the image along both axes makes the field global; one clipped on one side gives a
    lower bound of the size. Rectified or max-pooled units pass gradient to part of their window
    only, which the several random images and channel weights make unlikely to matter. ``reason`` (why the graph did not give the field)
    goes into errors: a model whose gradients cannot be built says which op stops both.
    """
    lay = model.layer(layer)
    hw = tuple(int(d) for d in model.input_shape[1:])
    shape = lay.output_shape
    if shape is None or len(shape) != 3:
        # no H×W grid of units: each unit is one whole-image feature
        return ReceptiveField(lay.name, size=hw, stride=(0, 0), offset=(0, 0), input_hw=hw, is_global=True,
                              source="gradient support")
    c, h, w = shape
    units = [(h // 2, w // 2)] + ([(h // 2 + 1, w // 2)] if h > 1 else []) + ([(h // 2, w // 2 + 1)] if w > 1 else [])
    rng = np.random.default_rng(SUPPORT_SEED)
    x = rng.normal(size=(SUPPORT_IMAGES, *model.input_shape)).astype(np.float32)
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(SUPPORT_IMAGES, c))
    seeds = np.zeros((len(units) * SUPPORT_IMAGES, c, h, w), np.float32)
    for k, (y, xx) in enumerate(units):
        seeds[k * SUPPORT_IMAGES:(k + 1) * SUPPORT_IMAGES, :, y, xx] = signs
    try:
        engine = model.gradient_engine(model.input_name, objective="seed", target=lay.tensor)
        grads = engine.run(np.concatenate([x] * len(units)), seed=seeds)[model.input_name]
    except CnnvisError as exc:
        raise CnnvisError(f"layer {lay.name}: no receptive field ({reason}), and none from the gradient: {exc}") \
            from None
    boxes = []
    for k in range(len(units)):
        support = np.abs(grads[k * SUPPORT_IMAGES:(k + 1) * SUPPORT_IMAGES]).sum(axis=(0, 1)) > 0
        rows, cols = np.flatnonzero(support.any(axis=1)), np.flatnonzero(support.any(axis=0))
        if not len(rows):
            raise CnnvisError(f"layer {lay.name}: no receptive field ({reason}), and the unit's gradient is zero "
                              "for every test input")
        boxes.append((rows[0], cols[0], rows[-1] + 1, cols[-1] + 1))
    top, left, bottom, right = boxes[0]
    if (top, bottom) == (0, hw[0]) and (left, right) == (0, hw[1]):
        return ReceptiveField(lay.name, size=hw, stride=(0, 0), offset=(0, 0), input_hw=hw, is_global=True,
                              source="gradient support")
    neighbour = {0: 1 if h > 1 else None, 1: (2 if h > 1 else 1) if w > 1 else None}
    size, stride, offset = [], [], []
    for axis, (lo, hi) in enumerate(((top, bottom), (left, right))):
        shift = 0
        if neighbour[axis] is not None:
            other = boxes[neighbour[axis]]
            # an edge the image does not clip moves by one stride
            shift = other[axis] - lo if lo > 0 else other[axis + 2] - hi
        # a box the image clips on one side gives a lower bound of the size
        size.append(int(hi - lo))
        stride.append(int(shift))
        offset.append(int(lo - units[0][axis] * shift))
    return ReceptiveField(lay.name, size=tuple(size), stride=tuple(stride), offset=tuple(offset), input_hw=hw,
                          source="gradient support")
