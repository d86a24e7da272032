"""Occlusion sensitivity (Zeiler & Fergus 2014, section 4.2 and Figure 7).

A grey square slides over the image; at each position the network sees the occluded image and we
record (a) the probability of a chosen class, (b) the most probable class and (c) the total
activation of one feature map of a chosen layer (the map strongest in the unoccluded image).

All window positions run through onnxruntime in batches. When it saves work, the windows are
computed *incrementally*: a window changes only a rectangle of each early layer's output, so the
first layers (a chain of convolutions, poolings and pointwise ops) are evaluated only on that
rectangle (plus its receptive halo), pasted into the unoccluded image's maps, and the rest of the
network runs from there. This gives the same numbers as occluding the image and running the whole
network (tested to float32 rounding), with less arithmetic.

The input-space helpers the sensitivity analyses share live in :mod:`cnnvis.analysis.inputspace`
(the heat-map overlays are drawn by :mod:`cnnvis.export.plots`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto, helper

from .. import ops
from ..errors import CnnvisError
from ..model import chunk_bounds
from ..preprocess import input_space
from .base import Analysis, PerImage
from .inputspace import default_feature_layer, probabilities

# ----------------------------------------------------------------------------- windows

def _pair(value, what):
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) <= 0:
        raise CnnvisError(f"{what}: expected a positive size (or height, width), got {value}")
    return value


def window_positions(image_hw, window, stride):
    """Top-left corners of every window: (ys, xs), starting at 0, every ``stride`` while it fits,
    plus one window flush with the far edge when the stride does not land there (so every pixel
    is covered)."""
    (h, w), (wh, ww), (sh, sw) = image_hw, window, stride
    if wh > h or ww > w:
        raise CnnvisError(f"window=({wh}, {ww}): larger than the {h}x{w} input", params="window")

    def axis(size, win, step):
        starts = np.arange(0, size - win + 1, step)
        return starts if starts[-1] == size - win else np.append(starts, size - win)

    return axis(h, wh, sh), axis(w, ww, sw)


def coverage_mean(values, ys, xs, window, image_hw) -> np.ndarray:
    """Per pixel, the mean of ``values[i, j]`` over the windows covering it (NaN where none does)."""
    h, w = image_hw
    wh, ww = window
    total = np.zeros((h + 1, w + 1))
    count = np.zeros((h + 1, w + 1))
    values = np.asarray(values, dtype=np.float64)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            # 2-D difference array: +v at the top-left, -v past the right and bottom edges
            for arr, v in ((total, values[i, j]), (count, 1.0)):
                arr[y, x] += v
                arr[y, x + ww] -= v
                arr[y + wh, x] -= v
                arr[y + wh, x + ww] += v
    total = total.cumsum(0).cumsum(1)[:h, :w]
    count = np.rint(count.cumsum(0).cumsum(1)[:h, :w])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclasses.dataclass
class OcclusionMaps:
    """The maps of one image; map cell (i, j) is the window with top-left corner (ys[i], xs[j])."""

    target: int
    window: tuple
    stride: tuple
    ys: np.ndarray
    xs: np.ndarray
    probability: np.ndarray  # of ``target``
    top_class: np.ndarray
    top_probability: np.ndarray
    base_probability: float  # of ``target`` without occluder
    base_top_class: int
    layer: str | None = None
    channel: int | None = None
    activation: np.ndarray | None = None  # total activation of ``channel`` of ``layer``
    base_activation: float | None = None
    image_hw: tuple = (0, 0)

    def to_pixels(self, values) -> np.ndarray:
        """A map as an image-sized array (mean over the windows covering each pixel)."""
        return coverage_mean(values, self.ys, self.xs, self.window, self.image_hw)

    def nearest_window_classes(self) -> np.ndarray:
        """Per pixel, the most probable class of the window whose centre is nearest (ties: the
        first window): a pixel covered by windows with different winners gets one class."""
        h, w = self.image_hw
        cy = self.ys + (self.window[0] - 1) / 2.0
        cx = self.xs + (self.window[1] - 1) / 2.0
        iy = np.abs(np.arange(h)[:, None] - cy[None]).argmin(axis=1)
        ix = np.abs(np.arange(w)[:, None] - cx[None]).argmin(axis=1)
        return self.top_class[iy[:, None], ix[None, :]]

    def summary(self) -> dict:
        i, j = np.unravel_index(int(np.argmin(self.probability)), self.probability.shape)
        out = {"target": self.target, "window": list(self.window), "stride": list(self.stride),
               "grid": [len(self.ys), len(self.xs)], "base_probability": self.base_probability,
               "base_top_class": self.base_top_class,
               "min_probability": float(self.probability[i, j]),
               "min_probability_window": [int(self.ys[i]), int(self.xs[j])],
               "top_classes": sorted({int(c) for c in np.unique(self.top_class)})}
        if self.activation is not None:
            k = np.unravel_index(int(np.argmin(self.activation)), self.activation.shape)
            out.update(layer=self.layer, channel=self.channel, base_activation=self.base_activation,
                       min_activation=float(self.activation[k]),
                       min_activation_window=[int(self.ys[k[0]]), int(self.xs[k[1]])])
        return out


@dataclasses.dataclass
class OcclusionResult(PerImage):
    """:meth:`Occlusion.run`'s result: one :class:`OcclusionMaps` per image of the batch, in order,
    and how the windows were computed (``plan``: :meth:`_IncrementalPlan.describe` of the batch's
    plan)."""

    _per_image = "maps"
    maps: list
    plan: dict | None = None


# ----------------------------------------------------------------------------- incremental plan

#: pointwise ops applied to the chain's tensor with constant parameters (Clip's bounds, BatchNorm's
#: statistics), and elementwise ops whose other operands are constants broadcast over space
_UNARY = ops.UNARY_POINTWISE_OPS - {"BatchNormalization", "Clip"}
_WITH_CONSTANTS = ops.ARITHMETIC_OPS | {"BatchNormalization", "Clip"}


@dataclasses.dataclass
class _Stage:
    """One spatial op (or none, for pointwise ops on the image) and the pointwise ops after it."""

    nodes: list
    input: str
    tensors: list  # every output tensor of the stage, in order; tensors[-1] is the stage output
    spatial: bool = False  # nodes[0] is a sliding window op (Conv / pool)
    kernel: tuple = (1, 1)  # dilated extent (k - 1) * d + 1
    stride: tuple = (1, 1)
    pad_begin: tuple = (0, 0)
    pad_value: float = 0.0
    per_output_cost: float = 0.0
    # filled from real shapes
    in_hw: tuple = (0, 0)
    out_shape: tuple = (0, 0, 0)
    pad_end: tuple = (0, 0)
    length: tuple = (0, 0)  # output rectangle size (fixed for all windows)
    crop: tuple = (0, 0)  # input crop size
    starts: tuple = ()  # (ys, xs) output rectangle starts per window

    @property
    def output(self):
        return self.tensors[-1]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _spatial_params(node, inits):
    """Kernel extent, stride, begin pads and pad value of a 2-D sliding window node
    (:data:`cnnvis.ops.SLIDING_WINDOW_OPS`: Conv, MaxPool, AveragePool, LpPool), or None."""
    a = ops.attributes(node)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None
    if node.op_type == "Conv":
        if len(node.input) < 2 or node.input[1] not in inits or any(i and i not in inits for i in node.input[2:]):
            return None
        wshape = tuple(inits[node.input[1]].dims)
        if len(wshape) != 4:
            return None
        kernel = list(a.get("kernel_shape") or wshape[2:])
        per_output = wshape[1] * wshape[2] * wshape[3]
    else:
        if len(node.output) > 1 and any(node.output[1:]):
            return None  # pool indices are used
        kernel = list(a["kernel_shape"])
        if len(kernel) != 2:
            return None
        per_output = kernel[0] * kernel[1]
    if node.op_type not in ops.PAD_VALUES and (any(a.get("pads", [0] * 4)) or a.get("ceil_mode", 0)):
        return None  # AveragePool: the divisors would depend on the position
    win = ops.window(node, weight_shape=(None, None, *kernel), attrs=a)
    return win.extent, win.strides, win.pads_begin, ops.PAD_VALUES.get(node.op_type, 0.0), per_output


def _constant_is_pointwise(arr_dims) -> bool:
    dims = tuple(arr_dims)
    size = int(np.prod(dims)) if dims else 1
    # a constant broadcast over the spatial axes (numpy broadcasting aligns trailing axes)
    return size == 1 or (len(dims) >= 2 and dims[-1] == 1 and dims[-2] == 1)


def _is_pointwise(node, current, inits) -> bool:
    if node.op_type in _UNARY:
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            return False
        return node.input[0] == current and all(i in inits for i in node.input[1:] if i)
    if node.op_type in _WITH_CONSTANTS:
        others = [i for i in node.input if i and i != current]
        if current not in node.input or any(i not in inits for i in others):
            return False
        if node.op_type in ("BatchNormalization", "Clip"):
            return node.input[0] == current
        return all(_constant_is_pointwise(inits[i].dims) for i in others)
    return False


def _chain_stages(proto, input_name):
    """The longest prefix of the graph that is a chain of local 2-D ops, cut into stages."""
    inits = {i.name: i for i in proto.graph.initializer}
    consumers = {}
    for node in proto.graph.node:
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    stages, current = [], input_name
    while True:
        users = consumers.get(current, [])
        if len(users) != 1 or (current in outputs and current != input_name):
            break
        node = users[0]
        if any(i and i not in inits and i != current for i in node.input):
            break
        if node.op_type in ops.SLIDING_WINDOW_OPS and node.input[0] == current:
            params = _spatial_params(node, inits)
            if params is None:
                break
            extent, stride, pad_begin, pad_value, per_output = params
            stages.append(_Stage([node], current, [node.output[0]], True, extent, stride, pad_begin, pad_value,
                                 float(per_output)))
        elif _is_pointwise(node, current, inits):
            if not stages:
                stages.append(_Stage([], current, []))
            stages[-1].nodes.append(node)
            stages[-1].tensors.append(node.output[0])
            stages[-1].per_output_cost += 1.0
        else:
            break
        current = node.output[0]
    return stages


def _out_interval(lo, hi, extent, stride, pad, size_out):
    """Outputs whose window [o*s - p, o*s - p + extent) meets input rows [lo, hi)."""
    first = max(0, -(-(lo + pad - extent + 1) // stride))
    last = min(size_out, (hi - 1 + pad) // stride + 1)
    return first, last


def _node_cost(node, shapes, inits) -> float:
    out = shapes.get(node.output[0]) if node.output else None
    n_out = float(np.prod(out[1:])) if out and None not in out[1:] else 0.0
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
        return n_out * float(np.prod(inits[node.input[1]].dims[1:]))
    if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
        return float(np.prod(inits[node.input[1]].dims))
    if node.op_type in ops.POOL_OPS:
        k = _attrs(node).get("kernel_shape", [1, 1])
        return n_out * float(np.prod(k))
    return n_out


def _submodel(proto, nodes, input_name, input_chw, outputs):
    """A model computing ``outputs`` from ``input_name`` (N×C×H×W) with the given nodes."""
    from ..onnxgraph import make_model, opset_of, prune

    kept, inits = prune(nodes, proto.graph.initializer, outputs)
    inp = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", *input_chw])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(kept, "cnnvis_occlusion_part", [inp], outs, inits)
    return make_model(graph, opset=max(opset_of(proto), 13))


def _unpadded(node):
    """A copy of a spatial node with no padding and floor rounding (the crop carries the padding)."""
    a = _attrs(node)
    a.pop("ceil_mode", None)
    a.pop("auto_pad", None)
    a["pads"] = [0, 0, 0, 0]
    if node.op_type == "Conv" and "kernel_shape" in a:
        a["kernel_shape"] = list(a["kernel_shape"])
    return helper.make_node(node.op_type, list(node.input), list(node.output[:1]), name=node.name, **a)



class _IncrementalPlan:
    """Stages evaluated on rectangles, the cut after them and the sessions that run it all."""

    def __init__(self, model, window, ys, xs, tap, max_stages=None):
        self.model = model
        proto = model.proto
        self.tap = tap
        stages = _chain_stages(proto, model.input_name)
        if max_stages is not None:
            stages = stages[:max_stages]
        # real shapes from one forward run (onnxruntime's own rounding of ceil-mode pools)
        # (the same tap set serves the unoccluded run of every image: one session per tap layer)
        self.base_outputs = list(dict.fromkeys([model.output_name] + ([tap] if tap else [])
                                               + [t for s in stages for t in s.tensors]))
        x0 = np.zeros((1, *model.input_shape), np.float32)
        values = dict(zip(self.base_outputs, model.session(tuple(self.base_outputs)).run(
            self.base_outputs, {model.input_name: x0})))
        shapes = {model.input_name: (1, *model.input_shape), **{t: v.shape for t, v in values.items()}}
        usable = []
        for s in stages:
            if any(len(shapes[t]) != 4 for t in s.tensors) or len(shapes[s.input]) != 4:
                break
            usable.append(s)
        stages = usable
        # per-window rectangles through the stages
        wh, ww = window
        lo = [np.asarray(ys, np.int64), np.asarray(xs, np.int64)]
        hi = [lo[0] + wh, lo[1] + ww]
        grid_y, grid_x = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
        self.window_index = (grid_y.ravel(), grid_x.ravel())
        for s in stages:
            in_shape = shapes[s.input]
            s.in_hw = tuple(in_shape[2:])
            s.out_shape = tuple(shapes[s.output][1:])
            starts, lengths = [], []
            for axis in range(2):
                size_out = s.out_shape[1 + axis]
                first, last = zip(*[_out_interval(int(a), int(b), s.kernel[axis], s.stride[axis],
                                                  s.pad_begin[axis], size_out) for a, b in zip(lo[axis], hi[axis])])
                first, last = np.asarray(first), np.asarray(last)
                length = max(1, int((last - first).max()))
                starts.append(np.clip(first, 0, size_out - length))
                lengths.append(length)
                lo[axis], hi[axis] = starts[-1], starts[-1] + length
            s.length = tuple(lengths)
            s.starts = tuple(starts)
            s.crop = tuple((s.length[i] - 1) * s.stride[i] + s.kernel[i] for i in range(2))
            s.pad_end = tuple(max(0, (s.out_shape[1 + i] - 1) * s.stride[i] + s.kernel[i] - s.pad_begin[i]
                                  - s.in_hw[i]) for i in range(2))
        self.all_stages = stages
        self._choose_cut(proto, shapes)

    def _choose_cut(self, proto, shapes):
        from ..onnxgraph import static_shapes

        model = self.model
        inits = {i.name: i for i in proto.graph.initializer}
        full_shapes = static_shapes(proto, (1, *model.input_shape))
        full_shapes.update(shapes)
        node_cost = {n.output[0]: _node_cost(n, full_shapes, inits) for n in proto.graph.node if n.output}
        total = float(sum(node_cost.values()))
        c, h, w = model.input_shape
        costs = [total + c * h * w]  # d = 0: the whole network on occluded copies of the image
        prefix = 0.0
        patch = 0.0
        for s in self.all_stages:
            prefix += sum(node_cost.get(n.output[0], 0.0) for n in s.nodes)
            cout = s.out_shape[0]
            cin = shapes[s.input][1]
            patch += cout * s.length[0] * s.length[1] * max(1.0, s.per_output_cost) \
                + cin * s.crop[0] * s.crop[1]  # the crop copy
            tail = total - prefix
            paste = float(np.prod(s.out_shape))  # copying the unoccluded maps per window
            costs.append(patch + tail + paste)
        self.costs = costs
        best = int(np.argmin(costs))
        # the incremental path only when it saves a clear share of the work
        self.depth = best if costs[best] < 0.9 * costs[0] else 0
        self.stages = self.all_stages[:self.depth]
        self.full_cost, self.cost = costs[0], costs[self.depth]

    def describe(self) -> dict:
        return {"incremental_stages": [s.output for s in self.stages],
                "estimated_work_ratio": round(self.cost / self.full_cost, 4)}


class Occlusion(Analysis):
    """Occlusion maps of images, Zeiler & Fergus style: ``Occlusion(model, window=...).run(x, target)``.

    Parameters
    ----------
    model : :class:`cnnvis.model.Model`
    window, stride : occluder size and step in input pixels (int or (height, width)).
    layer : layer whose strongest feature map's total activation is mapped (default: the last
        layer with C×H×W maps); ``False`` for none.
    channel : that layer's feature map to map (default: per image, the strongest in the
        unoccluded image).
    fill : occluder value in input space, broadcastable to C×H×W (default: the preprocessing's
        neutral grey, see :class:`cnnvis.preprocess.InputSpace`).
    preprocessing : for the default fill (default: the model's own).
    batch_size : windows per onnxruntime call.
    incremental : evaluate early layers only on the changed rectangles when that saves work
        (``"auto"``), never (``False``), or always as deep as possible (``True``, for tests).

    After :meth:`run`, ``plan_`` describes how the last image was computed (``plan_.describe()``).
    Sessions (of the model and of the stage graphs) live in the model's cache (``Model.session``).
    """

    def __init__(self, model, window=35, stride=8, layer=None, channel=None, fill=None, preprocessing=None,
                 batch_size: int = 32, incremental="auto"):
        super().__init__(model, window=window, stride=stride, layer=layer, channel=channel, fill=fill,
                         preprocessing=preprocessing, batch_size=batch_size, incremental=incremental)
        self._plans = {}

    # -------------------------------------------------------------- helpers
    def _fill_array(self):
        c, h, w = self.model.input_shape
        fill = self.fill
        if fill is None:
            fill = input_space(self.model, self.preprocessing).grey_
        fill = np.asarray(fill, dtype=np.float32)
        if fill.ndim == 1:
            fill = fill.reshape(-1, 1, 1)
        try:
            return np.broadcast_to(fill, (c, h, w))
        except ValueError:
            raise CnnvisError(f"fill: shape {fill.shape} does not broadcast to the input {c}x{h}x{w}") from None

    def _layer_tensor(self):
        if self.layer is False:
            return None, None
        name = self.layer or default_feature_layer(self.model)
        layer = self.model.layer(name)
        return layer.name, layer.tensor

    def _session(self, key, build):
        from ..onnxgraph import decompose_lrn

        # idle threads sleep: the incremental path alternates between several small sessions
        return self.model.session(key=key, build=lambda: decompose_lrn(build()), spinning=False)

    def plan(self, ys, xs, tap):
        window = _pair(self.window, "window")
        key = (window, tuple(ys), tuple(xs), tap)
        if key not in self._plans:
            if self.incremental is False or getattr(self.model, "reduced_precision", False):
                # a float16 model runs whole in its own precision: partial graphs would be float32
                max_stages = 0
            else:
                max_stages = None
            plan = _IncrementalPlan(self.model, window, ys, xs, tap, max_stages=max_stages)
            if self.incremental is True:
                plan.depth = len(plan.all_stages)
                plan.stages = plan.all_stages
                plan.cost = plan.costs[plan.depth]
            plan.key = ("occlusion", key, self.incremental)
            self._plans[key] = plan
        return self._plans[key]

    # -------------------------------------------------------------- running
    def run(self, inputs, target=None) -> OcclusionResult:
        """The maps of each preprocessed image of the batch ``inputs`` (N×C×H×W). ``target``: one
        class for all, one per image, or None for each image's predicted class."""
        x = self.model.check_batch(inputs)
        targets = [None] * len(x) if target is None else np.broadcast_to(
            np.asarray(target, dtype=np.int64), (len(x),)).tolist()
        maps = [self._image(image, t, self.channel) for image, t in zip(x, targets)]
        plan = getattr(self, "plan_", None)
        return OcclusionResult(maps, plan.describe() if maps and plan is not None else None)

    def _image(self, x, target, channel) -> OcclusionMaps:
        model = self.model
        window = _pair(self.window, "window")
        stride = _pair(self.stride, "stride")
        ys, xs = window_positions(x.shape[1:], window, stride)
        layer_name, tap = self._layer_tensor()
        plan = self.plan_ = self.plan(ys, xs, tap)
        fill = self._fill_array()

        # the unoccluded image: every map the plan needs, the tap and the output
        out_name = model.output_name
        wanted = plan.base_outputs
        base = dict(zip(wanted, model.session(tuple(wanted)).run(wanted, {model.input_name: x[None]})))
        base = {k: v[0] for k, v in base.items()}
        base[model.input_name] = x
        base_prob = probabilities(model, base[out_name][None])[0]
        base_top = int(np.argmax(base_prob))
        if target is None:
            target = base_top
        target = int(target)
        if not 0 <= target < base_prob.shape[0]:
            raise CnnvisError(f"class {target}: expected an index in [0, {base_prob.shape[0]})")
        if tap:
            per_channel = base[tap].reshape(base[tap].shape[0], -1).astype(np.float64).sum(axis=1)
            if channel is None:
                channel = int(np.argmax(per_channel))
            channel = int(channel)
            if not 0 <= channel < per_channel.shape[0]:
                raise CnnvisError(f"channel {channel}: layer {layer_name} has {per_channel.shape[0]} maps")
            base_activation = float(per_channel[channel])
        else:
            channel, base_activation = None, None

        # each stage's unoccluded input, padded once for all windows (its own pad value)
        padded = [np.pad(np.asarray(base[st.input], np.float32),
                         ((0, 0), (st.pad_begin[0], st.pad_end[0]), (st.pad_begin[1], st.pad_end[1])),
                         constant_values=np.float32(st.pad_value)) for st in plan.stages]
        n = len(ys) * len(xs)
        prob = np.empty((n, base_prob.shape[0]))
        activation = np.empty(n) if tap else None
        for start, stop in chunk_bounds(n, self.batch_size):
            idx = np.arange(start, stop)
            p, act = self._windows(plan, x, fill, base, padded, idx, ys, xs, window, tap, channel)
            prob[idx] = p
            if tap:
                activation[idx] = act
        shape = (len(ys), len(xs))
        top = np.argmax(prob, axis=1)
        return OcclusionMaps(
            target=target, window=window, stride=stride, ys=ys, xs=xs,
            probability=prob[:, target].reshape(shape), top_class=top.reshape(shape).astype(np.int64),
            top_probability=prob[np.arange(n), top].reshape(shape), base_probability=float(base_prob[target]),
            base_top_class=base_top, layer=layer_name, channel=channel,
            activation=activation.reshape(shape) if tap else None, base_activation=base_activation,
            image_hw=tuple(x.shape[1:]))

    def _stage_session(self, plan, i, outs):
        s = plan.stages[i]
        cin = self.model.input_shape[0] if i == 0 else plan.stages[i - 1].out_shape[0]

        def build():
            nodes = ([_unpadded(s.nodes[0])] + s.nodes[1:]) if s.spatial else list(s.nodes)
            return _submodel(self.model.proto, nodes, s.input, (cin, *s.crop), outs)

        return self._session((plan.key, plan.depth, "stage", i, tuple(outs)), build)

    def _tail_session(self, plan, outs):
        model = self.model
        last = plan.stages[-1]
        inside = {t for st in plan.stages for t in st.tensors}
        remaining = [n for n in model.proto.graph.node if not (n.output and n.output[0] in inside)]
        return self._session((plan.key, plan.depth, "tail", tuple(outs)), lambda: _submodel(
            model.proto, remaining, last.output, last.out_shape, outs))

    def _windows(self, plan, x, fill, base, padded, idx, ys, xs, window, tap, channel):
        """Probabilities (B×classes) and the tapped channel's totals (B,) for windows ``idx``."""
        model = self.model
        wh, ww = window
        iy, ix = plan.window_index[0][idx], plan.window_index[1][idx]  # per-axis position numbers
        wy, wx = ys[iy], xs[ix]
        b = len(idx)
        out_name = model.output_name
        if not plan.stages:
            batch = np.repeat(x[None], b, axis=0)
            for k in range(b):
                batch[k, :, wy[k]:wy[k] + wh, wx[k]:wx[k] + ww] = fill[:, wy[k]:wy[k] + wh, wx[k]:wx[k] + ww]
            names = list(dict.fromkeys([out_name] + ([tap] if tap else [])))
            res = dict(zip(names, model.session(tuple(names)).run(names, {model.input_name: batch})))
            act = res[tap][:, channel].reshape(b, -1).astype(np.float64).sum(axis=1) if tap else None
            return probabilities(model, res[out_name]), act

        # the occluded square is the changed rectangle of the image
        prev_rect = (wy, wx, (wh, ww))
        prev_values = np.stack([fill[:, wy[k]:wy[k] + wh, wx[k]:wx[k] + ww] for k in range(b)])
        tap_sum = None
        for i, s in enumerate(plan.stages):
            src = padded[i]
            ry, rx = s.starts[0][iy], s.starts[1][ix]  # output rectangle corners
            sy, sx = ry * s.stride[0], rx * s.stride[1]  # input crop corners (padded coordinates)
            crops = np.empty((b, src.shape[0], *s.crop), np.float32)
            py, px, (ph, pw) = prev_rect
            for k in range(b):
                crops[k] = src[:, sy[k]:sy[k] + s.crop[0], sx[k]:sx[k] + s.crop[1]]
                # paste the changed rectangle (in padded coordinates) where it meets the crop
                y0, x0 = py[k] + s.pad_begin[0], px[k] + s.pad_begin[1]
                ty0, tx0 = max(y0, sy[k]), max(x0, sx[k])
                ty1, tx1 = min(y0 + ph, sy[k] + s.crop[0]), min(x0 + pw, sx[k] + s.crop[1])
                if ty1 > ty0 and tx1 > tx0:
                    crops[k, :, ty0 - sy[k]:ty1 - sy[k], tx0 - sx[k]:tx1 - sx[k]] = \
                        prev_values[k, :, ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
            outs = list(dict.fromkeys([s.output] + ([tap] if tap in s.tensors else [])))
            res = dict(zip(outs, self._stage_session(plan, i, outs).run(outs, {s.input: crops})))
            if tap in s.tensors:
                # total = unoccluded total - unoccluded rectangle + recomputed rectangle
                ly, lx = s.length
                full = base[tap][channel].astype(np.float64)
                inside = np.array([full[ry[k]:ry[k] + ly, rx[k]:rx[k] + lx].sum() for k in range(b)])
                tap_sum = full.sum() - inside + res[tap][:, channel].reshape(b, -1).astype(np.float64).sum(1)
            prev_rect = (ry, rx, s.length)
            prev_values = res[s.output]
        last = plan.stages[-1]
        maps = np.repeat(base[last.output][None], b, axis=0)
        ly, lx = last.length
        ry, rx, _ = prev_rect
        for k in range(b):
            maps[k, :, ry[k]:ry[k] + ly, rx[k]:rx[k] + lx] = prev_values[k]
        outs = list(dict.fromkeys([out_name] + ([tap] if tap and tap_sum is None else [])))
        res = dict(zip(outs, self._tail_session(plan, outs).run(outs, {last.output: maps})))
        if tap and tap_sum is None:
            tap_sum = res[tap][:, channel].reshape(b, -1).astype(np.float64).sum(axis=1)
        return probabilities(model, res[out_name]), tap_sum

