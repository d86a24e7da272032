"""Caffe net + weights -> ONNX graph that computes what Caffe computes in the TEST phase.

Conventions of the graph written here:

* node names are Caffe layer names (helper nodes of a layer are called ``<layer>/<what>``);
* every layer output is its own tensor, also for in-place layers: the tensor of ``relu1`` working
  in place on blob ``pool1`` is ``relu1``, while ``pool1`` keeps the value before rectification;
* the batch dimension of the inputs is symbolic (``N``);
* ``metadata_props`` holds JSON maps from Caffe blob names to the ONNX tensor with their final
  value (:data:`META_BLOB_FINAL`) and to every tensor that held a value of the blob, in order
  (:data:`META_BLOBS`: ``pool1 -> [pool1, relu1]``), from layer names to their output tensors
  (:data:`META_LAYERS`), Caffe types (:data:`META_TYPES`) and parameter initializers
  (:data:`META_PARAMS`), and the sha256 of the source files.

Caffe details reproduced exactly: pooling output sizes (rounding up, minus one when the last
window would start in the padding), the AVE pooling divisor (window clipped at ``H + pad`` before
clipping to the image), MAX pooling over in-image elements only, LRN in both regions, BatchNorm's
scale-factor blob, InnerProduct's flattening from its axis.
"""
from __future__ import annotations

import json
import zlib

import numpy as np

from .. import limits
from ..errors import CnnvisError
from .reader import CaffeNetDef, CaffeWeights, blob_from_proto

META_BLOBS = "cnnvis.caffe.blobs"  # blob -> [tensors holding its successive values]; last = final
META_BLOB_FINAL = "cnnvis.caffe.blob_final"  # blob -> tensor holding its final value
META_LAYERS = "cnnvis.caffe.layers"  # layer -> [output tensors]
META_TYPES = "cnnvis.caffe.types"  # layer -> Caffe type
META_PARAMS = "cnnvis.caffe.params"  # layer -> [initializers of its parameter blobs]
META_PROTOTXT_SHA = "cnnvis.caffe.prototxt_sha256"
META_WEIGHTS_SHA = "cnnvis.caffe.weights_sha256"
META_WEIGHTS = "cnnvis.caffe.weights"  # {"file", "format"} or {"generated", "seed"}
META_NOTES = "cnnvis.caffe.notes"  # [one-line notes on what the conversion changed]: train/test nets
BATCH = "N"
FILLS = ("he", "xavier", "gaussian")

#: Layers that read data from a source (database, files, memory): their first top becomes the net's
#: input, further tops (labels) are not computed.
DATA_LAYERS = ("Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData")
#: Layers of a training net that do not compute a feature: dropped when a train/test net is opened
#: as a deploy net, with the layers that only fed them. (Any other type ending in "Loss" too.)
DROPPED_LAYERS = (
    "Accuracy", "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
    "SigmoidCrossEntropyLoss", "ContrastiveLoss", "Silence", "HDF5Output",
)

SUPPORTED_LAYERS = (
    "Convolution", "Deconvolution", "InnerProduct", "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal",
    "BNLL", "Power", "Pooling", "LRN", "Dropout", "Softmax", "Concat", "Flatten", "Reshape", "Eltwise",
    "BatchNorm", "Scale", "Split", "Slice", "Crop",
) + DATA_LAYERS + DROPPED_LAYERS


def caffe_pool_axis(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool, any_pad: bool):
    """Caffe's pooling geometry along one axis.

    Returns ``(out, pad_end, divisors, starts)``: the output size, the end padding that makes a
    floor-mode ONNX pool produce ``out`` windows starting at ``i*stride - pad``, Caffe's AVE
    divisor of every window and the window starts (in input coordinates).
    """
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # Caffe drops the last window when it would start in the padding (only when padding is on).
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    starts = [i * stride - pad for i in range(max(out, 0))]
    divisors = [min(start + kernel, size + pad) - start for start in starts]
    pad_end = max(0, (out - 1) * stride + kernel - size - pad)
    return out, pad_end, divisors, starts


def is_dropped_type(type_name: str) -> bool:
    """True for the layers a deploy net does not have: losses, Accuracy, Silence, HDF5Output."""
    return type_name in DROPPED_LAYERS or type_name.endswith("Loss")


def parse_input_shape(text) -> tuple:
    """``input_shape`` (the CLI's ``--input-shape``): ``C,H,W`` (or ``N,C,H,W``, ``CxHxW``) as a
    (C, H, W)-like tuple of ints."""
    if isinstance(text, (tuple, list)):
        parts = [str(v) for v in text]
    else:
        parts = [p for p in str(text).replace("x", ",").replace("×", ",").replace(" ", ",").split(",") if p]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if not 1 <= len(dims) <= 4 or any(d <= 0 for d in dims):
        raise CnnvisError(f"input_shape={text}: expected positive sizes such as 3,224,224 (C,H,W) or "
                          "1,3,224,224", params="input_shape")
    return tuple(dims[1:]) if len(dims) == 4 else tuple(dims)


