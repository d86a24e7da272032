"""Input-space helpers the sensitivity analyses (occlusion, invariance, saliency, maximize) and the
CLI share: which class an image is about, the model's output as probabilities, and the default
feature layer. The neutral grey, the pixel range and the way back to a picture are
:class:`cnnvis.preprocess.InputSpace` (``input_space``)."""
from __future__ import annotations

import numpy as np

from .. import ops
from ..errors import CnnvisError

#: ops whose output is a feature map a user would call "the layer" (not pools or bookkeeping);
#: Conv first, then the ops that follow it in a block (invariance walks those)
FEATURE_OPS = ("Conv", *sorted(ops.FEATURE_OPS - {"Conv"}))


def resolve_class(model, spec, what: str = "class"):
    """A class index from an index or a name (None, '' and 'predicted' mean the predicted class)."""
    if spec is None or (isinstance(spec, str) and spec in ("", "predicted")):
        return None
    return model.class_index(spec, what)


def probabilities(model, output) -> np.ndarray:
    """The model's output as class probabilities (see :meth:`cnnvis.model.Model.probabilities`)."""
    return model.probabilities(np.asarray(output, dtype=np.float64))


def default_feature_layer(model) -> str:
    """The last layer whose output is C×H×W feature maps (e.g. relu5 of AlexNet)."""
    for layer in reversed(model.layers):
        if layer.op_type in FEATURE_OPS and layer.output_shape is not None and len(layer.output_shape) == 3:
            return layer.name
    raise CnnvisError(f"model {model.name} has no layer with C×H×W feature maps; name one with layer=...",
                      params="layer")
