"""Builders of the network topologies cnnvis knows, as ONNX graphs with deterministic weights.

`build_alexnet` and `build_caffenet` give the exact BVLC topologies (Caffe names: conv1, relu1,
norm1, pool1, ..., fc8, prob) with He-initialised random weights from a fixed seed: untrained
stand-ins for the 240 MB real files, used for tests and full-scale benchmarks. The same
:class:`NetBuilder` builds the demo network trained on Fashion-MNIST.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnxgraph import make_model


class NetBuilder:
    """Appends Caffe-style layers to an ONNX graph; tensor and node names are the layer names.

    Weights are named ``<layer>.weight`` / ``<layer>.bias``. Each layer draws its weights from its
    own generator seeded by (seed, layer index), so a topology change in one layer does not change
    the weights of the others.
    """

    def __init__(self, input_shape=(3, 227, 227), input_name: str = "data", seed: int = 0,
                 init: str = "he", batch: str | int = "N"):
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_name = input_name
        self.seed = int(seed)
        self.init = init
        self.batch = batch
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.top = input_name
        self.shape = self.input_shape  # C,H,W or (features,)
        self._index = 0

    # ------------------------------------------------------------------ helpers
    def _rng(self):
        self._index += 1
        return np.random.default_rng([self.seed, self._index])

    def _add_param(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.array(array, dtype=np.float32, order="C"), name))
        return name

    def _weights(self, shape, fan_in):
        rng = self._rng()
        if self.init == "he":
            std = math.sqrt(2.0 / fan_in)
        elif self.init == "xavier":
            std = math.sqrt(1.0 / fan_in)
        else:
            raise ValueError(f"unknown init {self.init!r}")
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def _node(self, op, name, inputs, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        self.top = name
        return name

    # ------------------------------------------------------------------ layers
    def conv(self, name, num_output, kernel, stride=1, pad=0, group=1, bias=True):
        c, h, w = self.shape
        if c % group or num_output % group:
            raise ValueError(f"{name}: channels {c}->{num_output} not divisible by group {group}")
        fan_in = (c // group) * kernel * kernel
        weight = self._add_param(f"{name}.weight", self._weights((num_output, c // group, kernel, kernel), fan_in))
        inputs = [self.top, weight]
        if bias:
            inputs.append(self._add_param(f"{name}.bias", np.zeros(num_output, np.float32)))
        self._node("Conv", name, inputs, kernel_shape=[kernel, kernel], strides=[stride, stride],
                   pads=[pad] * 4, group=group, dilations=[1, 1])
        oh = (h + 2 * pad - kernel) // stride + 1
        ow = (w + 2 * pad - kernel) // stride + 1
        self.shape = (num_output, oh, ow)
        return name

    def relu(self, name):
        return self._node("Relu", name, [self.top])

    def lrn(self, name, size=5, alpha=1e-4, beta=0.75, k=1.0):
        return self._node("LRN", name, [self.top], size=size, alpha=alpha, beta=beta, bias=k)

    def max_pool(self, name, kernel, stride, pad=0):
        """Caffe MAX pooling: output size rounds up (ceil mode)."""
        c, h, w = self.shape
        oh, ow = caffe_pool_size(h, kernel, stride, pad), caffe_pool_size(w, kernel, stride, pad)
        self._node("MaxPool", name, [self.top], kernel_shape=[kernel, kernel], strides=[stride, stride],
                   pads=[pad] * 4, ceil_mode=1)
        self.shape = (c, oh, ow)
        return name

    def fc(self, name, num_output):
        if len(self.shape) != 1:
            flat = f"{name}_input_flat"
            self.nodes.append(helper.make_node("Flatten", [self.top], [flat], name=flat, axis=1))
            self.top = flat
            self.shape = (int(np.prod(self.shape)),)
        (fan_in,) = self.shape
        weight = self._add_param(f"{name}.weight", self._weights((num_output, fan_in), fan_in))
        bias = self._add_param(f"{name}.bias", np.zeros(num_output, np.float32))
        self._node("Gemm", name, [self.top, weight, bias], transB=1)
        self.shape = (num_output,)
        return name

    def dropout(self, name, ratio=0.5):
        if ratio == 0.5:  # ONNX's default ratio: no extra input
            return self._node("Dropout", name, [self.top])
        ratio_name = self._add_param(f"{name}.ratio", np.array(ratio, np.float32))
        return self._node("Dropout", name, [self.top, ratio_name])

    def softmax(self, name="prob"):
        return self._node("Softmax", name, [self.top], axis=1)

    def build(self, graph_name: str, doc: str = "") -> onnx.ModelProto:
        batch = self.batch
        inp = helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, [batch, *self.input_shape])
        out = helper.make_tensor_value_info(self.top, TensorProto.FLOAT, [batch, *self.shape])
        graph = helper.make_graph(self.nodes, graph_name, [inp], [out], self.initializers, doc_string=doc)
        return make_model(graph)


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int = 0) -> int:
    """Caffe's pooling output size: ceil rounding, minus one if the last window starts in the padding."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _bvlc(kind: str, seed: int, input_size: int, num_classes: int) -> onnx.ModelProto:
    b = NetBuilder((3, input_size, input_size), input_name="data", seed=seed)
    b.conv("conv1", 96, 11, stride=4)
    b.relu("relu1")
    if kind == "alexnet":  # AlexNet normalises before pooling, CaffeNet pools first
        b.lrn("norm1")
        b.max_pool("pool1", 3, 2)
    else:
        b.max_pool("pool1", 3, 2)
        b.lrn("norm1")
    b.conv("conv2", 256, 5, pad=2, group=2)
    b.relu("relu2")
    if kind == "alexnet":
        b.lrn("norm2")
        b.max_pool("pool2", 3, 2)
    else:
        b.max_pool("pool2", 3, 2)
        b.lrn("norm2")
    b.conv("conv3", 384, 3, pad=1)
    b.relu("relu3")
    b.conv("conv4", 384, 3, pad=1, group=2)
    b.relu("relu4")
    b.conv("conv5", 256, 3, pad=1, group=2)
    b.relu("relu5")
    b.max_pool("pool5", 3, 2)
    b.fc("fc6", 4096)
    b.relu("relu6")
    b.dropout("drop6")
    b.fc("fc7", 4096)
    b.relu("relu7")
    b.dropout("drop7")
    b.fc("fc8", num_classes)
    b.softmax("prob")
    doc = (f"BVLC {kind} topology with UNTRAINED He-initialised random weights (seed {seed}); "
           "for tests and benchmarks, not for interpretation.")
    return b.build(f"{kind}_random", doc)


