"""A small helper that appends ONNX nodes and constants with unique names.

Backward rules only talk to this class, so they read like the formulas they implement:
``b.mul(g, b.cast_like(b.op("Greater", [x, b.scalar(0)])))``.
"""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers for one ONNX graph; ``dtype`` is the model's float type."""

    def __init__(self, dtype=np.float32, taken=(), prefix: str = "cnnvis_bw"):
        self.dtype = np.dtype(dtype)
        self.elem_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken)
        self._prefix = prefix
        self._count = 0
        self._consts: dict = {}
        # facts about the forward graph that some rules use (set by the graph pass)
        self.backend = "onnxruntime"
        self.known_constants: dict = {}
        self.producer: dict = {}  # tensor -> forward node
        self.consumers: dict = {}  # tensor -> number of forward node inputs reading it
        self.protected: set = set()  # tensors whose own gradient is asked for (wrt, target)
        self.premasked: set = set()  # Relu outputs whose gradient a MaxPool rule already masked
        self.lrn_parts: dict = {}  # LRN output -> (normaliser s, s**beta) names the forward must define
        self.static_batch: int | None = None  # the one batch size the graph is built for, if any
        self.wants_static_batch = False  # set by a rule that has a faster form for a fixed batch size
        self.session_threads: int | None = None  # intra-op threads of the session that will run it

    @contextlib.contextmanager
    def emitting_into(self, nodes: list):
        """Append nodes to ``nodes`` instead of the backward list (for rewritten forward nodes)."""
        saved, self.nodes = self.nodes, nodes
        try:
            yield nodes
        finally:
            self.nodes = saved

    @contextlib.contextmanager
    def computing_in(self, dtype):
        """Write constants, masks and zeros in ``dtype`` (a rule in a region cast to another float type)."""
        saved = self.dtype, self.elem_type
        self.dtype = np.dtype(dtype)
        self.elem_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        try:
            yield
        finally:
            self.dtype, self.elem_type = saved

    # ------------------------------------------------------------------ names
    def fresh(self, hint: str = "t") -> str:
        while True:
            self._count += 1
            name = f"{self._prefix}/{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def reserve(self, name: str) -> str:
        self._taken.add(name)
        return name

    # ------------------------------------------------------------------ nodes
    def op(self, op_type: str, inputs, n_outputs: int = 1, outputs=None, hint: str | None = None, **attrs):
        """Append one node; returns its output name (or the list of names when n_outputs > 1)."""
        if outputs is None:
            outputs = [self.fresh(hint or op_type.lower()) for _ in range(n_outputs)]
        node = helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(f"{op_type}_node"), **attrs)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else list(outputs)

    # -------------------------------------------------------------- constants
    def const(self, value, dtype=None, hint: str = "const") -> str:
        """An initializer holding ``value`` (deduplicated for small constants)."""
        arr = np.asarray(value, dtype=dtype if dtype is not None else None)
        if dtype is None and arr.dtype.kind == "f":
            arr = arr.astype(self.dtype)
        key = None
        if arr.size <= 64:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        if key is not None:
            self._consts[key] = name
        return name

    def scalar(self, value) -> str:
        return self.const(np.array(value, dtype=self.dtype))

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1))

    # ------------------------------------------------------ arithmetic sugar
    def add(self, a, b):
        return self.op("Add", [a, b])

    def sub(self, a, b):
        return self.op("Sub", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def div(self, a, b):
        return self.op("Div", [a, b])

    def neg(self, a):
        return self.op("Neg", [a])

    def scale(self, a, factor: float):
        return a if factor == 1.0 else self.mul(a, self.scalar(factor))

    def mask(self, condition):
        """A boolean tensor as 0/1 in the model's float type."""
        return self.op("Cast", [condition], to=self.elem_type)

    def reduce_sum(self, x, axes, keepdims: int = 1):
        axes = [int(a) for a in axes]
        if not axes:
            return x
        return self.op("ReduceSum", [x, self.ints(axes)], keepdims=keepdims)

    def reshape(self, x, shape):
        target = shape if isinstance(shape, str) else self.ints(shape)
        return self.op("Reshape", [x, target])

    def shape_of(self, x):
        return self.op("Shape", [x])

    def transpose(self, x, perm):
        return self.op("Transpose", [x], perm=[int(p) for p in perm])

    def unsqueeze(self, x, axes):
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def zeros_like_shape(self, shape_name: str):
        """Zeros with a runtime shape (int64 1-D tensor)."""
        zero = numpy_helper.from_array(np.zeros(1, dtype=self.dtype))
        return self.op("ConstantOfShape", [shape_name], value=zero)

    def sum(self, names):
        names = list(names)
        if len(names) == 1:
            return names[0]
        return self.op("Sum", names)


def value_info(name: str, elem_type: int = TensorProto.UNDEFINED, shape=None):
    if elem_type == TensorProto.UNDEFINED:
        return onnx.ValueInfoProto(name=name)
    return helper.make_tensor_value_info(name, elem_type, shape)
