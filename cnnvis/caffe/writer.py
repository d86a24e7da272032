"""ONNX -> Caffe: a deploy ``.prototxt`` and a binary ``.caffemodel`` for Caffe users.

Only graphs whose ops have an exact Caffe counterpart are written; anything else is refused with
the node and op named. Blob names are the ONNX tensor names, layer names the node names. The
patterns that cnnvis's own importer produces map back to the layer they came from (AVE pooling
with its divisor map, InnerProduct as Flatten+Gemm or Reshape+MatMul+Add, Scale as Mul+Add,
Power as Mul/Add/Pow with scalars), so Caffe -> ONNX -> Caffe -> ONNX computes the same thing.

Pooling is checked numerically: ONNX and Caffe disagree on output sizes (floor vs ceil) and on
the AVE divisor near borders, so every pool is written only when Caffe's geometry (ceil rounding,
or ``round_mode: FLOOR`` when that is what fits) gives the same windows and, for AVE, the same
values on an all-ones input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CnnvisError
from . import schema
from .to_onnx import caffe_pool_axis

SUPPORTED_OPS = (
    "Conv", "ConvTranspose", "Relu", "LeakyRelu", "PRelu", "Elu", "Sigmoid", "Tanh", "Abs", "Softplus",
    "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "LRN", "Gemm", "MatMul", "Dropout",
    "Softmax", "Flatten", "Reshape", "Concat", "Add", "Sub", "Mul", "Max", "Sum", "Pow",
    "BatchNormalization", "Split", "Identity",
)


class _Writer:
    def __init__(self, model):
        import onnx

        from ..onnxgraph import fold_constants, opset_of, upgrade_opset

        if isinstance(model, (str, Path)):
            path = Path(model)
            try:
                model = onnx.load(str(path))
            except Exception as exc:  # onnx raises DecodeError or OSError variants
                raise CnnvisError(f"{path}: cannot read the ONNX model ({str(exc).splitlines()[0]})") from None
        opset = opset_of(model)
        if opset < 13:
            model = upgrade_opset(model, opset)
        if any(n.op_type == "Constant" for n in model.graph.node):
            model = fold_constants(model)
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self._arrays = {}
        self.consumers = {}
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.producer = {o: node for node in self.graph.node for o in node.output if o}
        self.alias = {}  # tensor -> blob standing for it (a Flatten folded into InnerProduct)
        self.inner_product_axis = {}  # MatMul output -> InnerProduct axis when a Reshape was folded
        self.shapes = _infer_shapes(model, batch=1)
        self._shapes_batch2 = None
        self.layers = []  # (LayerParameter, [np.ndarray])
        self.layer_names = set()
        self.blobs = set()
        self.absorbed = set()  # ids of nodes folded into an earlier layer
        self.messages = schema.messages()

    # ------------------------------------------------------------ helpers

    def const(self, name):
        from onnx import numpy_helper

        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def is_const(self, name) -> bool:
        return bool(name) and name in self.inits

    def shape(self, node, name):
        shape = self.shapes.get(name)
        if shape is None or any(d is None for d in shape):
            self.fail(node, f"cannot infer a static shape for tensor {name!r}")
        return shape

    def fail(self, node, message):
        raise CnnvisError(f"ONNX node {node.name or node.output[0]!r} ({node.op_type}): {message}")

    def blob(self, node, name):
        name = self.alias.get(name, name)
        if self.is_const(name):
            self.fail(node, f"input {name!r} is a constant; Caffe layers take it only as a parameter")
        if name not in self.blobs:
            self.fail(node, f"input {name!r} is not produced by an earlier node or a graph input")
        return name

    def single_consumer(self, name):
        """The only node reading ``name`` when it is not also a graph output, else None."""
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def layer(self, node, type_name, bottoms, tops, blobs=(), suffix=""):
        # A layer that absorbed later nodes is named after the node producing its top.
        named = self.producer.get(tops[0], node) if tops else node
        base = (named.name or node.name or f"{type_name.lower()}{len(self.layers)}") + suffix
        name, i = base, 1
        while name in self.layer_names:
            i += 1
            name = f"{base}_{i}"
        self.layer_names.add(name)
        msg = self.messages.LayerParameter(name=name, type=type_name)
        msg.bottom.extend(bottoms)
        msg.top.extend(tops)
        self.layers.append((msg, [np.asarray(b, dtype=np.float32) for b in blobs]))
        self.blobs.update(tops)
        return msg

    @staticmethod
    def attrs(node):
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def window(self, node, attrs, weight_shape=None):
        """The node's window geometry; SAME auto padding has no Caffe equivalent."""
        from .. import ops

        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            self.fail(node, f"auto_pad {auto_pad} has no Caffe equivalent; give explicit pads")
        return ops.window(node, weight_shape=weight_shape, attrs=attrs)

    def scalar(self, name):
        if self.is_const(name) and self.const(name).size == 1:
            return float(self.const(name).reshape(()))
        return None

    # ------------------------------------------------------------ driver

    def run(self, name=None):
        net = self.messages.NetParameter(name=name or self.graph.name or "net")
        init_names = set(self.inits)
        for vi in self.graph.input:
            if vi.name in init_names:
                continue
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                    for d in vi.type.tensor_type.shape.dim]
            if not dims:
                raise CnnvisError(f"ONNX input {vi.name!r} has no shape; Caffe's Input layer needs one")
            if vi.type.tensor_type.elem_type != 1:
                raise CnnvisError(f"ONNX input {vi.name!r}: Caffe blobs are float; got element type "
                                  f"{vi.type.tensor_type.elem_type}")
            dims[0] = 1
            msg = self.layer(_Named(vi.name), "Input", [], [vi.name])
            msg.input_param.shape.add().dim.extend(dims)
        for node in self.graph.node:
            if id(node) in self.absorbed:
                continue
            if node.domain not in ("", "ai.onnx"):
                self.fail(node, f"custom domain {node.domain!r} has no Caffe layer")
            handler = getattr(self, "op_" + node.op_type, None)
            if handler is None:
                self.fail(node, f"no Caffe layer for this op; supported: {', '.join(SUPPORTED_OPS)}")
            handler(node)
        for out in self.graph.output:
            if out.name not in self.blobs:
                raise CnnvisError(f"ONNX output {out.name!r} is a constant or not computed; Caffe nets "
                                  "output blobs computed from the inputs")
        for msg, _ in self.layers:
            net.layer.add().CopyFrom(msg)
        return net, {msg.name: blobs for msg, blobs in self.layers if blobs}

    # ------------------------------------------------------------ convolution

    def _spatial(self, node, param, kernel, pads, strides, dilations):
        nsp = len(kernel)
        begin, end = list(pads[:nsp]), list(pads[nsp:])
        if begin != end:
            self.fail(node, f"asymmetric pads {list(pads)}; Caffe pads both sides equally")
        if nsp == 2:
            _pair(param, "kernel_size", "kernel_h", "kernel_w", kernel, None)
            _pair(param, "pad", "pad_h", "pad_w", begin, 0)
            _pair(param, "stride", "stride_h", "stride_w", strides, 1)
        else:
            param.kernel_size.extend(kernel)
            if any(begin):
                param.pad.extend(begin)
            if any(s != 1 for s in strides):
                param.stride.extend(strides)
        if any(d != 1 for d in dilations):
            param.dilation.extend([dilations[0]] if len(set(dilations)) == 1 else dilations)

    def _conv(self, node, deconv):
        a = self.attrs(node)
        x = self.blob(node, node.input[0])
        if not self.is_const(node.input[1]) or (len(node.input) > 2 and node.input[2]
                                                and not self.is_const(node.input[2])):
            self.fail(node, "weights and bias must be initializers")
        weight = self.const(node.input[1])
        bias = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        win = self.window(node, a, weight.shape)
        kernel, pads, strides, dilations = list(win.kernel), list(win.pads), list(win.strides), list(win.dilations)
        group = int(a.get("group", 1))
        if deconv:
            if any(a.get("output_padding", [])) or "output_shape" in a:
                self.fail(node, "output_padding/output_shape have no Caffe equivalent")
            num_output = weight.shape[1] * group
        else:
            num_output = weight.shape[0]
        layer = self.layer(node, "Deconvolution" if deconv else "Convolution", [x], [node.output[0]],
                           [weight] + ([bias] if bias is not None else []))
        p = layer.convolution_param
        p.num_output = num_output
        if bias is None:
            p.bias_term = False
        if group != 1:
            p.group = group
        self._spatial(node, p, kernel, pads, strides, dilations)

    def op_Conv(self, node):
        self._conv(node, deconv=False)

    def op_ConvTranspose(self, node):
        self._conv(node, deconv=True)

    # ------------------------------------------------------------ activations

    def op_Relu(self, node):
        self.layer(node, "ReLU", [self.blob(node, node.input[0])], [node.output[0]])

    def op_LeakyRelu(self, node):
        layer = self.layer(node, "ReLU", [self.blob(node, node.input[0])], [node.output[0]])
        layer.relu_param.negative_slope = float(self.attrs(node).get("alpha", 0.01))

    def op_PRelu(self, node):
        x = self.blob(node, node.input[0])
        if not self.is_const(node.input[1]):
            self.fail(node, "the slope must be an initializer")
        slope = self.const(node.input[1])
        shape = self.shape(node, x)
        if slope.size == 1:
            layer = self.layer(node, "PReLU", [x], [node.output[0]], [slope.reshape(1)])
            layer.prelu_param.channel_shared = True
            return
        padded = (1,) * (len(shape) - slope.ndim) + slope.shape
        if len(shape) < 2 or padded != tuple(shape[1] if i == 1 else 1 for i in range(len(shape))):
            self.fail(node, f"slope shape {slope.shape} is not per channel of input {tuple(shape)}")
        self.layer(node, "PReLU", [x], [node.output[0]], [slope.reshape(-1)])

    def op_Elu(self, node):
        layer = self.layer(node, "ELU", [self.blob(node, node.input[0])], [node.output[0]])
        alpha = float(self.attrs(node).get("alpha", 1.0))
        if alpha != 1.0:
            layer.elu_param.alpha = alpha

    def op_Abs(self, node):
        self.layer(node, "AbsVal", [self.blob(node, node.input[0])], [node.output[0]])

    def op_Softplus(self, node):
        # Caffe's BNLL computes log(1 + exp(x)).
        self.layer(node, "BNLL", [self.blob(node, node.input[0])], [node.output[0]])

    def op_Sigmoid(self, node):
        self.layer(node, "Sigmoid", [self.blob(node, node.input[0])], [node.output[0]])

    def op_Tanh(self, node):
        self.layer(node, "TanH", [self.blob(node, node.input[0])], [node.output[0]])

    # ------------------------------------------------------------ pooling and normalisation

    def _pool(self, node, method):
        a = self.attrs(node)
        x = self.blob(node, node.input[0])
        shape = self.shape(node, x)
        if len(shape) != 4 or len(a.get("kernel_shape", [])) != 2:
            self.fail(node, "Caffe pools 4-D blobs with 2-D windows")
        win = self.window(node, a)
        if any(d != 1 for d in win.dilations):
            self.fail(node, "dilated pooling has no Caffe equivalent")
        if a.get("storage_order", 0) != 0 or len(node.output) > 1 and node.output[1]:
            self.fail(node, "MaxPool indices output has no Caffe equivalent")
        kh, kw = win.kernel
        sh, sw = win.strides
        pads = win.pads
        ph, pw = pads[0], pads[1]
        if ph >= kh or pw >= kw:
            self.fail(node, f"pads {list(pads)} must be smaller than the kernel for Caffe")
        y = node.output[0]
        out_h, out_w = self.shape(node, y)[2:]
        height, width = shape[2:]
        any_pad = bool(ph or pw)
        round_mode = None
        for ceil_mode in (True, False):
            hh = caffe_pool_axis(height, kh, sh, ph, ceil_mode, any_pad)
            ww = caffe_pool_axis(width, kw, sw, pw, ceil_mode, any_pad)
            if (hh[0], ww[0]) == (out_h, out_w):
                round_mode = "CEIL" if ceil_mode else "FLOOR"
                break
        if round_mode is None:
            self.fail(node, f"output {out_h}x{out_w} matches neither rounding of Caffe's pooling")
        if hh[3][-1] >= height or ww[3][-1] >= width:
            self.fail(node, "a pooling window lies outside the input")
        tops = [y]
        if method == "AVE":
            tops = [self._check_average(node, (height, width), (kh, kw), (sh, sw), (ph, pw), hh, ww)]
        layer = self.layer(node, "Pooling", [x], tops)
        p = layer.pooling_param
        p.pool = p.AVE if method == "AVE" else p.MAX
        _pool_pair(p, "kernel_size", "kernel_h", "kernel_w", (kh, kw))
        if ph or pw:
            _pool_pair(p, "pad", "pad_h", "pad_w", (ph, pw))
        if sh != 1 or sw != 1:
            _pool_pair(p, "stride", "stride_h", "stride_w", (sh, sw))
        if round_mode == "FLOOR":
            p.round_mode = p.FLOOR

    def _check_average(self, node, size, kernel, stride, pad, hh, ww):
        """The pooled blob after comparing ONNX and Caffe AVE pooling on an all-ones input."""
        y = node.output[0]
        scale_node = self.single_consumer(y)
        scale = None
        if (scale_node is not None and scale_node.op_type == "Mul" and len(scale_node.input) == 2
                and scale_node.input[0] == y and self.is_const(scale_node.input[1])):
            factor = self.const(scale_node.input[1])
            if factor.ndim <= 4 and all(d == 1 for d in factor.shape[:-2]):
                scale = factor
        # In-image elements per window, divided by Caffe's divisor: Caffe's output on ones.
        counts = [np.array([min(s + k, n_in) - max(s, 0) for s in axis[3]], np.float64)
                  for n_in, k, axis in zip(size, kernel, (hh, ww))]
        caffe = np.outer(counts[0], counts[1]) / np.outer(np.asarray(hh[2], np.float64), np.asarray(ww[2], np.float64))
        onnx_plain = _run_pool_on_ones(node, size)
        if scale is not None:
            onnx_scaled = onnx_plain * scale.reshape(scale.shape[-2:] if scale.ndim >= 2 else scale.shape)
            if np.allclose(onnx_scaled, caffe, rtol=1e-5, atol=0):
                self.absorbed.add(id(scale_node))
                return scale_node.output[0]
        if np.allclose(onnx_plain, caffe, rtol=1e-5, atol=0):
            return y
        self.fail(node, "its border divisor differs from Caffe's AVE pooling (which divides by the "
                        "window clipped at H + pad); use count_include_pad=1 or no padding")

    def op_MaxPool(self, node):
        self._pool(node, "MAX")

    def op_AveragePool(self, node):
        self._pool(node, "AVE")

    def _global(self, node, method):
        x = self.blob(node, node.input[0])
        if len(self.shape(node, x)) != 4:
            self.fail(node, "Caffe pools 4-D blobs")
        layer = self.layer(node, "Pooling", [x], [node.output[0]])
        layer.pooling_param.pool = layer.pooling_param.MAX if method == "MAX" else layer.pooling_param.AVE
        layer.pooling_param.global_pooling = True

    def op_GlobalMaxPool(self, node):
        self._global(node, "MAX")

    def op_GlobalAveragePool(self, node):
        self._global(node, "AVE")

    def op_LRN(self, node):
        a = self.attrs(node)
        size = int(a["size"])
        if size % 2 == 0:
            self.fail(node, f"size {size}: Caffe's LRN needs an odd size")
        layer = self.layer(node, "LRN", [self.blob(node, node.input[0])], [node.output[0]])
        p = layer.lrn_param
        p.local_size = size
        p.alpha = float(a.get("alpha", 1e-4))
        p.beta = float(a.get("beta", 0.75))
        p.k = float(a.get("bias", 1.0))

    def op_BatchNormalization(self, node):
        a = self.attrs(node)
        if a.get("training_mode", 0) or any(o for o in node.output[1:]):
            self.fail(node, "only inference-mode BatchNormalization can be written")
        x = self.blob(node, node.input[0])
        if not all(self.is_const(n) for n in node.input[1:5]):
            self.fail(node, "scale, bias, mean and variance must be initializers")
        gamma, beta, mean, var = (self.const(n).astype(np.float32) for n in node.input[1:5])
        y = node.output[0]
        layer = self.layer(node, "BatchNorm", [x], [y], [mean, var, np.ones(1, np.float32)])
        layer.batch_norm_param.eps = float(a.get("epsilon", 1e-5))
        if np.any(gamma != 1) or np.any(beta != 0):
            # Caffe's BatchNorm has no affine part; a Scale layer in place adds it.
            scale = self.layer(node, "Scale", [y], [y], [gamma, beta], suffix="_scale")
            scale.scale_param.bias_term = True

    def op_Dropout(self, node):
        if len(node.input) > 2 and node.input[2]:
            if not self.is_const(node.input[2]) or bool(self.const(node.input[2])):
                self.fail(node, "training-mode Dropout cannot be written")
        if len(node.output) > 1 and node.output[1] and node.output[1] in self.consumers:
            self.fail(node, "the mask output has no Caffe equivalent")
        ratio = 0.5
        if len(node.input) > 1 and node.input[1]:
            ratio = self.scalar(node.input[1])
            if ratio is None:
                self.fail(node, "ratio must be a constant scalar")
        layer = self.layer(node, "Dropout", [self.blob(node, node.input[0])], [node.output[0]])
        layer.dropout_param.dropout_ratio = ratio

    # ------------------------------------------------------------ dense layers

    def op_Gemm(self, node):
        a = self.attrs(node)
        if a.get("transA", 0):
            self.fail(node, "transA=1 has no Caffe equivalent")
        x = self.blob(node, node.input[0])
        if not self.is_const(node.input[1]) or (len(node.input) > 2 and node.input[2]
                                                and not self.is_const(node.input[2])):
            self.fail(node, "B and C must be initializers")
        weight = self.const(node.input[1])
        weight = weight if a.get("transB", 0) else weight.T
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        if alpha != 1.0:
            weight = weight * np.float32(alpha)
        num_output = weight.shape[0]
        blobs = [weight]
        if len(node.input) > 2 and node.input[2]:
            bias = np.broadcast_to(self.const(node.input[2]).astype(np.float32), (1, num_output)).reshape(-1)
            blobs.append(bias * np.float32(beta) if beta != 1.0 else bias)
        layer = self.layer(node, "InnerProduct", [x], [node.output[0]], blobs)
        layer.inner_product_param.num_output = num_output
        if len(blobs) == 1:
            layer.inner_product_param.bias_term = False

    def op_MatMul(self, node):
        x = self.blob(node, node.input[0])
        if not self.is_const(node.input[1]) or self.const(node.input[1]).ndim != 2:
            self.fail(node, "only x @ W with a 2-D constant W (an InnerProduct) can be written")
        weight = self.const(node.input[1])
        axis = self.inner_product_axis.get(node.output[0], len(self.shape(node, x)) - 1)
        num_output = weight.shape[1]
        blobs, top = [weight.T], node.output[0]
        add = self.single_consumer(top)
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == top else add.input[0]
            if self.is_const(other) and self.const(other).size == num_output and \
                    self.const(other).shape[-1:] == (num_output,):
                blobs.append(self.const(other).reshape(-1))
                top = add.output[0]
                self.absorbed.add(id(add))
        layer = self.layer(node, "InnerProduct", [x], [top], blobs)
        layer.inner_product_param.num_output = num_output
        if axis != 1:
            layer.inner_product_param.axis = axis
        if len(blobs) == 1:
            layer.inner_product_param.bias_term = False

    # ------------------------------------------------------------ shape ops

    def op_Softmax(self, node):
        x = self.blob(node, node.input[0])
        rank = len(self.shape(node, x))
        axis = int(self.attrs(node).get("axis", -1))
        axis = axis + rank if axis < 0 else axis
        if axis == 0:
            self.fail(node, "softmax across the batch axis")
        layer = self.layer(node, "Softmax", [x], [node.output[0]])
        if axis != 1:
            layer.softmax_param.axis = axis

    def op_Flatten(self, node):
        axis = int(self.attrs(node).get("axis", 1))
        x = self.blob(node, node.input[0])
        rank = len(self.shape(node, x))
        if (axis + rank if axis < 0 else axis) != 1:
            self.fail(node, f"axis {axis}: Caffe's Flatten keeps the batch axis; only axis 1 maps")
        user = self.single_consumer(node.output[0])
        if (user is not None and user.op_type == "Gemm" and user.input[0] == node.output[0]
                and not self.attrs(user).get("transA", 0)):
            # InnerProduct flattens from axis 1 by itself.
            self.alias[node.output[0]] = x
            return
        self.layer(node, "Flatten", [x], [node.output[0]])

    def op_Reshape(self, node):
        if self.attrs(node).get("allowzero", 0):
            self.fail(node, "allowzero=1 has no Caffe equivalent")
        x = self.blob(node, node.input[0])
        in_shape = self.shape(node, x)
        out_shape = self.shape(node, node.output[0])
        user = self.single_consumer(node.output[0])
        if (user is not None and user.op_type == "Mul" and len(user.input) == 2
                and len(out_shape) > len(in_shape) and tuple(out_shape[:len(in_shape)]) == tuple(in_shape)
                and all(d == 1 for d in out_shape[len(in_shape):])):
            # Trailing ones appended for a broadcast product: Caffe's two-bottom Scale broadcasts
            # the blob itself (see _scale_by_blob).
            other = user.input[1] if user.input[0] == node.output[0] else user.input[0]
            if not self.is_const(other) and len(self.shapes.get(other) or ()) == len(out_shape):
                self.alias[node.output[0]] = x
                return
        axis = len(out_shape) - 1
        if (user is not None and user.op_type == "MatMul" and user.input[0] == node.output[0]
                and self.is_const(user.input[1]) and 1 <= axis <= len(in_shape)
                and tuple(out_shape[:axis]) == tuple(in_shape[:axis])
                and int(np.prod(in_shape[axis:])) == out_shape[-1]):
            # Flattening the trailing axes for a MatMul: InnerProduct with that axis does it itself.
            self.alias[node.output[0]] = x
            self.inner_product_axis[user.output[0]] = axis
            return
        # Caffe's target is "copy the batch, then fixed dims": check the graph agrees at batch 2.
        if self._shapes_batch2 is None:
            self._shapes_batch2 = _infer_shapes(self.model, batch=2)
        in2 = self._shapes_batch2.get(x)
        out2 = self._shapes_batch2.get(node.output[0])
        if (in_shape[0] != out_shape[0] or in2 is None or out2 is None or in2[0] != out2[0]
                or tuple(out2[1:]) != tuple(out_shape[1:])):
            self.fail(node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} does not keep the batch axis "
                            "apart from the others")
        layer = self.layer(node, "Reshape", [x], [node.output[0]])
        layer.reshape_param.shape.dim.extend([0] + list(out_shape[1:]))

    def op_Concat(self, node):
        rank = len(self.shape(node, node.input[0]))
        axis = int(self.attrs(node)["axis"])
        axis = axis + rank if axis < 0 else axis
        if axis == 0:
            self.fail(node, "concatenation along the batch axis")
        layer = self.layer(node, "Concat", [self.blob(node, n) for n in node.input], [node.output[0]])
        if axis != 1:
            layer.concat_param.axis = axis

    def op_Split(self, node):
        x = self.blob(node, node.input[0])
        shape = self.shape(node, x)
        axis = int(self.attrs(node).get("axis", 0))
        axis = axis + len(shape) if axis < 0 else axis
        if axis == 0:
            self.fail(node, "split along the batch axis")
        sizes = [self.shape(node, o)[axis] for o in node.output]
        layer = self.layer(node, "Slice", [x], list(node.output))
        layer.slice_param.axis = axis
        layer.slice_param.slice_point.extend(np.cumsum(sizes)[:-1].tolist())

    def op_Identity(self, node):
        self.layer(node, "Split", [self.blob(node, node.input[0])], [node.output[0]])

    # ------------------------------------------------------------ element-wise

    def _eltwise(self, node, op, coeff=None):
        shapes = [self.shape(node, n) for n in node.input]
        if any(s != shapes[0] for s in shapes):
            self.fail(node, f"inputs of shapes {[tuple(s) for s in shapes]}; Caffe's Eltwise needs equal shapes")
        layer = self.layer(node, "Eltwise", [self.blob(node, n) for n in node.input], [node.output[0]])
        p = layer.eltwise_param
        p.operation = {"SUM": p.SUM, "PROD": p.PROD, "MAX": p.MAX}[op]
        if coeff:
            p.coeff.extend(coeff)

    def _power(self, node, x, scale=1.0, shift=0.0, power=1.0):
        """Power layer from a Mul/Add/Pow chain by scalars, fusing what follows in Caffe's order."""
        top = node.output[0]
        stage = 0 if scale != 1.0 else (1 if shift != 0.0 else 2)
        while True:
            nxt = self.single_consumer(top)
            if nxt is None or len(nxt.input) != 2 or nxt.input[0] != top:
                break
            value = self.scalar(nxt.input[1])
            if value is None:
                break
            if nxt.op_type == "Add" and stage < 1:
                shift, stage = value, 1
            elif nxt.op_type == "Pow" and stage < 2:
                power, stage = value, 2
            else:
                break
            self.absorbed.add(id(nxt))
            top = nxt.output[0]
            if stage == 2:
                break
        layer = self.layer(node, "Power", [self.blob(node, x)], [top])
        p = layer.power_param
        if power != 1.0:
            p.power = power
        if scale != 1.0:
            p.scale = scale
        if shift != 0.0:
            p.shift = shift

    def _scale(self, node, x, gamma=None, beta=None):
        """Scale layer (axis, num_axes from the constant's broadcast shape), absorbing a bias Add."""
        shape = self.shape(node, x)
        const = gamma if gamma is not None else beta
        axis, end = _broadcast_span(const.shape, len(shape))
        if axis is None or axis == 0:
            self.fail(node, f"constant of shape {const.shape} does not broadcast along trailing axes "
                            f"(from axis >= 1) of input {tuple(shape)}")
        pshape = tuple(shape[axis:end])

        def squeeze(c):
            padded = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
            index = (0,) * axis + (slice(None),) * (end - axis) + (0,) * (len(shape) - end)
            return np.broadcast_to(padded[index], pshape).astype(np.float32)

        top = node.output[0]
        if gamma is not None and beta is None:
            add = self.single_consumer(top)
            if add is not None and add.op_type == "Add" and add.input[0] == top and self.is_const(add.input[1]):
                bias = self.const(add.input[1])
                if _broadcast_span(bias.shape, len(shape)) == (axis, end):
                    beta = bias
                    self.absorbed.add(id(add))
                    top = add.output[0]
        gamma_blob = squeeze(gamma) if gamma is not None else np.ones(pshape, np.float32)
        blobs = [gamma_blob] + ([squeeze(beta)] if beta is not None else [])
        layer = self.layer(node, "Scale", [self.blob(node, x)], [top], blobs)
        p = layer.scale_param
        if axis != 1:
            p.axis = axis
        if end - axis != 1:
            p.num_axes = end - axis
        if beta is not None:
            p.bias_term = True

    def _with_constant(self, node):
        """(tensor input, constant array) for a binary node with one initializer, else None."""
        if len(node.input) != 2:
            return None
        a, b = node.input
        if self.is_const(b) and not self.is_const(a):
            return a, self.const(b), 1
        if self.is_const(a) and not self.is_const(b) and node.op_type in ("Add", "Mul"):
            return b, self.const(a), 0
        return None

    def op_Add(self, node):
        found = self._with_constant(node)
        if found is None:
            self._eltwise(node, "SUM")
        elif found[1].size == 1:
            self._power(node, found[0], shift=float(found[1].reshape(())))
        else:
            self._scale(node, found[0], beta=found[1])

    def op_Sum(self, node):
        self._eltwise(node, "SUM")

    def op_Sub(self, node):
        found = self._with_constant(node)
        if found is None:
            self._eltwise(node, "SUM", coeff=[1.0, -1.0])
        elif found[1].size == 1:
            self._power(node, found[0], shift=-float(found[1].reshape(())))
        else:
            self.fail(node, "subtracting a non-scalar constant has no exact Caffe layer")

    def _scale_by_blob(self, node):
        """Caffe's two-bottom Scale for x * s, s covering a span of x's axes (when the shapes differ)."""
        a, b = node.input
        blobs = [self.alias.get(n, n) for n in node.input]
        shapes = [tuple(self.shape(node, n)) for n in blobs]
        ranks = [len(self.shape(node, n)) for n in node.input]  # as the Mul sees them
        big = 0 if ranks[0] > ranks[1] or (ranks[0] == ranks[1] and len(shapes[0]) >= len(shapes[1])) else 1
        x_shape, s_shape = shapes[big], shapes[1 - big]
        s_rank = ranks[1 - big]
        axis = len(x_shape) - s_rank  # numpy aligns the Mul's operands on the right
        if not s_shape or x_shape[axis:axis + len(s_shape)] != s_shape:
            self.fail(node, f"inputs of shapes {shapes[0]} and {shapes[1]}: neither Eltwise (equal shapes) nor "
                            "Scale (one covers a span of the other's axes) computes this product")
        layer = self.layer(node, "Scale", [self.blob(node, node.input[big]), self.blob(node, node.input[1 - big])],
                           [node.output[0]])
        if axis != 1:
            layer.scale_param.axis = axis

    def op_Mul(self, node):
        found = self._with_constant(node)
        if found is None and len(node.input) == 2 and (
                tuple(self.shape(node, node.input[0])) != tuple(self.shape(node, node.input[1]))
                or any(n in self.alias for n in node.input)):
            self._scale_by_blob(node)
        elif found is None:
            self._eltwise(node, "PROD")
        elif found[1].size == 1:
            self._power(node, found[0], scale=float(found[1].reshape(())))
        else:
            self._scale(node, found[0], gamma=found[1])

    def op_Max(self, node):
        if any(self.is_const(n) for n in node.input):
            self.fail(node, "Max with a constant has no Caffe layer")
        self._eltwise(node, "MAX")

    def op_Pow(self, node):
        exponent = self.scalar(node.input[1]) if len(node.input) == 2 else None
        if exponent is None or self.is_const(node.input[0]):
            self.fail(node, "only x ** (constant scalar) maps to Caffe's Power layer")
        self._power(node, node.input[0], power=exponent)


