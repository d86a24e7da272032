"""Modern CNN architectures through every command, built here with onnx.helper (no PyTorch) at small
widths: 3×32×32 inputs, 8-16 channels, 10 classes, seeded random weights, written the way
torch.onnx.export writes them (BatchNormalization after convolutions, Clip as ReLU6, HardSwish,
squeeze-and-excitation with ReduceMean/HardSigmoid/Mul, SiLU as Sigmoid·Mul, GELU via Erf, NHWC
transposes around LayerNormalization, channel shuffle as Reshape-Transpose-Reshape, Split, the
Shape -> Gather -> Unsqueeze -> Concat -> Reshape flatten), plus a float16 variant.

For each: the layer table holds no int tensors, every analysis command runs through
``cnnvis.cli.main`` and writes finite results, and gradcheck of the input and of the first conv's
weights passes (float64 central differences, the command's default tolerance 1e-3).
"""
import json
import math
import re

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis import ops
from cnnvis.cli import main
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model, static_shapes_and_types

CLASSES = 10


class _Net:
    """A graph under construction: each method adds the nodes of one torch module as exported."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0
        self.channels = {"x": 3}

    def name(self, hint):
        self.count += 1
        return f"/{hint}_{self.count}"

    def const(self, value, hint="c"):
        name = self.name(hint).lstrip("/") + ".value"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type, inputs, hint=None, channels=None, outputs=1, **attrs):
        base = self.name(hint or op_type.lower())
        outs = [f"{base}/out{i}" if outputs > 1 else f"{base}/out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{base}/{op_type}", **attrs))
        for o in outs:
            self.channels[o] = channels if channels is not None else self.channels.get(inputs[0])
        return outs if outputs > 1 else outs[0]

    # --------------------------------------------------------------- modules
    def conv(self, x, cout, k=3, stride=1, pad=None, group=1, bias=True):
        cin = self.channels[x]
        pad = k // 2 if pad is None else pad
        w = self.rng.normal(size=(cout, cin // group, k, k)) * math.sqrt(2.0 / (cin // group * k * k))
        layer = self.name("conv").lstrip("/")
        self.inits.append(numpy_helper.from_array(w.astype(np.float32), f"{layer}.weight"))
        inputs = [x, f"{layer}.weight"]
        if bias:
            self.inits.append(numpy_helper.from_array((self.rng.normal(size=cout) * 0.1).astype(np.float32),
                                                      f"{layer}.bias"))
            inputs.append(f"{layer}.bias")
        return self.op("Conv", inputs, hint=layer, channels=cout, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=group, dilations=[1, 1])

    def bn(self, x):
        c = self.channels[x]
        scale = self.const((1 + 0.1 * self.rng.normal(size=c)).astype(np.float32), "bn.weight")
        bias = self.const((0.1 * self.rng.normal(size=c)).astype(np.float32), "bn.bias")
        mean = self.const((0.1 * self.rng.normal(size=c)).astype(np.float32), "bn.running_mean")
        var = self.const(self.rng.uniform(0.5, 1.5, size=c).astype(np.float32), "bn.running_var")
        return self.op("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5)

    def relu(self, x):
        return self.op("Relu", [x])

    def relu6(self, x):
        return self.op("Clip", [x, self.const(np.float32(0)), self.const(np.float32(6))])

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def gelu(self, x):  # x * 0.5 * (1 + erf(x / sqrt(2))), as torch exports nn.GELU at opset 17
        e = self.op("Erf", [self.op("Div", [x, self.const(np.float32(math.sqrt(2.0)))])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [e, self.const(np.float32(1))])]),
                               self.const(np.float32(0.5))])

    def conv_bn(self, x, cout, k=3, stride=1, group=1, act="relu"):
        y = self.bn(self.conv(x, cout, k, stride, group=group, bias=False))
        return {"relu": self.relu, "relu6": self.relu6, "hardswish": lambda t: self.op("HardSwish", [t]),
                "silu": self.silu, None: lambda t: t}[act](y)

    def inverted_residual(self, x, cout, stride, expand, act, se=None):
        """MobileNet/EfficientNet block: 1×1 expand, depthwise 3×3, optional squeeze-and-excite
        (``se``: keywords of :meth:`squeeze_excite`), 1×1 project, and the residual Add when the
        shape allows."""
        hidden = self.channels[x] * expand
        y = self.conv_bn(x, hidden, k=1, act=act)
        y = self.conv_bn(y, hidden, stride=stride, group=hidden, act=act)  # depthwise
        if se is not None:
            y = self.squeeze_excite(y, **se)
        y = self.conv_bn(y, cout, k=1, act=None)
        return self.op("Add", [x, y]) if stride == 1 and self.channels[x] == cout else y

    def squeeze_excite(self, x, reduced, gate="Sigmoid", inner="relu"):
        c = self.channels[x]
        s = self.op("ReduceMean", [x], channels=c, axes=[2, 3], keepdims=1)  # opset 17: axes attribute
        s = self.conv(s, reduced, k=1)
        s = self.relu(s) if inner == "relu" else self.silu(s)
        s = self.conv(s, c, k=1)
        return self.op("Mul", [x, self.op(gate, [s])])

    def torch_flatten(self, x):
        """Shape -> Gather(0) -> Unsqueeze -> Concat([n, -1]) -> Reshape: torch's x.view(x.size(0), -1)."""
        n = self.op("Gather", [self.op("Shape", [x]), self.const(np.array(0, np.int64))], axis=0)
        target = self.op("Concat", [self.op("Unsqueeze", [n, self.const(np.array([0], np.int64))]),
                                    self.const(np.array([-1], np.int64))], axis=0)
        return self.op("Reshape", [x, target])

    def head(self, x, flatten=True):
        """Global average pool, flatten, fully connected to the classes."""
        c = self.channels[x]
        x = self.op("GlobalAveragePool", [x])
        x = self.torch_flatten(x) if flatten else self.op("Flatten", [x], axis=1)
        return self.linear(x, c, CLASSES)

    def linear(self, x, cin, cout):
        layer = self.name("fc").lstrip("/")
        self.inits.append(numpy_helper.from_array(
            (self.rng.normal(size=(cout, cin)) / math.sqrt(cin)).astype(np.float32), f"{layer}.weight"))
        self.inits.append(numpy_helper.from_array((self.rng.normal(size=cout) * 0.1).astype(np.float32),
                                                  f"{layer}.bias"))
        return self.op("Gemm", [x, f"{layer}.weight", f"{layer}.bias"], hint=layer, channels=cout, transB=1)

    def build(self, name, logits):
        graph = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                                  [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, CLASSES])], self.inits)
        return make_model(graph)


