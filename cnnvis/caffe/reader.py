"""Reading Caffe files: ``.prototxt`` nets, binary and HDF5 weights, mean ``.binaryproto`` files.

Nets are normalised to a list of :class:`CaffeLayer` whatever their vintage: V2 ``layer { type:
"Convolution" }`` and legacy V1 ``layers { type: CONVOLUTION }`` entries, net inputs declared as
``Input`` layers or as ``input:`` with ``input_dim:``/``input_shape:``. Layers are filtered for the
TEST phase with Caffe's include/exclude rules, as Caffe does when it builds a net for inference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import limits
from ..errors import CnnvisError
from . import schema

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
TEST_PHASE = 1
V0_LAYER_FIELD = 1  # V1LayerParameter.layer: a V0LayerParameter (pre-2014 nets)


@dataclass
class CaffeLayer:
    """One layer of a net, the same for V1 and V2 definitions."""

    name: str
    type: str
    bottoms: list
    tops: list
    proto: object  # LayerParameter or V1LayerParameter
    v1: bool = False

    def param(self, field_name: str):
        """The layer's ``<field_name>`` message (Caffe's defaults when the prototxt omits it)."""
        if field_name not in self.proto.DESCRIPTOR.fields_by_name:
            raise CnnvisError(
                f"layer {self.name!r} ({self.type}): V1 layer definitions have no {field_name}; "
                "upgrade the net to the V2 'layer' format")
        return getattr(self.proto, field_name)


@dataclass
class CaffeNetDef:
    """A parsed net: its name, declared inputs (name, shape) and TEST-phase layers in order."""

    name: str
    path: str
    inputs: list  # [(blob name, shape tuple)] from input:/input_dim:/input_shape:
    layers: list  # [CaffeLayer]
    proto: object = None
    excluded: list = field(default_factory=list)  # [CaffeLayer] left out of the TEST phase by their rules


@dataclass
class CaffeBlob:
    """A parameter blob: its values and whether its shape came from the legacy 4-D fields."""

    array: np.ndarray
    legacy: bool = False

    @property
    def shape(self):
        return tuple(self.array.shape)


@dataclass
class CaffeWeights:
    """Parameter blobs per layer name, from a binary or HDF5 weights file."""

    path: str
    format: str  # "binary" or "hdf5"
    layers: dict = field(default_factory=dict)  # name -> [CaffeBlob]
    layer_types: dict = field(default_factory=dict)  # name -> type string ("" for HDF5)


# ---------------------------------------------------------------- prototxt

def parse_prototxt(path):
    """The NetParameter message of a text ``.prototxt``; syntax errors name file, line and column."""
    from google.protobuf import text_format

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CnnvisError(f"{path}: cannot read the prototxt ({_reason(exc)})") from None
    net = schema.messages().NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        message = str(exc)
        prefix = f"{line}:{column} : "
        if message.startswith(prefix):
            message = message[len(prefix):]
        where = f"{path}:{line}:{column}" if line is not None else str(path)
        raise CnnvisError(f"{where}: prototxt syntax error: {message}") from None
    return net


def read_net(path) -> CaffeNetDef:
    """A ``.prototxt`` as a :class:`CaffeNetDef` (TEST phase, V1 layers upgraded to V2 types)."""
    net = parse_prototxt(path)
    return net_from_proto(net, str(path))


def net_from_proto(net, path: str = "<net>") -> CaffeNetDef:
    if len(net.layer) and len(net.layers):
        raise CnnvisError(f"{path}: the net mixes V2 'layer' and V1 'layers' entries; use one format")
    inputs = _declared_inputs(net, path)
    state = net.state
    layers, excluded = [], []
    for proto, v1 in [(p, False) for p in net.layer] + [(p, True) for p in net.layers]:
        if v1 and schema.has_unknown_field(proto, V0_LAYER_FIELD):
            raise CnnvisError(f"{path}: layer {proto.name!r} uses the V0 layer format (before 2014); "
                              "upgrade it with Caffe's upgrade_net_proto_text tool")
        if not _included(proto, state, path):
            excluded.append(_layer(proto, v1, path))
            continue
        layers.append(_layer(proto, v1, path))
    names = [layer.name for layer in layers]
    for i, name in enumerate(names):
        if not name:
            raise CnnvisError(f"{path}: layer #{i + 1} ({layers[i].type}) has no name")
    return CaffeNetDef(name=net.name, path=path, inputs=inputs, layers=layers, proto=net, excluded=excluded)


def _layer(proto, v1: bool, path: str) -> CaffeLayer:
    if v1:
        enum = proto.DESCRIPTOR.fields_by_name["type"].enum_type
        enum_name = enum.values_by_number[proto.type].name if proto.type in enum.values_by_number else str(proto.type)
        type_name = schema.V1_TYPE_NAMES.get(enum_name, enum_name)
    else:
        type_name = proto.type
    if not type_name or type_name == "NONE":
        raise CnnvisError(f"{path}: layer {proto.name!r} has no type")
    return CaffeLayer(name=proto.name, type=type_name, bottoms=list(proto.bottom), tops=list(proto.top),
                      proto=proto, v1=v1)


def _declared_inputs(net, path: str) -> list:
    names = list(net.input)
    if not names:
        if len(net.input_shape) or len(net.input_dim):
            raise CnnvisError(f"{path}: input_shape/input_dim given without 'input:' names")
        return []
    if len(net.input_shape):
        if len(net.input_shape) != len(names):
            raise CnnvisError(f"{path}: {len(names)} 'input:' names but {len(net.input_shape)} input_shape entries")
        return [(n, tuple(int(d) for d in s.dim)) for n, s in zip(names, net.input_shape)]
    if len(net.input_dim) != 4 * len(names):
        raise CnnvisError(f"{path}: {len(names)} 'input:' names need {4 * len(names)} input_dim values "
                          f"(4 per input), found {len(net.input_dim)}")
    dims = [int(d) for d in net.input_dim]
    return [(n, tuple(dims[4 * i:4 * i + 4])) for i, n in enumerate(names)]


def _rule_matches(rule, state) -> bool:
    # Caffe's Net::StateMeetsRule.
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def _included(proto, net_state, path: str) -> bool:
    # Caffe's Net::FilterNet for a net built in the TEST phase.
    state = type(net_state)()
    state.CopyFrom(net_state)
    state.phase = TEST_PHASE
    if len(proto.include) and len(proto.exclude):
        raise CnnvisError(f"{path}: layer {proto.name!r} has both include and exclude rules")
    if len(proto.include):
        return any(_rule_matches(r, state) for r in proto.include)
    return not any(_rule_matches(r, state) for r in proto.exclude)


# ---------------------------------------------------------------- weights

def is_hdf5(path) -> bool:
    """True when the file starts with the HDF5 signature (also after a user block of 512·2^k bytes)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def read_weights(path) -> CaffeWeights:
    """Parameter blobs of a ``.caffemodel`` (binary protobuf) or Caffe HDF5 file, by content."""
    path = Path(path)
    if not path.is_file():
        raise CnnvisError(f"{path}: weights file not found")
    if is_hdf5(path):
        return _read_hdf5_weights(path)
    size = path.stat().st_size  # read, parsed and converted to arrays: about three copies
    limits.check(3 * size, f"{path}: a {size:,}-byte weights file")
    return _read_binary_weights(path)


