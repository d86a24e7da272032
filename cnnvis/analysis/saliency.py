"""Saliency maps of a class: vanilla gradient, guided backpropagation and Grad-CAM.

* ``gradient`` (Simonyan et al. 2014): the gradient of the class logit w.r.t. the input pixels;
  the heat map is the largest absolute value over the colour channels.
* ``guided`` (Springenberg et al. 2015): the same with the guided-backpropagation rule at every
  ReLU (only positive gradients through positive activations).
* ``gradcam`` (Selvaraju et al. 2017): at a convolutional layer (default: the last one with C×H×W
  maps), channel weights = spatial mean of the gradient of the class logit w.r.t. the layer's
  output; map = ReLU(Σ_c weight_c · activation_c), bilinearly upsampled to the input size.

All gradients come from :mod:`cnnvis.autodiff` (one engine, batches of images, one class per image).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CnnvisError
from .base import Analysis
from .inputspace import default_feature_layer, probabilities

METHODS = ("gradient", "guided", "gradcam")


def upsample_bilinear(maps, size) -> np.ndarray:
    """Bilinear resize of ``maps`` (…×h×w) to ``size`` (H, W) with pixel centres aligned
    (source coordinate = (dst + 0.5)·h/H − 0.5, clamped at the borders)."""
    maps = np.asarray(maps, dtype=np.float64)
    out = maps
    for axis, new in ((-2, size[0]), (-1, size[1])):
        old = out.shape[axis]
        pos = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0.0, old - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, old - 1)
        frac = pos - lo
        shape = [1] * out.ndim
        shape[axis] = new
        frac = frac.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1.0 - frac) + np.take(out, hi, axis=axis) * frac
    return out


def gradcam_from(activations, gradients) -> np.ndarray:
    """Grad-CAM maps (N×h×w) from a layer's activations and the class gradients there (N×C×h×w)."""
    a = np.asarray(activations, dtype=np.float64)
    g = np.asarray(gradients, dtype=np.float64)
    if a.ndim != 4 or a.shape != g.shape:
        raise CnnvisError(f"Grad-CAM needs N×C×H×W activations and gradients, got {a.shape} and {g.shape}")
    weights = g.mean(axis=(2, 3))
    return np.maximum(np.einsum("nc,nchw->nhw", weights, a), 0.0)


@dataclasses.dataclass
class SaliencyResult:
    """Maps for a batch: ``heatmap`` N×H×W at the input size (≥ 0); ``gradient`` N×C×H×W for the
    gradient methods; ``cam`` N×h×w at the layer's size for Grad-CAM."""

    method: str
    targets: np.ndarray
    probability: np.ndarray  # of each image's target class
    heatmap: np.ndarray
    gradient: np.ndarray | None = None
    cam: np.ndarray | None = None
    layer: str | None = None


class Saliency(Analysis):
    """Saliency maps for a model: ``Saliency(model, method=...).run(x, target)``.

    Parameters
    ----------
    model : :class:`cnnvis.model.Model`
    method : ``gradient``, ``guided`` or ``gradcam``.
    layer : Grad-CAM layer (default: the last layer with C×H×W maps).
    batch_size : images per onnxruntime call.
    """

    def __init__(self, model, method: str = "gradient", layer=None, batch_size: int = 32):
        super().__init__(model, method=method, layer=layer, batch_size=batch_size)

    def _engine(self, wrt, rule, outputs=()):
        # shared per model: run() is called chunk after chunk
        return self.model.gradient_engine([wrt], objective="logit", rule=rule, outputs=tuple(outputs),
                                          batch_size=int(self.batch_size))

    def run(self, inputs, target=None, probs=None) -> SaliencyResult:
        """Maps for a batch ``inputs`` (N×C×H×W); ``target``: one class for all, one per image, or
        None for each image's predicted class. ``probs``: the model's class probabilities for ``inputs``
        when the caller has them already (several methods on one batch need one forward pass)."""
        if self.method not in METHODS:
            raise CnnvisError(f"method={self.method!r}: expected one of {', '.join(METHODS)}", params="method")
        model = self.model
        x = model.check_batch(inputs)
        n = len(x)
        if probs is None:
            probs = probabilities(model, model.run(x, batch_size=self.batch_size)[model.output_name])
        probs = np.asarray(probs)
        if probs.shape[0] != n:
            raise CnnvisError(f"probs: {probs.shape[0]} rows for {n} images")
        if target is None:
            targets = np.argmax(probs, axis=1)
        else:
            targets = np.broadcast_to(np.asarray(target, dtype=np.int64), (n,)).copy()
        if ((targets < 0) | (targets >= probs.shape[1])).any():
            raise CnnvisError(f"class: expected indices in [0, {probs.shape[1]})")
        targets = targets.astype(np.int64)
        chosen = probs[np.arange(n), targets]
        if self.method in ("gradient", "guided"):
            engine = self._engine(model.input_name, self.method if self.method == "guided" else "gradient")
            grad = engine.run(x, index=targets)[model.input_name]
            heat = np.abs(grad.astype(np.float64)).max(axis=1)
            return SaliencyResult(self.method, targets, chosen, heat, gradient=grad)
        name = self.layer or default_feature_layer(model)
        layer = model.layer(name)
        if layer.output_shape is None or len(layer.output_shape) != 3:
            raise CnnvisError(f"layer={layer.name!r}: Grad-CAM needs a layer with C×H×W maps, "
                              f"it outputs {layer.output_shape}", params="layer")
        engine = self._engine(layer.tensor, "gradient", outputs=[layer.tensor])
        res = engine.run(x, index=targets)
        cam = gradcam_from(res.outputs[layer.tensor], res[layer.tensor])
        heat = upsample_bilinear(cam, x.shape[2:])
        return SaliencyResult("gradcam", targets, chosen, heat, cam=cam, layer=layer.name)

