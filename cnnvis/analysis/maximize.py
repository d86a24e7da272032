"""Activation maximisation: input patterns that excite a channel or a class.

Start from seeded noise around the neutral grey and climb the gradient of the objective — a
channel's mean activation (``channel_mean``) or a class logit (``logit``) — with respect to the
input, one batch element per channel or class (a per-sample index), so many patterns are
optimised in one batch. Regularisers keep the patterns image-like (Yosinski et al. 2015):

* ``jitter``: each step sees the image rolled by a random offset of up to ``jitter`` pixels;
* ``blur_sigma`` / ``blur_every``: a Gaussian blur every few steps;
* ``decay``: L2 decay, pulling the pattern towards the neutral grey by that fraction per step;
* ``clip="range"``: keep every pixel inside the valid [0, 1] pixel range of the preprocessing;
* ``norm_bound``: keep the pattern within an L2 ball (input units) around the grey.

Each step moves by ``learning_rate`` × the pixel range along the gradient scaled to unit RMS per
pattern, so the same settings work for 0–255 Caffe inputs and 0–1 inputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CnnvisError
from ..preprocess import channels_last, input_space
from .base import Analysis
from .inputspace import default_feature_layer

OBJECTIVES = ("channel_mean", "logit")
CLIPS = ("range", "none")


@dataclasses.dataclass
class MaximizationResult:
    """:meth:`ActivationMaximization.run`'s result: ``patterns`` (N×C×H×W, input space) for the
    channel or class ``indices``, the final objective per pattern (without jitter), ``history``
    (steps×N objective values), the objective's ``layer`` and the input ``space`` (for display)."""

    indices: np.ndarray
    layer: str
    patterns: np.ndarray
    objective: np.ndarray
    history: np.ndarray
    space: object

    def display_tiles(self) -> np.ndarray:
        """The patterns as tiles for :func:`cnnvis.export.figures.grid_png`: N×H×W×3 RGB (colour
        models) or N×H×W (grey), deviations from the grey (each tile is min–max scaled there)."""
        p = self.patterns.astype(np.float64) - self.space.grey_[None]
        return np.ascontiguousarray(channels_last(p, self.space.preprocessing.channel_order))


