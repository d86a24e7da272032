"""An ONNX image classifier, its onnxruntime sessions, its layer table and taps.

:class:`Model` wraps a forward graph whose weights are all named initializers (constants the file
computes are folded) and whose batch dimension is symbolic. Layers get Caffe-style names where they
can be derived (conv1, relu1, norm1, pool1, ..., fc8, prob), also for zoo files whose tensors are
named ``r0``, ``r1``... and whose weights are ``conv1_w_0``. ``run`` returns any set of
intermediate tensors ("taps"), with one cached session per tap set, in batches of ``batch_size``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import onnxgraph, ops
from .errors import CnnvisError, unknown_name_error

#: ops that carry the weights of a layer (and so name it)
PARAM_OPS = ops.PARAM_OPS
#: prefix of a derived name for parameterless ops, Caffe style (relu1, norm1, pool1, drop6)
DERIVED_PREFIX = {
    "Relu": "relu", "LeakyRelu": "relu", "PRelu": "prelu", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "LRN": "norm", "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool",
    "GlobalMaxPool": "pool", "Dropout": "drop", "Flatten": "flatten", "Reshape": "reshape",
    "Concat": "concat", "Add": "add", "Mul": "mul", "BatchNormalization": "bn", "Clip": "clip",
}
_WEIGHT_SUFFIX = re.compile(r"(?:[._/](?:w|W|weight|weights|kernel)(?:_\d+)?)$")
_GENERIC_NODE_NAME = re.compile(r"^(?:[A-Za-z]+_\d+|n_?\d+|node_?\d+|/.*|\d*)$")


@dataclasses.dataclass
class Layer:
    """One row of the layer table."""

    name: str
    op_type: str
    tensor: str  # ONNX tensor holding the layer's output
    node: str  # ONNX node name ('' when the file has none)
    inputs: list
    output_shape: tuple | None = None  # per image (C,H,W) or (features,)
    weight: str | None = None  # initializer names
    bias: str | None = None
    weight_shape: tuple | None = None
    bias_shape: tuple | None = None
    params: int = 0
    macs: int = 0
    caffe_blob: str | None = None  # the Caffe blob name this tensor holds a value of, if known
    caffe_type: str | None = None  # the Caffe layer type, for models imported from Caffe

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("output_shape", "weight_shape", "bias_shape"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d


class Model:
    """A classifier in ONNX with cached onnxruntime sessions.

    Parameters
    ----------
    proto : onnx.ModelProto
        The forward graph (any opset onnx can convert; weights may be computed by constant nodes).
    name : str
        Display name (registry name or file name).
    sidecar : dict, optional
        Registry metadata: class names, preprocessing, trained flag, input size, ...
    device, threads : onnxruntime execution provider choice and intra-op threads.
    sha256 : str, optional
        Of the source file; computed from the serialized graph when not given.
    """

    def __init__(self, proto: onnx.ModelProto, name: str = "model", sidecar: dict | None = None,
                 device: str = "auto", threads: int | None = None, sha256: str | None = None,
                 source: str | None = None):
        self.name = name
        self.sidecar = dict(sidecar or {})
        self.device = device
        self.threads = threads
        self.source = source
        onnxgraph.select_providers(device)  # validate early: one line for a bad --device
        # native_proto: the file's own graph (its precision), which the forward sessions run;
        # proto: the same graph computing in float32 (the same object for a float32 model), which
        # gradients, occlusion's partial graphs and exports build on
        self.native_proto = onnxgraph.make_batch_dynamic(onnxgraph.fold_constants(proto))
        self.proto = onnxgraph.to_float32(self.native_proto)
        self.reduced_precision = self.proto is not self.native_proto
        inputs = onnxgraph.real_inputs(self.native_proto)
        if len(inputs) != 1:
            raise CnnvisError(f"{name}: expected one image input, found {len(inputs)} "
                              f"({', '.join(i.name for i in inputs)})")
        self.input_name = inputs[0].name
        self.precision = onnxgraph.precision_name(_native_float_type(self.native_proto, inputs[0]))
        self.forward_precision = self.precision  # what the forward sessions compute in
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) != 4:
            raise CnnvisError(f"{name}: input {self.input_name!r} has {len(dims)} dims; expected N×C×H×W")
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        size = self.sidecar.get("input_size")
        if None in shape:
            if not size:
                raise CnnvisError(f"{name}: input {self.input_name!r} has no fixed C×H×W; "
                                  "give input_size in the model's sidecar")
            shape = list(size)
        self.input_shape = tuple(int(d) for d in shape)
        self.sha256 = sha256 or hashlib.sha256(proto.SerializeToString()).hexdigest()
        self._inits = onnxgraph.initializer_map(self.proto)
        self._sessions: dict = {}
        self._engines: dict = {}
        self.layers = self._layer_table()
        self._by_name = {layer.name: layer for layer in self.layers}
        self._by_tensor = {layer.tensor: layer for layer in self.layers}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path, **kwargs) -> "Model":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CnnvisError(f"{path}: cannot read model file ({exc.strerror or exc})") from None
        try:
            proto = onnx.load_from_string(data)
        except Exception:
            proto = None
        if proto is None or not proto.graph.node:
            raise CnnvisError(f"{path}: not an ONNX model (unparsable or truncated protobuf, or an empty graph)")
        kwargs.setdefault("name", path.name)
        kwargs.setdefault("sha256", hashlib.sha256(data).hexdigest())
        kwargs.setdefault("source", str(path))
        if "sidecar" not in kwargs:
            side = path.with_name(path.name + ".json")
            if not side.exists():
                side = path.with_suffix(".json")
            if side.exists():
                try:
                    kwargs["sidecar"] = json.loads(side.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise CnnvisError(f"{side}: sidecar is not valid JSON ({exc})") from None
        return cls(proto, **kwargs)

    # ------------------------------------------------------------------ layer table
    def _layer_table(self) -> list:
        """One row per group of nodes whose output is a feature: a float tensor computed from the
        input's values (shape arithmetic — Shape, Gather, Concat of int64 shapes... — is no layer)."""
        shapes, self._types = onnxgraph.static_shapes_and_types(self.native_proto, (1, *self.input_shape))
        features = ops.feature_tensors(self.native_proto, self._types)
        nodes = [n for n in self.native_proto.graph.node if n.output and n.output[0] in features]
        caffe_meta = self._metadata_json("cnnvis.caffe.blobs")
        blob_of_tensor = {}
        if caffe_meta:
            for blob, tensors in caffe_meta.items():
                for t in ([tensors] if isinstance(tensors, str) else tensors):
                    blob_of_tensor[t] = blob
        use_node_names = all(n.name for n in nodes) \
            and not any(_GENERIC_NODE_NAME.match(n.name) for n in nodes)
        layers, used = [], set()
        last_param_name = None
        caffe_layers = self._metadata_json("cnnvis.caffe.layers") or {}
        caffe_types = self._metadata_json("cnnvis.caffe.types") or {}
        for i, group in enumerate(_group_nodes(nodes, caffe_layers)):
            # A Caffe layer built from several ONNX nodes shares one node name: one row, whose
            # output is the group's last tensor and whose weights are the first it uses.
            node = next((n for n in group if n.op_type in PARAM_OPS), group[0])
            out = group[-1].output[0]
            weight = bias = None
            params = [n for g in group for n in g.input[1:] if n in self._inits]
            if node.op_type in PARAM_OPS and params:
                weight = params[0]
                bias = params[1] if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(params) > 1 else None
            if use_node_names or (node.name and not _GENERIC_NODE_NAME.match(node.name)):
                name = group[-1].name
            elif weight is not None:
                name = _name_from_weight(weight) or f"{node.op_type.lower()}{i}"
            elif node.op_type == "Softmax" and group[-1] is nodes[-1]:
                name = "prob"
            else:
                prefix = DERIVED_PREFIX.get(node.op_type, node.op_type.lower())
                name = prefix + (_suffix(last_param_name) if last_param_name else str(i))
                if node.op_type in ("MaxPool", "AveragePool") and last_param_name:
                    name = prefix + _major(last_param_name)
            if weight is not None:
                last_param_name = name
            name = _unique(name, used)
            used.add(name)
            layer = Layer(name=name, op_type=node.op_type, tensor=out, node=group[-1].name,
                          inputs=list(node.input), caffe_blob=blob_of_tensor.get(out),
                          caffe_type=caffe_types.get(group[-1].name))
            shape = shapes.get(out)
            layer.output_shape = tuple(shape[1:]) if shape and None not in shape[1:] else None
            if weight is not None:
                layer.weight, layer.weight_shape = weight, tuple(self._inits[weight].dims)
                layer.params += int(np.prod(layer.weight_shape))
            if bias is not None:
                layer.bias, layer.bias_shape = bias, tuple(self._inits[bias].dims)
                layer.params += int(np.prod(layer.bias_shape))
            layer.macs = _macs(node, layer, shapes)
            layer.inputs = list(group[0].input)
            layers.append(layer)
        return layers

    def _metadata_json(self, key):
        for p in self.proto.metadata_props:
            if p.key == key:
                try:
                    return json.loads(p.value)
                except ValueError:
                    return None
        return None

    def conv_layers(self, transposed: bool = False) -> list:
        """The convolution layers in graph order (with ``transposed``, ConvTranspose ones too);
        one line naming the model when there is none."""
        kinds = ("Conv", "ConvTranspose") if transposed else ("Conv",)
        convs = [layer for layer in self.layers if layer.op_type in kinds]
        if not convs:
            raise CnnvisError(f"model {self.name} has no convolution layer; name one with --layer")
        return convs

    def layer(self, name: str) -> Layer:
        """A layer by its cnnvis name, its ONNX tensor name, its node name or its Caffe blob name."""
        if name in self._by_name:
            return self._by_name[name]
        if name in self._by_tensor:
            return self._by_tensor[name]
        for layer in self.layers:
            if name in (layer.node, layer.caffe_blob) and name:
                return layer
        raise unknown_name_error("layer", name, [layer.name for layer in self.layers])

    def tensor_name(self, spec: str) -> str:
        """The ONNX tensor for ``input``, a layer name or a tensor name."""
        if spec in ("input", self.input_name):
            return self.input_name
        return self.layer(spec).tensor

    def param_name(self, spec: str) -> str:
        """The initializer for ``LAYER.weight`` / ``LAYER.bias`` (or an initializer's own name)."""
        if spec in self._inits:
            return spec
        layer_name, _, kind = spec.rpartition(".")
        if kind not in ("weight", "bias") or not layer_name:
            raise CnnvisError(f"{spec!r}: expected LAYER.weight or LAYER.bias (e.g. conv1.weight)")
        layer = self.layer(layer_name)
        name = layer.weight if kind == "weight" else layer.bias
        if name is None:
            raise CnnvisError(f"layer {layer.name} ({layer.op_type}) has no {kind}")
        return name

    def param(self, spec: str) -> np.ndarray:
        return numpy_helper.to_array(self._inits[self.param_name(spec)])

    @property
    def output_name(self) -> str:
        return self.proto.graph.output[0].name

    @property
    def logits_layer(self) -> Layer:
        """The layer before the final Softmax (the class neurons before softmax), or the output."""
        last = self._by_tensor.get(self.output_name) or self.layers[-1]
        if last.op_type in ("Softmax", "LogSoftmax"):
            return self._by_tensor.get(last.inputs[0], last)
        return last

    @property
    def class_names(self) -> list:
        names = self.sidecar.get("classes") or self.sidecar.get("class_names")
        n = (self.logits_layer.output_shape or (0,))[0]
        if names and len(names) == n:
            return list(names)
        return [f"class {i}" for i in range(n)]

    @property
    def trained(self) -> bool | None:
        """True/False as the sidecar says; None when nothing says (a bare .onnx file)."""
        value = self.sidecar.get("trained")
        return None if value is None else bool(value)

    def info(self) -> dict:
        """What manifests record about the model (and, for a float16/bfloat16 model, in which
        precision its forward passes and its gradients are computed)."""
        info = {"name": self.name, "sha256": self.sha256, "source": self.source,
                "trained": self.trained, "input_shape": list(self.input_shape)}
        if self.reduced_precision:
            info["precision"] = {"forward": self.forward_precision, "gradients": "float32 (weights upcast)",
                                 "results": "float32"}
        return info

    # ------------------------------------------------------------------ running
    def release(self) -> None:
        """Drop the cached onnxruntime sessions and gradient engines (each holds a copy of the
        weights); they are built again when needed."""
        self._sessions.clear()
        self._engines.clear()

    def gradient_engine(self, wrt, **options):
        """The GradientEngine (``cnnvis.autodiff``) for ``wrt`` and ``options`` on this model, shared by
        every caller asking for the same ones: its graphs and sessions are built once per model.
        ``device`` and ``threads`` default to the model's."""
        from .autodiff import GradientEngine

        wrt = [wrt] if isinstance(wrt, str) else list(wrt)
        options = {"device": self.device, "threads": self.threads, **options}
        key = (tuple(wrt), tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in self._engines:
            self._engines[key] = GradientEngine(self.proto, wrt, **options)
        return self._engines[key]

    def session(self, outputs=()):
        """The cached onnxruntime session whose outputs are ``outputs`` (tensor names)."""
        key = tuple(outputs)
        sess = self._sessions.get(key)
        if sess is None:
            if self.reduced_precision and self.forward_precision == self.precision:
                # the file's own graph and precision, fed and answering in float32
                outputs = key or [o.name for o in self.native_proto.graph.output]
                proto = onnxgraph.with_outputs(self.native_proto, outputs, self._types)
                try:
                    sess = _Float32Session(onnxgraph.create_session(proto, device=self.device, threads=self.threads),
                                           self.input_name)
                except CnnvisError:
                    if self.precision != "bfloat16":
                        raise
                    # onnxruntime's CPU build has next to no bfloat16 kernels: the float32 graph
                    # runs instead, and info() says so
                    self.forward_precision = "float32 (bfloat16 weights upcast: onnxruntime cannot run bfloat16 here)"
                    self._sessions.clear()
                    return self.session(key)
            elif self.reduced_precision:
                proto = onnxgraph.with_outputs(onnxgraph.decompose_lrn(self.proto), key or [
                    o.name for o in self.proto.graph.output], {}, copy=False)
                sess = onnxgraph.create_session(proto, device=self.device, threads=self.threads)
            else:
                # LRN as elementwise ops + channel pooling: same values, ~20% faster in onnxruntime
                proto = onnxgraph.decompose_lrn(self.proto)
                if key:
                    proto = onnxgraph.with_outputs(proto, key, self._types, copy=False)
                sess = onnxgraph.create_session(proto, device=self.device, threads=self.threads)
            self._sessions[key] = sess
        return sess

    def check_batch(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise CnnvisError(f"input batch has shape {tuple(x.shape)}; model {self.name} expects "
                              f"N×{'×'.join(map(str, self.input_shape))}")
        if not np.issubdtype(x.dtype, np.floating):
            raise CnnvisError(f"input batch has dtype {x.dtype}; expected a float array")
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, x, outputs=None, batch_size: int = 32) -> dict:
        """Run a batch; return ``{name: array}`` for each requested layer/tensor (default: the output).

        ``outputs`` are layer names, tensor names or ``input``. The batch is split into chunks of
        ``batch_size`` so that memory stays bounded; one session serves every chunk.
        """
        x = self.check_batch(x)
        names = list(outputs) if outputs else [self.output_name]
        tensors = [self.tensor_name(n) for n in names]
        unique = list(dict.fromkeys(t for t in tensors if t != self.input_name))
        results = {t: [] for t in unique}
        if unique:
            sess = self.session(tuple(unique))
            step = max(1, int(batch_size))
            for start in range(0, len(x), step):
                for t, value in zip(unique, sess.run(unique, {self.input_name: x[start:start + step]})):
                    results[t].append(value)
        # one chunk: its arrays as they are (a concatenate would copy every tapped tensor again)
        merged = {t: (v[0] if len(v) == 1 else np.concatenate(v)) if v else np.zeros((0,))
                  for t, v in results.items()}
        merged[self.input_name] = x
        return {n: merged[t] for n, t in zip(names, tensors)}

    def predict(self, x, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (softmax of the logits if the graph does not end in a softmax)."""
        return self.probabilities(self.run(x, [self.output_name], batch_size)[self.output_name])

    def probabilities(self, output) -> np.ndarray:
        """The graph's output as class probabilities: as is after a final Softmax, else its softmax."""
        last = self._by_tensor.get(self.output_name)
        if last is not None and last.op_type == "Softmax":
            return np.asarray(output)
        return softmax(output)

    def class_index(self, spec, what: str = "--class") -> int:
        """A class index from an index (int or digit string) or a class name.

        Names match exactly, then case-insensitively, then against any comma-separated alias of
        the name ('tabby' finds 'tabby, tabby cat'); an alias shared by several classes is an error.
        """
        names = self.class_names
        n = len(names)
        if isinstance(spec, (bool, np.bool_)):
            raise CnnvisError(f"{what} {spec!r}: expected a class index or name")
        if isinstance(spec, (int, np.integer)) or (isinstance(spec, str) and spec.strip().lstrip("-").isdigit()):
            idx = int(spec)
            if not 0 <= idx < n:
                raise CnnvisError(f"{what} {spec}: class index must be in [0, {n}) for model {self.name}")
            return idx
        text = str(spec).strip()
        if text in names:
            return names.index(text)
        low = text.lower()
        for rule in (lambda name: name.lower() == low,
                     lambda name: low in [a.strip().lower() for a in name.split(",")]):
            hits = [i for i, name in enumerate(names) if rule(name)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                shown = ", ".join(f"{i} ({names[i]})" for i in hits)
                raise CnnvisError(f"{what} {text!r}: matches several classes: {shown}; give the index")
        raise unknown_name_error("class", text, names)


def load_model(spec, weights=None, device: str = "auto", threads: int | None = None) -> Model:
    """A Model from a registry name, an ``.onnx`` path or a Caffe ``.prototxt`` (+ weights)."""
    from . import registry

    return registry.load(spec, weights=weights, device=device, threads=threads)


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (N × classes)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _Float32Session:
    """An onnxruntime session of a float16/float64 graph that takes and returns float32: the image
    feed is cast to the input's type by numpy (as a user's own run of the file would), float
    results are cast to float32."""

    def __init__(self, session, input_name: str):
        self.session = session
        self.input_name = input_name
        kind = next(i.type for i in session.get_inputs() if i.name == input_name)
        self.input_dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(kind, np.float32)

    def run(self, output_names, feeds, *args, **kwargs):
        feeds = {k: (np.asarray(v).astype(self.input_dtype, copy=False) if k == self.input_name else v)
                 for k, v in feeds.items()}
        results = self.session.run(output_names, feeds, *args, **kwargs)
        return [r.astype(np.float32, copy=False) if np.issubdtype(r.dtype, np.floating) else r for r in results]

    def __getattr__(self, name):
        return getattr(self.session, name)


def _native_float_type(proto, image) -> int:
    """The reduced float type the graph computes in (of its input, else of its first reduced
    weight or Cast), or the input's own type."""
    kind = image.type.tensor_type.elem_type
    if kind != TensorProto.FLOAT:
        return kind
    for init in proto.graph.initializer:
        if init.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return init.data_type
    for node in proto.graph.node:
        to = ops.attributes(node).get("to") if node.op_type == "Cast" else None
        if to in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return to
    return kind


# ---------------------------------------------------------------------- naming helpers

def _group_nodes(nodes, caffe_layers=()) -> list:
    """Consecutive nodes of one layer: same name, or (Caffe imports) helper nodes named
    ``<layer>/<what>`` followed by the node ``<layer>``."""
    def key(node):
        prefix = node.name.split("/", 1)[0]
        return prefix if prefix in caffe_layers else node.name

    groups = []
    for node in nodes:
        if groups and node.name and key(groups[-1][-1]) == key(node):
            groups[-1].append(node)
        else:
            groups.append([node])
    return groups


def _name_from_weight(weight: str) -> str | None:
    base = _WEIGHT_SUFFIX.sub("", weight)
    return base if base and base != weight else None


def _suffix(param_layer: str) -> str:
    """'conv1' -> '1', 'conv1_2' -> '1_2', 'fc6' -> '6'."""
    m = re.search(r"(\d+(?:_\d+)*)$", param_layer)
    return m.group(1) if m else "_" + param_layer


def _major(param_layer: str) -> str:
    """'conv5' -> '5', 'conv1_2' -> '1' (VGG's pool1 follows conv1_2)."""
    m = re.search(r"(\d+)(?:_\d+)*$", param_layer)
    return m.group(1) if m else "_" + param_layer


def _unique(name, used):
    if name not in used:
        return name
    k = 2
    while f"{name}_{k}" in used:
        k += 1
    return f"{name}_{k}"


def _macs(node, layer: Layer, shapes) -> int:
    """Multiply-accumulates per image."""
    out = layer.output_shape
    if out is None:
        return 0
    if node.op_type in ("Conv", "ConvTranspose") and layer.weight_shape:
        w = layer.weight_shape
        if node.op_type == "Conv":
            return int(np.prod(out)) * int(np.prod(w[1:]))
        in_shape = shapes.get(node.input[0])
        return int(np.prod(in_shape[1:])) * int(np.prod(w[1:])) if in_shape else 0
    if node.op_type in ("Gemm", "MatMul") and layer.weight_shape:
        return int(np.prod(layer.weight_shape))
    return 0
