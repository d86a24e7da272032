"""ONNX graph utilities shared by the model, the gradient engine and the Caffe importer.

One place for: the opset/IR version cnnvis writes, building models that onnxruntime loads,
constant folding, a dynamic batch dimension, static shape inference, and onnxruntime sessions with
execution-provider selection.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import ops
from .errors import CnnvisError
from .ops import attributes, floor_mode_pads, pool_output_size, window  # noqa: F401  (pool_output_size: callers import it from here)

#: Opset and IR version of every model cnnvis writes. onnx>=1.23 defaults to IR 14 / opset 28,
#: which current onnxruntime refuses; these are accepted by onnxruntime >= 1.14.
OPSET = 17
IR_VERSION = 8


def make_model(graph: onnx.GraphProto, opset: int = OPSET, producer: str = "cnnvis") -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = IR_VERSION
    return model


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return OPSET


def tensor_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def initializer_map(model: onnx.ModelProto) -> dict:
    return {init.name: init for init in model.graph.initializer}


def real_inputs(model: onnx.ModelProto) -> list:
    """Graph inputs that are fed at run time (not initializers listed as inputs, as IR<4 does)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _run_single_node(node: onnx.NodeProto, values: dict, opset: int) -> list:
    from onnx.reference import ReferenceEvaluator

    inputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in node.input if n]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in node.output if n]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    model = make_model(graph, opset=max(opset, 7))
    ref = ReferenceEvaluator(model)
    return ref.run(None, {n: values[n] for n in node.input if n})


#: Constant's attributes other than ``value``: (name, numpy dtype of the value) — ONNX Constant op spec
_CONSTANT_LISTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}


def constant_node_value(node: onnx.NodeProto):
    """The numpy value of a ``Constant`` node (any of its forms: ``value``, ``value_float(s)``,
    ``value_int(s)``, as PyTorch's dynamo exporter writes a Reshape target ``[-1]``), else None
    (not a Constant of the default domain, or a string or sparse constant)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name in _CONSTANT_LISTS:
        return np.array(helper.get_attribute_value(a), dtype=_CONSTANT_LISTS[a.name])
    return None


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constants and store its outputs as initializers.

    Graph inputs that have an initializer (old IR versions list weights as inputs) are treated as
    constants and removed from the inputs. Afterwards every weight computed by the file (e.g. the
    ``ConstantOfShape`` nodes of the onnx test-data AlexNet) is a named initializer. Initializers
    are converted to numpy only when a node that uses them is folded (weights can be large).
    """
    opset = opset_of(model)
    if opset < 13:
        model = upgrade_opset(model, opset)
        opset = opset_of(model)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    folded: dict = {}  # name -> numpy value computed here

    def value(name):
        if name in folded:
            return folded[name]
        return numpy_helper.to_array(inits[name])

    kept_nodes = []
    for node in graph.node:
        constant = constant_node_value(node)
        if constant is not None:
            folded[node.output[0]] = constant
            continue
        foldable = (
            node.domain in ("", "ai.onnx")
            and any(node.input)  # nodes without inputs (other than Constant) are left alone
            and all((not n) or n in folded or n in inits for n in node.input)
            and not node.op_type.startswith("Random") and node.op_type != "Multinomial"
        )
        if foldable:
            try:
                outs = _run_single_node(node, {n: value(n) for n in node.input if n}, opset)
            except Exception:  # an op the reference evaluator cannot run stays in the graph
                kept_nodes.append(node)
                continue
            for name, val in zip([o for o in node.output if o], outs):
                folded[name] = np.asarray(val)
            continue
        kept_nodes.append(node)

    used = _ordered_unique([n for node in kept_nodes for n in node.input if n]
                           + [o.name for o in graph.output])
    new_inits = []
    for name in used:
        if name in folded:
            new_inits.append(numpy_helper.from_array(folded[name], name))
        elif name in inits:
            new_inits.append(inits[name])
    constant = set(folded) | set(inits)
    inputs = [i for i in graph.input if i.name not in constant]
    new_graph = helper.make_graph(kept_nodes, graph.name or "graph", inputs, list(graph.output), new_inits)
    out = make_model(new_graph, opset=opset)
    _copy_metadata(model, out)
    return out


