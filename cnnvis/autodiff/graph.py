"""Build one ONNX graph that computes the forward pass, an objective and its gradients.

The pass: find the tensors that both depend on a requested ``wrt`` tensor and feed the
objective's target, walk those nodes in reverse topological order applying each op's backward
rule (``rules.py``), sum gradient contributions of tensors used more than once, and expose the
gradients as graph outputs. Runtime parameters (class index, unit, channel, seed, labels, dropout
masks) are graph inputs, so one built graph serves every class and unit.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import ops
from ..errors import CnnvisError, unknown_name_error
from ..onnxgraph import fold_shape_arithmetic, make_batch_dynamic, make_model, opset_of, prune, real_inputs
from .builder import GraphBuilder, value_info
from .rules import RULES, RuleContext, backward

#: Objective kinds. ``unit``: one element of the target per sample; ``channel_sum`` /
#: ``channel_mean`` / ``channel_max``: one channel of the target reduced over space; ``logit``: a
#: class score before the softmax; ``probability`` / ``log_probability``: after it; ``seed``: the dot
#: product of the target with a seed tensor; ``cross_entropy``: softmax cross-entropy of the logits
#: against integer labels (gradients are of the batch mean; the engine scales by 1/N).
OBJECTIVES = ("unit", "channel_sum", "channel_mean", "channel_max", "logit", "probability",
              "log_probability", "seed", "cross_entropy")

INDEX_INPUT = "cnnvis_index"
SEED_INPUT = "cnnvis_seed"
OBJECTIVE_OUTPUT = "cnnvis_objective"
GRAD_PREFIX = "cnnvis_grad/"
MASK_SUFFIX = "/dropout_mask"

# ops whose rules also handle a gradient that carries a per-sample axis for a constant tensor
_PER_SAMPLE_SAFE_ON_CONSTANTS = {"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}


@dataclass
class GradientGraph:
    """A built forward + backward graph and what its inputs and outputs mean."""

    model: onnx.ModelProto
    input_name: str
    sample_shape: tuple
    objective: str
    target: str
    target_shape: tuple  # per sample
    wrt: list
    grad_outputs: dict  # wrt name -> output name
    wrt_shapes: dict  # wrt name -> per-sample (batched tensors) or full (constants) shape
    batched_wrt: set
    per_sample: bool
    rule: str
    runtime_inputs: dict = field(default_factory=dict)  # role -> input name
    dropout_masks: dict = field(default_factory=dict)  # input name -> (per-sample shape, drop ratio)
    extra_outputs: list = field(default_factory=list)
    dtype: type = np.float32
    static_batch: int | None = None  # the graph runs only batches of this size (else any size)
    batch_specialisable: bool = False  # a graph built for one batch size would be faster


def model_dtype(model: onnx.ModelProto):
    inp = real_inputs(model)
    if not inp:
        raise CnnvisError("the model has no runtime input (expected one image input N x C x H x W)")
    return np.dtype(helper.tensor_dtype_to_np_dtype(inp[0].type.tensor_type.elem_type))


def prepare_forward(model: onnx.ModelProto) -> onnx.ModelProto:
    """The forward model with a symbolic batch dimension on the image input (a copy if changed)."""
    inputs = real_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise CnnvisError(f"the model must have exactly one runtime input (the images); it has: {names}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) and not dims[0].dim_param:
        return make_batch_dynamic(model)
    return model  # callers copy the nodes they change; weights are not copied needlessly


def default_target(model: onnx.ModelProto, objective: str) -> str:
    softmaxes = [n for n in model.graph.node if n.op_type in ("Softmax", "LogSoftmax")]
    if objective == "probability":
        probs = [n for n in softmaxes if n.op_type == "Softmax"]
        if not probs:
            raise CnnvisError("objective='probability': the model has no Softmax; name the tensor to differentiate "
                              "as target=<tensor>", params="objective")
        return probs[-1].output[0]
    if objective in ("logit", "log_probability", "cross_entropy"):
        if softmaxes:
            return softmaxes[-1].input[0]
        return model.graph.output[0].name
    raise CnnvisError(f"objective {objective!r} needs a target tensor")


def tensor_names(model: onnx.ModelProto) -> list:
    names = [i.name for i in model.graph.input] + [i.name for i in model.graph.initializer]
    names += [o for n in model.graph.node for o in n.output if o]
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def build_gradient_graph(model: onnx.ModelProto, sample_shape, wrt, objective: str = "logit", target=None,
                         rule: str = "gradient", per_sample: bool = True, training: bool = False,
                         weights_as_inputs: bool = False, outputs=(), backend: str = "onnxruntime",
                         batch: int | None = None, session_threads: int | None = None) -> GradientGraph:
    """Forward + objective + backward as one ONNX model (see :class:`GradientGraph`).

    ``batch``: let rules specialise to this batch size (the graph then runs only batches of it).
    ``session_threads``: intra-op threads of the session that will run the graph, when known;
    some rules pick another form for one thread.
    """
    from .backend import forward_shapes

    if rule not in RULES:
        raise CnnvisError(f"rule {rule!r}: expected one of {', '.join(RULES)}")
    if objective not in OBJECTIVES:
        raise CnnvisError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    forward = fold_shape_arithmetic(prepare_forward(model), tuple(int(d) for d in sample_shape))
    forward = _pin_dilated_same_pools(forward, sample_shape, backend)
    dtype = model_dtype(forward)
    graph = forward.graph
    image = real_inputs(forward)[0].name
    names = tensor_names(forward)
    known = set(names)
    wrt = [wrt] if isinstance(wrt, str) else list(wrt)
    if not wrt:
        raise CnnvisError("wrt: name at least one tensor to differentiate with respect to")
    for w in wrt:
        if w not in known:
            raise unknown_name_error("wrt tensor", w, names)
    target = target or default_target(forward, objective)
    if target not in known:
        raise unknown_name_error("target tensor", target, names)
    for o in outputs:
        if o not in known:
            raise unknown_name_error("output tensor", o, names)

    sample_shape = tuple(int(d) for d in sample_shape)
    shapes = forward_shapes(forward, sample_shape, backend)
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    b = GraphBuilder(dtype, taken=known)
    b.known_constants = constants
    b.backend = backend
    b.static_batch = int(batch) if batch else None
    b.session_threads = session_threads
    nodes = _floor_mode_pools([_copy_node(n) for n in graph.node], shapes, b)
    float_types = _float_types(nodes, forward)
    new_inputs = [onnx.ValueInfoProto()]
    new_inputs[0].CopyFrom(real_inputs(forward)[0])

    # training variant: Dropout multiplies by a fed 0/1 mask scaled by 1/(1-ratio)
    masks = {}
    if training:
        nodes, masks = _dropout_as_masks(nodes, b, constants, shapes, dtype)
        for mask_name, (mask_shape, _) in masks.items():
            new_inputs.append(helper.make_tensor_value_info(mask_name, b.elem_type, ["N", *mask_shape]))
            shapes[mask_name] = (shapes[image][0], *mask_shape)

    # which tensors carry the batch
    batched = {image, *masks}
    for node in nodes:
        if any(i in batched for i in node.input if i):
            batched.update(o for o in node.output if o)
    if target not in batched:
        raise CnnvisError(f"target {target!r} does not depend on the input {image!r}")

    # objective head: the seed (gradient of the objective w.r.t. the target) and its value per sample
    runtime = {}
    seed, value = _objective_head(b, objective, target, shapes[target], runtime, new_inputs)

    # the tensors on a path wrt -> target
    producer = {o: n for n in nodes for o in n.output if o}
    b.producer = producer
    b.consumers = collections.Counter(i for n in nodes for i in n.input if i)
    b.protected = set(wrt) | {target}
    ancestors = _ancestors(target, producer)
    for w in wrt:
        if w not in ancestors:
            raise CnnvisError(f"wrt {w!r}: the objective's target {target!r} does not depend on it")
    descendants = _descendants(wrt, nodes)
    on_path = ancestors & descendants

    indices_requested = {}

    def request_output(node, index):
        while len(node.output) <= index:
            node.output.append("")
        if not node.output[index]:
            node.output[index] = b.fresh(f"{node.output[0]}_out{index}")
            indices_requested[node.output[index]] = node
        return node.output[index]

    contributions = {target: [seed]}
    for node in reversed(nodes):
        outs = [o for o in node.output if o]
        if not any(o in on_path for o in outs):
            continue
        grads_out = [(b.sum(contributions[o]) if contributions.get(o) else None) if o else None for o in node.output]
        if all(g is None for g in grads_out):
            continue
        need = [bool(i) and i in on_path for i in node.input]
        if not any(need):
            continue
        if per_sample and not any(i in batched for i in node.input if i) and \
                node.op_type not in _PER_SAMPLE_SAFE_ON_CONSTANTS:
            raise CnnvisError(f"node {node.name or outs[0]!r} ({node.op_type}) computes a constant from a "
                              "requested weight; fold constants first or ask for batch-summed gradients")
        ctx = RuleContext(node, b, shapes, batched, rule, per_sample, need, grads_out, request_output)
        with b.computing_in(float_types.get(node.output[0], dtype)):  # a Cast region of another float type
            grads_in = backward(ctx)
        for inp, g in zip(node.input, grads_in):
            if g is not None and inp:
                contributions.setdefault(inp, []).append(g)

    grad_outputs, wrt_shapes = {}, {}
    out_infos = [helper.make_tensor_value_info(OBJECTIVE_OUTPUT, b.elem_type, ["N"])]
    b.op("Identity", [value], outputs=[OBJECTIVE_OUTPUT])
    for w in wrt:
        out_name = GRAD_PREFIX + w
        b.op("Identity", [b.sum(contributions[w])], outputs=[out_name])
        grad_outputs[w] = out_name
        wrt_shapes[w] = tuple(shapes[w][1:]) if w in batched else tuple(shapes[w])
        leading = ["N"] if (w in batched or per_sample) else []
        w_type = helper.np_dtype_to_tensor_dtype(np.dtype(float_types.get(w, dtype)))
        out_infos.append(helper.make_tensor_value_info(out_name, w_type, leading + list(wrt_shapes[w])))
    for o in outputs:
        out_infos.append(value_info(o))

    all_nodes = _expand_lrns(nodes, b, shapes) + b.nodes
    inits = list(graph.initializer) + b.initializers
    all_nodes, inits = prune(all_nodes, inits, [o.name for o in out_infos])
    if weights_as_inputs:
        # listed as inputs too, initializers become defaults that a run may override (IR >= 4)
        kept = {i.name for i in inits}
        for init in graph.initializer:
            if init.data_type == b.elem_type and init.name in kept:
                new_inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    built = _assemble(all_nodes, (graph.name or "model") + "_gradients", new_inputs, out_infos, inits,
                      max(opset_of(forward), 17))
    if b.wants_static_batch and b.static_batch:
        # a graph specialised to one batch size says so, so that another size fails at the input
        for info in list(built.graph.input) + list(built.graph.output):
            dims = info.type.tensor_type.shape.dim
            if len(dims) and dims[0].dim_param == "N":
                dims[0].dim_value = b.static_batch
    return GradientGraph(
        model=built, input_name=image, sample_shape=sample_shape, objective=objective, target=target,
        target_shape=tuple(shapes[target][1:]), wrt=wrt, grad_outputs=grad_outputs, wrt_shapes=wrt_shapes,
        batched_wrt={w for w in wrt if w in batched}, per_sample=per_sample, rule=rule, runtime_inputs=runtime,
        dropout_masks=masks, extra_outputs=list(outputs), dtype=dtype,
        static_batch=b.static_batch if b.wants_static_batch else None, batch_specialisable=b.wants_static_batch)


_NOT_FLOAT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater", "Less", "GreaterOrEqual",
              "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}


def _float_types(nodes, model):
    """The float type (numpy dtype) of each float tensor: inputs and initializers as declared,
    Cast/CastLike outputs as cast, other outputs as their first float input. Rules build their
    constants in the type of the node's output, so a region cast to another float type works."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    types = {}
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type in floats:
            types[vi.name] = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    for init in model.graph.initializer:
        if init.data_type in floats:
            types[init.name] = helper.tensor_dtype_to_np_dtype(init.data_type)
    for node in nodes:
        if node.op_type in _NOT_FLOAT:
            continue
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            t = helper.tensor_dtype_to_np_dtype(to) if to in floats else None
        elif node.op_type == "CastLike":
            t = types.get(node.input[1])
        else:
            t = next((types[i] for i in node.input if i in types), None)
        if t is not None:
            for o in node.output[:1]:
                if o:
                    types[o] = t
    return types


