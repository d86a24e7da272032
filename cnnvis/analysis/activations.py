"""Activations: what each layer outputs for a set of images.

:class:`Activations` takes a :class:`cnnvis.model.Model` and preprocessed batches; nothing here
knows of files or plots (those are :mod:`cnnvis.export`). :class:`DatasetChannelStats` accumulates
per-channel statistics over a stream of chunks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import ops
from ..errors import CnnvisError
from .base import Analysis

#: op types whose outputs are shown by default ("every layer" without the bookkeeping ones)
DEFAULT_LAYER_OPS = ops.DISPLAY_OPS


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


@dataclasses.dataclass
class ActivationsResult:
    """:meth:`Activations.run`'s result: the layers (table names, in order) and ``values``
    ``{layer: N×...}`` of the batch."""

    layers: list
    values: dict

    def __getitem__(self, layer) -> np.ndarray:
        return self.values[layer]


class Activations(Analysis):
    """What some layers output for a batch: ``Activations(model, layers).run(x)``.

    Parameters
    ----------
    model : :class:`cnnvis.model.Model`
    layers : layer names (``all`` or none: :func:`default_layers`); errors list the closest names.
    batch_size : images per onnxruntime call (one session for the whole tap set).
    """

    def __init__(self, model, layers=None, batch_size: int = 32):
        super().__init__(model, layers=layers, batch_size=batch_size)

    def run(self, inputs, target=None) -> ActivationsResult:
        """``{layer: N×...}`` of the batch ``inputs`` (N×C×H×W). ``target``: None (the layers
        are ``layers``); callers stream a dataset chunk by chunk, so memory stays bounded by one."""
        if target is not None:
            raise CnnvisError(f"target={target!r}: activations are of the layers given as layers=...",
                              params="target")
        layers = resolve_layers(self.model, self.layers)
        return ActivationsResult(layers, self.model.run(inputs, layers, batch_size=self.batch_size))


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
