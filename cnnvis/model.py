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
import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import onnxgraph, ops
from .errors import CnnvisError, unknown_name_error

#: op domains onnxruntime's CPU provider implements ("" is ai.onnx)
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
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
        # shape arithmetic (Slice bounds computed from Shape) as constants for this input shape:
        # gradient rules and the layer table's shapes need them constant
        _check_fold_budget(self.native_proto, self.input_shape, name)
        folded = onnxgraph.fold_shape_arithmetic(self.native_proto, self.input_shape)
        if folded is not self.native_proto:
            self.native_proto = folded
            self.proto = onnxgraph.to_float32(folded)
        self.sha256 = sha256 or hashlib.sha256(proto.SerializeToString()).hexdigest()
        self._inits = onnxgraph.initializer_map(self.proto)
        self._sessions = SessionCache()
        self._engines: dict = {}
        #: 1 once a run found a layer that does not follow the batch (the graph's batch is fixed):
        #: :meth:`run` then runs one image at a time
        self.fixed_batch = None
        self.layers = self._layer_table()
        self._by_name = {layer.name: layer for layer in self.layers}
        self._by_tensor = {layer.tensor: layer for layer in self.layers}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path, **kwargs) -> "Model":
        """A Model from an ``.onnx`` file, validated once: external data only from the file's own
        folder, onnx's full check, and an onnxruntime session that runs one image (within the
        memory budget). Any failure is one CnnvisError naming the file."""
        path = Path(path)
        proto, digest = read_onnx(path)
        kwargs.setdefault("name", path.name)
        kwargs.setdefault("sha256", digest)
        kwargs.setdefault("source", str(path))
        if "sidecar" not in kwargs:
            side = path.with_name(path.name + ".json")
            if not side.exists():
                side = path.with_suffix(".json")
            if side.exists():
                try:
                    kwargs["sidecar"] = json.loads(side.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    raise CnnvisError(f"{side}: sidecar is not valid JSON ({exc})") from None
                if not isinstance(kwargs["sidecar"], dict):
                    raise CnnvisError(f"{side}: sidecar must be a JSON object")
        try:
            model = cls(proto, **kwargs)
        except CnnvisError:
            raise
        except Exception as exc:  # a graph onnx's checker accepts but shape inference or folding cannot take
            raise CnnvisError(f"{path}: cannot read this graph ({_first_line(exc)})") from None
        model.check_runs(str(path))
        return model

    def check_runs(self, what: str | None = None) -> None:
        """Build the forward session and run one zero image through it (after checking that one
        image's activations fit the memory budget), so that a model which cannot run (an op of an
        unknown domain, a convolution whose weight does not match its input) fails at load in one
        line naming ``what`` (default: the model's name), not in the middle of a command."""
        from . import limits

        what = what or self.name
        per_image = int(np.prod(self.input_shape, dtype=object))
        for layer in self.layers:
            if layer.output_shape:
                per_image += int(np.prod(layer.output_shape, dtype=object))
        shown = "x".join(map(str, self.input_shape))
        limits.check(4 * per_image, f"{what}: one {shown} input and its activations")
        try:
            quiet = _quiet_run_options()  # the failure is reported below, in one line
            sess = self.session((self.output_name,))
            sess.run([self.output_name], {self.input_name: np.zeros((1, *self.input_shape), np.float32)}, quiet)
        except CnnvisError:
            raise
        except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidGraph, ...)
            self.release()
            raise CnnvisError(f"{what}: onnxruntime cannot run this model ({_first_line(exc)})") from None

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
            raise CnnvisError(f"model {self.name} has no convolution layer; name one with layer=...", params="layer")
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
            self._engines[key] = GradientEngine(self.proto, wrt, sessions=_EngineSessions(self, key), **options)
        return self._engines[key]

    def session(self, outputs=(), key=None, build=None, spinning: bool = True, threads=None, device=None):
        """The cached onnxruntime session whose outputs are ``outputs`` (tensor names) — or, given
        ``key`` and ``build``, of the graph ``build()`` returns, run as it is (a graph made from this
        model: occlusion's stage graphs, the gradient engines' graphs), built once per ``key``: the
        one session cache of a model (:meth:`drop_sessions`, :meth:`release` empty it).
        ``spinning=False``: idle threads sleep (for callers alternating between small sessions);
        ``threads``, ``device``: when not the model's (``threads=0``: onnxruntime's default)."""
        cache_key = ("graph", key) if build is not None else tuple(outputs)
        sess = self._sessions.get(cache_key)
        if sess is None:
            device = self.device if device is None else device
            threads = self.threads if threads is None else threads
            if build is not None:
                return self._sessions(key, build, threads=threads, device=device, spinning=spinning)
            if self.reduced_precision and self.forward_precision == self.precision:
                # the file's own graph and precision, fed and answering in float32
                outs = list(cache_key) or [o.name for o in self.native_proto.graph.output]
                proto = onnxgraph.drop_unused(onnxgraph.with_outputs(self.native_proto, outs, self._types))
                try:
                    sess = _Float32Session(onnxgraph.create_session(proto, device=device, threads=threads,
                                                                    spinning=spinning), self.input_name)
                except CnnvisError:
                    if self.precision != "bfloat16":
                        raise
                    # onnxruntime's CPU build has next to no bfloat16 kernels: the float32 graph
                    # runs instead, and info() says so
                    self.forward_precision = "float32 (bfloat16 weights upcast: onnxruntime cannot run bfloat16 here)"
                    self._sessions.clear()
                    return self.session(outputs, spinning=spinning, threads=threads, device=device)
            elif self.reduced_precision:
                proto = onnxgraph.drop_unused(onnxgraph.with_outputs(onnxgraph.decompose_lrn(self.proto), list(
                    cache_key) or [o.name for o in self.proto.graph.output], {}, copy=False))
                sess = onnxgraph.create_session(proto, device=device, threads=threads, spinning=spinning)
            else:
                # LRN as elementwise ops + channel pooling: same values, ~20% faster in onnxruntime
                proto = onnxgraph.decompose_lrn(self.proto)
                if cache_key:  # only what the taps need runs (an early layer's session skips the rest)
                    proto = onnxgraph.drop_unused(onnxgraph.with_outputs(proto, list(cache_key), self._types,
                                                                         copy=False))
                sess = onnxgraph.create_session(proto, device=device, threads=threads, spinning=spinning)
            self._sessions[cache_key] = sess
        return sess

    def drop_sessions(self, keep) -> None:
        """Forget the cached sessions of built graphs whose ``key`` fails ``keep(key)`` (a caller
        dropping graphs it no longer runs, e.g. a gradient engine's evicted chunk-size graphs)."""
        self._sessions.drop(keep)

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
        batch_size = min(batch_size, self.fixed_batch or batch_size)
        names = list(outputs) if outputs else [self.output_name]
        tensors = [self.tensor_name(n) for n in names]
        unique = list(dict.fromkeys(t for t in tensors if t != self.input_name))
        results = {t: [] for t in unique}
        if unique:
            sess = self.session(tuple(unique))
            quiet = _quiet_run_options()
            for start, stop in chunk_bounds(len(x), batch_size):
                try:
                    values = sess.run(unique, {self.input_name: x[start:stop]}, quiet)
                except Exception as exc:  # onnxruntime's own classes (Fail, RuntimeException...)
                    raise runtime_error(f"{self.name}: batch of {stop - start}", exc) from None
                for t, value in zip(unique, values):
                    layer = self._by_tensor.get(t)
                    if layer is not None and stop - start > 1 \
                            and (value.ndim == 0 or value.shape[0] != stop - start):
                        # a layer that does not follow the batch (a dynamo batch-1 export's
                        # as_strided: Reshape [-1] -> Gather of fixed indices, which
                        # make_batch_dynamic could not prove per image): one image at a time
                        self.fixed_batch = 1
                        return self.run(x, outputs, batch_size=1)
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

    def class_index(self, spec, what: str = "class") -> int:
        """A class index from an index (int or digit string) or a class name; ``what`` names it in
        errors (the CLI passes its flag).

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


def read_onnx(path):
    """``(proto, sha256)`` of an ``.onnx`` file, checked: a parsable non-empty graph, external data
    only from files inside the model's own folder (relative names resolved there, never in the
    current folder; absolute names, ``..`` and symlinks leading out refused), and onnx's full
    check (``onnx.checker.check_model(..., full_check=True)``; by path for models over 2 GB).
    The sha256 covers the file and its external data."""
    from . import limits

    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise CnnvisError(f"{path}: not a file (expected an .onnx model)")
        limits.check(size, f"{path}: a {size:,}-byte model file")
        data = path.read_bytes()
    except OSError as exc:
        raise CnnvisError(f"{path}: cannot read model file ({exc.strerror or exc})") from None
    try:
        proto = onnx.load_from_string(data)
    except Exception:
        proto = None
    if proto is None or not proto.graph.node:
        raise CnnvisError(f"{path}: not an ONNX model (unparsable or truncated protobuf, or an empty graph)")
    digest = hashlib.sha256(data)
    external = _external_data_files(proto, path)
    if external:
        total = sum(os.path.getsize(f) for f in external.values())
        limits.check(size + total, f"{path}: the model and its {total:,} bytes of external data")
        for location in sorted(external):
            with open(external[location], "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise CnnvisError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
    def domain_of(d):
        return "" if d in ("", "ai.onnx") else d  # two names of the default domain

    imported = {domain_of(o.domain) for o in proto.opset_import}
    for node in _all_nodes(proto.graph):
        domain = domain_of(node.domain)
        if domain not in KNOWN_DOMAINS or domain not in imported:
            raise CnnvisError(f"{path}: node {node.name or node.op_type!r} uses op {node.op_type} of "
                              f"{'unknown' if domain not in KNOWN_DOMAINS else 'unimported'} domain {domain!r} "
                              f"(known: {', '.join(repr(d) for d in sorted(KNOWN_DOMAINS))})")
    try:
        if proto.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
            onnx.checker.check_model(proto, full_check=True)
        else:
            onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, and what onnx's C++ raises
        raise CnnvisError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    return proto, digest.hexdigest()


def _external_data_files(proto, path: Path) -> dict:
    """``{location: file}`` of the model's external data, each checked to be a regular file inside
    the model's folder that holds the bytes the tensor claims; a one-line error otherwise."""
    folder = os.path.realpath(path.parent)
    files = {}
    for tensor in _all_tensors(proto.graph):
        if not (tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        what = f"{path}: tensor {tensor.name!r} external data {location!r}"
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise CnnvisError(f"{what}: expected a file name relative to the model's folder "
                              "(no absolute path, no '..')")
        real = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([real, folder]) != folder:
            raise CnnvisError(f"{what}: leads outside the model's folder {folder} (symlink?)")
        if not os.path.isfile(real):
            raise CnnvisError(f"{what}: no such file beside the model")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise CnnvisError(f"{what}: offset/length are not integers") from None
        file_size = os.path.getsize(real)
        if offset < 0 or (length is not None and (length < 0 or offset + length > file_size)) or offset > file_size:
            raise CnnvisError(f"{what}: offset {offset} / length {length} lie outside the {file_size}-byte file")
        files[location] = real
    return files


def _all_graphs(graph):
    """A graph and its subgraphs (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_graphs(sub)


def _all_nodes(graph):
    """The nodes of a graph and of its subgraphs."""
    for g in _all_graphs(graph):
        yield from g.node


def _all_tensors(graph):
    """Every TensorProto of a graph and its subgraphs: initializers (dense and sparse) and the
    tensors of node attributes (Constant values and the like)."""
    for g in _all_graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


def _quiet_run_options():
    """onnxruntime RunOptions that do not log a failing kernel to stderr (the failure is raised
    as one line instead)."""
    import onnxruntime

    quiet = onnxruntime.RunOptions()
    quiet.log_severity_level = 4
    return quiet


_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.S)


def runtime_error(what: str, exc) -> CnnvisError:
    """One line for an onnxruntime failure while running a session: the node (name and op) and
    its message without the source location (``reshape_helper.h:91 ... was false.``) when
    onnxruntime names them, else the message's first line."""
    match = _ORT_NODE.search(str(exc))
    if not match:
        return CnnvisError(f"{what}: onnxruntime failed ({_first_line(exc)})")
    op, node, message = match.groups()
    message = " ".join(message.split())
    message = re.sub(r"^\S+:\d+ .*? was false\. ", "", message)
    return CnnvisError(f"{what}: node {node!r} ({op}): {message[:300]}")


def _first_line(exc) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(exc).__name__


class SessionCache(dict):
    """onnxruntime sessions, each built once per key: the one session cache of cnnvis. A
    :class:`Model` keeps its tap sessions in one (under their output names, :meth:`Model.session`)
    and the sessions of graphs built from it under ``("graph", key)``; a gradient engine made from
    a bare graph (no Model: ``cached_engine``, the trainer's training graph) gets one of its own.
    Called as ``cache(key, build, threads, device)`` it is the ``sessions`` provider
    :class:`cnnvis.autodiff.GradientEngine` takes."""

    def __call__(self, key, build, threads=None, device="auto", spinning: bool = True):
        """The session of the graph ``build()`` returns, built on the first call for ``key``."""
        cache_key = ("graph", key)
        sess = self.get(cache_key)
        if sess is None:
            sess = self[cache_key] = onnxgraph.create_session(build(), device=device, threads=threads,
                                                              spinning=spinning)
        return sess

    def drop(self, keep) -> None:
        """Forget the sessions of built graphs whose ``key`` fails ``keep(key)``."""
        for cache_key in [k for k in self if k and k[0] == "graph" and not keep(k[1])]:
            del self[cache_key]


def _check_fold_budget(proto, input_shape, name) -> None:
    """Folding shape arithmetic runs the graph at batch 2: when the graph has any, the tensors onnx
    can size for two images must fit the memory budget first (a model declaring a huge input or
    huge activations is refused in one line before anything runs)."""
    from . import limits
    from .ops import SHAPE_SOURCE_OPS

    if not any(n.op_type in SHAPE_SOURCE_OPS for n in proto.graph.node):
        return
    elements = int(np.prod(input_shape, dtype=object)) * 2
    for shape in onnxgraph.static_shapes(proto, (2, *input_shape)).values():
        if shape and all(isinstance(d, int) and d > 0 for d in shape):
            elements += int(np.prod(shape, dtype=object))
    shown = "x".join(map(str, input_shape))
    limits.check(4 * elements, f"{name}: two {shown} inputs and their activations")


class _EngineSessions:
    """A gradient engine's view of its model's session cache: sessions keyed under the engine's
    own key (see :class:`cnnvis.autodiff.GradientEngine`'s ``sessions``)."""

    def __init__(self, model: "Model", engine_key):
        self.model, self.engine_key = model, engine_key

    def __call__(self, key, build, threads, device):
        return self.model.session(key=("engine", self.engine_key, key), build=build, threads=threads or 0,
                                  device=device)

    def drop(self, keep) -> None:
        self.model.drop_sessions(lambda k: not (k[:2] == ("engine", self.engine_key)) or keep(k[2]))


def chunk_bounds(n: int, batch_size: int, parts: int = 1) -> list:
    """``(start, stop)`` of every chunk of ``batch_size`` items out of ``n`` (the last one shorter),
    each cut into ``parts`` near-equal pieces (none empty): the one batch-chunking loop, used by
    :meth:`Model.run`, occlusion's windows and the gradient engine (whose full chunks may run in a
    graph specialised to ``batch_size``; ``parts`` are its concurrent workers)."""
    step = max(1, int(batch_size))
    bounds = []
    for start in range(0, int(n), step):
        stop = min(start + step, int(n))
        if parts <= 1:
            bounds.append((start, stop))
            continue
        cuts = np.linspace(start, stop, min(int(parts), stop - start) + 1).round().astype(int)
        bounds.extend(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    return bounds


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