def build_alexnet(seed: int = 0, input_size: int = 227, num_classes: int = 1000) -> onnx.ModelProto:
    """The BVLC AlexNet topology (LRN before pooling) with deterministic He-init random weights."""
    return _bvlc("alexnet", seed, input_size, num_classes)


def build_caffenet(seed: int = 0, input_size: int = 227, num_classes: int = 1000) -> onnx.ModelProto:
    """The BVLC reference CaffeNet topology (pooling before LRN) with deterministic random weights."""
    return _bvlc("caffenet", seed, input_size, num_classes)


#: The demo network: CaffeNet's layer types in CaffeNet's order, sized for 1×28×28 Fashion-MNIST.
FASHION_CAFFENET = {
    "input": [1, 28, 28],
    "conv1": {"num_output": 48, "kernel": 5, "stride": 1, "pad": 2},
    "pool1": {"kernel": 3, "stride": 2},
    "norm1": {"size": 5, "alpha": 1e-4, "beta": 0.75},
    "conv2": {"num_output": 64, "kernel": 5, "pad": 2, "group": 2},
    "pool2": {"kernel": 3, "stride": 2},
    "norm2": {"size": 5, "alpha": 1e-4, "beta": 0.75},
    "conv3": {"num_output": 96, "kernel": 3, "pad": 1},
    "conv4": {"num_output": 96, "kernel": 3, "pad": 1, "group": 2},
    "conv5": {"num_output": 64, "kernel": 3, "pad": 1, "group": 2},
    "pool5": {"kernel": 3, "stride": 2},
    "fc6": {"num_output": 256, "dropout": 0.5},
    "fc7": {"num_output": 256, "dropout": 0.5},
    "fc8": {"num_output": 10},
}


def build_fashion_caffenet(seed: int = 0, spec: dict | None = None) -> onnx.ModelProto:
    """The demo network (see FASHION_CAFFENET): conv1 → relu → pool (ceil) → LRN, conv2 (group 2) →
    relu → pool → LRN, conv3 → relu, conv4 (g2) → relu, conv5 (g2) → relu → pool, fc6 → relu → drop,
    fc7 → relu → drop, fc8, softmax. 28 → 28 → 14 → 14 → 7 → 7 → 3 spatially."""
    s = spec or FASHION_CAFFENET
    b = NetBuilder(tuple(s["input"]), input_name="data", seed=seed)
    for i in (1, 2):
        b.conv(f"conv{i}", **s[f"conv{i}"])
        b.relu(f"relu{i}")
        b.max_pool(f"pool{i}", **s[f"pool{i}"])
        b.lrn(f"norm{i}", size=s[f"norm{i}"]["size"], alpha=s[f"norm{i}"]["alpha"], beta=s[f"norm{i}"]["beta"])
    for i in (3, 4, 5):
        b.conv(f"conv{i}", **s[f"conv{i}"])
        b.relu(f"relu{i}")
    b.max_pool("pool5", **s["pool5"])
    for i in (6, 7):
        b.fc(f"fc{i}", s[f"fc{i}"]["num_output"])
        b.relu(f"relu{i}")
        b.dropout(f"drop{i}", s[f"fc{i}"]["dropout"])
    b.fc("fc8", s["fc8"]["num_output"])
    b.softmax("prob")
    return b.build("fashion_caffenet", "CaffeNet-shaped network for 1x28x28 Fashion-MNIST (cnnvis demo)")
