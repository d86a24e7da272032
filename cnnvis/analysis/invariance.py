"""Invariance to translation, scaling and rotation (Zeiler & Fergus 2014, section 4.4, Figure 5).

Each image is transformed by a sweep of amounts (vertical or horizontal shift in pixels, scale
factor about the centre, rotation in degrees about the centre); for every amount we record, per
chosen layer, the normalised Euclidean distance between the feature vectors of the transformed and
the original image, ‖f(T x) − f(x)‖ / ‖f(x)‖, and the probability of the class of interest.

Transforms act on the preprocessed input (so they work for any model and for ``--input-array``);
uncovered pixels get the neutral grey of the preprocessing. Bilinear interpolation; at the
identity (shift 0, scale 1, angle 0) the transform returns the input unchanged, so the distance
there is exactly 0.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import ops
from ..errors import CnnvisError
from ..preprocess import input_space
from .base import Analysis, PerImage
from .inputspace import FEATURE_OPS, probabilities

TRANSFORMS = ("translation", "scale", "rotation")
AXES = ("vertical", "horizontal")


def affine_matrix(kind: str, amount: float, axis: str = "vertical"):
    """(matrix, shift) mapping an output pixel (row, col) about the centre to its input pixel.

    ``translation``: the content moves by ``amount`` pixels (down or right); ``scale``: the
    content is enlarged ``amount`` times; ``rotation``: the content turns ``amount`` degrees
    counter-clockwise as displayed (row 0 at the top).
    """
    amount = float(amount)
    if kind == "translation":
        if axis not in AXES:
            raise CnnvisError(f"axis={axis!r}: expected one of {', '.join(AXES)}", params="axis")
        shift = np.array([amount, 0.0]) if axis == "vertical" else np.array([0.0, amount])
        return np.eye(2), shift
    if kind == "scale":
        if amount <= 0:
            raise CnnvisError(f"scale {amount}: expected a positive factor")
        return np.eye(2) / amount, np.zeros(2)
    if kind == "rotation":
        t = math.radians(amount)
        c, s = math.cos(t), math.sin(t)
        if amount % 90 == 0:  # exact quarter turns (cos/sin of multiples of pi/2 are not exact)
            c, s = float(round(c)), float(round(s))
        # (row, col) with rows pointing down: a counter-clockwise turn of the content maps the
        # output pixel back by the inverse rotation
        return np.array([[c, s], [-s, c]]), np.zeros(2)
    raise CnnvisError(f"transform {kind!r}: expected one of {', '.join(TRANSFORMS)}")


def transform_image(x, kind: str, amount: float, fill=0.0, axis: str = "vertical") -> np.ndarray:
    """Transform one C×H×W input; ``fill`` (scalar or per channel) where no input pixel lands."""
    from scipy.ndimage import affine_transform

    x = np.asarray(x)
    if x.ndim != 3:
        raise CnnvisError(f"transform: expected a C×H×W image, got shape {x.shape}")
    matrix, shift = affine_matrix(kind, amount, axis)
    centre = (np.array(x.shape[1:], dtype=np.float64) - 1.0) / 2.0
    # input = matrix @ (output - centre - shift) + centre
    offset = centre - matrix @ (centre + shift)
    fill = np.broadcast_to(np.asarray(fill, dtype=np.float64).reshape(-1), (x.shape[0],))
    out = np.empty(x.shape, dtype=np.float64)
    for ch in range(x.shape[0]):
        out[ch] = affine_transform(x[ch].astype(np.float64), matrix, offset=offset, order=1,
                                   mode="constant", cval=float(fill[ch]))
    return out.astype(x.dtype)


def default_amounts(kind: str, input_hw) -> np.ndarray:
    """The paper's kind of sweep, sized to the input: shifts of up to a quarter of the height,
    scales 0.6–1.8, rotations 0–360° every 30°."""
    if kind == "translation":
        limit = max(1, int(round(min(input_hw) / 4)))
        step = max(1, int(round(limit / 6)))
        right = np.arange(0, limit + 1, step)
        return np.concatenate([-right[:0:-1], right]).astype(np.float64)
    if kind == "scale":
        return np.round(np.arange(0.6, 1.8001, 0.1), 2)
    if kind == "rotation":
        return np.arange(0.0, 360.0001, 30.0)
    raise CnnvisError(f"transform {kind!r}: expected one of {', '.join(TRANSFORMS)}")


def feature_distance(features, reference) -> np.ndarray:
    """‖f − f₀‖ / ‖f₀‖ for each row of ``features`` (N×…) against ``reference`` (…)."""
    f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    r = np.asarray(reference, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(r)
    diff = np.linalg.norm(f - r[None], axis=1)
    if norm == 0:
        return np.where(diff == 0, 0.0, np.inf)
    return diff / norm


def first_feature_layer(model) -> str:
    """The output of the first convolution block (the first Conv and the pointwise ops after it)."""
    names = [layer.name for layer in model.layers]
    for i, layer in enumerate(model.layers):
        if layer.op_type == "Conv":
            j = i
            while j + 1 < len(names) and model.layers[j + 1].op_type in FEATURE_OPS[1:] \
                    and model.layers[j + 1].inputs[:1] == [model.layers[j].tensor]:
                j += 1
            return names[j]
    raise CnnvisError(f"model {model.name} has no convolution layer; name layers with layer=...",
                      params="layer")


def top_hidden_layer(model):
    """The layer feeding the logits through value-preserving ops (dropout, flatten, squeeze,
    transpose...: :data:`cnnvis.ops.VALUE_PRESERVING_OPS`), e.g. relu7 of AlexNet; None if none."""
    by_tensor = {layer.tensor: layer for layer in model.layers}
    logits = model.logits_layer
    tensor = logits.inputs[0] if logits.inputs else None
    layer = by_tensor.get(tensor)
    while layer is not None and layer.op_type in ops.VALUE_PRESERVING_OPS:
        layer = by_tensor.get(layer.inputs[0]) if layer.inputs else None
    return layer.name if layer is not None else None


def default_layers(model) -> list:
    """Layer 1 and the top hidden layer, as in the paper's Figure 5."""
    layers = [first_feature_layer(model)]
    top = top_hidden_layer(model)
    if top and top not in layers:
        layers.append(top)
    return layers


