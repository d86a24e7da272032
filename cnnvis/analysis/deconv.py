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


import numpy as np

from ..errors import CnnvisError
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


def project(model, x, layer: str, units, values=None, rule: str = "deconvnet", batch_size: int = 32) -> np.ndarray:
    """Deconvnet projections: row i keeps activation ``units[i]`` = (map, y, x) of ``layer`` for
    image ``x[i]`` and returns its projection to the input (N×C×H×W float32).

    ``values``: the kept activations (default: computed by a forward pass); a projection is linear
    in its seed, so it is scaled by the activation's value as in the paper. Memory stays bounded by
    ``batch_size`` rows.
    """
    x = np.asarray(x)  # may be a broadcast view of one image: rows are copied chunk by chunk
    model.check_batch(x[:1])
    shape = layer_shape(model, layer)
    units = unit_rows(units, shape)
    if len(units) != len(x):
        raise CnnvisError(f"project: {len(x)} image rows but {len(units)} units (one unit per row)")
    if values is None:
        values = np.concatenate([
            unit_values(model.run(x[s:s + batch_size].astype(np.float32), [layer], batch_size=batch_size)[layer],
                        units[s:s + batch_size])
            for s in range(0, len(x), batch_size)]) if len(x) else np.zeros(0, np.float32)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(values) != len(x):
        raise CnnvisError(f"project: {len(values)} values for {len(x)} rows")
    engine = projection_engine(model, layer, rule=rule, batch_size=batch_size)
    out = np.empty((len(x), *x.shape[1:]), dtype=np.float32)
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        seed = np.zeros((stop - start, *shape), dtype=np.float32)
        u = units[start:stop]
        rows = np.arange(stop - start)
        if len(shape) == 1:
            seed[rows, u[:, 0]] = values[start:stop]
        else:
            seed[rows, u[:, 0], u[:, 1], u[:, 2]] = values[start:stop]
        rows_x = np.ascontiguousarray(x[start:stop], dtype=np.float32)
        out[start:stop] = engine.run(rows_x, seed=seed)[model.input_name]
    return out


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


def deconv_image(model, image, layer: str, maps=None, position=None, rule: str = "deconvnet",
                 batch_size: int = 32) -> dict:
    """Project, for one image (C×H×W), each chosen map's strongest activation (or the activation at
    ``position`` = (y, x)) of ``layer``; all maps in one batched engine call per ``batch_size``.

    Returns ``maps``, ``units`` (M, 3), ``values`` (M,), ``projections`` (M×C×H×W) and
    ``field`` (the layer's :class:`~cnnvis.analysis.receptive.ReceptiveField`).
    """
    image = model.check_batch(np.asarray(image)[None])
    shape = layer_shape(model, layer)
    acts = model.run(image, [layer])[layer][0]
    n_maps = shape[0]
    maps = list(range(n_maps)) if maps is None else [int(m) for m in maps]
    for m in maps:
        if not 0 <= m < n_maps:
            raise CnnvisError(f"map {m}: layer {layer} has maps 0..{n_maps - 1}")
    if position is None:
        all_units, _ = strongest_units(acts)
        units = all_units[maps]
    else:
        if len(shape) == 1:
            raise CnnvisError(f"layer {layer} is a feature vector; a position (y, x) needs feature maps")
        y, xx = (int(v) for v in position)
        units = unit_rows([(m, y, xx) for m in maps], shape)
    values = unit_values(np.broadcast_to(acts, (len(units), *acts.shape)), units)
    rows = np.broadcast_to(image, (len(units), *image.shape[1:]))
    projections = project(model, rows, layer, units, values=values, rule=rule, batch_size=batch_size)
    return {"maps": maps, "units": units, "values": np.asarray(values, np.float32), "projections": projections,
            "field": receptive_field(model, layer)}


# ------------------------------------------------------------------------------------ display

def projection_display(projection, preprocessing) -> np.ndarray:
    """A projection (…×C×H×W, input space) as display tiles: channel order to RGB, values as they
    are (figure grids normalise each tile)."""
    from ..preprocess import channels_last

    return channels_last(np.asarray(projection, dtype=np.float64), preprocessing.channel_order)