def upgrade_opset(model: onnx.ModelProto, from_opset: int) -> onnx.ModelProto:
    """Mark an old-opset model as opset 17 after converting it (ops cnnvis uses changed little)."""
    # The onnx version converter handles the op-by-op changes (Dropout, Reshape, Softmax axes...).
    from onnx import version_converter

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.opset_import[:]
    m.opset_import.extend([helper.make_opsetid("", from_opset)])
    try:
        converted = version_converter.convert_version(m, OPSET)
    except Exception as exc:  # pragma: no cover - depends on the file
        raise CnnvisError(f"cannot convert the model from opset {from_opset} to {OPSET}: {exc}") from None
    converted.ir_version = IR_VERSION
    return converted


def _copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto):
    for p in src.metadata_props:
        dst.metadata_props.add(key=p.key, value=p.value)


def _ordered_unique(seq):
    seen = set()
    out = []
    for s in seq:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def prune(nodes, initializers, outputs) -> tuple:
    """The nodes (in order) and initializers needed to compute ``outputs``; the rest dropped."""
    needed = set(outputs)
    kept = []
    for node in reversed(list(nodes)):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    return kept, [i for i in initializers if i.name in needed]


def drop_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (edited in place) without the nodes and initializers its outputs do not need:
    onnxruntime runs every node of a graph, so a session answering an early layer would still run
    the rest (AlexNet's fully connected layers: 244 MB of weights read per batch for a conv5 tap).
    A graph with subgraphs (If, Loop, Scan), whose bodies may read outer tensors, is left whole."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return model
    nodes, inits = prune(g.node, g.initializer, [o.name for o in g.output])
    kept_outputs = {o for n in nodes for o in n.output}
    kept_inits = {i.name for i in inits}
    # in place, by position (the weights are not copied)
    for k in reversed(range(len(g.node))):
        if not any(o in kept_outputs for o in g.node[k].output):
            del g.node[k]
    for k in reversed(range(len(g.initializer))):
        if g.initializer[k].name not in kept_inits:
            del g.initializer[k]
    return model


def make_batch_dynamic(model: onnx.ModelProto, batch_name: str = "N") -> onnx.ModelProto:
    """Give the single image input and all outputs a symbolic batch dimension.

    A ``Reshape`` whose constant target starts with the file's fixed batch size (``[1, -1]`` in the
    zoo AlexNet) gets ``0`` there instead, meaning "copy the batch dimension". With ``allowzero=1``
    (dynamo exports) a 0 would mean a literal zero: when the target has no other zero, allowzero
    changes nothing else and is dropped, so the 0 copies the batch. Targets with another zero are
    left as they are (with allowzero a literal zero, which only an empty tensor can take).
    A file whose batch was 1 also gets its dynamo ``as_strided`` selections made per image
    (:func:`_per_image_gathers`).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inputs = real_inputs(m)
    if len(inputs) != 1:
        return m
    dims = inputs[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else None
    if len(dims):
        dims[0].Clear()
        dims[0].dim_param = batch_name
    for out in m.graph.output:
        odims = out.type.tensor_type.shape.dim
        if len(odims):
            odims[0].Clear()
            odims[0].dim_param = batch_name
    del m.graph.value_info[:]
    if fixed:
        inits = initializer_map(m)
        for node in m.graph.node:
            if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in inits:
                shape = numpy_helper.to_array(inits[node.input[1]]).copy()
                if not (shape.size and shape[0] == fixed) or (shape[1:] == 0).any():
                    continue  # a literal zero (allowzero=1) empties the tensor at any batch
                if attributes(node).get("allowzero", 0):
                    kept = [a for a in node.attribute if a.name != "allowzero"]
                    del node.attribute[:]
                    node.attribute.extend(kept)
                shape[0] = 0
                new = numpy_helper.from_array(shape.astype(np.int64), node.input[1])
                inits[node.input[1]].CopyFrom(new)
    if fixed == 1:
        _per_image_gathers(m)
    return m


def _constant_values(model: onnx.ModelProto) -> dict:
    """name -> value of every initializer (its TensorProto: weights are converted when read) and
    Constant node output (numpy, :func:`constant_node_value`)."""
    values = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        constant = constant_node_value(node)
        if constant is not None:
            values[node.output[0]] = constant
    return values


def _per_image_gathers(m: onnx.ModelProto) -> None:
    """In place, on a graph made batch-dynamic from a file whose batch was 1: rewrite a dynamo
    export's ``as_strided`` — Reshape to ``[-1]`` (the whole tensor, batch included) then Gather
    (axis 0) of constant indices — into the same selection per image: Reshape to ``[-1, P]`` (P the
    per-image size) then Gather along axis 1. At batch 1 the values are the file's; at batch N each
    image's row is selected from that image alone, so the graph runs batched and the Gather is no
    longer along the batch axis (its backward rule applies).

    Rewritten only when it is proven to be that selection: the flattened tensor is ``[b, *rest]`` at
    batch b = 1 and 2 (its first axis is the batch, the rest static), every index lies within one
    image (``-P <= i < P``, negatives counted from that image's end, as at batch 1), and the Gather's
    output keeps a batch axis — indices of shape ``(1, ...)`` (the leading 1 becomes the batch), or
    else the Gather's only consumer is a Reshape whose target copies the batch (``0`` first, without
    ``allowzero``). Every consumer of the flattened tensor must be such a Gather. Anything else is
    left as it is (a gradient through it then stops at the Gather rule's one-line error)."""
    consts = _constant_values(m)
    graph = m.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def value(name):
        c = consts.get(name)
        return numpy_helper.to_array(c) if isinstance(c, onnx.TensorProto) else c

    def flattening(node):
        if node is None or node.op_type != "Reshape" or len(node.input) < 2:
            return False
        target = value(node.input[1])
        return target is not None and target.size == 1 and int(target.reshape(-1)[0]) == -1

    candidates = {}
    for node in graph.node:
        if node.op_type != "Gather" or int(attributes(node).get("axis", 0)) not in (0, -1):
            continue
        flat = producer.get(node.input[0])
        if flattening(flat) and value(node.input[1]) is not None and flat.output[0] not in outputs:
            candidates.setdefault(flat.output[0], (flat, []))[1].append(node)
    if not candidates:
        return
    image = real_inputs(m)[0]
    sample = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim[1:]]
    if None in sample:
        return
    try:
        at = [static_shapes(m, (b, *sample)) for b in (1, 2)]
    except Exception:  # noqa: BLE001 - no shapes: nothing proven, nothing rewritten
        return
    for flat_name, (flat, gathers) in candidates.items():
        src = flat.input[0]
        s1, s2 = at[0].get(src), at[1].get(src)
        if not s1 or not s2 or None in s1 or None in s2 or s1[0] != 1 or s2[0] != 2 or s1[1:] != s2[1:]:
            continue
        per_image = int(np.prod(s1[1:], dtype=np.int64))
        if sum(i == flat_name for c in consumers.get(flat_name, []) for i in c.input) != len(gathers):
            continue  # the flattened tensor also feeds something else
        plans = []
        for gather in gathers:
            idx = value(gather.input[1]).astype(np.int64)
            if idx.size == 0 or idx.min() < -per_image or idx.max() >= per_image:
                break  # an index outside one image: not a per-image selection
            idx = np.where(idx < 0, idx + per_image, idx)
            if idx.ndim and idx.shape[0] == 1:
                plans.append((gather, idx[0]))
                continue
            after = consumers.get(gather.output[0], [])
            target = value(after[0].input[1]) if len(after) == 1 and after[0].op_type == "Reshape" \
                and len(after[0].input) > 1 else None
            if gather.output[0] in outputs or target is None or not target.size or int(target[0]) != 0 \
                    or attributes(after[0]).get("allowzero", 0):
                break
            plans.append((gather, idx))
        else:
            replaced = [flat.input[1]]
            flat.input[1] = _new_initializer(graph, f"{flat_name}_per_image_shape",
                                             np.array([-1, per_image], np.int64))
            for gather, idx in plans:
                replaced.append(gather.input[1])
                gather.input[1] = _new_initializer(graph, f"{gather.output[0]}_per_image_indices", idx)
                kept = [a for a in gather.attribute if a.name != "axis"]
                del gather.attribute[:]
                gather.attribute.extend(kept + [helper.make_attribute("axis", 1)])
            used = {i for n in graph.node for i in n.input if i} | outputs
            unused = [i for i in graph.initializer if i.name in replaced and i.name not in used]
            for init in unused:
                graph.initializer.remove(init)
            for node in [nd for nd in graph.node if nd.op_type == "Constant" and nd.output[0] in replaced
                         and nd.output[0] not in used]:
                graph.node.remove(node)


def _new_initializer(graph, name: str, value) -> str:
    """Add ``value`` as an initializer under ``name`` (suffixed until no tensor has that name)."""
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} \
        | {i.name for i in graph.input}
    unique, k = name, 1
    while unique in taken:
        unique, k = f"{name}_{k}", k + 1
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), unique))
    return unique