def _read_binary_weights(path: Path) -> CaffeWeights:
    from google.protobuf.message import DecodeError

    data = path.read_bytes()
    net = schema.raw_messages().NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as exc:
        raise CnnvisError(f"{path}: truncated or not a Caffe binary model (protobuf decoding failed: "
                          f"{_reason(exc)})") from None
    if not len(net.layer) and not len(net.layers):
        raise CnnvisError(f"{path}: not a Caffe binary model (no layers found); expected a .caffemodel "
                          "written by Caffe or a Caffe HDF5 weights file")
    weights = CaffeWeights(path=str(path), format="binary")
    for proto, v1 in [(p, False) for p in net.layer] + [(p, True) for p in net.layers]:
        if v1 and schema.has_unknown_field(proto, V0_LAYER_FIELD):
            raise CnnvisError(f"{path}: layer {proto.name!r} uses the V0 layer format (before 2014); "
                              "upgrade it with Caffe's upgrade_net_proto_binary tool")
        layer = _layer(proto, v1, str(path))
        weights.layers[proto.name] = [
            blob_from_proto(b, f"{path}: layer {proto.name!r} blob {i}") for i, b in enumerate(proto.blobs)]
        weights.layer_types[proto.name] = layer.type
    return weights


def _read_hdf5_weights(path: Path) -> CaffeWeights:
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise CnnvisError(f"{path}: cannot open the HDF5 weights ({_reason(exc)})") from None
    weights = CaffeWeights(path=str(path), format="hdf5")
    with h5:
        if "data" not in h5 or not isinstance(h5["data"], h5py.Group):
            raise CnnvisError(f"{path}: not a Caffe HDF5 weights file (no /data group of layers)")
        for name, group in h5["data"].items():
            if not isinstance(group, h5py.Group):
                continue
            keys = list(group.keys())
            if not all(k.isdigit() for k in keys):
                raise CnnvisError(f"{path}: /data/{name} holds {keys}; Caffe HDF5 weights name blobs 0, 1, ...")
            keys.sort(key=int)
            if [int(k) for k in keys] != list(range(len(keys))):
                raise CnnvisError(f"{path}: /data/{name} blobs are {keys}, expected 0..{len(keys) - 1}")
            try:
                limits.check(sum(4 * getattr(group[k], "size", 0) for k in keys),
                             f"{path}: the blobs of layer {name!r}")
                arrays = [np.asarray(group[k][()], dtype=np.float32) for k in keys]
            except (OSError, TypeError, ValueError) as exc:
                raise CnnvisError(f"{path}: /data/{name}: unreadable dataset ({_reason(exc)})") from None
            weights.layers[name] = [CaffeBlob(a) for a in arrays]
            weights.layer_types[name] = ""
    return weights