def _assemble(nodes, name, inputs, outputs, initializers, opset):
    # make_graph + make_model would copy the weights twice; add them once, to the final model
    model = make_model(helper.make_graph(nodes, name, inputs, outputs), opset=opset)
    model.graph.initializer.extend(initializers)
    return model


def _copy_node(node):
    n = onnx.NodeProto()
    n.CopyFrom(node)
    return n


def _pin_dilated_same_pools(forward, sample_shape, backend):
    """``forward`` with each SAME-padded pool whose windows are dilated given its pads explicitly.

    onnxruntime sizes such a pool's pads by the undilated kernel (see :func:`cnnvis.ops.window`),
    so its output is shorter than the ``ceil(size / stride)`` that onnx shape inference and onnx's
    reference evaluator give it. With the pads onnxruntime uses written out (auto_pad NOTSET) all
    three run the same windows, and the rules differentiate what onnxruntime runs. A copy when
    anything changes; other models are returned as they are.
    """
    from .backend import forward_shapes

    def dilated_same(node):
        if node.op_type not in ops.POOL_OPS:
            return False
        attrs = ops.attributes(node)
        return (attrs.get("auto_pad") or "NOTSET") in ("SAME_UPPER", "SAME_LOWER") and \
            any(int(d) != 1 for d in attrs.get("dilations") or [])

    todo = [i for i, node in enumerate(forward.graph.node) if dilated_same(node)]
    if not todo:
        return forward
    pinned = onnx.ModelProto()
    pinned.CopyFrom(forward)
    sample_shape = tuple(int(d) for d in sample_shape)
    for i in todo:  # in graph order: the pools before this one are pinned already
        node = pinned.graph.node[i]
        in_shape = forward_shapes(pinned, sample_shape, backend)[node.input[0]]
        win = ops.window(node, in_shape)
        attrs = ops.attributes(node)
        attrs.update(auto_pad="NOTSET", pads=list(win.pads))
        node.CopyFrom(helper.make_node(node.op_type, list(node.input), list(node.output), name=node.name,
                                       domain=node.domain, **attrs))
    return pinned