class ActivationMaximization(Analysis):
    """Gradient ascent on the input for several channels or classes at once:
    ``ActivationMaximization(model, layer=...).run(None, target=indices)``.

    Parameters
    ----------
    model : :class:`cnnvis.model.Model`
    layer : layer whose channels are maximised (``channel_mean``; default: the last layer with
        C×H×W maps). Ignored for ``logit``.
    objective : ``channel_mean`` or ``logit``.
    steps, learning_rate : number and size of the ascent steps (see the module docstring).
    jitter, blur_sigma, blur_every, decay, clip, norm_bound : regularisers (module docstring).
    init_scale : standard deviation of the starting noise, as a fraction of the pixel range.
    seed : for the starting noise and the jitter offsets.
    preprocessing : defines the grey, the pixel range and the display (default: the model's).
    batch_size : patterns per onnxruntime call.
    """

    def __init__(self, model, layer=None, objective: str = "channel_mean", steps: int = 200,
                 learning_rate: float = 0.05, jitter: int = 0, blur_sigma: float = 0.0, blur_every: int = 4,
                 decay: float = 0.0, clip: str = "range", norm_bound=None, init_scale: float = 0.1,
                 seed: int = 0, preprocessing=None, batch_size: int = 32):
        super().__init__(model, layer=layer, objective=objective, steps=steps, learning_rate=learning_rate,
                         jitter=jitter, blur_sigma=blur_sigma, blur_every=blur_every, decay=decay, clip=clip,
                         norm_bound=norm_bound, init_scale=init_scale, seed=seed, preprocessing=preprocessing,
                         batch_size=batch_size)

    def _check(self):
        if self.objective not in OBJECTIVES:
            raise CnnvisError(f"objective={self.objective!r}: expected one of {', '.join(OBJECTIVES)}",
                              params="objective")
        if self.clip not in CLIPS:
            raise CnnvisError(f"clip={self.clip!r}: expected one of {', '.join(CLIPS)}", params="clip")
        if int(self.steps) < 0 or int(self.jitter) < 0 or int(self.blur_every) < 1:
            raise CnnvisError(f"steps={self.steps!r}, jitter={self.jitter!r}, blur_every={self.blur_every!r}: "
                              "expected steps and jitter >= 0 and blur_every >= 1",
                              params=("steps", "jitter", "blur_every"))
        if not 0.0 <= float(self.decay) < 1.0:
            raise CnnvisError(f"decay={self.decay!r}: expected a fraction in [0, 1)", params="decay")
        if self.norm_bound is not None and float(self.norm_bound) <= 0:
            raise CnnvisError(f"norm_bound={self.norm_bound!r}: expected a positive number", params="norm_bound")

    def target_layer(self):
        """The layer whose output the objective reads (the logits for ``logit``)."""
        if self.objective == "logit":
            return self.model.logits_layer
        return self.model.layer(self.layer or default_feature_layer(self.model))

    def run(self, inputs=None, target=None) -> MaximizationResult:
        """Optimise one pattern per channel (or class) index in ``target`` (default: every channel
        or class of the target layer). ``inputs``: the starting images (N×C×H×W, one per index;
        default: the grey plus seeded noise of ``init_scale``)."""
        self._check()
        model = self.model
        layer = self.target_layer()
        if target is None:
            target = range((layer.output_shape or (0,))[0])
        indices = np.atleast_1d(np.asarray(target))
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or len(indices) == 0:
            raise CnnvisError("target: expected a non-empty list of channel or class numbers", params="target")
        size = (layer.output_shape or (0,))[0]
        bad = indices[(indices < 0) | (indices >= size)]
        if bad.size:
            raise CnnvisError(f"index {int(bad[0])}: layer {layer.name} has {size} "
                              f"{'classes' if self.objective == 'logit' else 'channels'}")
        if self.objective == "channel_mean" and (layer.output_shape is None or len(layer.output_shape) < 2):
            raise CnnvisError(f"layer={layer.name!r}: outputs {layer.output_shape}; channel_mean needs C×H×W "
                              "maps (use objective='logit' for class neurons)", params=("layer", "objective"))
        space = input_space(model, self.preprocessing)
        engine = model.gradient_engine([model.input_name], objective=self.objective, target=layer.tensor,
                                       batch_size=int(self.batch_size))
        rng = np.random.default_rng(self.seed)
        n = len(indices)
        c, h, w = model.input_shape
        span = space.pixel_span.reshape(1, c, 1, 1)
        grey = space.grey_.reshape(1, c, *space.grey_.shape[1:])
        if inputs is None:
            x = grey + float(self.init_scale) * span * rng.standard_normal((n, c, h, w))
        else:
            x = model.check_batch(inputs).astype(np.float64)
            if len(x) != n:
                raise CnnvisError(f"inputs: {len(x)} starting images for {n} indices", params="inputs")
        x = self._constrain(x, space, grey)
        history = np.empty((int(self.steps), n))
        jitter = int(self.jitter)
        for step in range(int(self.steps)):
            shifts = rng.integers(-jitter, jitter + 1, size=(n, 2)) if jitter else None
            seen = _roll(x, shifts) if jitter else x
            res = engine.run(seen.astype(np.float32), index=indices.astype(np.int64))
            grad = res[model.input_name].astype(np.float64)
            if jitter:
                grad = _roll(grad, -shifts)
            history[step] = res.objective
            rms = np.sqrt((grad ** 2).reshape(n, -1).mean(axis=1)).reshape(n, 1, 1, 1)
            x = x + float(self.learning_rate) * span * grad / np.where(rms > 0, rms, 1.0)
            if self.decay:
                x = grey + (1.0 - float(self.decay)) * (x - grey)
            if self.blur_sigma and (step + 1) % int(self.blur_every) == 0:
                from scipy.ndimage import gaussian_filter

                x = gaussian_filter(x, sigma=(0, 0, float(self.blur_sigma), float(self.blur_sigma)), mode="nearest")
            x = self._constrain(x, space, grey)
        final = engine.run(x.astype(np.float32), index=indices.astype(np.int64))
        return MaximizationResult(indices=indices.astype(np.int64), layer=layer.name, patterns=x.astype(np.float32),
                                  objective=np.asarray(final.objective, dtype=np.float64), history=history,
                                  space=space)

    def _constrain(self, x, space, grey):
        if self.clip == "range":
            x = space.clip(x)
        if self.norm_bound is not None:
            d = x - grey
            norm = np.sqrt((d ** 2).reshape(len(x), -1).sum(axis=1)).reshape(-1, 1, 1, 1)
            x = grey + d * np.minimum(1.0, float(self.norm_bound) / np.where(norm > 0, norm, 1.0))
        return x


def _roll(x, shifts):
    out = np.empty_like(x)
    for i, (dy, dx) in enumerate(shifts):
        out[i] = np.roll(x[i], (int(dy), int(dx)), axis=(1, 2))
    return out