class _Named:
    """Stand-in for a node when naming the Input layer after a graph input."""

    def __init__(self, name):
        self.name = name


def _pair(param, single, h, w, values, default):
    if values[0] == values[1]:
        if values[0] != default:
            getattr(param, single).append(int(values[0]))
    else:
        setattr(param, h, int(values[0]))
        setattr(param, w, int(values[1]))


def _pool_pair(param, single, h, w, values):
    if values[0] == values[1]:
        setattr(param, single, int(values[0]))
    else:
        setattr(param, h, int(values[0]))
        setattr(param, w, int(values[1]))


def _broadcast_span(const_shape, rank):
    """(first, end) axes where a constant broadcast against a rank-``rank`` tensor is not 1."""
    if len(const_shape) > rank:
        return None, None
    padded = (1,) * (rank - len(const_shape)) + tuple(const_shape)
    non_one = [i for i, d in enumerate(padded) if d != 1]
    if not non_one:
        return None, None
    return non_one[0], non_one[-1] + 1


def _run_pool_on_ones(node, size):
    """The ONNX pooling node applied to a 1x1xHxW input of ones (float64 result)."""
    from onnx import TensorProto, helper

    from ..onnxgraph import create_session, make_model

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    pool = helper.make_node(node.op_type, ["x"], ["y"], **attrs)
    graph = helper.make_graph([pool], "pool_check", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    session = create_session(make_model(graph), device="cpu", threads=1)
    out = session.run(None, {"x": np.ones((1, 1, *size), np.float32)})[0]
    return out[0, 0].astype(np.float64)


def _infer_shapes(model, batch: int) -> dict:
    """Static shapes of every tensor with the batch fixed (unknown other dimensions taken as 1)."""
    from ..onnxgraph import real_inputs, static_shapes

    fed = {}
    for vi in real_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        fed[vi.name] = [batch if i == 0 else (d.dim_value if d.HasField("dim_value") else 1) for i, d in enumerate(dims)]
    try:
        # the specification's pool sizes: each pool is then checked against Caffe's rounding
        return static_shapes(model, fed, onnxruntime_pools=False)
    except Exception as exc:  # onnx raises InferenceError subclasses
        raise CnnvisError(f"ONNX shape inference failed: {str(exc).splitlines()[0]}") from None


def onnx_to_caffe(model, name: str | None = None):
    """(NetParameter without weights, {layer name: [float32 arrays]}) for an ONNX model or path."""
    return _Writer(model).run(name)


def caffemodel_bytes(net, blobs: dict) -> bytes:
    """A binary ``.caffemodel``: the net's layers with their parameter blobs, as Caffe writes it."""
    raw = schema.raw_messages()
    out = raw.NetParameter.FromString(net.SerializeToString())
    for layer in out.layer:
        for array in blobs.get(layer.name, []):
            blob = layer.blobs.add()
            array = np.asarray(array, dtype="<f4")
            blob.shape.dim.extend(array.shape)
            blob.data.append(array.tobytes())
    return out.SerializeToString()


def prototxt_text(net) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(net)


def write_caffe(model, prototxt, caffemodel, name: str | None = None):
    """Write ``prototxt`` (deploy net) and ``caffemodel`` (binary weights) for an ONNX model."""
    from ..manifest import write_bytes, write_text

    net, blobs = onnx_to_caffe(model, name)
    write_text(prototxt, prototxt_text(net))
    write_bytes(caffemodel, caffemodel_bytes(net, blobs))
    return Path(prototxt), Path(caffemodel)
