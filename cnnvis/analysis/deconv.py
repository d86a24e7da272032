"""Deconvnet projections (Zeiler & Fergus 2014): what in the input made one activation fire.

Keep one activation of a layer, zero the rest, and send it back to the pixels through the
network: unpooling by the max-pool switches of the forward pass, rectification of the backward
signal at each ReLU, and convolution with the transposed filters. This is the gradient engine with
``rule="deconvnet"`` and the objective "dot product of the layer with a seed", the seed holding
the kept activation's value at its position and zeros elsewhere; the projection is the gradient
with respect to the input.

Many projections run as one batch: row ``i`` of the batch is an image (repeated as needed) and
its own seed, so all the maps of a layer project in one engine call per ``batch_size`` rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CnnvisError
from ..model import chunk_bounds
from .base import Analysis
from .receptive import receptive_field

RULES = ("deconvnet", "guided", "gradient")

def projection_engine(model, layer: str, rule: str = "deconvnet", batch_size: int = 32):
    """The GradientEngine (shared per model) projecting seeds at ``layer`` back to the input."""
    if rule not in RULES:
        raise CnnvisError(f"rule={rule!r}: expected one of {', '.join(RULES)}", params="rule")
    tensor = model.tensor_name(layer)
    if tensor == model.input_name:
        raise CnnvisError(f"layer {layer}: is the input; name a layer to project from")
    return model.gradient_engine([model.input_name], objective="seed", target=tensor, rule=rule,
                                 batch_size=int(batch_size))


def layer_shape(model, layer: str) -> tuple:
    """Per-image output shape of a layer as (C, H, W) or (F,); errors for anything else."""
    shape = model.layer(layer).output_shape
    if shape is None or len(shape) not in (1, 3):
        raise CnnvisError(f"layer {layer}: output shape {shape} per image; expected C×H×W feature maps "
                          "or a feature vector")
    return tuple(int(d) for d in shape)


def unit_rows(units, shape) -> np.ndarray:
    """``units`` as an int64 (N, 3) array of (map, y, x); a vector layer's units are (f, 0, 0)."""
    arr = np.asarray(units, dtype=np.int64)
    if arr.ndim == 1:
        arr = arr[:, None] if len(shape) == 1 else arr[None]
    if len(shape) == 1 and arr.shape[1] == 1:
        arr = np.concatenate([arr, np.zeros((len(arr), 2), np.int64)], axis=1)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise CnnvisError(f"units: expected rows of (map, y, x), got shape {arr.shape}")
    dims = (shape[0], 1, 1) if len(shape) == 1 else shape
    for axis, (name, dim) in enumerate(zip(("map", "y", "x"), dims)):
        bad = (arr[:, axis] < 0) | (arr[:, axis] >= dim)
        if bad.any():
            raise CnnvisError(f"unit {name} {int(arr[bad, axis][0])}: must be in [0, {dim}) for a layer of "
                              f"shape {'×'.join(map(str, shape))}")
    return arr


def unit_values(acts, units) -> np.ndarray:
    """The activation of each row's unit: ``acts`` is N×C×H×W or N×F, ``units`` (N, 3)."""
    rows = np.arange(len(units))
    if acts.ndim == 2:
        return acts[rows, units[:, 0]]
    return acts[rows, units[:, 0], units[:, 1], units[:, 2]]