# ------------------------------------------------------------------------ architectures

def resnet_basic():
    n = _Net(1)
    x = n.op("MaxPool", [n.conv_bn("x", 8)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for cout, stride in ((8, 1), (16, 2)):
        y = n.conv_bn(n.conv_bn(x, cout, stride=stride), cout, act=None)
        short = x if stride == 1 else n.conv_bn(x, cout, k=1, stride=stride, act=None)
        x = n.relu(n.op("Add", [y, short]))
    return n.build("resnet_basic", n.head(x))


def resnet_bottleneck():
    n = _Net(2)
    x = n.conv_bn("x", 8, stride=2)
    for width, stride in ((4, 1), (8, 2)):
        y = n.conv_bn(n.conv_bn(n.conv_bn(x, width, k=1), width, stride=stride), width * 4, k=1, act=None)
        short = n.conv_bn(x, width * 4, k=1, stride=stride, act=None)
        x = n.relu(n.op("Add", [y, short]))
    return n.build("resnet_bottleneck", n.head(x))


def mobilenet_v2():
    n = _Net(3)
    x = n.conv_bn("x", 8, stride=2, act="relu6")
    for cout, stride, expand in ((8, 1, 2), (12, 2, 3), (12, 1, 3)):
        x = n.inverted_residual(x, cout, stride, expand, "relu6")
    return n.build("mobilenet_v2", n.head(n.conv_bn(x, 16, k=1, act="relu6")))


def mobilenet_v3():
    n = _Net(4)
    x = n.conv_bn("x", 8, stride=2, act="hardswish")
    for cout, stride in ((8, 1), (12, 2)):
        x = n.inverted_residual(x, cout, stride, 2, "hardswish", se={"reduced": 4, "gate": "HardSigmoid"})
    x = n.op("GlobalAveragePool", [n.conv_bn(x, 16, k=1, act="hardswish")])
    x = n.op("HardSwish", [n.linear(n.torch_flatten(x), 16, 16)], channels=16)
    return n.build("mobilenet_v3", n.linear(x, 16, CLASSES))


def efficientnet():
    n = _Net(5)
    x = n.conv_bn("x", 8, stride=2, act="silu")
    for cout, stride in ((8, 1), (12, 2)):
        x = n.inverted_residual(x, cout, stride, 2, "silu", se={"reduced": 4, "gate": "Sigmoid", "inner": "silu"})
    return n.build("efficientnet", n.head(n.conv_bn(x, 16, k=1, act="silu")))


def densenet():
    n = _Net(6)
    x = n.op("MaxPool", [n.conv_bn("x", 8)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for block in range(2):
        for _ in range(2):
            y = n.conv(n.relu(n.bn(x)), 4, bias=False)
            x = n.op("Concat", [x, y], channels=n.channels[x] + 4, axis=1)
        if block == 0:
            x = n.conv(n.relu(n.bn(x)), 8, k=1, bias=False)
            x = n.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    return n.build("densenet", n.head(n.relu(n.bn(x))))


def inception():
    n = _Net(7)
    x = n.op("MaxPool", [n.conv_bn("x", 8)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    b1 = n.conv_bn(x, 4, k=1)
    b3 = n.conv_bn(n.conv_bn(x, 4, k=1), 4)
    b5 = n.conv_bn(n.conv_bn(x, 2, k=1), 4, k=5)
    bp = n.conv_bn(n.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), 4, k=1)
    x = n.op("Concat", [b1, b3, b5, bp], channels=16, axis=1)
    x = n.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)
    return n.build("inception", n.head(n.conv_bn(x, 16, k=1)))


def shufflenet_v2():
    n = _Net(8)
    x = n.op("MaxPool", [n.conv_bn("x", 8, stride=2)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for _ in range(2):
        c = n.channels[x]
        a, b = n.op("Split", [x, n.const(np.array([c // 2, c // 2], np.int64))], channels=c // 2, outputs=2, axis=1)
        b = n.conv_bn(b, c // 2, k=1)
        b = n.conv_bn(b, c // 2, group=c // 2, act=None)
        b = n.conv_bn(b, c // 2, k=1)
        x = n.op("Concat", [a, b], channels=c, axis=1)
        # channel shuffle, groups 2: view(n, 2, c/2, h, w) -> transpose(1, 2) -> view(n, c, h, w)
        x = n.op("Reshape", [x, n.const(np.array([1, 2, c // 2, 8, 8], np.int64))])
        x = n.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
        x = n.op("Reshape", [x, n.const(np.array([1, c, 8, 8], np.int64))], channels=c)
    x = n.conv_bn(x, 16, k=1)
    x = n.op("ReduceMean", [x], axes=[2, 3], keepdims=0)  # torchvision: x.mean([2, 3])
    return n.build("shufflenet_v2", n.linear(x, 16, CLASSES))


def squeezenet():
    n = _Net(9)
    x = n.op("MaxPool", [n.relu(n.conv("x", 8, stride=2, pad=0))], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    for squeeze, expand in ((4, 8), (4, 8)):
        s = n.relu(n.conv(x, squeeze, k=1))
        x = n.op("Concat", [n.relu(n.conv(s, expand, k=1)), n.relu(n.conv(s, expand, k=3))],
                 channels=2 * expand, axis=1)
    x = n.relu(n.conv(x, CLASSES, k=1))
    x = n.op("GlobalAveragePool", [x])
    return n.build("squeezenet", n.torch_flatten(x))


def convnext():
    n = _Net(10)

    def layer_norm(t, c):
        return n.op("LayerNormalization", [t, n.const(np.ones(c, np.float32) + 0.1 * n.rng.normal(size=c).astype(np.float32)),
                                           n.const((0.1 * n.rng.normal(size=c)).astype(np.float32))],
                    axis=-1, epsilon=1e-6)

    def nhwc_layer_norm(t):
        c = n.channels[t]
        t = layer_norm(n.op("Transpose", [t], perm=[0, 2, 3, 1]), c)
        return n.op("Transpose", [t], perm=[0, 3, 1, 2])

    def linear_last(t, cin, cout):
        w = n.const((n.rng.normal(size=(cin, cout)) / math.sqrt(cin)).astype(np.float32), "pwconv.weight")
        return n.op("Add", [n.op("MatMul", [t, w], channels=cout),
                            n.const((0.1 * n.rng.normal(size=cout)).astype(np.float32), "pwconv.bias")])

    x = nhwc_layer_norm(n.conv("x", 8, k=4, stride=4, pad=0))  # patchify stem
    for _ in range(2):
        c = n.channels[x]
        y = n.conv(x, c, k=7, group=c)  # 7×7 depthwise
        y = layer_norm(n.op("Transpose", [y], perm=[0, 2, 3, 1]), c)
        y = linear_last(n.gelu(linear_last(y, c, 4 * c)), 4 * c, c)
        y = n.op("Mul", [y, n.const(np.full(c, 0.5, np.float32), "layer_scale")])
        x = n.op("Add", [x, n.op("Transpose", [y], perm=[0, 3, 1, 2])])
    x = n.torch_flatten(n.op("GlobalAveragePool", [x]))
    x = layer_norm(x, n.channels[x])
    return n.build("convnext", n.linear(x, 8, CLASSES))


def shufflenet_v2_torchscript():
    """ShuffleNet V2 as the TorchScript exporter writes torch.chunk(x, 2, dim=1): two Slices whose
    bounds are computed at run time (Shape -> Gather -> Add -> Div -> Mul -> Unsqueeze), and the
    Shape -> Gather -> Concat -> Reshape flatten. The bounds are constants for a fixed input shape."""
    n = _Net(9)
    x = n.op("MaxPool", [n.conv_bn("x", 8, stride=2)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for _ in range(2):
        c = n.channels[x]
        dim = n.op("Gather", [n.op("Shape", [x]), n.const(np.array(1, np.int64))], axis=0)
        half = n.op("Div", [n.op("Add", [dim, n.const(np.array(1, np.int64))]), n.const(np.array(2, np.int64))])
        axes, zero = n.const(np.array([0], np.int64)), n.const(np.array([1], np.int64))
        mid = n.op("Unsqueeze", [half, axes])
        end = n.op("Unsqueeze", [n.op("Mul", [half, n.const(np.array(2, np.int64))]), axes])
        a = n.op("Slice", [x, n.const(np.array([0], np.int64)), mid, zero], channels=c // 2)
        b = n.op("Slice", [x, mid, end, zero], channels=c // 2)
        b = n.conv_bn(b, c // 2, k=1)
        b = n.conv_bn(b, c // 2, group=c // 2, act=None)
        b = n.conv_bn(b, c // 2, k=1)
        x = n.op("Concat", [a, b], channels=c, axis=1)
    x = n.conv_bn(x, 16, k=1)
    return n.build("shufflenet_v2_torchscript", n.head(x))


def float16(build):
    """The architecture with its weights and its input and output in float16."""
    def make():
        proto = build()
        for init in proto.graph.initializer:
            if init.data_type == TensorProto.FLOAT:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
        for info in list(proto.graph.input) + list(proto.graph.output):
            info.type.tensor_type.elem_type = TensorProto.FLOAT16
        return proto
    make.__name__ = build.__name__ + "_fp16"
    return make


ARCHITECTURES = [resnet_basic, resnet_bottleneck, mobilenet_v2, mobilenet_v3, efficientnet, densenet, inception,
                 shufflenet_v2, shufflenet_v2_torchscript, squeezenet, convnext, float16(resnet_basic), float16(mobilenet_v3)]
IDS = [a.__name__ for a in ARCHITECTURES]


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=IDS)
def arch(request, tmp_path_factory):
    """(model file, Model, input array file) of one architecture."""
    folder = tmp_path_factory.mktemp(request.param.__name__)
    proto = request.param()
    path = folder / f"{request.param.__name__}.onnx"
    path.write_bytes(proto.SerializeToString())
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.save(folder / "x.npy", x)
    return {"path": str(path), "model": Model.from_file(path), "x": str(folder / "x.npy"), "out": folder / "out",
            "proto": proto}


def test_forward_equals_onnxruntime_on_the_file(arch):
    import onnxruntime as ort

    model = arch["model"]
    x = np.load(arch["x"])
    elem = arch["proto"].graph.input[0].type.tensor_type.elem_type
    sess = ort.InferenceSession(arch["proto"].SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"x": x[i:i + 1].astype(helper.tensor_dtype_to_np_dtype(elem))})[0]
                          for i in range(len(x))]).astype(np.float32)
    got = model.run(x, [model.output_name])[model.output_name]
    # float32: the same graph in the same runtime; float16: numpy casts as the reference run does
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_layer_table_holds_only_float_features(arch):
    model = arch["model"]
    _, types = static_shapes_and_types(model.native_proto, (1, *model.input_shape))
    assert model.layers and all(ops.is_float(types[layer.tensor]) for layer in model.layers)
    shape_ops = {"Shape", "Gather", "Unsqueeze"}
    assert not [layer.name for layer in model.layers if layer.op_type in shape_ops]
    assert model.conv_layers()[0].weight_shape[1] == 3
    every = model.run(np.load(arch["x"]), [layer.name for layer in model.layers])
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in every.values())


def _finite_outputs(folder, nan_fill=False):
    """Every .npy written under ``folder`` is finite; with ``nan_fill`` (top-k projections: NaN marks
    pixels outside the image and slots no image filled) NaN is allowed, infinities are not and some
    values are finite. Returns how many files were checked."""
    files = sorted(folder.rglob("*.npy"))
    for f in files:
        arr = np.load(f)
        if np.issubdtype(arr.dtype, np.floating):
            if nan_fill:
                assert not np.isinf(arr).any() and np.isfinite(arr).any(), f
            else:
                assert np.isfinite(arr).all(), f
    tables = sorted(folder.rglob("*.json")) + sorted(folder.rglob("*.csv"))
    for f in tables:  # numbers in JSON and CSV: Python writes non-finite floats as NaN / Infinity / nan / inf
        text = f.read_text()
        assert not re.search(r"\b(-?Infinity|-?inf)\b", text), f
        assert nan_fill or not re.search(r"\b(NaN|nan)\b", text), f
    return len(files) + len(tables)


def _run_commands(arch, commands):
    failed = {}
    for name, argv in commands.items():
        out = arch["out"] / name
        code = main([*argv, "--out", str(out)] if name != "layers" else argv)
        if code != 0:
            failed[name] = code
            continue
        if name != "layers":
            assert _finite_outputs(out, nan_fill=name == "topk"), name
            assert json.loads((out / "manifest.json").read_text()), name
    assert not failed, failed


def test_every_op_on_the_feature_path_has_a_backward_rule(arch):
    """The gradient commands below need a rule for each op computing a feature (shape arithmetic
    needs none: gradients pass around it)."""
    proto = arch["model"].proto
    data = ops.data_tensors(proto)
    used = {n.op_type for n in proto.graph.node if n.output and n.output[0] in data}
    assert used and not used - set(ops.backward_rule_ops()), sorted(used - set(ops.backward_rule_ops()))
    assert not {n.op_type for n in proto.graph.node if n.output and n.output[0] not in data} \
        - {"Shape", "Gather", "Unsqueeze", "Concat"}  # only the torch flatten's shape arithmetic is not data


def test_commands_without_gradients_run_and_write_finite_results(arch):
    m, x = ["--model", arch["path"]], arch["x"]
    first = arch["model"].conv_layers()[0].name
    _run_commands(arch, {
        "layers": ["layers", *m, "--json"],
        "activations": ["activations", *m, "--input-array", x],  # every layer: no shape tensor among them
        "filters": ["filters", *m, "--layer", first],
        "volume": ["volume", *m, "--input-array", x, "--layer", first],
        "order": ["order", *m, "--input-array", x, "--layer", first, "--method", "pca-maps"],
        "occlusion": ["occlusion", *m, "--input-array", x, "--window", "8", "--stride", "8"],
        "invariance": ["invariance", *m, "--input-array", x],
    })


def test_gradient_commands_run_and_write_finite_results(arch):
    m, x = ["--model", arch["path"]], arch["x"]
    first, last = arch["model"].conv_layers()[0].name, arch["model"].conv_layers()[-1].name
    _run_commands(arch, {
        "conv-gradients": ["conv-gradients", *m, "--input-array", x, "--layer", first],
        "gradients": ["gradients", *m, "--input-array", x, "--wrt", "input", "--wrt", f"{first}.weight"],
        "deconv": ["deconv", *m, "--input-array", x, "--layer", last],
        "topk": ["topk", *m, "--input-array", x, "--layer", last, "--restart"],
        "maximize": ["maximize", *m, "--layer", last, "--channels", "2", "--steps", "3"],
        "saliency": ["saliency", *m, "--input-array", x],
    })
    if arch["model"].reduced_precision:  # the manifests say in which precision what was computed
        manifest = json.loads((arch["out"] / "deconv" / "manifest.json").read_text())
        model_info = json.dumps(manifest)
        assert '"forward": "float16"' in model_info and '"gradients": "float32 (weights upcast)"' in model_info


def test_gradcheck_of_input_and_first_conv_weights(arch, capsys):
    first = arch["model"].conv_layers()[0].name
    code = main(["gradcheck", "--model", arch["path"], "--input-array", arch["x"], "--wrt", "input",
                 "--wrt", f"{first}.weight", "--samples", "12"])
    assert code == 0, capsys.readouterr()


def test_float16_occlusion_is_the_model_s_own_run_of_occluded_images():
    """A float16 model is occluded whole in its own precision: each map value equals the class
    probability of the occluded image run through the model (no float32 partial graphs mixed in)."""
    from cnnvis.analysis.occlusion import Occlusion

    model = Model(float16(mobilenet_v3)(), name="fp16")
    x = np.random.default_rng(1).normal(size=(3, 32, 32)).astype(np.float32)
    maps = Occlusion(model, window=16, stride=16, fill=0.0, layer=False).run(x[None])[0]
    occluded = []
    for y in maps.ys:
        for xx in maps.xs:
            img = x.copy()
            img[:, y:y + 16, xx:xx + 16] = 0.0
            occluded.append(img)
    probs = model.predict(np.stack(occluded))[:, maps.target].reshape(maps.probability.shape)
    np.testing.assert_allclose(maps.probability, probs, rtol=0, atol=1e-7)


def test_default_feature_layer_is_the_last_activation():
    from cnnvis.analysis.occlusion import default_feature_layer

    model = Model(mobilenet_v3(), name="mobilenet_v3")
    layer = model.layer(default_feature_layer(model))
    assert layer.op_type == "HardSwish" and layer.output_shape == (16, 8, 8)


@pytest.mark.parametrize("build", [resnet_basic, resnet_bottleneck, mobilenet_v2, densenet, inception, shufflenet_v2,
                                   squeezenet, convnext], ids=lambda b: b.__name__)
def test_graph_receptive_field_equals_gradient_support(build):
    """Two independent derivations agree: the field the graph gives (through residual sums, concats,
    depthwise convolutions, channel shuffles, NHWC transposes) and the support of the gradient,
    for the deepest conv layer whose central unit's field lies inside the image. (With a
    squeeze-and-excitation gate the gradient reaches every pixel: the graph's field is the
    convolutional window by design, see cnnvis.analysis.receptive.)"""
    from cnnvis.analysis.receptive import receptive_field, support_field

    model = Model(build(), name=build.__name__)
    inside = []
    for layer in model.conv_layers():
        rf = receptive_field(model, layer.name)
        _, h, w = layer.output_shape
        assert rf.source == "graph" and not rf.is_global, layer.name
        top, left, bottom, right = rf.box(h // 2, w // 2)
        if top >= 0 and left >= 0 and bottom <= 32 and right <= 32 and h > 1:
            inside.append((layer.name, rf))
    name, rf = inside[-1]
    support = support_field(model, name)
    assert (support.size, support.stride, support.offset) == (rf.size, rf.stride, rf.offset), name


def test_computed_slice_bounds_fold_and_every_layer_has_a_shape():
    """The torch.chunk bounds become constants for the fixed input shape (so the layer table knows
    every shape and the Slice rules see constants); the batch-following flatten target stays."""
    model = Model(shufflenet_v2_torchscript(), name="chunks")
    assert all(layer.output_shape and None not in layer.output_shape for layer in model.layers)
    slices = [n for n in model.proto.graph.node if n.op_type == "Slice"]
    inits = {i.name: numpy_helper.to_array(i).tolist() for i in model.proto.graph.initializer}
    # 8 channels at 8x8 after the stem: halves [0, 4) and [4, 8), hand-computed (8 + 1) // 2 = 4
    assert [(inits[s.input[1]], inits[s.input[2]]) for s in slices] == [([0], [4]), ([4], [8])] * 2
    assert [n.op_type for n in model.proto.graph.node if n.op_type in ("Shape", "Div", "Mul", "Add")] \
        == ["Shape"]  # only the flatten's Shape -> Gather(0) follows the batch
    sliced = [layer for layer in model.layers if layer.op_type == "Slice"]
    assert [layer.output_shape for layer in sliced] == [(4, 8, 8)] * 4