def _floor_mode_pools(nodes, shapes, b):
    """Rewrite ceil-mode pools as floor-mode pools with the end padding that gives the same windows.

    onnx shape inference (which onnxruntime applies when loading) sizes ceil-mode pools without
    onnxruntime's own rule (a window starting in the end padding is dropped); a backward graph
    that mixes such a pool's output with constants of the true size would be refused. In floor
    mode both agree. AveragePool counting the padding keeps its divisors via a constant factor
    when the new end padding is larger than the old one.
    """
    out = []
    for node in nodes:
        if node.op_type not in ("MaxPool", "AveragePool"):
            out.append(node)
            continue
        attrs = ops.attributes(node)
        if not attrs.get("ceil_mode", 0) or (attrs.get("auto_pad") or "NOTSET") != "NOTSET":
            out.append(node)
            continue
        in_shape = shapes[node.input[0]]
        spatial = len(in_shape) - 2
        win = ops.window(node, in_shape, attrs=attrs)
        pads = list(win.pads)
        sizes, floor_pads = ops.floor_mode_pads(win, in_shape[2:])
        new_end = floor_pads[spatial:]
        new_attrs = {k: v for k, v in attrs.items() if k not in ("ceil_mode", "pads")}
        new_attrs["pads"] = floor_pads
        correction = None
        if node.op_type == "AveragePool" and attrs.get("count_include_pad", 0) and \
                any(new_end[i] > pads[spatial + i] for i in range(spatial)):
            # floor mode without counting padding, times in-image count / original divisor
            new_attrs["count_include_pad"] = 0
            factor = np.ones([1, 1] + sizes)
            for i in range(spatial):
                args = (in_shape[2 + i], sizes[i], win.kernel[i], win.strides[i], pads[i], pads[spatial + i])
                shape = [1] * (2 + spatial)
                shape[2 + i] = -1
                factor = factor * (ops.average_pool_divisors(*args, 0, win.dilations[i])
                                   / ops.average_pool_divisors(*args, 1, win.dilations[i])).reshape(shape)
            correction = b.const(factor.astype(b.dtype), hint="avgpool_pad_correction")
        if correction is None:
            out.append(helper.make_node(node.op_type, list(node.input), list(node.output), name=node.name, **new_attrs))
        else:
            inner = b.fresh(node.output[0] + "_floor")
            out.append(helper.make_node(node.op_type, list(node.input), [inner], name=node.name, **new_attrs))
            out.append(helper.make_node("Mul", [inner, correction], [node.output[0]], name=b.fresh("avgpool_scale")))
            shapes[inner] = shapes[node.output[0]]
    return out