def fold_shape_arithmetic(model: onnx.ModelProto, sample_shape, batches=(1, 2)) -> onnx.ModelProto:
    """``model`` with its shape arithmetic folded to initializers for images of ``sample_shape``
    (C, H, W): the tensors computed from Shape/Size and constants only (:func:`ops.data_tensors`;
    the Shape → Gather → Add → Div → Mul bounds of a TorchScript ``torch.chunk`` Slice) that have
    the same value at every batch size. The graph is run once per batch size of ``batches`` (on
    zeros: these tensors never depend on the values) and the tensors equal in all runs become
    initializers; those that follow the batch (a Reshape target ``[N, -1]``) and the nodes they
    need stay, so the model still takes any batch. ``model`` itself when it has no such tensor
    or cannot run (loading it reports that in one line)."""
    from .ops import SHAPE_SOURCE_OPS, data_tensors

    graph = model.graph
    if not any(n.op_type in SHAPE_SOURCE_OPS for n in graph.node):
        return model
    data = data_tensors(model)
    shape_only = [o for n in graph.node for o in n.output if o and o not in data]
    exact = set(shape_only)
    try:
        runs = _run_shape_only(model, shape_only, sample_shape, batches)
    except Exception:  # noqa: BLE001 - a model that cannot run is reported by its own check
        runs = None
    if runs is None and _computes_in_float64(model):
        # onnxruntime's CPU kernels of Conv, pools... take no float64: probe the model in float32.
        # Shapes do not depend on the precision; only the tensors computed from shapes and integer
        # constants without any float arithmetic are taken from that run (float64 ones are not)
        try:
            exact = _integer_shape_arithmetic(model, data, static_shapes_and_types(model, (1, *sample_shape))[1])
        except Exception:  # noqa: BLE001 - no types: nothing proven exact
            exact = set()
        try:
            runs = _run_shape_only(_retyped(model, (TensorProto.DOUBLE,), stash=True), shape_only,
                                   sample_shape, batches)
        except Exception:  # noqa: BLE001
            runs = None
    if runs is None:
        return model
    fixed = {name: runs[0][k] for k, name in enumerate(shape_only) if name in exact
             and all(r[k].shape == runs[0][k].shape and np.array_equal(r[k], runs[0][k]) for r in runs[1:])}
    if not fixed:
        return model
    kept = [n for n in graph.node if not all(o in fixed for o in n.output if o)]
    outputs = [o.name for o in graph.output]
    nodes, _ = prune(kept, [], outputs)  # a Shape whose every use was folded goes too
    used = {i for n in nodes for i in n.input if i} | set(outputs)
    inits = list(graph.initializer) + [numpy_helper.from_array(np.asarray(fixed[name]), name)
                                       for name in shape_only if name in fixed and name in used]
    new_graph = helper.make_graph(nodes, graph.name or "graph", list(graph.input), list(graph.output), inits)
    out = make_model(new_graph, opset=opset_of(model))
    _copy_metadata(model, out)
    return out


