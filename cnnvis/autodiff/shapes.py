"""Static tensor shapes for building gradient graphs, without running the model.

onnx shape inference is fast once the big weights are left out, but it sizes ceil-mode pooling
without onnxruntime's rule (a window that would start in the end padding is dropped). Each
ceil-mode pool is therefore replaced, in a throwaway copy, by a floor-mode pool with the end
padding that gives onnxruntime's size, and inference is re-run.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..onnxgraph import real_inputs

_SMALL = 4096  # initializers up to this many elements keep their values (shape tensors, axes)


def _light_copy(model: onnx.ModelProto, sample_shape, batch: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = model.graph
    inputs = []
    image = real_inputs(model)[0]
    inputs.append(helper.make_tensor_value_info(image.name, image.type.tensor_type.elem_type, [batch, *sample_shape]))
    inits = []
    for init in g.initializer:
        if int(np.prod(init.dims)) <= _SMALL:
            inits.append(init)
        else:
            inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for extra in g.input[1:]:
        if extra.name not in {i.name for i in inputs} and extra.name not in {i.name for i in inits}:
            inputs.append(extra)
    outputs = [onnx.ValueInfoProto(name=o.name) for o in g.output]
    m.graph.CopyFrom(helper.make_graph(list(g.node), g.name or "g", inputs, outputs, inits))
    return m


def _infer(m):
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            shapes[vi.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def inferred_shapes(model: onnx.ModelProto, sample_shape, batch: int = 2):
    """Shapes of every tensor at batch size ``batch``; None if inference cannot size them all."""
    from .rules import pool_output_size

    m = _light_copy(model, tuple(sample_shape), batch)
    try:
        shapes = _infer(m)
        for node in m.graph.node:
            if node.op_type not in ("MaxPool", "AveragePool"):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if not attrs.get("ceil_mode", 0):
                continue
            in_shape = shapes.get(node.input[0])
            if in_shape is None or None in in_shape:
                return None
            spatial = len(in_shape) - 2
            kernel = list(attrs["kernel_shape"])
            strides = list(attrs.get("strides") or [1] * spatial)
            dil = list(attrs.get("dilations") or [1] * spatial)
            pads = list(attrs.get("pads") or [0] * (2 * spatial))
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"", ""):
                return None
            new_pads = list(pads)
            for i in range(spatial):
                size = in_shape[2 + i]
                out = pool_output_size(size, kernel[i], strides[i], pads[i], pads[spatial + i], True, dil[i])
                new_pads[spatial + i] = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size - pads[i])
            for a in node.attribute:
                if a.name == "ceil_mode":
                    a.i = 0
                if a.name == "pads":
                    del a.ints[:]
                    a.ints.extend(new_pads)
            if "pads" not in attrs:
                node.attribute.append(helper.make_attribute("pads", new_pads))
            shapes = _infer(m)
    except Exception:  # noqa: BLE001 - inference failures fall back to running the graph
        return None
    names = [o for n in model.graph.node for o in n.output if o]
    if any(shapes.get(n) is None or None in shapes[n] for n in names):
        return None
    return shapes
