"""The gradient engine: backward ONNX graphs built from forward ONNX models.

onnxruntime has no autograd, so cnnvis writes the backward pass itself: per-op rules
(:mod:`.rules`), a graph pass that chains them from an objective to the requested tensors
(:mod:`.graph`), an engine that caches the built graph and runs batches (:mod:`.engine`), and a
float64 finite-difference checker (:mod:`.gradcheck`).
"""
from .engine import GradientEngine, GradientResult, cached_engine, gradients
from .gradcheck import GradcheckReport, gradcheck, to_float64
from .graph import OBJECTIVES, GradientGraph, build_gradient_graph, build_objective_graph
from .rules import RULES, supported_ops

__all__ = [
    "GradientEngine", "GradientResult", "cached_engine", "gradients", "GradcheckReport", "gradcheck",
    "to_float64", "OBJECTIVES", "GradientGraph", "build_gradient_graph", "build_objective_graph", "RULES",
    "supported_ops",
]