def _run_shape_only(model: onnx.ModelProto, shape_only: list, sample_shape, batches) -> list:
    """The values of the tensors ``shape_only`` in onnxruntime, one list per batch size of
    ``batches``, the image all zeros (raises what loading or running raises)."""
    image = real_inputs(model)[0]
    probe = with_outputs(model, shape_only, static_shapes_and_types(model, (1, *sample_shape))[1])
    sess = create_session(probe, device="cpu", threads=1)
    dtype = helper.tensor_dtype_to_np_dtype(probe.graph.input[[i.name for i in probe.graph.input]
                                                             .index(image.name)].type.tensor_type.elem_type)
    return [sess.run(shape_only, {image.name: np.zeros((b, *sample_shape), dtype)}) for b in batches]


def _computes_in_float64(model: onnx.ModelProto) -> bool:
    """Whether the graph has float64 weights, inputs, outputs or Casts to float64."""
    g = model.graph
    double = TensorProto.DOUBLE
    return (any(i.data_type == double for i in g.initializer)
            or any(v.type.tensor_type.elem_type == double for v in list(g.input) + list(g.output))
            or any(n.op_type == "Cast" and attributes(n).get("to") == double for n in g.node))


def _integer_shape_arithmetic(model: onnx.ModelProto, data: set, elem_types: dict) -> set:
    """The shape-only tensors (not in ``data``) whose values no float arithmetic touched: integer or
    bool tensors (``elem_types``: onnx's inferred element types) computed by Shape/Size (of any
    tensor: only its shape is read), or by another node from such tensors and integer or bool
    constants only. A float32 run of a float64 model gives them exactly as the model does."""
    def exact_type(elem_type) -> bool:
        return elem_type is not None and elem_type in _INTEGER_TYPES

    exact = {name for name, c in _constant_values(model).items()
             if exact_type(c.data_type if isinstance(c, onnx.TensorProto)
                           else helper.np_dtype_to_tensor_dtype(c.dtype))}
    for node in model.graph.node:
        outs = [o for o in node.output if o]
        if node.op_type == "Constant" or any(o in data for o in outs):
            continue
        if node.op_type in ops.SHAPE_SOURCE_OPS or all(i in exact for i in node.input if i):
            exact.update(o for o in outs if exact_type(elem_types.get(o)))
    return exact