def _expand_lrns(nodes, b, shapes):
    """The forward nodes with every LRN written out (see :func:`rules.expand_lrn`)."""
    from .rules import expand_lrn

    out = []
    for node in nodes:
        if node.op_type == "LRN" and node.domain in ("", "ai.onnx"):
            with b.emitting_into(out):
                expand_lrn(b, node, shapes[node.input[0]])
        else:
            out.append(node)
    return out


def _ancestors(target, producer):
    seen, stack = {target}, [target]
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if node is None:
            continue
        for i in node.input:
            if i and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _descendants(sources, nodes):
    seen = set(sources)
    for node in nodes:  # topological order
        if any(i in seen for i in node.input if i):
            seen.update(o for o in node.output if o)
    return seen


def _dropout_as_masks(nodes, b, constants, shapes, dtype):
    out, masks = [], {}
    used = {i for n in nodes for i in n.input}
    for node in nodes:
        if node.op_type != "Dropout":
            out.append(node)
            continue
        if len(node.output) > 1 and node.output[1] and node.output[1] in used:
            raise CnnvisError(f"node {node.name!r} (Dropout): its mask output is used; cannot train this graph")
        ratio = 0.5
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                raise CnnvisError(f"node {node.name!r} (Dropout): the ratio must be a constant")
            ratio = float(np.asarray(constants[node.input[1]]).reshape(-1)[0])
        else:
            for a in node.attribute:
                if a.name == "ratio":
                    ratio = float(a.f)
        mask = b.reserve(node.output[0] + MASK_SUFFIX)
        masks[mask] = (tuple(shapes[node.input[0]][1:]), ratio)
        scaled = node.output[0] + "/scaled_mask"
        out.append(helper.make_node("Mul", [mask, b.scalar(1.0 / (1.0 - ratio))], [scaled], name=scaled))
        out.append(helper.make_node("Mul", [node.input[0], scaled], [node.output[0]], name=node.name or node.output[0]))
    return out, masks


