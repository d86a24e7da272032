"""Caffe models without pycaffe: schema, reader, conversion to ONNX, writer.

    model = load_caffe("deploy.prototxt", "weights.caffemodel")   # onnx.ModelProto
    write_caffe(model, "deploy.prototxt", "weights.caffemodel")   # and back

Weights are read by content: binary ``.caffemodel`` (protobuf) or Caffe's HDF5 format, matched to
the prototxt by layer name (a snapshot of a training net works with its deploy prototxt).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CnnvisError
from .reader import (  # noqa: F401
    CaffeBlob, CaffeLayer, CaffeNetDef, CaffeWeights, is_hdf5, parse_prototxt, read_mean_binaryproto,
    read_net, read_weights,
)
from .to_onnx import (  # noqa: F401
    BATCH, DATA_LAYERS, DROPPED_LAYERS, FILLS, META_BLOB_FINAL, META_BLOBS, META_LAYERS, META_NOTES, META_PARAMS,
    META_PROTOTXT_SHA, META_TYPES, META_WEIGHTS, META_WEIGHTS_SHA, SUPPORTED_LAYERS, caffe_pool_axis, convert,
    parse_input_shape,
)
from .writer import SUPPORTED_OPS, caffemodel_bytes, onnx_to_caffe, prototxt_text, write_caffe  # noqa: F401


def load_caffe(prototxt, weights=None, *, fill: str = "he", seed: int = 0, input_shape=None):
    """An ONNX model computing the Caffe net ``prototxt`` with ``weights``.

    ``weights`` is a ``.caffemodel`` (binary) or Caffe HDF5 file; without it, weights of the right
    shapes are generated deterministically from ``seed`` (``fill``: ``he``, ``xavier`` or
    ``gaussian`` for weights; biases 0, BatchNorm mean 0 / variance 1, Scale 1 / 0, PReLU 0.25).

    A train/test prototxt opens as its deploy net: the data layer becomes the input (shape from
    the data layer, its transform_param, or ``input_shape`` = (C, H, W)), losses and Accuracy are
    dropped; :func:`caffe_notes` gives the one-line note saying so.
    """
    from ..manifest import sha256_file

    prototxt = Path(prototxt)
    if not prototxt.is_file():
        raise CnnvisError(f"{prototxt}: prototxt not found")
    net = read_net(prototxt)
    loaded = read_weights(weights) if weights is not None else None
    model = convert(net, loaded, fill=fill, seed=seed, input_shape=input_shape)
    props = {p.key: p.value for p in model.metadata_props}
    props[META_PROTOTXT_SHA] = sha256_file(prototxt)
    if loaded is not None:
        props[META_WEIGHTS_SHA] = sha256_file(weights)
        props[META_WEIGHTS] = json.dumps({"file": Path(weights).name, "format": loaded.format})
    else:
        props[META_WEIGHTS] = json.dumps({"generated": fill, "seed": int(seed)})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"converted by cnnvis from Caffe {prototxt.name}" + (
        f" + {Path(weights).name}" if weights is not None else f" (generated {fill} weights, seed {seed})")
    return model


def caffe_metadata(model) -> dict:
    """The Caffe maps a converted model carries (empty for other models).

    Keys: :data:`META_BLOB_FINAL` (blob -> tensor with its final value), :data:`META_BLOBS` (blob ->
    every tensor that held a value of it, in order), :data:`META_LAYERS` (layer ->
    output tensors), :data:`META_TYPES` (layer -> Caffe type), :data:`META_PARAMS` (layer ->
    initializers of its parameter blobs), :data:`META_NOTES` (one-line notes on a train/test net
    opened as a deploy net), :data:`META_WEIGHTS` and the sha256 entries.
    """
    props = {p.key: p.value for p in model.metadata_props}
    out = {}
    for key in (META_BLOBS, META_BLOB_FINAL, META_LAYERS, META_TYPES, META_PARAMS, META_WEIGHTS, META_NOTES):
        if key in props:
            out[key] = json.loads(props[key])
    for key in (META_PROTOTXT_SHA, META_WEIGHTS_SHA):
        if key in props:
            out[key] = props[key]
    return out


def caffe_notes(model) -> list:
    """The one-line notes of a converted train/test net (what was dropped, where the input shape
    came from); empty for deploy nets and other models."""
    return list(caffe_metadata(model).get(META_NOTES, []))