_INTEGER_TYPES = frozenset({TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                            TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
                            TensorProto.BOOL})


def static_shapes(model: onnx.ModelProto, input_shape, onnxruntime_pools: bool = True) -> dict:
    """Shapes of every tensor (see :func:`static_shapes_and_types`)."""
    return static_shapes_and_types(model, input_shape, onnxruntime_pools)[0]


def static_shapes_and_types(model: onnx.ModelProto, input_shape, onnxruntime_pools: bool = True) -> tuple:
    """``(shapes, elem_types)``: shapes of every tensor for a fixed input shape (N, C, H, W), by onnx shape inference.
    ``input_shape`` may also be a dict giving the shape of each runtime input by name.
    ``onnxruntime_pools=False`` keeps the ONNX specification's sizes of the window ops below.

    Large initializers are replaced by typed graph inputs first, so that inference does not copy
    hundreds of megabytes of weights. Where onnx sizes a window op otherwise than onnxruntime runs
    it, the op is replaced, in that throwaway copy, by one with explicit pads that onnx sizes as
    onnxruntime does (:func:`_onnxruntime_sized`): ceil-mode pools (onnxruntime drops a window that
    would start in the end padding), SAME-padded dilated pools (onnxruntime pads them by the
    undilated kernel) and SAME-padded ConvTranspose with ``output_padding`` (onnxruntime's output
    is ``size * stride`` long, onnx adds the output padding). The ops are taken in graph order,
    shapes inferred again after one whose size changed, so an op after it is sized from its real
    input. Tensors inference cannot size have None dimensions (or are absent). ``elem_types`` maps
    each tensor inference could type to its ONNX element type (``TensorProto.FLOAT16``, ``INT64``...).
    """
    graph = model.graph
    small, large = [], []
    for init in graph.initializer:
        (small if int(np.prod(init.dims)) <= 4096 else large).append(init)
    fed = {i.name: i for i in real_inputs(model)}
    if not isinstance(input_shape, dict):
        input_shape = {next(iter(fed)): input_shape}
    typed_inputs = [helper.make_tensor_value_info(name, fed[name].type.tensor_type.elem_type, list(shape))
                    for name, shape in input_shape.items()]
    typed_inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in large]
    outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in graph.output]
    nodes = [_copy(n) for n in graph.node]  # the rewrites below edit these copies
    light = make_model(helper.make_graph(nodes, "shapes", typed_inputs, outputs, small), opset=opset_of(model))
    shapes, types = _infer_shapes(light)
    stale = False  # a rewritten op changed a size since shapes were inferred
    for node in light.graph.node if onnxruntime_pools else ():
        if node.op_type not in ops.WINDOW_OPS:
            continue
        if stale:
            shapes, types = _infer_shapes(light)
            stale = False
        in_shape, out_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
        if in_shape is None or None in in_shape:
            continue
        rewritten = _onnxruntime_sized(node, in_shape)
        if rewritten is None:
            continue
        attrs, sizes = rewritten
        node.CopyFrom(helper.make_node(node.op_type, list(node.input), list(node.output), name=node.name,
                                       domain=node.domain, **attrs))
        stale = out_shape is None or tuple(out_shape[2:]) != tuple(sizes)
    if stale:
        shapes, types = _infer_shapes(light)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _onnxruntime_sized(node, in_shape):
    """``(attributes, out_sizes)`` of a stand-in for ``node`` (a window op over ``in_shape``) that
    onnx shape inference sizes as onnxruntime runs ``node``, or None where onnx already does.

    Only for shape inference: a pool becomes a floor-mode pool with the same strides and begin
    pads and an undilated kernel as long as the dilated one, whose end pads make onnxruntime's
    number of windows (:func:`cnnvis.ops.floor_mode_pads` for ceil mode,
    :func:`cnnvis.ops.same_pool_output_size` for SAME padding); where onnxruntime's SAME pads are
    negative (a dilated kernel shorter than its stride), no end pad is small enough and the kernel
    grows instead. A SAME ConvTranspose gets :func:`cnnvis.ops.window`'s explicit pads.
    """
    attrs = attributes(node)
    auto_pad = attrs.get("auto_pad") or "NOTSET"
    sizes = [int(d) for d in in_shape[2:]]
    if node.op_type == "ConvTranspose":
        if auto_pad not in ("SAME_UPPER", "SAME_LOWER") or "output_shape" in attrs \
                or not any(attrs.get("output_padding") or []):
            return None
        win = window(node, in_shape, attrs=attrs)
        n = win.spatial
        out_pad = list(attrs["output_padding"])
        out = [win.strides[i] * (sizes[i] - 1) + out_pad[i] + win.extent[i] - win.pads[i] - win.pads[n + i]
               for i in range(n)]
        attrs.update(auto_pad="NOTSET", pads=list(win.pads))
        return attrs, out
    if node.op_type not in ops.POOL_OPS:
        return None
    dilated = any(int(d) != 1 for d in attrs.get("dilations") or [])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") and dilated:
        win = window(node, in_shape, attrs=attrs)
        out = [ops.same_pool_output_size(sizes[i], win.kernel[i], win.strides[i], win.dilations[i])
               for i in range(win.spatial)]
    elif auto_pad == "NOTSET" and attrs.get("ceil_mode", 0) and node.op_type in ("MaxPool", "AveragePool"):
        win = window(node, in_shape, attrs=attrs)
        out, _ = floor_mode_pads(win, sizes)
    else:
        return None
    n = win.spatial
    ends = [(out[i] - 1) * win.strides[i] + win.extent[i] - sizes[i] - win.pads[i] for i in range(n)]
    kernel = [win.extent[i] + max(0, -ends[i]) for i in range(n)]
    for key in ("ceil_mode", "dilations", "auto_pad"):
        attrs.pop(key, None)
    attrs.update(kernel_shape=kernel, pads=list(win.pads_begin) + [max(0, e) for e in ends])
    return attrs, out