def _one_hot(b, index, depth):
    """(N,) int64 -> (N, depth) 0/1 in the model's float type."""
    grid = b.const(np.arange(depth, dtype=np.int64).reshape(1, depth))
    return b.mask(b.op("Equal", [b.unsqueeze(index, [1]), grid]))


def _objective_head(b, objective, target, target_shape, runtime, new_inputs):
    per_sample = list(target_shape[1:])
    size = int(np.prod(per_sample)) if per_sample else 1
    flat = b.reshape(target, [0, -1])

    def index_input():
        new_inputs.append(helper.make_tensor_value_info(INDEX_INPUT, TensorProto.INT64, ["N"]))
        runtime["index"] = INDEX_INPUT
        return INDEX_INPUT

    def dot(seed_flat):
        return b.reduce_sum(b.mul(flat, seed_flat), [1], keepdims=0)

    if objective in ("unit", "logit", "probability"):
        onehot = _one_hot(b, index_input(), size)
        return b.reshape(onehot, b.shape_of(target)), dot(onehot)
    if objective.startswith("channel_"):
        if len(per_sample) < 1:
            raise CnnvisError(f"objective {objective!r}: target {target!r} has no channel axis")
        c = per_sample[0]
        spatial = int(np.prod(per_sample[1:])) if len(per_sample) > 1 else 1
        chan = b.unsqueeze(_one_hot(b, index_input(), c), [2])  # (N, C, 1)
        by_channel = b.reshape(target, [0, c, -1])
        if objective == "channel_max":
            first = b.op("ArgMax", [by_channel], axis=2, keepdims=1, select_last_index=0)
            positions = b.const(np.arange(spatial, dtype=np.int64).reshape(1, 1, spatial))
            seed3 = b.mul(chan, b.mask(b.op("Equal", [first, positions])))
        else:
            seed3 = b.op("Expand", [chan, b.shape_of(by_channel)])
            if objective == "channel_mean":
                seed3 = b.scale(seed3, 1.0 / spatial)
        seed_flat = b.reshape(seed3, [0, -1])
        return b.reshape(seed3, b.shape_of(target)), dot(seed_flat)
    if objective == "seed":
        new_inputs.append(helper.make_tensor_value_info(SEED_INPUT, b.elem_type, ["N", *per_sample]))
        runtime["seed"] = SEED_INPUT
        return SEED_INPUT, dot(b.reshape(SEED_INPUT, [0, -1]))
    # log_probability / cross_entropy act on 2-D logits
    if len(target_shape) != 2:
        raise CnnvisError(f"objective {objective!r}: target {target!r} must be N x classes logits, "
                          f"got per-sample shape {tuple(per_sample)}")
    log_p = b.op("LogSoftmax", [target], axis=1)
    onehot = _one_hot(b, index_input(), size)
    picked = b.reduce_sum(b.mul(log_p, onehot), [1], keepdims=0)
    residual = b.sub(b.op("Exp", [log_p]), onehot)  # softmax - onehot
    if objective == "log_probability":
        return b.neg(residual), picked
    return residual, b.neg(picked)


