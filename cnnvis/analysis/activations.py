"""Activations: what each layer outputs for a set of images.

Functions take a :class:`cnnvis.model.Model` and preprocessed batches; they know nothing of files
or plots (those are :mod:`cnnvis.export`).
"""
from __future__ import annotations

import numpy as np

from ..errors import CnnvisError

#: op types whose outputs are shown by default ("every layer" without the bookkeeping ones)
DEFAULT_LAYER_OPS = ("Conv", "ConvTranspose", "Relu", "LeakyRelu", "PRelu", "LRN", "MaxPool",
                     "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "MatMul",
                     "Softmax", "BatchNormalization", "Sigmoid", "Tanh", "Concat", "Add")


def default_layers(model) -> list:
    """The layers shown when the user names none: every layer that computes something visible."""
    return [layer.name for layer in model.layers
            if layer.op_type in DEFAULT_LAYER_OPS and layer.output_shape is not None]


def resolve_layers(model, names) -> list:
    """Validate layer names (``all`` = default_layers); errors list the closest names."""
    if not names:
        return default_layers(model)
    out = []
    for name in names:
        if name == "all":
            out.extend(default_layers(model))
        else:
            out.append(model.layer(name).name)
    return list(dict.fromkeys(out))


def layer_activations(model, batch, layers, batch_size: int = 32) -> dict:
    """``{layer: N×...}`` for one preprocessed batch; one onnxruntime session for the whole tap set."""
    layers = resolve_layers(model, layers)
    return model.run(batch, layers, batch_size=batch_size)


def iter_activations(model, chunks, layers, batch_size: int = 32):
    """For an iterable of ``(names, batch)`` chunks, yield ``(names, {layer: N×...})`` chunk by chunk.

    Memory stays bounded by one chunk whatever the number of images.
    """
    layers = resolve_layers(model, layers)
    for names, batch in chunks:
        yield names, model.run(batch, layers, batch_size=batch_size)


def feature_stack(model, image_batch, layer: str, reduce: str = "none", batch_size: int = 32) -> np.ndarray:
    """A layer's maps as a C×H×W stack: of one image (``reduce='none'`` with N == 1) or averaged /
    maximised over the images (``reduce='mean'|'max'``)."""
    acts = model.run(image_batch, [layer], batch_size=batch_size)[layer]
    if acts.ndim != 4:
        raise CnnvisError(f"layer {layer} outputs shape {acts.shape[1:]} per image; "
                          "a volume needs C×H×W feature maps (a convolution, pooling or LRN layer)")
    if reduce == "none":
        if len(acts) != 1:
            raise CnnvisError(f"reduce='none': {len(acts)} images given; pick one or use reduce='mean' or "
                              "reduce='max'", params="reduce")
        return acts[0]
    if reduce == "mean":
        return acts.mean(axis=0)
    if reduce == "max":
        return acts.max(axis=0)
    raise CnnvisError(f"reduce={reduce!r}: expected none, mean or max", params="reduce")


def as_maps(values) -> np.ndarray:
    """One image's layer output as maps: C×H×W as is; a feature vector as one near-square map
    (padded with NaN, which grids draw as background)."""
    values = np.asarray(values)
    if values.ndim == 3:
        return values
    if values.ndim == 1:
        n = values.size
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        flat = np.full(rows * cols, np.nan)
        flat[:n] = values
        return flat.reshape(1, rows, cols)
    if values.ndim == 2:
        return values[None]
    raise CnnvisError(f"cannot show an output of shape {values.shape} as maps")


def channel_stats(maps) -> dict:
    """Per-channel summary: max, mean, and whether a map is dead (all ≤ 0) or constant."""
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1)
    finite = np.where(np.isnan(flat), 0.0, flat)
    return {
        "max": np.nanmax(flat, axis=1),
        "mean": finite.mean(axis=1),
        "dead": np.nanmax(flat, axis=1) <= 0,
        "constant": np.nanmax(flat, axis=1) == np.nanmin(flat, axis=1),
    }


# ----------------------------------------------------------------------------- over a dataset


def channel_moments(acts) -> dict:
    """Per layer and channel, the partial statistics of one chunk ``{layer: N×C×...}``: every value
    of a channel (all images, all positions) is one sample. ``{layer: {count, mean, m2, max,
    active}}`` (float64 moments as :func:`cnnvis.analysis.stats.batch_moments` gives them; ``active``:
    how many values are > 0). :class:`DatasetChannelStats` merges them."""
    from . import stats

    out = {}
    for layer, values in acts.items():
        v = np.asarray(values)
        if v.ndim < 2 or v.shape[0] == 0:
            raise CnnvisError(f"layer {layer}: expected N×C×... activations, got shape {v.shape}")
        n, c = v.shape[:2]
        rows = np.moveaxis(v.reshape(n, c, -1), 1, 2).reshape(-1, c)  # samples × channels
        count, mean, m2 = stats.batch_moments(rows)
        out[layer] = {"count": np.int64(count), "mean": mean, "m2": m2,
                      "max": rows.max(axis=0).astype(np.float64),
                      "active": np.count_nonzero(rows > 0, axis=0).astype(np.int64)}
    return out


class DatasetChannelStats:
    """Per-channel mean, standard deviation (population, over every value of the channel), maximum
    and fraction of active (> 0) values of some layers over a stream of chunks.

    ``update(acts)`` takes a chunk; ``merge(part)`` takes :func:`channel_moments` of a chunk
    computed elsewhere (the parallel float64 update), so chunks merged in the same order give the
    same bits wherever they were computed."""

    def __init__(self):
        self.layers_: dict = {}
        self.n_images_ = 0

    def update(self, acts) -> "DatasetChannelStats":
        n = len(next(iter(acts.values())))
        return self.merge(channel_moments(acts), n)

    def merge(self, part: dict, n_images: int) -> "DatasetChannelStats":
        from .stats import RunningMoments

        for layer, p in part.items():
            entry = self.layers_.get(layer)
            if entry is None:
                entry = self.layers_[layer] = {"moments": RunningMoments(), "max": np.asarray(p["max"]),
                                               "active": np.asarray(p["active"], np.int64)}
            else:
                entry["max"] = np.maximum(entry["max"], p["max"])
                entry["active"] = entry["active"] + np.asarray(p["active"], np.int64)
            entry["moments"].merge(int(p["count"]), p["mean"], p["m2"])
        self.n_images_ += int(n_images)
        return self

    def summary(self) -> dict:
        """``{layer: {values_per_channel, mean, std, max, fraction_active}}`` (lists over channels)."""
        out = {}
        for layer, entry in self.layers_.items():
            m = entry["moments"]
            out[layer] = {"values_per_channel": int(m.count), "mean": m.mean.tolist(), "std": m.std(0).tolist(),
                          "max": entry["max"].tolist(), "fraction_active": (entry["active"] / m.count).tolist()}
        return out