def _copy(node):
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _infer_shapes(model) -> tuple:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes, types = {}, {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return shapes, types


# ---------------------------------------------------------------- onnxruntime sessions

DEVICES = ("auto", "cpu", "cuda")


def select_providers(device: str = "auto", available=None) -> list:
    """Execution providers for ``device``: CUDA first when it is asked for or available, else CPU."""
    if device not in DEVICES:
        raise CnnvisError(f"device={device!r}: expected one of {', '.join(DEVICES)}", params="device")
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda":
        if not has_cuda:
            raise CnnvisError(
                "device='cuda': onnxruntime has no CUDAExecutionProvider here "
                f"(available: {', '.join(available)}); install onnxruntime-gpu and a CUDA driver", params="device")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(model, device: str = "auto", threads: int | None = None, spinning: bool = True):
    """An onnxruntime InferenceSession for a ModelProto (or serialized bytes).

    ``spinning=False`` lets idle worker threads sleep: for code that alternates between several
    small sessions, spin-waiting threads of one would otherwise keep a core busy while another runs.
    """
    import onnxruntime as ort

    data = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    providers = select_providers(device)
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as exc:
        if providers[0] == "CUDAExecutionProvider" and device == "auto":
            # A CUDA provider that is listed but cannot start (no driver, no GPU) falls back to CPU.
            return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        raise CnnvisError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


class _NodeWriter:
    """The builder calls :func:`write_lrn` makes (``op``, ``scalar``; ``ints`` for the caller's
    axes), appending plain nodes and float32 initializers named after ``prefix``. The gradient
    engine passes its own GraphBuilder instead."""

    def __init__(self, prefix: str, nodes: list, initializers: list):
        self.prefix, self.nodes, self.initializers, self._count = prefix, nodes, initializers, 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}_{hint}{self._count}"

    def op(self, op_type: str, inputs, outputs=None, **attrs) -> str:
        outputs = list(outputs) if outputs else [self._fresh(op_type.lower())]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self._fresh(op_type), **attrs))
        return outputs[0]

    def scalar(self, value) -> str:
        name = self._fresh("c")
        self.initializers.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def ints(self, values) -> str:
        name = self._fresh("i")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, np.int64).reshape(-1), name))
        return name