def build_objective_graph(model: onnx.ModelProto, sample_shape, objective: str = "logit", target=None, free=(),
                          backend: str = "reference", outputs=()):
    """Forward + objective value only, with the tensors in ``free`` turned into graph inputs.

    A free initializer becomes an input; a free intermediate tensor is cut from its producer and
    fed instead; ``outputs`` are extra tensors to expose. Used by finite differences. Returns
    (model, runtime inputs, target name, per-sample target shape).
    """
    from .backend import forward_shapes

    if objective not in OBJECTIVES:
        raise CnnvisError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    forward = fold_shape_arithmetic(prepare_forward(model), tuple(int(d) for d in sample_shape))
    forward = _pin_dilated_same_pools(forward, sample_shape, backend)
    graph = forward.graph
    names = tensor_names(forward)
    target = target or default_target(forward, objective)
    if target not in names:
        raise unknown_name_error("target tensor", target, names)
    dtype = model_dtype(forward)
    b = GraphBuilder(dtype, taken=names)
    image = real_inputs(forward)[0]
    inputs = [image]
    inits = {i.name: i for i in graph.initializer}
    nodes = [_copy_node(n) for n in graph.node]
    free = [f for f in free if f != image.name]
    shapes = forward_shapes(forward, tuple(sample_shape), backend)
    for f in free:
        if f not in names:
            raise unknown_name_error("tensor", f, names)
        if f in inits:
            init = inits.pop(f)
            inputs.append(helper.make_tensor_value_info(f, init.data_type, list(init.dims)))
            continue
        for node in nodes:
            for k, o in enumerate(node.output):
                if o == f:
                    node.output[k] = b.fresh("cut")
        inputs.append(helper.make_tensor_value_info(f, b.elem_type, ["N", *shapes[f][1:]]))
    runtime = {}
    _, value = _objective_head(b, objective, target, shapes[target], runtime, inputs)
    b.op("Identity", [value], outputs=[OBJECTIVE_OUTPUT])
    outs = [helper.make_tensor_value_info(OBJECTIVE_OUTPUT, b.elem_type, ["N"])] + [value_info(o) for o in outputs]
    all_nodes, kept_inits = prune(nodes + b.nodes, list(inits.values()) + b.initializers,
                                   [OBJECTIVE_OUTPUT, *outputs])
    built = _assemble(all_nodes, "objective", inputs, outs, kept_inits, max(opset_of(forward), 17))
    return built, runtime, target, tuple(shapes[target][1:])
