"""Static tensor shapes for building gradient graphs, without running the model.

The inference itself (large weights left out, onnxruntime's ceil-mode pooling sizes) is
:func:`cnnvis.onnxgraph.static_shapes`; a gradient graph needs every tensor sized, so this says
None when inference cannot size them all (the caller then runs the forward graph instead).
"""
from __future__ import annotations

import onnx

from ..onnxgraph import static_shapes


def inferred_shapes(model: onnx.ModelProto, sample_shape, batch: int = 2):
    """Shapes of every tensor at batch size ``batch``; None if inference cannot size them all."""
    try:
        shapes = static_shapes(model, (batch, *tuple(sample_shape)))
    except Exception:  # noqa: BLE001 - inference failures fall back to running the graph
        return None
    names = [o for n in model.graph.node for o in n.output if o]
    if any(shapes.get(n) is None or None in shapes[n] for n in names):
        return None
    return shapes