class _Converter:
    def __init__(self, net: CaffeNetDef, weights: CaffeWeights | None, fill: str, seed: int,
                 input_shape=None):
        if fill not in FILLS:
            raise CnnvisError(f"fill {fill!r}: expected one of {', '.join(FILLS)}")
        self.net, self.weights, self.fill, self.seed = net, weights, fill, int(seed)
        self.input_shape = parse_input_shape(input_shape) if input_shape is not None else None
        self.labels = {}  # label blobs of data layers -> data layer name (not computed)
        self.input_notes = []  # how each input's shape was found, for the note of a train/test net
        self.global_stats_forced = []  # BatchNorm layers of a training net using stored statistics
        self.training = False
        self.unused_inputs = set()  # inputs of a train/test net read only by dropped layers
        self.nodes, self.initializers, self.graph_inputs = [], [], []
        self.shapes = {}  # tensor -> shape tuple, dim 0 None (the batch)
        self.blob_tensor = {}  # blob -> tensor holding its current value
        self.blob_history = {}  # blob -> every tensor that held a value of it
        self.layer_tensors, self.layer_types = {}, {}
        self.layer_params = {}  # layer -> initializers holding its Caffe blobs (as used by the graph)
        self.tensor_names, self.node_names = set(), set()
        self.available = {}  # blobs produced and not consumed yet (Caffe's net outputs), in order
        self.reserved = {name for name, _ in net.inputs} | {t for layer in net.layers for t in layer.tops}
        self._per_image_bytes = 0  # inputs and layer outputs of one image so far (the memory budget)

    # ------------------------------------------------------------ naming and emission

    def unique_tensor(self, base: str) -> str:
        name, i = base, 1
        while name in self.tensor_names:
            i += 1
            name = f"{base}_{i}"
        self.tensor_names.add(name)
        return name

    def const(self, base: str, array, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.unique_tensor(base)
        array = np.asarray(array, dtype=dtype)  # keeps 0-d scalars 0-d (ascontiguousarray would not)
        self.initializers.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    def param_const(self, layer, kind: str, array) -> str:
        name = self.const(f"{layer.name}/{kind}", array)
        self.layer_params.setdefault(layer.name, []).append(name)
        return name

    def tmp(self, layer, what: str) -> str:
        return self.unique_tensor(f"{layer.name}/{what}")

    def emit(self, op: str, inputs, outputs, name: str, **attrs):
        from onnx import helper

        base, i = name, 1
        while name in self.node_names:
            i += 1
            name = f"{base}_{i}"
        self.node_names.add(name)
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))

    # ------------------------------------------------------------ parameters

    def params(self, layer, specs):
        """The layer's blobs checked against ``specs`` = [(kind, shape, fan_in)], or generated."""
        expected = [tuple(int(d) for d in shape) for _, shape, _ in specs]
        kinds = [kind for kind, _, _ in specs]
        source, where = None, None
        if len(layer.proto.blobs):  # blobs written into the prototxt itself
            where = self.net.path
            source = [blob_from_proto(b, f"{where}: layer {layer.name!r} blob {i}")
                      for i, b in enumerate(layer.proto.blobs)]
        elif self.weights is not None:
            where = self.weights.path
            source = self.weights.layers.get(layer.name)
            if not source:  # absent, or present without blobs (e.g. saved from another net)
                raise CnnvisError(
                    f"{where}: no weights for layer {layer.name!r} ({layer.type}); expected blobs "
                    f"{_describe(kinds, expected)}. Weights are matched to the prototxt by layer name")
        if source is None:
            return [self._generate(layer, kind, shape, fan_in) for kind, shape, fan_in in
                    zip(kinds, expected, [s[2] for s in specs])]
        if len(source) != len(expected):
            raise CnnvisError(
                f"{where}: layer {layer.name!r} ({layer.type}) has {len(source)} blobs "
                f"{[b.shape for b in source]}; the prototxt needs {len(expected)}: {_describe(kinds, expected)}")
        arrays = []
        for kind, shape, blob in zip(kinds, expected, source):
            if not _shape_matches(blob, shape):
                raise CnnvisError(
                    f"{where}: layer {layer.name!r} ({layer.type}) {kind} blob has shape {blob.shape}, "
                    f"the prototxt needs {shape}")
            arrays.append(blob.array.reshape(shape).astype(np.float32, copy=False))
        return arrays

    def _generate(self, layer, kind, shape, fan_in):
        limits.check(4 * _count(shape),
                     f"{self.net.path}: layer {layer.name!r}: a generated {kind} of shape {_show(shape)}")
        rng = np.random.default_rng([self.seed, zlib.crc32(layer.name.encode("utf-8"))])
        if kind == "weight":
            fan_in = max(int(fan_in), 1)
            # drawn in chunks (the same numbers as one draw) so that Ctrl-C is seen between them
            out = np.empty(_count(shape), np.float32)
            for start in range(0, out.size, _CHUNK):
                part = out[start:start + _CHUNK]
                if self.fill == "xavier":
                    limit = np.sqrt(3.0 / fan_in)
                    part[:] = rng.uniform(-limit, limit, size=part.size)
                else:
                    rng.standard_normal(out=part, dtype=np.float32)
                    part *= np.float32(np.sqrt(2.0 / fan_in) if self.fill == "he" else 0.01)
            return out.reshape(shape)
        constant = {"bias": 0.0, "mean": 0.0, "variance": 1.0, "scale_factor": 1.0, "gamma": 1.0,
                    "beta": 0.0, "slope": 0.25}[kind]
        return np.full(shape, constant, dtype=np.float32)

    # ------------------------------------------------------------ driver

    def plan(self):
        """(layers to convert, dropped layers, pruned layers) of the TEST-phase net.

        A deploy net is converted as it is. A train/test net (data layers, losses, Accuracy) loses
        its losses, Accuracy, Silence and HDF5Output layers, and the layers whose results only
        they used (GoogLeNet's auxiliary classifiers): what remains computes the blobs nothing
        reads (as in a deploy net) and the prediction the last loss or Accuracy layer read.
        """
        layers = list(self.net.layers)
        dropped = [layer for layer in layers if is_dropped_type(layer.type)]
        self.training = bool(dropped) or any(l.type in DATA_LAYERS and l.type != "Input" for l in layers)
        if not dropped:
            return layers, [], []
        labels = {top for l in layers if l.type in DATA_LAYERS and l.type != "Input" for top in l.tops[1:]}
        keep, read_later = [], set()
        for layer in reversed(layers):
            if not is_dropped_type(layer.type):
                keep.extend(t for t in layer.tops if t not in read_later and t not in labels and t not in keep)
            read_later.update(layer.bottoms)
        keep.reverse()
        predictions = [l.bottoms[0] for l in dropped if l.bottoms and l.type not in ("Silence", "HDF5Output")
                       and l.bottoms[0] not in labels]
        if predictions and predictions[-1] not in keep:
            keep.append(predictions[-1])
        needed, kept = set(keep), []
        for layer in reversed(layers):
            if is_dropped_type(layer.type) or not needed.intersection(layer.tops):
                continue
            kept.append(layer)
            needed.difference_update(layer.tops)
            needed.update(layer.bottoms)
        kept.reverse()
        kept_ids = {id(l) for l in kept}
        pruned = [l for l in layers if id(l) not in kept_ids and not is_dropped_type(l.type)]
        # declared inputs that only dropped layers read (a label given as an input)
        read = {b for l in kept for b in l.bottoms}
        declared = [n for n, _ in self.net.inputs] + [t for l in layers if l.type == "Input" for t in l.tops]
        self.unused_inputs = {n for n in declared if n not in read}
        return kept, dropped, pruned

    def run(self):
        layers, dropped, pruned = self.plan()
        inputs_count = len([n for n, _ in self.net.inputs if n not in self.unused_inputs]) + sum(
            len([t for t in l.tops if t not in self.unused_inputs]) if l.type == "Input" else 1
            for l in layers if l.type in DATA_LAYERS)
        if self.input_shape is not None and inputs_count > 1:
            shape = ",".join(str(d) for d in self.input_shape)
            raise CnnvisError(f"{self.net.path}: input_shape={shape} sets the shape of the one net input, but "
                              f"the net has {inputs_count} inputs", params="input_shape")
        for name in sorted(self.unused_inputs):
            self.input_notes.append(f"input {name!r} (read only by dropped layers) left out")
        for name, shape in self.net.inputs:
            if name not in self.unused_inputs:
                self.add_input(name, shape, self.net.path)
        for index, layer in enumerate(layers):
            self.layer_types[layer.name] = layer.type
            if layer.type == "Input":
                self.input_layer(layer)
                continue
            if layer.type in DATA_LAYERS:
                self.data_layer(layer, layers[index + 1:])
                continue
            handler = getattr(self, "layer_" + layer.type, None)
            if handler is None:
                raise CnnvisError(
                    f"{self.net.path}: layer {layer.name!r} has type {layer.type!r}, which cnnvis cannot "
                    f"convert; supported: {', '.join(SUPPORTED_LAYERS)}")
            inputs = []
            for bottom in layer.bottoms:
                if bottom in self.labels and bottom not in self.blob_tensor:
                    raise CnnvisError(
                        f"{self.net.path}: layer {layer.name!r} ({layer.type}) reads {bottom!r}, a label "
                        f"top of data layer {self.labels[bottom]!r}; cnnvis computes the net from its "
                        "image input only")
                if bottom not in self.blob_tensor:
                    excluded = [l.name for l in self.net.excluded if bottom in l.tops]
                    why = (f"; layer {excluded[0]!r} writing it is not in the TEST phase (its include/exclude "
                           "rules)" if excluded else "")
                    raise CnnvisError(f"{self.net.path}: layer {layer.name!r} reads blob {bottom!r}, which "
                                      f"no earlier layer or net input produces{why}")
                inputs.append(self.blob_tensor[bottom])
            outputs = self.top_tensors(layer)
            shapes = handler(layer, inputs, [self.shapes[t] for t in inputs], outputs)
            for bottom in layer.bottoms:
                self.available.pop(bottom, None)
            self.bind(layer, outputs, shapes)
        notes = [self.training_note(dropped, pruned)] if self.training else []
        return self.build(notes)

    def training_note(self, dropped, pruned) -> str:
        """One line on how a train/test net became a deploy net."""
        parts = [f"{self.net.path}: train/test net opened as a deploy net (phase TEST)"]
        parts.extend(self.input_notes)
        if dropped:
            kinds = sorted({l.type for l in dropped})
            text = f"dropped {len(dropped)} layer(s) a deploy net does not have ({', '.join(kinds)})"
            if pruned:
                text += f" and {len(pruned)} layer(s) that only fed them"
            parts.append(text)
        if self.global_stats_forced:
            parts.append(f"{len(self.global_stats_forced)} BatchNorm layer(s) with use_global_stats: false "
                         "use their stored statistics")
        input_names = {vi.name for vi in self.graph_inputs}
        outputs = [t for t in self.available.values() if t not in input_names]
        if outputs:
            parts.append("output " + ", ".join(repr(t) for t in outputs))
        return "; ".join(parts)

    def top_tensors(self, layer):
        names = []
        for i, top in enumerate(layer.tops):
            in_place = top in self.blob_tensor or top in names
            if not in_place and top not in self.tensor_names:
                names.append(self.unique_tensor(top))
            elif (len(layer.tops) == 1 and layer.name not in self.tensor_names
                  and layer.name not in self.reserved):
                names.append(self.unique_tensor(layer.name))
            else:
                names.append(self.unique_tensor(f"{layer.name}/{top}"))
        return names

    def bind(self, layer, outputs, shapes):
        if len(shapes) != len(outputs):  # pragma: no cover - a handler bug
            raise AssertionError(f"{layer.name}: {len(shapes)} shapes for {len(outputs)} outputs")
        for top, tensor, shape in zip(layer.tops, outputs, shapes):
            self.shapes[tensor] = tuple(shape)
            self.blob_tensor[top] = tensor
            self.blob_history.setdefault(top, []).append(tensor)
            self.available.pop(top, None)
            self.available[top] = tensor
            self._per_image_bytes += 4 * _count(shape[1:])
        self.layer_tensors[layer.name] = list(outputs)
        limits.check(self._per_image_bytes, f"{self.net.path}: layer {layer.name!r} (outputs "
                     f"{', '.join(_show(s) for s in shapes)}): the activations of one image")

    def add_input(self, name, shape, where):
        from onnx import TensorProto, helper

        if self.input_shape is not None:
            shape = (1,) + self.input_shape
        shape = tuple(int(d) for d in shape)
        if len(shape) < 1 or any(d <= 0 for d in shape):
            raise CnnvisError(f"{where}: input {name!r} has shape {shape}; expected positive dimensions")
        if name in self.blob_tensor:
            raise CnnvisError(f"{where}: input blob {name!r} is declared twice")
        self.tensor_names.add(name)
        self._per_image_bytes += 4 * _count(shape[1:])
        limits.check(self._per_image_bytes, f"{where}: input {name!r} of shape {_show(shape)}, one image")
        dims = [BATCH] + list(shape[1:])
        self.graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        self.shapes[name] = (None,) + shape[1:]
        self.blob_tensor[name] = name
        self.blob_history[name] = [name]
        self.available[name] = name

    def input_layer(self, layer):
        shapes = list(layer.param("input_param").shape)
        if not shapes:
            raise CnnvisError(f"{self.net.path}: Input layer {layer.name!r} has no input_param shape")
        if len(shapes) not in (1, len(layer.tops)):
            raise CnnvisError(f"{self.net.path}: Input layer {layer.name!r} has {len(layer.tops)} tops "
                              f"but {len(shapes)} shapes")
        for i, top in enumerate(layer.tops):
            if top in self.unused_inputs:
                continue
            shape = shapes[i if len(shapes) > 1 else 0]
            self.add_input(top, tuple(shape.dim), f"{self.net.path}: layer {layer.name!r}")
        self.layer_tensors[layer.name] = [t for t in layer.tops if t not in self.unused_inputs]

    def data_layer(self, layer, later):
        """A data layer's first top becomes the net's input; its other tops are labels."""
        if not layer.tops:
            self.fail(layer, "a data layer needs a top blob")
        if self.input_shape is not None:
            shape, how = (1,) + self.input_shape, "--input-shape"
        else:
            shape, how = self.data_shape(layer, later)
        self.add_input(layer.tops[0], shape, f"{self.net.path}: layer {layer.name!r}")
        for top in layer.tops[1:]:
            self.labels[top] = layer.name
        self.layer_tensors[layer.name] = [layer.tops[0]]
        self.input_notes.append(f"input {layer.tops[0]!r} {'x'.join(str(d) for d in shape[1:])} from {how}")

    def data_shape(self, layer, later):
        """(1, C, H, W) of a data layer's images and where it came from, or a CnnvisError asking
        for input_shape."""
        kind = layer.type

        def ask(missing):
            raise CnnvisError(f"{self.net.path}: layer {layer.name!r} ({kind}): {missing}; give the input "
                              "shape as input_shape=C,H,W", params="input_shape")

        if kind == "DummyData":
            p = layer.param("dummy_data_param")
            if len(p.shape):
                return (1,) + tuple(int(d) for d in p.shape[0].dim[1:]), f"layer {layer.name!r} (DummyData shape)"
            if len(p.channels) and len(p.height) and len(p.width):
                return (1, int(p.channels[0]), int(p.height[0]), int(p.width[0])), \
                    f"layer {layer.name!r} (DummyData channels/height/width)"
            ask("no shape in dummy_data_param")
        if kind == "MemoryData":
            p = layer.param("memory_data_param")
            dims = (int(p.channels), int(p.height), int(p.width))
            if min(dims) <= 0:
                ask("memory_data_param gives no channels/height/width")
            return (1,) + dims, f"layer {layer.name!r} (MemoryData)"
        if kind == "HDF5Data":
            ask("the image shape is stored in the HDF5 files, not in the prototxt")
        transform = layer.param("transform_param") if "transform_param" in layer.proto.DESCRIPTOR.fields_by_name \
            else None
        crop = int(transform.crop_size) if transform is not None else 0
        mean_file = transform.mean_file if transform is not None and transform.HasField("mean_file") else ""
        mean_values = len(transform.mean_value) if transform is not None else 0
        channels = height = None
        used = []
        if kind == "Data":
            p = layer.param("data_param")
            crop = crop or int(p.crop_size)
            mean_file = mean_file or (p.mean_file if p.HasField("mean_file") else "")
            if transform is not None and (transform.force_color or transform.force_gray):
                channels = 3 if transform.force_color else 1
                used.append("force_color" if transform.force_color else "force_gray")
        elif kind == "ImageData":
            p = layer.param("image_data_param")
            crop = crop or int(p.crop_size)
            channels = 3 if p.is_color else 1
            used.append("is_color")
            if not crop and p.new_height > 0 and p.new_width > 0:
                height = (int(p.new_height), int(p.new_width))
                used.append("new_height/new_width")
        elif kind == "WindowData":
            p = layer.param("window_data_param")
            crop = crop or int(p.crop_size)
            channels = 3  # windows are cut from colour images
        if crop:
            height = (crop, crop)
            used.append("crop_size")
        if mean_file and (channels is None or height is None):
            found = self._mean_file(mean_file)
            if found is not None:
                channels = channels or int(found.shape[0])
                height = height or tuple(int(d) for d in found.shape[1:])
                used.append(f"mean_file {mean_file}")
        if channels is None and mean_values > 1:
            channels = mean_values
            used.append("mean_value")
        if channels is None:
            channels = self._channels_from_weights(layer.tops[0], later)
            if channels is not None:
                used.append("the first convolution's weights")
        if height is None:
            ask("the image size is not in the prototxt (no crop_size)")
        if channels is None:
            ask("the number of channels is not in the prototxt")
        return (1, channels) + tuple(height), f"{', '.join(used)} of layer {layer.name!r} ({kind})"

    def _mean_file(self, name):
        from pathlib import Path

        from .reader import read_mean_binaryproto

        for candidate in (Path(name), Path(self.net.path).parent / name):
            if candidate.is_file():
                return read_mean_binaryproto(candidate)
        return None

    def _channels_from_weights(self, blob, later):
        """Input channels of the first convolution reading ``blob``: its weight blob's dimension 1
        times the group (None without weights)."""
        for layer in later:
            if blob in layer.tops and blob not in layer.bottoms:
                return None  # overwritten before any convolution reads it
            if blob not in layer.bottoms:
                continue
            if layer.type != "Convolution":
                return None
            source = list(layer.proto.blobs)
            if source:
                blobs = [blob_from_proto(b, f"{self.net.path}: layer {layer.name!r} blob {i}")
                         for i, b in enumerate(source)]
            elif self.weights is not None:
                blobs = self.weights.layers.get(layer.name) or []
            else:
                return None
            if not blobs or len(blobs[0].shape) < 2:
                return None
            return int(blobs[0].shape[1]) * int(layer.param("convolution_param").group)
        return None

    def build(self, notes=()):
        from onnx import TensorProto, helper

        from ..onnxgraph import make_model

        if not self.nodes:
            raise CnnvisError(f"{self.net.path}: the net has no layers to convert")
        outputs = []
        input_names = {vi.name for vi in self.graph_inputs}
        for blob, tensor in self.available.items():
            if tensor in input_names:
                continue
            shape = self.shapes[tensor]
            outputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, [BATCH] + list(shape[1:])))
        output_names = {vi.name for vi in outputs}
        value_info = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [BATCH] + list(s[1:]))
                      for t, s in self.shapes.items() if t not in input_names and t not in output_names]
        graph = helper.make_graph(self.nodes, self.net.name or "caffe_net", self.graph_inputs, outputs,
                                  self.initializers, value_info=value_info)
        model = make_model(graph)
        helper.set_model_props(model, {
            META_BLOBS: json.dumps(self.blob_history),
            META_BLOB_FINAL: json.dumps(self.blob_tensor),
            META_LAYERS: json.dumps(self.layer_tensors),
            META_TYPES: json.dumps(self.layer_types),
            META_PARAMS: json.dumps(self.layer_params),
            **({META_NOTES: json.dumps(list(notes))} if notes else {}),
        })
        return model

    # ------------------------------------------------------------ helpers for handlers

    def need(self, layer, inputs, count, shapes=None, min_rank=None):
        if count is not None and len(inputs) != count:
            raise CnnvisError(f"{self.net.path}: layer {layer.name!r} ({layer.type}) needs {count} bottom "
                              f"blob(s), has {len(inputs)}")
        if min_rank is not None:
            for s in shapes:
                if len(s) < min_rank:
                    raise CnnvisError(f"{self.net.path}: layer {layer.name!r} ({layer.type}) needs a "
                                      f"{min_rank}-D or larger input, got shape {_show(s)}")

    def elementwise(self, layer, inputs, shapes, outputs, op: str, **attrs):
        """A one-bottom, one-top layer that is the ONNX op ``op`` applied to each element."""
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        self.emit(op, inputs, outputs, layer.name, **attrs)
        return [shapes[0]]

    def need_tops(self, layer, count):
        if len(layer.tops) != count:
            raise CnnvisError(f"{self.net.path}: layer {layer.name!r} ({layer.type}) needs {count} top "
                              f"blob(s), has {len(layer.tops)}")

    def axis(self, layer, axis, rank, what="axis", allow_batch=False):
        if not -rank <= axis < rank:
            raise CnnvisError(f"{self.net.path}: layer {layer.name!r} {what} {axis} is out of range for a "
                              f"{rank}-D input")
        axis = axis + rank if axis < 0 else axis
        if axis == 0 and not allow_batch:
            raise CnnvisError(f"{self.net.path}: layer {layer.name!r} ({layer.type}) works across the batch "
                              f"axis ({what} 0); cnnvis converts nets whose images are independent")
        return axis

    def fail(self, layer, message):
        raise CnnvisError(f"{self.net.path}: layer {layer.name!r} ({layer.type}): {message}")

    # ------------------------------------------------------------ layers

    def _geometry(self, layer, p, nsp):
        def expand(values, default, what):
            values = [int(v) for v in values]
            if not values:
                if default is None:
                    self.fail(layer, f"{what} is required")
                return [default] * nsp
            if len(values) == 1:
                return values * nsp
            if len(values) != nsp:
                self.fail(layer, f"{what} has {len(values)} values for {nsp} spatial axes")
            return values

        def pair(h, w, repeated, default, what):
            if p.HasField(h) or p.HasField(w):
                if nsp != 2:
                    self.fail(layer, f"{h}/{w} can only be used for 2-D convolution")
                if len(repeated):
                    self.fail(layer, f"either {what} or {h}/{w} should be given, not both")
                if what == "kernel_size" and not (p.HasField(h) and p.HasField(w)):
                    self.fail(layer, "kernel_h and kernel_w must be given together")
                return [int(getattr(p, h)), int(getattr(p, w))]
            return expand(repeated, default, what)

        kernel = pair("kernel_h", "kernel_w", p.kernel_size, None, "kernel_size")
        pad = pair("pad_h", "pad_w", p.pad, 0, "pad")
        stride = pair("stride_h", "stride_w", p.stride, 1, "stride")
        dilation = expand(p.dilation, 1, "dilation")
        if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0:
            self.fail(layer, f"kernel {kernel}, stride {stride} and dilation {dilation} must be positive")
        return kernel, pad, stride, dilation

    def _conv_common(self, layer, inputs, shapes, deconv):
        self.need(layer, inputs, 1, shapes, min_rank=3)
        self.need_tops(layer, 1)
        p = layer.param("convolution_param")
        shape = shapes[0]
        if p.axis not in (1, 1 - len(shape)):
            self.fail(layer, f"axis {p.axis}: only channel axis 1 is supported")
        nsp = len(shape) - 2
        kernel, pad, stride, dilation = self._geometry(layer, p, nsp)
        channels, num_output, group = shape[1], int(p.num_output), int(p.group)
        if num_output <= 0:
            self.fail(layer, "num_output must be positive")
        if group <= 0 or channels % group or num_output % group:
            self.fail(layer, f"group {group} must divide the {channels} input channels and num_output {num_output}")
        extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        if deconv:
            out = [s * (i - 1) + e - 2 * q for i, s, e, q in zip(shape[2:], stride, extent, pad)]
            wshape = (channels, num_output // group, *kernel)
            fan_in = num_output // group * int(np.prod(kernel))
        else:
            out = [(i + 2 * q - e) // s + 1 for i, s, e, q in zip(shape[2:], stride, extent, pad)]
            wshape = (num_output, channels // group, *kernel)
            fan_in = channels // group * int(np.prod(kernel))
        if min(out) <= 0:
            self.fail(layer, f"input {_show(shape)} gives an empty output {out}")
        specs = [("weight", wshape, fan_in)]
        if p.bias_term:
            specs.append(("bias", (num_output,), 1))
        arrays = self.params(layer, specs)
        names = [self.param_const(layer, "weight", arrays[0])]
        if p.bias_term:
            names.append(self.param_const(layer, "bias", arrays[1]))
        attrs = dict(kernel_shape=kernel, strides=stride, pads=pad + pad, dilations=dilation, group=group)
        return inputs[0], names, attrs, (None, num_output, *out)

    def layer_Convolution(self, layer, inputs, shapes, outputs):
        x, params, attrs, out = self._conv_common(layer, inputs, shapes, deconv=False)
        self.emit("Conv", [x] + params, outputs, layer.name, **attrs)
        return [out]

    def layer_Deconvolution(self, layer, inputs, shapes, outputs):
        x, params, attrs, out = self._conv_common(layer, inputs, shapes, deconv=True)
        self.emit("ConvTranspose", [x] + params, outputs, layer.name, **attrs)
        return [out]

    def layer_InnerProduct(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1, shapes, min_rank=2)
        self.need_tops(layer, 1)
        p = layer.param("inner_product_param")
        shape = shapes[0]
        axis = self.axis(layer, int(p.axis), len(shape))
        k = int(np.prod(shape[axis:]))
        n = int(p.num_output)
        if n <= 0:
            self.fail(layer, "num_output must be positive")
        transpose = bool(p.transpose)
        specs = [("weight", (k, n) if transpose else (n, k), k)]
        if p.bias_term:
            specs.append(("bias", (n,), 1))
        arrays = self.params(layer, specs)
        x = inputs[0]
        if axis == 1:
            if len(shape) > 2:
                flat = self.tmp(layer, "flatten")
                self.emit("Flatten", [x], [flat], f"{layer.name}/flatten", axis=1)
                x = flat
            gemm_inputs = [x, self.param_const(layer, "weight", arrays[0])]
            if p.bias_term:
                gemm_inputs.append(self.param_const(layer, "bias", arrays[1]))
            self.emit("Gemm", gemm_inputs, outputs, layer.name, transB=0 if transpose else 1)
        else:
            # y[..., :] = x.reshape(leading dims, K) @ W.T + b, leading dims kept as they are.
            target = self.const(f"{layer.name}/shape", [0] * axis + [k], dtype=np.int64)
            flat = self.tmp(layer, "flatten")
            self.emit("Reshape", [x, target], [flat], f"{layer.name}/flatten")
            weight = arrays[0] if transpose else arrays[0].T
            w_name = self.param_const(layer, "weight", weight)
            if p.bias_term:
                product = self.tmp(layer, "matmul")
                self.emit("MatMul", [flat, w_name], [product], f"{layer.name}/matmul")
                self.emit("Add", [product, self.param_const(layer, "bias", arrays[1])], outputs, layer.name)
            else:
                self.emit("MatMul", [flat, w_name], outputs, layer.name)
        return [tuple(shape[:axis]) + (n,)]

    def layer_ReLU(self, layer, inputs, shapes, outputs):
        slope = float(layer.param("relu_param").negative_slope)
        if slope == 0.0:
            return self.elementwise(layer, inputs, shapes, outputs, "Relu")
        return self.elementwise(layer, inputs, shapes, outputs, "LeakyRelu", alpha=slope)

    def layer_PReLU(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1, shapes, min_rank=2)
        self.need_tops(layer, 1)
        shared = bool(layer.param("prelu_param").channel_shared)
        shape = shapes[0]
        channels = 1 if shared else shape[1]
        (slope,) = self.params(layer, [("slope", (channels,), 1)])
        # (C, 1, 1, ...) broadcasts over the channel axis of an N-D input.
        slope = slope.reshape((channels,) + (1,) * (len(shape) - 2)) if not shared else slope
        self.emit("PRelu", [inputs[0], self.param_const(layer, "slope", slope)], outputs, layer.name)
        return [shape]

    def layer_Sigmoid(self, layer, inputs, shapes, outputs):
        return self.elementwise(layer, inputs, shapes, outputs, "Sigmoid")

    def layer_TanH(self, layer, inputs, shapes, outputs):
        return self.elementwise(layer, inputs, shapes, outputs, "Tanh")

    def layer_Dropout(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        # Identity at inference (Caffe scales during training only), like ONNX Dropout.
        ratio = self.const(f"{layer.name}/ratio", np.float32(layer.param("dropout_param").dropout_ratio))
        self.emit("Dropout", [inputs[0], ratio], outputs, layer.name)
        return [shapes[0]]

    def layer_Pooling(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        shape = shapes[0]
        if len(shape) != 4:
            self.fail(layer, f"Caffe pools 4-D blobs, got shape {_show(shape)}")
        p = layer.param("pooling_param")
        method = p.DESCRIPTOR.fields_by_name["pool"].enum_type.values_by_number[p.pool].name
        if method not in ("MAX", "AVE"):
            self.fail(layer, f"pool {method} is not supported (MAX and AVE are)")
        height, width = shape[2], shape[3]
        ceil_mode = True
        if "round_mode" in p.DESCRIPTOR.fields_by_name and p.HasField("round_mode"):
            ceil_mode = p.round_mode == 0
        if p.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                self.fail(layer, "global_pooling takes no kernel size")
            if p.pad or p.pad_h or p.pad_w or p.stride != 1 or p.stride_h > 1 or p.stride_w > 1:
                self.fail(layer, "global_pooling needs pad 0 and stride 1")
            self.emit("GlobalMaxPool" if method == "MAX" else "GlobalAveragePool", inputs, outputs, layer.name)
            return [(None, shape[1], 1, 1)]
        if p.HasField("kernel_size") == (p.HasField("kernel_h") and p.HasField("kernel_w")):
            self.fail(layer, "give kernel_size or kernel_h and kernel_w (exactly one of them)")
        kh, kw = (p.kernel_size, p.kernel_size) if p.HasField("kernel_size") else (p.kernel_h, p.kernel_w)
        ph, pw = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        sh, sw = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        if min(kh, kw, sh, sw) <= 0:
            self.fail(layer, "kernel and stride must be positive")
        if ph >= kh or pw >= kw:
            self.fail(layer, f"pad ({ph}, {pw}) must be smaller than the kernel ({kh}, {kw})")
        any_pad = bool(ph or pw)
        out_h, pe_h, div_h, starts_h = caffe_pool_axis(height, kh, sh, ph, ceil_mode, any_pad)
        out_w, pe_w, div_w, starts_w = caffe_pool_axis(width, kw, sw, pw, ceil_mode, any_pad)
        if out_h <= 0 or out_w <= 0:
            self.fail(layer, f"input {_show(shape)} gives an empty output ({out_h}, {out_w})")
        if starts_h[-1] >= height or starts_w[-1] >= width:
            self.fail(layer, f"the last pooling window starts outside the {height}x{width} input (stride "
                             "larger than the kernel without padding); Caffe's value there is undefined")
        attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, pe_h, pe_w])
        out_shape = (None, shape[1], out_h, out_w)
        if method == "MAX":
            # ONNX MaxPool ignores padded positions, as Caffe takes the max over in-image elements.
            self.emit("MaxPool", inputs, outputs, layer.name, **attrs)
            return [out_shape]
        # Caffe divides the in-image sum by the window clipped at H + pad (not at H): pool the
        # zero-padded sum (average with the full kernel counted) and rescale by kh*kw / divisor.
        factor = (kh * kw) / np.outer(np.asarray(div_h, np.float64), np.asarray(div_w, np.float64))
        if np.all(factor == 1.0):
            self.emit("AveragePool", inputs, outputs, layer.name, count_include_pad=1, **attrs)
            return [out_shape]
        pooled = self.tmp(layer, "sum_pool")
        self.emit("AveragePool", inputs, [pooled], f"{layer.name}/sum_pool", count_include_pad=1, **attrs)
        self.emit("Mul", [pooled, self.const(f"{layer.name}/divisor_scale", factor)], outputs, layer.name)
        return [out_shape]

    def layer_LRN(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        shape = shapes[0]
        if len(shape) != 4:
            self.fail(layer, f"Caffe's LRN needs a 4-D blob, got shape {_show(shape)}")
        p = layer.param("lrn_param")
        size = int(p.local_size)
        if size % 2 == 0:
            self.fail(layer, f"local_size {size} must be odd (as in Caffe)")
        region = p.DESCRIPTOR.fields_by_name["norm_region"].enum_type.values_by_number[p.norm_region].name
        alpha, beta = float(p.alpha), float(p.beta)
        if region == "ACROSS_CHANNELS":
            self.emit("LRN", inputs, outputs, layer.name, size=size, alpha=alpha, beta=beta, bias=float(p.k))
            return [shape]
        # WITHIN_CHANNEL: y = x * (1 + alpha/n^2 * sum_{n x n, zero padded} x^2)^(-beta); k is unused.
        # Caffe builds it from a stride-1 AVE pool with pad (n-1)/2, whose windows all count n^2.
        x = inputs[0]
        half = (size - 1) // 2
        square = self.tmp(layer, "square")
        self.emit("Mul", [x, x], [square], f"{layer.name}/square")
        mean = self.tmp(layer, "window_mean")
        self.emit("AveragePool", [square], [mean], f"{layer.name}/window_mean", kernel_shape=[size, size],
                  strides=[1, 1], pads=[half] * 4, count_include_pad=1)
        scaled = self.tmp(layer, "scaled")
        self.emit("Mul", [mean, self.const(f"{layer.name}/alpha", np.float32(alpha))], [scaled],
                  f"{layer.name}/scaled")
        shifted = self.tmp(layer, "shifted")
        self.emit("Add", [scaled, self.const(f"{layer.name}/one", np.float32(1.0))], [shifted],
                  f"{layer.name}/shifted")
        power = self.tmp(layer, "power")
        self.emit("Pow", [shifted, self.const(f"{layer.name}/minus_beta", np.float32(-beta))], [power],
                  f"{layer.name}/power")
        self.emit("Mul", [x, power], outputs, layer.name)
        return [shape]

    def layer_Softmax(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        p = layer.param("softmax_param")
        axis = self.axis(layer, int(p.axis), len(shapes[0]), allow_batch=False)
        self.emit("Softmax", inputs, outputs, layer.name, axis=axis)
        return [shapes[0]]

    def layer_Concat(self, layer, inputs, shapes, outputs):
        self.need_tops(layer, 1)
        if not inputs:
            self.fail(layer, "needs at least one bottom blob")
        p = layer.param("concat_param")
        rank = len(shapes[0])
        raw_axis = int(p.axis) if p.HasField("axis") or not p.HasField("concat_dim") else int(p.concat_dim)
        axis = self.axis(layer, raw_axis, rank)
        for s in shapes[1:]:
            if len(s) != rank or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
                self.fail(layer, f"bottom shapes {[_show(x) for x in shapes]} differ outside axis {axis}")
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        self.emit("Concat", inputs, outputs, layer.name, axis=axis)
        return [tuple(out)]

    def layer_Flatten(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        p = layer.param("flatten_param")
        shape = shapes[0]
        axis = self.axis(layer, int(p.axis), len(shape))
        end = self.axis(layer, int(p.end_axis), len(shape), what="end_axis", allow_batch=True)
        if end < axis:
            self.fail(layer, f"end_axis {p.end_axis} comes before axis {p.axis}")
        out = tuple(shape[:axis]) + (int(np.prod(shape[axis:end + 1])),) + tuple(shape[end + 1:])
        if axis == 1 and end == len(shape) - 1:
            self.emit("Flatten", inputs, outputs, layer.name, axis=1)
        else:
            target = self.const(f"{layer.name}/shape", [0] + list(out[1:]), dtype=np.int64)
            self.emit("Reshape", [inputs[0], target], outputs, layer.name)
        return [out]

    def layer_Reshape(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        p = layer.param("reshape_param")
        shape = shapes[0]
        rank = len(shape)
        spec = [int(d) for d in p.shape.dim]
        start = int(p.axis)
        if not -(rank + 1) <= start <= rank:
            self.fail(layer, f"axis {p.axis} is out of range for a {rank}-D input")
        start = start + rank + 1 if start < 0 else start
        end = rank if p.num_axes == -1 else start + int(p.num_axes)
        if p.num_axes < -1 or end > rank:
            self.fail(layer, f"num_axes {p.num_axes} does not fit a {rank}-D input from axis {start}")
        if spec.count(-1) > 1 or any(d < -1 for d in spec):
            self.fail(layer, f"shape {spec}: at most one -1 and no other negative values")
        middle = []
        for i, d in enumerate(spec):
            if d == 0:
                if start + i >= rank:
                    self.fail(layer, f"shape {spec}: dim {i} copies input axis {start + i}, which does not exist")
                middle.append(shape[start + i])
            else:
                middle.append(d)
        out = list(shape[:start]) + middle + list(shape[end:])
        replaced = list(shape[start:end])
        if -1 in middle:
            known_in = [d for d in replaced if d is not None]
            known_out = [d for d in middle if d not in (-1, None)]
            if None in replaced and None not in middle:
                # The batch is merged into the inferred dimension: fine only when it is alone there.
                if int(np.prod(known_in)) != int(np.prod(known_out)) or middle.index(-1) + start != 0:
                    self.fail(layer, f"shape {spec} mixes the batch axis with other axes")
                out[start + middle.index(-1)] = None
            else:
                total = int(np.prod(known_in))
                part = int(np.prod(known_out))
                if part == 0 or total % part:
                    self.fail(layer, f"shape {spec} does not fit input {_show(shape)}")
                out[start + middle.index(-1)] = total // part
        if out[0] is not None or any(d is None for d in out[1:]):
            self.fail(layer, f"shape {spec} moves or changes the batch axis of input {_show(shape)}")
        if int(np.prod(out[1:])) != int(np.prod(shape[1:])):
            self.fail(layer, f"shape {spec} gives {_show(out)}, which does not hold the {_show(shape)} input")
        target = self.const(f"{layer.name}/shape", [0] + list(out[1:]), dtype=np.int64)
        self.emit("Reshape", [inputs[0], target], outputs, layer.name)
        return [tuple(out)]

    def layer_Eltwise(self, layer, inputs, shapes, outputs):
        self.need_tops(layer, 1)
        if len(inputs) < 2:
            self.fail(layer, "needs at least two bottom blobs")
        if any(s != shapes[0] for s in shapes):
            self.fail(layer, f"bottom shapes differ: {[_show(s) for s in shapes]}")
        p = layer.param("eltwise_param")
        op = p.DESCRIPTOR.fields_by_name["operation"].enum_type.values_by_number[p.operation].name
        coeff = [float(c) for c in p.coeff]
        if coeff and op != "SUM":
            self.fail(layer, "coefficients are only allowed for SUM")
        if coeff and len(coeff) != len(inputs):
            self.fail(layer, f"{len(coeff)} coefficients for {len(inputs)} bottom blobs")
        if op == "MAX":
            self.emit("Max", inputs, outputs, layer.name)
            return [shapes[0]]
        terms = list(inputs)
        if op == "SUM" and coeff:
            for i, c in enumerate(coeff):
                if c != 1.0:
                    scaled = self.tmp(layer, f"scaled{i}")
                    self.emit("Mul", [terms[i], self.const(f"{layer.name}/coeff{i}", np.float32(c))], [scaled],
                              f"{layer.name}/scaled{i}")
                    terms[i] = scaled
        binary = "Add" if op == "SUM" else "Mul"
        acc = terms[0]
        for i, term in enumerate(terms[1:], start=1):
            last = i == len(terms) - 1
            out = outputs[0] if last else self.tmp(layer, f"partial{i}")
            self.emit(binary, [acc, term], [out], layer.name if last else f"{layer.name}/partial{i}")
            acc = out
        return [shapes[0]]

    def layer_BatchNorm(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1, shapes, min_rank=2)
        self.need_tops(layer, 1)
        p = layer.param("batch_norm_param")
        if p.HasField("use_global_stats") and not p.use_global_stats:
            if not self.training:
                self.fail(layer, "use_global_stats: false normalises with the statistics of each batch; "
                                 "cnnvis converts the inference form (stored statistics)")
            # a training net's setting: its deploy net uses the stored statistics (said in the note)
            self.global_stats_forced.append(layer.name)
        channels = shapes[0][1]
        mean, var, factor = self.params(layer, [("mean", (channels,), 1), ("variance", (channels,), 1),
                                                ("scale_factor", (1,), 1)])
        # Caffe stores running sums; the statistics are the sums times 1/scale_factor (0 stays 0).
        f = np.float32(0.0 if factor[0] == 0 else 1.0 / factor[0])
        self.emit("BatchNormalization", [
            inputs[0],
            self.const(f"{layer.name}/unit_scale", np.ones(channels)),
            self.const(f"{layer.name}/zero_bias", np.zeros(channels)),
            self.param_const(layer, "mean", mean * f),
            self.param_const(layer, "variance", var * f),
        ], outputs, layer.name, epsilon=float(p.eps))
        return [shapes[0]]

    def layer_Scale(self, layer, inputs, shapes, outputs):
        if len(inputs) not in (1, 2):
            self.fail(layer, f"needs one or two bottom blobs, has {len(inputs)}")
        self.need_tops(layer, 1)
        p = layer.param("scale_param")
        shape = shapes[0]
        if len(inputs) == 2:
            return self._scale_by_blob(layer, p, inputs, shapes, outputs)
        axis = self.axis(layer, int(p.axis), len(shape))
        num_axes = int(p.num_axes)
        if num_axes < -1 or (num_axes >= 0 and axis + num_axes > len(shape)):
            self.fail(layer, f"num_axes {num_axes} does not fit a {len(shape)}-D input from axis {axis}")
        end = len(shape) if num_axes == -1 else axis + num_axes
        pshape = tuple(shape[axis:end])
        specs = [("gamma", pshape, 1)] + ([("beta", pshape, 1)] if p.bias_term else [])
        arrays = self.params(layer, specs)
        # Trailing ones make the parameter broadcast from `axis` of the input.
        bshape = pshape + (1,) * (len(shape) - end)
        gamma = self.param_const(layer, "gamma", arrays[0].reshape(bshape))
        if not p.bias_term:
            self.emit("Mul", [inputs[0], gamma], outputs, layer.name)
            return [shape]
        scaled = self.tmp(layer, "scaled")
        self.emit("Mul", [inputs[0], gamma], [scaled], f"{layer.name}/scaled")
        self.emit("Add", [scaled, self.param_const(layer, "beta", arrays[1].reshape(bshape))], outputs, layer.name)
        return [shape]

    def _scale_by_blob(self, layer, p, inputs, shapes, outputs):
        # Caffe's ScaleLayer with two bottoms: y = x * s (+ bias blob), s covering the axes of x
        # from `axis` on (num_axes is not used); axis 0 multiplies image by image.
        shape, sshape = shapes
        axis = self.axis(layer, int(p.axis), len(shape), allow_batch=True)
        end = axis + len(sshape)
        if end > len(shape) or any(a != b for a, b in zip(shape[axis:end], sshape)):
            self.fail(layer, f"scale blob of shape {_show(sshape)} does not match input {_show(shape)} "
                             f"from axis {axis}")
        if axis == 0 and not sshape:
            self.fail(layer, "an empty scale blob")
        trailing = len(shape) - end
        scale = inputs[1]
        if trailing:
            target = self.const(f"{layer.name}/scale_shape", [0] * len(sshape) + [1] * trailing, dtype=np.int64)
            scale = self.tmp(layer, "scale_broadcast")
            self.emit("Reshape", [inputs[1], target], [scale], f"{layer.name}/scale_broadcast")
        if not p.bias_term:
            self.emit("Mul", [inputs[0], scale], outputs, layer.name)
            return [shape]
        if axis == 0:
            self.fail(layer, "a bias blob along the batch axis")
        pshape = tuple(sshape)
        (beta,) = self.params(layer, [("beta", pshape, 1)])
        scaled = self.tmp(layer, "scaled")
        self.emit("Mul", [inputs[0], scale], [scaled], f"{layer.name}/scaled")
        self.emit("Add", [scaled, self.param_const(layer, "beta", beta.reshape(pshape + (1,) * trailing))],
                  outputs, layer.name)
        return [shape]

    def layer_ELU(self, layer, inputs, shapes, outputs):
        # y = x for x > 0, alpha * (exp(x) - 1) otherwise: ONNX Elu.
        return self.elementwise(layer, inputs, shapes, outputs, "Elu", alpha=float(layer.param("elu_param").alpha))

    def layer_AbsVal(self, layer, inputs, shapes, outputs):
        return self.elementwise(layer, inputs, shapes, outputs, "Abs")

    def layer_BNLL(self, layer, inputs, shapes, outputs):
        # Caffe's binomial normal log likelihood, log(1 + exp(x)): ONNX Softplus.
        return self.elementwise(layer, inputs, shapes, outputs, "Softplus")

    def layer_Crop(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 2)
        self.need_tops(layer, 1)
        p = layer.param("crop_param")
        shape, ref = shapes
        if len(ref) != len(shape):
            self.fail(layer, f"bottoms of ranks {len(shape)} and {len(ref)}; Caffe crops blobs of one rank")
        axis = self.axis(layer, int(p.axis), len(shape))
        offsets = [int(v) for v in p.offset]
        count = len(shape) - axis
        if len(offsets) not in (0, 1, count):
            self.fail(layer, f"{len(offsets)} offsets for the {count} cropped axes (give 0, 1 or {count})")
        offsets = offsets * count if len(offsets) == 1 else (offsets or [0] * count)
        out = list(shape[:axis]) + list(ref[axis:])
        for i, (size, want, offset) in enumerate(zip(shape[axis:], ref[axis:], offsets)):
            if offset + want > size:
                self.fail(layer, f"axis {axis + i}: offset {offset} + size {want} exceeds the input size {size}")
        axes = list(range(axis, len(shape)))
        starts = self.const(f"{layer.name}/starts", offsets, dtype=np.int64)
        ends = self.const(f"{layer.name}/ends", [o + w for o, w in zip(offsets, ref[axis:])], dtype=np.int64)
        self.emit("Slice", [inputs[0], starts, ends, self.const(f"{layer.name}/axes", axes, dtype=np.int64)],
                  outputs, layer.name)
        return [tuple(out)]

    def layer_Split(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        if not outputs:
            self.fail(layer, "needs at least one top blob")
        for i, out in enumerate(outputs):
            self.emit("Identity", inputs, [out], layer.name if i == 0 else f"{layer.name}/{i}")
        return [shapes[0]] * len(outputs)

    def layer_Power(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        self.need_tops(layer, 1)
        p = layer.param("power_param")
        power, scale, shift = float(p.power), float(p.scale), float(p.shift)
        steps = []  # y = (shift + scale * x) ^ power
        if scale != 1.0:
            steps.append(("Mul", "scale", scale))
        if shift != 0.0:
            steps.append(("Add", "shift", shift))
        if power != 1.0:
            steps.append(("Pow", "power", power))
        if not steps:
            self.emit("Identity", inputs, outputs, layer.name)
            return [shapes[0]]
        x = inputs[0]
        for i, (op, what, value) in enumerate(steps):
            last = i == len(steps) - 1
            out = outputs[0] if last else self.tmp(layer, what)
            self.emit(op, [x, self.const(f"{layer.name}/{what}", np.float32(value))], [out],
                      layer.name if last else f"{layer.name}/{what}")
            x = out
        return [shapes[0]]

    def layer_Slice(self, layer, inputs, shapes, outputs):
        self.need(layer, inputs, 1)
        shape = shapes[0]
        p = layer.param("slice_param")
        raw_axis = int(p.axis) if p.HasField("axis") or not p.HasField("slice_dim") else int(p.slice_dim)
        axis = self.axis(layer, raw_axis, len(shape))
        size = shape[axis]
        points = [int(v) for v in p.slice_point]
        if points:
            if len(points) + 1 != len(outputs):
                self.fail(layer, f"{len(points)} slice points need {len(points) + 1} tops, found {len(outputs)}")
            bounds = [0] + points + [size]
            if any(b <= a for a, b in zip(bounds, bounds[1:])):
                self.fail(layer, f"slice points {points} must increase within the axis size {size}")
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        else:
            if not outputs or size % len(outputs):
                self.fail(layer, f"axis size {size} does not split evenly into {len(outputs)} tops")
            sizes = [size // len(outputs)] * len(outputs)
        split = self.const(f"{layer.name}/split", sizes, dtype=np.int64)
        self.emit("Split", [inputs[0], split], outputs, layer.name, axis=axis)
        out_shapes = []
        for s in sizes:
            out = list(shape)
            out[axis] = s
            out_shapes.append(tuple(out))
        return out_shapes


_CHUNK = 1 << 22  # generated weights per random draw


def _count(shape) -> int:
    """Elements of a shape (None dimensions count 1), as a Python int (no overflow)."""
    n = 1
    for d in shape:
        n *= 1 if d is None else max(int(d), 0)
    return n


def _shape_matches(blob, shape) -> bool:
    if blob.legacy:
        # Caffe compares legacy (num, channels, height, width) blobs with the shape padded to 4-D.
        if len(shape) > 4:
            return False
        return tuple(blob.shape) == (1,) * (4 - len(shape)) + tuple(shape)
    return tuple(blob.shape) == tuple(shape)


def _describe(kinds, shapes) -> str:
    return ", ".join(f"{k} {tuple(s)}" for k, s in zip(kinds, shapes))


def _show(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def convert(net: CaffeNetDef, weights: CaffeWeights | None = None, *, fill: str = "he", seed: int = 0,
            input_shape=None):
    """An ONNX ModelProto for ``net`` with ``weights`` (generated deterministically when None).

    ``input_shape`` (C, H, W; or text ``"3,224,224"``) sets the shape of the net's one input,
    whatever the prototxt says (needed when a data layer's shape is stored with the data).
    """
    return _Converter(net, weights, fill, seed, input_shape).run()