@dataclasses.dataclass
class InvarianceCurves:
    """One image's sweeps: for each transform, the amounts and per-amount measurements."""

    target: int
    layers: list
    amounts: dict  # transform -> (A,)
    distance: dict  # transform -> {layer: (A,)}
    probability: dict  # transform -> (A,) probability of ``target``
    top_class: dict  # transform -> (A,)
    inputs: dict | None = None  # transform -> A×C×H×W transformed images (run(..., keep_inputs=True))

    def rows(self, image: str = "") -> list:
        """Flat records (one per transform and amount) for CSV/JSON."""
        out = []
        for kind, amounts in self.amounts.items():
            for i, a in enumerate(amounts):
                row = {"image": image, "transform": kind, "amount": float(a), "target": self.target,
                       "probability": float(self.probability[kind][i]), "top_class": int(self.top_class[kind][i])}
                for layer in self.layers:
                    row[f"distance_{layer}"] = float(self.distance[kind][layer][i])
                out.append(row)
        return out


@dataclasses.dataclass
class InvarianceResult(PerImage):
    """:meth:`Invariance.run`'s result: one :class:`InvarianceCurves` per image, in order."""

    _per_image = "curves"
    curves: list


class Invariance(Analysis):
    """Feature distances and class probability along transformation sweeps:
    ``Invariance(model, layers=...).run(x, target)``.

    Parameters
    ----------
    model : :class:`cnnvis.model.Model`
    layers : layers whose feature vectors are compared (default: :func:`default_layers`).
    amounts : ``{transform: amounts}``; a transform left out uses :func:`default_amounts`; pass
        ``{"rotation": []}`` to skip one.
    axis : direction of the translation (``vertical`` as in the paper, or ``horizontal``).
    fill : value of uncovered pixels (default: the preprocessing's neutral grey).
    preprocessing : for the default fill (default: the model's own).
    batch_size : images per onnxruntime call.
    keep_inputs : also return the transformed images (to show what was measured; A×C×H×W per
        transform and image, so callers keeping them pass small batches).
    """

    def __init__(self, model, layers=None, amounts=None, axis: str = "vertical", fill=None, preprocessing=None,
                 batch_size: int = 32, keep_inputs: bool = False):
        super().__init__(model, layers=layers, amounts=amounts, axis=axis, fill=fill, preprocessing=preprocessing,
                         batch_size=batch_size, keep_inputs=keep_inputs)

    def sweeps(self) -> dict:
        given = dict(self.amounts or {})
        unknown = sorted(set(given) - set(TRANSFORMS))
        if unknown:
            raise CnnvisError(f"transforms {', '.join(unknown)}: expected {', '.join(TRANSFORMS)}")
        out = {}
        for kind in TRANSFORMS:
            values = given.get(kind)
            values = default_amounts(kind, self.model.input_shape[1:]) if values is None else np.asarray(values, float)
            if values.size:
                out[kind] = values.reshape(-1)
        if not out:
            raise CnnvisError("no transform amounts to sweep")
        return out

    def layer_names(self) -> list:
        """The compared layers, by their layer-table names."""
        return [self.model.layer(n).name for n in (self.layers or default_layers(self.model))]

    def transformed(self, image, kind: str, amounts=None) -> np.ndarray:
        """One preprocessed image (C×H×W) under each amount of transform ``kind`` (default: the
        sweep's amounts): A×C×H×W, uncovered pixels at the fill value — what :meth:`run` measures."""
        fill = self.fill
        if fill is None:
            fill = input_space(self.model, self.preprocessing).grey_.reshape(-1)
        amounts = self.sweeps()[kind] if amounts is None else amounts
        return np.stack([transform_image(image, kind, a, fill, self.axis) for a in amounts])

    def run(self, inputs, target=None) -> InvarianceResult:
        """The curves of each preprocessed image of the batch ``inputs`` (N×C×H×W); ``target``:
        one class for all, one per image, or None for each image's predicted class."""
        x = self.model.check_batch(inputs)
        targets = [None] * len(x) if target is None else np.broadcast_to(
            np.asarray(target, dtype=np.int64), (len(x),)).tolist()
        return InvarianceResult([self._image(image, t, self.keep_inputs) for image, t in zip(x, targets)])

    def _image(self, x, target, keep_inputs) -> InvarianceCurves:
        model = self.model
        layers = self.layer_names()
        sweeps = self.sweeps()
        names = list(dict.fromkeys(layers + [model.output_name]))
        ref = model.run(x[None], names, batch_size=1)
        ref_prob = probabilities(model, ref[model.output_name])[0]
        target = int(np.argmax(ref_prob)) if target is None else int(target)
        if not 0 <= target < ref_prob.shape[0]:
            raise CnnvisError(f"class {target}: expected an index in [0, {ref_prob.shape[0]})")
        distance, prob, top, inputs = {}, {}, {}, {}
        for kind, amounts in sweeps.items():
            batch = self.transformed(x, kind, amounts)
            if keep_inputs:
                inputs[kind] = batch
            out = model.run(batch, names, batch_size=self.batch_size)
            p = probabilities(model, out[model.output_name])
            prob[kind] = p[:, target]
            top[kind] = np.argmax(p, axis=1)
            distance[kind] = {layer: feature_distance(out[layer], ref[layer][0]) for layer in layers}
        return InvarianceCurves(target=target, layers=layers, amounts=sweeps, distance=distance,
                                probability=prob, top_class=top, inputs=inputs if keep_inputs else None)