def blob_from_proto(blob, where: str) -> CaffeBlob:
    """A BlobProto (either schema variant) as a float32 array in its declared shape."""
    if schema.unknown_field_count(blob):
        # Unpacked number arrays do not fit the bytes declaration of the raw schema; take the
        # slow but general path for this blob only.
        blob = schema.messages().BlobProto.FromString(blob.SerializeToString())
    legacy_fields = ("num", "channels", "height", "width")
    if blob.HasField("shape"):
        shape, legacy = tuple(int(d) for d in blob.shape.dim), False
    elif any(blob.HasField(f) for f in legacy_fields):
        shape, legacy = tuple(int(getattr(blob, f)) for f in legacy_fields), True
    else:
        shape, legacy = (), False
    if any(d < 0 for d in shape):
        raise CnnvisError(f"{where}: negative dimension in shape {shape}")
    values = _blob_values(blob, where)
    count = int(np.prod(shape, dtype=np.int64))
    if values.size != count:
        raise CnnvisError(f"{where}: {values.size} values for shape {shape} ({count} expected); "
                          "the file is truncated or corrupt")
    return CaffeBlob(values.reshape(shape), legacy)


def _blob_values(blob, where: str) -> np.ndarray:
    def join(field_name, dtype):
        value = getattr(blob, field_name)
        if len(value) and isinstance(value[0], bytes):  # raw schema: packed payload chunks
            raw = b"".join(value)
            if len(raw) % np.dtype(dtype).itemsize:
                raise CnnvisError(f"{where}: {field_name} payload of {len(raw)} bytes is not a whole "
                                  "number of values; the file is corrupt")
            return np.frombuffer(raw, dtype=dtype)
        return np.asarray(list(value), dtype=dtype)

    # Caffe's Blob::FromProto reads double_data when present, data otherwise.
    doubles = join("double_data", "<f8")
    if doubles.size:
        return doubles.astype(np.float32)
    return join("data", "<f4").astype(np.float32)


def read_mean_binaryproto(path) -> np.ndarray:
    """A Caffe mean file (BlobProto, 1xCxHxW or CxHxW) as a CxHxW float32 array."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CnnvisError(f"{path}: cannot read the mean file ({_reason(exc)})") from None
    blob = schema.raw_messages().BlobProto()
    try:
        blob.ParseFromString(data)
    except DecodeError as exc:
        raise CnnvisError(f"{path}: truncated or not a Caffe mean .binaryproto ({_reason(exc)})") from None
    array = blob_from_proto(blob, str(path)).array
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.size == 0:
        raise CnnvisError(f"{path}: mean blob has shape {array.shape}; expected 1xCxHxW or CxHxW")
    return np.ascontiguousarray(array, dtype=np.float32)


def _reason(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