def lrn_attributes(node) -> tuple:
    """``(size, alpha, beta, bias)`` of an LRN node, with ONNX's defaults."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    return int(a["size"]), float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))


def lrn_power(b, s, beta: float, out=None) -> str:
    """``s ** beta`` through builder ``b``. Caffe's 0.75 (and 0.5, 1) avoid Pow, which onnxruntime
    runs several times slower than Sqrt: s**0.75 = sqrt(s)·sqrt(sqrt(s))."""
    outputs = [out] if out else None
    if beta == 0.75:
        root = b.op("Sqrt", [s])
        return b.op("Mul", [root, b.op("Sqrt", [root])], outputs=outputs)
    if beta == 0.5:
        return b.op("Sqrt", [s], outputs=outputs)
    if beta == 1.0:
        return b.op("Identity", [s], outputs=outputs) if out else s
    return b.op("Pow", [s, b.scalar(beta)], outputs=outputs)


def write_lrn(b, node, window_mean, s_name=None, d_name=None) -> None:
    """Write an LRN node out through builder ``b`` (``op``/``scalar``, as :class:`_NodeWriter` and
    the gradient engine's GraphBuilder have): y = x / d, d = s**beta, s = bias + alpha ·
    window_mean(x²), where ``window_mean(t)`` emits the mean of ``t`` over each channel's window.
    ``s_name``/``d_name`` name s and d (the LRN backward rule reads them); y keeps its name."""
    size, alpha, beta, bias = lrn_attributes(node)
    x, y = node.input[0], node.output[0]
    mean = window_mean(b.op("Mul", [x, x]))
    s = b.op("Add", [b.op("Mul", [mean, b.scalar(alpha)]), b.scalar(bias)], outputs=[s_name] if s_name else None)
    b.op("Div", [x, lrn_power(b, s, beta, out=d_name)], outputs=[y])


def lrn_windows(size):
    """Channels before and after c in c's window (onnxruntime: floor and ceil of (size-1)/2)."""
    before = (size - 1) // 2
    return before, size - 1 - before


def _pooled_channel_mean(b, axis, size, before, after, t) -> str:
    """Mean of ``t`` (N×C×H×W) over each channel's LRN window: a (size, 1, 1) AveragePool over
    (C, H, W), onnxruntime's fastest channel window."""
    pooled = b.op("AveragePool", [b.op("Unsqueeze", [t, axis])], kernel_shape=[size, 1, 1],
                  pads=[before, 0, 0, after, 0, 0], count_include_pad=1)
    return b.op("Squeeze", [pooled, axis])


def decompose_lrn(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every ``LRN`` node by elementwise ops and an average pool over channels.

    Same function (y = x · (bias + alpha/size · Σ_window x²)^-beta), but onnxruntime runs it about
    20% faster than its LRN kernel on CaffeNet. Tensor names are kept, so taps still work.

    A Relu feeding an LRN becomes ``Max(x, 0)`` (the same values): onnxruntime's blocked-layout pass
    keeps a Relu in the convolution's blocked layout, and its output then has to be reordered for
    the LRN's elementwise ops, which run in NCHW. A Max runs in NCHW on the tensor that is reordered
    anyway when the convolution's output is tapped: AlexNet's tapped forward is about 6% faster.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    consts = []
    lrn_inputs = {node.input[0] for node in m.graph.node if node.op_type == "LRN"}
    for node in m.graph.node:
        if node.op_type == "Relu" and node.output[0] in lrn_inputs:
            zero = f"{node.output[0]}__zero"
            consts.append(numpy_helper.from_array(np.array(0, np.float32), zero))
            nodes.append(helper.make_node("Max", [node.input[0], zero], list(node.output), name=node.name))
            continue
        if node.op_type != "LRN":
            nodes.append(node)
            continue
        b = _NodeWriter(f"{node.output[0]}__lrn", nodes, consts)
        size = lrn_attributes(node)[0]
        before, after = lrn_windows(size)
        axis = b.ints([1])
        write_lrn(b, node, functools.partial(_pooled_channel_mean, b, axis, size, before, after))
    if not consts:
        return m
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(consts)
    return m


# ---------------------------------------------------------------- precision

#: reduced float types cnnvis runs natively and upcasts for gradients
_REDUCED_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def precision_name(elem_type: int) -> str:
    """'float32', 'float16', 'bfloat16', 'float64', ... for an ONNX element type."""
    return "float32" if elem_type == TensorProto.FLOAT else TensorProto.DataType.Name(elem_type).lower()


def is_reduced_precision(model: onnx.ModelProto) -> bool:
    """Whether the graph computes in float16/bfloat16 anywhere (weights, inputs or casts)."""
    g = model.graph
    if any(i.data_type in _REDUCED_FLOATS for i in g.initializer):
        return True
    if any(v.type.tensor_type.elem_type in _REDUCED_FLOATS for v in list(g.input) + list(g.output)):
        return True
    return any(n.op_type == "Cast" and attributes(n).get("to") in _REDUCED_FLOATS for n in g.node)


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model computing in float32: float16/bfloat16 weights upcast, inputs, outputs and value
    infos declared float32, Casts to a reduced float type cast to float32 instead, reduced-float
    tensor attributes (ConstantOfShape's value, Constant) upcast. Names and node order are kept.
    A float32 model is returned as it is."""
    if not is_reduced_precision(model):
        return model
    return _retyped(model, _REDUCED_FLOATS)


def _retyped(model: onnx.ModelProto, kinds, stash: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with the float types ``kinds`` made float32: weights, inputs, outputs,
    value infos, Casts and tensor attributes (see :func:`to_float32`); ``stash``: also a
    normalization's ``stash_type`` of one of ``kinds``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, init in enumerate(g.initializer):
        if init.data_type in kinds:
            g.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float32), init.name))
    for info in list(g.input) + list(g.output) + list(g.value_info):
        if info.type.tensor_type.elem_type in kinds:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type == "Cast" and a.i in kinds:
                a.i = TensorProto.FLOAT
            elif stash and a.name == "stash_type" and a.i in kinds:
                a.i = TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type in kinds:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
    return m


def with_outputs(model: onnx.ModelProto, outputs, elem_types: dict, copy: bool = True) -> onnx.ModelProto:
    """``model`` answering ``outputs`` (tensor names; each declared with its type from
    ``elem_types``, float32 when unknown). numpy has no bfloat16, so a bfloat16 image input becomes a
    float32 input of the same name cast to bfloat16 in the graph, and bfloat16 outputs are cast to
    float32 under their own names; other types are left to the caller (numpy casts the feeds and
    results exactly as a user's own run would: onnxruntime drops a Cast pair around a kernel it runs
    in float32, so in-graph casts would skip the float16 rounding). ``copy=False`` edits ``model``
    itself (a copy the caller made anyway)."""
    m = model
    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    g = m.graph
    image = real_inputs(m)[0]
    rename, head, tail = {}, [], []
    if image.type.tensor_type.elem_type == TensorProto.BFLOAT16:
        rename[image.name] = image.name + "/native"
        head.append(helper.make_node("Cast", [image.name], [rename[image.name]], to=TensorProto.BFLOAT16,
                                     name=image.name + "/to_native"))
        image.type.tensor_type.elem_type = TensorProto.FLOAT
    declared = []
    for t in outputs:
        kind = elem_types.get(t, TensorProto.FLOAT)
        if kind == TensorProto.BFLOAT16 and t != image.name:
            rename[t] = t + "/native"
            tail.append(helper.make_node("Cast", [rename[t]], [t], to=TensorProto.FLOAT, name=t + "/to_float32"))
            kind = TensorProto.FLOAT
        declared.append(helper.make_tensor_value_info(t, kind, None))
    if rename:
        for node in g.node:
            for k, name in enumerate(node.input):
                if name in rename:
                    node.input[k] = rename[name]
            for k, name in enumerate(node.output):
                if name in rename:
                    node.output[k] = rename[name]
        nodes = head + list(g.node) + tail
        del g.node[:]
        g.node.extend(nodes)
        del g.value_info[:]
    del g.output[:]
    g.output.extend(declared)
    return m