def strongest_units(acts) -> tuple:
    """Per map of one image's activations (C×H×W or F), the strongest unit (first in row-major
    order on ties): ``(units (C, 3) of (map, y, x), values (C,))``."""
    acts = np.asarray(acts)
    if acts.ndim == 1:
        acts = acts[:, None, None]
    c, h, w = acts.shape
    flat = acts.reshape(c, -1)
    best = np.argmax(flat, axis=1)  # argmax returns the first maximum
    units = np.stack([np.arange(c), best // w, best % w], axis=1).astype(np.int64)
    return units, flat[np.arange(c), best]


@dataclasses.dataclass
class DeconvResult:
    """:meth:`Deconvnet.run`'s result, one row per projection: ``images`` (M,) the row of the
    inputs it comes from, ``units`` (M, 3) of (map, y, x) (a vector layer's units are (f, 0, 0)),
    ``values`` (M,) the kept activations, ``projections`` M×C×H×W float32 (input space), and the
    layer's receptive ``field`` (:class:`~cnnvis.analysis.receptive.ReceptiveField`)."""

    layer: str
    rule: str
    images: np.ndarray
    units: np.ndarray
    values: np.ndarray
    projections: np.ndarray
    field: object

    def __len__(self):
        return len(self.units)


class Deconvnet(Analysis):
    """Projections of activations of ``layer`` back to the input:
    ``Deconvnet(model, layer).run(x, target=units)``.

    Parameters
    ----------
    model : :class:`cnnvis.model.Model`
    layer : the layer whose activations are projected (C×H×W maps or a feature vector).
    rule : ``deconvnet`` (Zeiler & Fergus), ``guided`` or ``gradient`` at the ReLUs.
    maps : without a ``target``, the maps projected for each image (default: all).
    position : without a ``target``, project each map's activation at (y, x) instead of its
        strongest one.
    batch_size : projection rows per engine call (memory stays bounded by it).
    """

    def __init__(self, model, layer, rule: str = "deconvnet", maps=None, position=None, batch_size: int = 32):
        super().__init__(model, layer=layer, rule=rule, maps=maps, position=position, batch_size=batch_size)

    def run(self, inputs, target=None, values=None) -> DeconvResult:
        """Projections for the batch ``inputs`` (N×C×H×W; may be a broadcast view, rows are copied
        chunk by chunk). ``target``: one unit (map, y, x) per image, each projected from its own
        image; None: for each image, each of ``maps``' strongest unit (or the unit at ``position``),
        image by image. ``values``: the kept activations of the ``target`` units (default: computed
        by a forward pass); a projection is linear in its seed, so it is scaled by the activation's
        value as in the paper."""
        model, layer = self.model, self.layer
        x = np.asarray(inputs)
        model.check_batch(x[:1])
        shape = layer_shape(model, layer)
        batch = int(self.batch_size)
        if target is None:
            images, units, values = self._chosen_units(x, shape)
        else:
            units = unit_rows(target, shape)
            if len(units) != len(x):
                raise CnnvisError(f"target: {len(x)} image rows but {len(units)} units (one unit per row)",
                                  params="target")
            images = np.arange(len(x))
            if values is None:
                values = np.concatenate([
                    unit_values(model.run(x[s:e].astype(np.float32), [layer], batch_size=batch)[layer], units[s:e])
                    for s, e in chunk_bounds(len(x), batch)]) if len(x) else np.zeros(0, np.float32)
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(values) != len(units):
            raise CnnvisError(f"values: {len(values)} values for {len(units)} rows", params="values")
        engine = projection_engine(model, layer, rule=self.rule, batch_size=batch)
        out = np.empty((len(units), *x.shape[1:]), dtype=np.float32)
        for start, stop in chunk_bounds(len(units), batch):
            seed = np.zeros((stop - start, *shape), dtype=np.float32)
            u = units[start:stop]
            rows = np.arange(stop - start)
            if len(shape) == 1:
                seed[rows, u[:, 0]] = values[start:stop]
            else:
                seed[rows, u[:, 0], u[:, 1], u[:, 2]] = values[start:stop]
            rows_x = np.ascontiguousarray(x[images[start:stop]], dtype=np.float32)
            out[start:stop] = engine.run(rows_x, seed=seed)[model.input_name]
        return DeconvResult(layer=layer, rule=self.rule, images=images, units=units, values=values, projections=out,
                            field=receptive_field(model, layer))

    def _chosen_units(self, x, shape):
        """Rows (image, unit, value) of each image's chosen maps, image by image."""
        model, layer = self.model, self.layer
        n_maps = shape[0]
        maps = list(range(n_maps)) if self.maps is None else [int(m) for m in self.maps]
        for m in maps:
            if not 0 <= m < n_maps:
                raise CnnvisError(f"map {m}: layer {layer} has maps 0..{n_maps - 1}")
        if self.position is not None and len(shape) == 1:
            raise CnnvisError(f"layer {layer} is a feature vector; a position (y, x) needs feature maps")
        images, units, values = [], [], []
        for i in range(len(x)):
            acts = model.run(model.check_batch(x[i:i + 1]), [layer])[layer][0]
            if self.position is None:
                chosen = strongest_units(acts)[0][maps]
            else:
                y, xx = (int(v) for v in self.position)
                chosen = unit_rows([(m, y, xx) for m in maps], shape)
            images.append(np.full(len(chosen), i, np.int64))
            units.append(chosen)
            values.append(unit_values(np.broadcast_to(acts, (len(chosen), *acts.shape)), chosen))
        if not images:
            return np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros(0, np.float32)
        return np.concatenate(images), np.concatenate(units), np.concatenate(values)


# ------------------------------------------------------------------------------------ display

def projection_display(projection, preprocessing) -> np.ndarray:
    """A projection (…×C×H×W, input space) as display tiles: channel order to RGB, values as they
    are (figure grids normalise each tile)."""
    from ..preprocess import channels_last

    return channels_last(np.asarray(projection, dtype=np.float64), preprocessing.channel_order)
