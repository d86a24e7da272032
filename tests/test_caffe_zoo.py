"""The classic Caffe zoo's topologies: real prototxts (tests/data/caffe, see its README) and
rebuilt ones (VGG, Network in Network, an Inception-BN module), with random weights written by
the test into a .caffemodel.

Every net is also run by :class:`MiniCaffe` below: a float64 numpy forward pass written from
Caffe's layer definitions, sharing no code with cnnvis's converter. It makes the random weights
(Caffe's blob shapes for each layer), writes them, and computes every blob. The converted ONNX
graph (float32) must give each blob's shape and values: to 1e-4 of the blob's largest magnitude
(float32 accumulated through up to ~60 layers; single layers are held to 1e-5 in test_caffe).
"""
from pathlib import Path

import numpy as np
import onnx
import pytest

from cnnvis.caffe import (
    META_BLOB_FINAL, caffe_metadata, caffe_notes, caffemodel_bytes, load_caffe, parse_prototxt, read_net,
)
from cnnvis.onnxgraph import create_session

from test_caffe import ref_conv, ref_lrn_across, ref_pool

DATA = Path(__file__).parent / "data" / "caffe"
RTOL = 1e-4
SKIPPED_TYPES = {"Accuracy", "SoftmaxWithLoss", "Data", "Input"}


class MiniCaffe:
    """A float64 forward pass of a TEST-phase Caffe net, layer by layer, making its weights."""

    def __init__(self, prototxt, seed=0):
        self.net = read_net(prototxt)
        self.rng = np.random.default_rng(seed)
        self.weights = {}

    def param(self, layer, shapes, kinds):
        if layer.name not in self.weights:
            arrays = []
            for shape, kind in zip(shapes, kinds):
                if kind == "weight":
                    fan_in = int(np.prod(shape[1:]))
                    arrays.append(self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
                elif kind == "variance":
                    arrays.append(self.rng.uniform(0.5, 2.0, shape))
                elif kind == "factor":
                    arrays.append(self.rng.uniform(0.5, 2.0, shape))
                elif kind == "gamma":
                    arrays.append(self.rng.uniform(0.5, 1.5, shape))
                else:  # bias, mean, beta
                    arrays.append(self.rng.standard_normal(shape) * 0.1)
            self.weights[layer.name] = [a.astype(np.float32).astype(np.float64) for a in arrays]
        return self.weights[layer.name]

    def forward(self, x, input_blob="data"):
        blobs = {input_blob: x}
        for layer in self.net.layers:
            if layer.type in SKIPPED_TYPES:
                continue
            args = [blobs[b] for b in layer.bottoms]
            outs = getattr(self, layer.type)(layer, *args)
            outs = outs if isinstance(outs, list) else [outs]
            for top, value in zip(layer.tops, outs):
                blobs[top] = value
        return blobs

    # Caffe's layers, from their definitions -------------------------------------------------

    def Convolution(self, layer, x):
        p = layer.proto.convolution_param
        kh, kw = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size[0],) * 2
        ph, pw = (p.pad_h, p.pad_w) if p.HasField("pad_h") else ((p.pad[0],) * 2 if len(p.pad) else (0, 0))
        sh, sw = (p.stride_h, p.stride_w) if p.HasField("stride_h") else ((p.stride[0],) * 2 if len(p.stride) else (1, 1))
        dil = (p.dilation[0],) * 2 if len(p.dilation) else (1, 1)
        shapes = [(p.num_output, x.shape[1] // p.group, kh, kw)] + ([(p.num_output,)] if p.bias_term else [])
        blobs = self.param(layer, shapes, ["weight", "bias"][:len(shapes)])
        return ref_conv(x, blobs[0], blobs[1] if p.bias_term else None, (sh, sw), (ph, pw), dil, p.group)

    def ReLU(self, layer, x):
        slope = layer.proto.relu_param.negative_slope
        return np.where(x > 0, x, slope * x)

    def Pooling(self, layer, x):
        p = layer.proto.pooling_param
        method = "MAX" if p.pool == 0 else "AVE"
        if p.global_pooling:
            return x.max(axis=(2, 3), keepdims=True) if method == "MAX" else x.mean(axis=(2, 3), keepdims=True)
        k = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size,) * 2
        s = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride,) * 2
        pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad,) * 2
        return ref_pool(x, k, s, pad, method)

    def LRN(self, layer, x):
        p = layer.proto.lrn_param
        assert p.norm_region == 0
        return ref_lrn_across(x, p.local_size, p.alpha, p.beta, p.k)

    def Concat(self, layer, *xs):
        return np.concatenate(xs, axis=layer.proto.concat_param.axis)

    def Dropout(self, layer, x):
        return x

    def InnerProduct(self, layer, x):
        p = layer.proto.inner_product_param
        flat = x.reshape(len(x), -1)
        w, b = self.param(layer, [(p.num_output, flat.shape[1]), (p.num_output,)], ["weight", "bias"])
        return flat @ w.T + b

    def Softmax(self, layer, x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def BatchNorm(self, layer, x):
        c = x.shape[1]
        mean, var, factor = self.param(layer, [(c,), (c,), (1,)], ["mean", "variance", "factor"])
        f = 0.0 if factor[0] == 0 else 1.0 / factor[0]
        eps = layer.proto.batch_norm_param.eps
        return (x - mean[None, :, None, None] * f) / np.sqrt(var[None, :, None, None] * f + eps)

    def Scale(self, layer, x):
        c = x.shape[1]
        bias = layer.proto.scale_param.bias_term
        blobs = self.param(layer, [(c,), (c,)][:1 + bias], ["gamma", "beta"][:1 + bias])
        y = x * blobs[0][None, :, None, None]
        return y + blobs[1][None, :, None, None] if bias else y

    def Eltwise(self, layer, *xs):
        p = layer.proto.eltwise_param
        if p.operation == 1:  # SUM
            coeff = list(p.coeff) or [1.0] * len(xs)
            return sum(c * v for c, v in zip(coeff, xs))
        return np.prod(xs, axis=0) if p.operation == 0 else np.max(xs, axis=0)

    def Split(self, layer, x):
        return [x] * len(layer.tops)


def _shapes(model):
    """Every tensor's shape after the batch, from the converted graph's declarations."""
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        out[vi.name] = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim[1:])
    return out


def _check(tmp_path, prototxt, size, blob_shapes, outputs, seed=0, input_shape=None):
    """Convert ``prototxt`` with MiniCaffe's random weights; compare shapes and every blob."""
    ref = MiniCaffe(prototxt, seed)
    x = np.random.default_rng(seed + 100).standard_normal((1,) + size).astype(np.float32).astype(np.float64)
    expected = ref.forward(x)
    weights = tmp_path / (Path(prototxt).stem + ".caffemodel")
    weights.write_bytes(caffemodel_bytes(parse_prototxt(prototxt), ref.weights))
    model = load_caffe(prototxt, weights, input_shape=input_shape)
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == outputs
    final = caffe_metadata(model)[META_BLOB_FINAL]
    shapes = _shapes(model)
    for blob, shape in blob_shapes.items():
        assert shapes[final[blob]] == shape, f"{blob}: {shapes[final[blob]]} != {shape}"
        assert expected[blob].shape[1:] == shape, blob
    names = sorted(b for b in final if b != "data")
    assert set(names) <= set(expected)  # every blob of the converted net is compared
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(final[b]) for b in names if final[b] not in have)
    session = create_session(m, device="cpu", threads=1)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {model.graph.input[0].name: x.astype(np.float32)})))
    for blob in names:
        want = expected[blob]
        err = np.abs(got[final[blob]] - want).max() / max(np.abs(want).max(), 1e-30)
        assert err <= RTOL, f"{blob}: relative error {err:.3g} > {RTOL}"
    return model, names


def test_resnet50_msra_deploy(tmp_path):
    # Blob shapes of the MSRA ResNet-50 at 224x224 (the paper's Table 1: conv1 112, conv2_x 56,
    # conv3_x 28, conv4_x 14, conv5_x 7; 4x bottleneck widths).
    model, names = _check(tmp_path, DATA / "ResNet-50-deploy.prototxt", (3, 224, 224), {
        "conv1": (64, 112, 112), "pool1": (64, 56, 56), "res2c": (256, 56, 56), "res3d": (512, 28, 28),
        "res4f": (1024, 14, 14), "res5c": (2048, 7, 7), "pool5": (2048, 1, 1), "fc1000": (1000,),
        "prob": (1000,)}, ["prob"])
    assert len(names) == 73  # 53 convolutions' blobs (BatchNorm, Scale, ReLU in place), 16 sums, 4 more
    meta = caffe_metadata(model)
    types = meta["cnnvis.caffe.types"]
    learned = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                  for layer, inits in meta["cnnvis.caffe.params"].items() if i.name in inits
                  and types[layer] in ("Convolution", "InnerProduct", "Scale"))
    # ResNet-50's usual count (25,557,032 learned weights, biases and BN affine parameters) plus the
    # 64 biases of the MSRA prototxt's conv1, the one convolution that keeps bias_term's default.
    assert learned == 25_557_032 + 64
    assert caffe_notes(model) == []


def test_googlenet_train_val(tmp_path):
    model, _ = _check(tmp_path, DATA / "bvlc_googlenet_train_val.prototxt", (3, 224, 224), {
        "conv1/7x7_s2": (64, 112, 112), "pool1/3x3_s2": (64, 56, 56), "conv2/3x3": (192, 56, 56),
        "pool2/3x3_s2": (192, 28, 28), "inception_3a/output": (256, 28, 28),
        "inception_3b/output": (480, 28, 28), "pool3/3x3_s2": (480, 14, 14),
        "inception_4a/output": (512, 14, 14), "inception_4e/output": (832, 14, 14),
        "pool4/3x3_s2": (832, 7, 7), "inception_5b/output": (1024, 7, 7), "pool5/7x7_s1": (1024, 1, 1),
        "loss3/classifier": (1000,)}, ["loss3/classifier"])
    (note,) = caffe_notes(model)
    assert "'data' 3x224x224" in note and "crop_size, mean_value" in note
    # loss1/loss1, loss2/loss2, loss3/loss3 and six Accuracy layers (top-1, top-5 per classifier)
    assert "dropped 9 layer(s)" in note and "output 'loss3/classifier'" in note
    assert not any(n.name.startswith(("loss1/", "loss2/")) for n in model.graph.node)


def test_squeezenet_v11_train_val_and_v10_deploy(tmp_path):
    model, _ = _check(tmp_path, DATA / "squeezenet_v1.1_train_val.prototxt", (3, 227, 227), {
        "conv1": (64, 113, 113), "pool1": (64, 56, 56), "fire2/concat": (128, 56, 56), "pool3": (128, 28, 28),
        "fire5/concat": (256, 28, 28), "pool5": (256, 14, 14), "fire9/concat": (512, 14, 14),
        "conv10": (1000, 14, 14), "pool10": (1000, 1, 1)}, ["pool10"])
    assert "3x227x227" in caffe_notes(model)[0]
    _check(tmp_path, DATA / "squeezenet_v1.0_deploy.prototxt", (3, 227, 227), {
        "conv1": (96, 111, 111), "pool1": (96, 55, 55), "fire2/concat": (128, 55, 55), "pool4": (256, 27, 27),
        "pool8": (512, 13, 13), "conv10": (1000, 15, 15), "pool10": (1000, 1, 1), "prob": (1000, 1, 1)}, ["prob"])
    # (v1.0's conv10 is a 1x1 convolution with pad: 1, hence 15x15 before the global pooling)


def _vgg(depth, width):
    """VGG-16/19 (configurations D and E) with channels divided by 64/width, as a train_val net."""
    blocks = {16: [2, 2, 3, 3, 3], 19: [2, 2, 4, 4, 4]}[depth]
    lines = ['name: "VGG"',
             'layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST } '
             'transform_param { crop_size: 224 mean_value: 103.939 mean_value: 116.779 mean_value: 123.68 } '
             'data_param { source: "val_lmdb" batch_size: 50 backend: LMDB } }']
    bottom = "data"
    for b, count in enumerate(blocks, start=1):
        channels = width * min(2 ** (b - 1), 8)
        for i in range(1, count + 1):
            name = f"conv{b}_{i}"
            lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                         f"convolution_param {{ num_output: {channels} pad: 1 kernel_size: 3 }} }}")
            lines.append(f'layer {{ name: "relu{b}_{i}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
            bottom = name
        lines.append(f'layer {{ name: "pool{b}" type: "Pooling" bottom: "{bottom}" top: "pool{b}" '
                     "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }")
        bottom = f"pool{b}"
    for name, n in (("fc6", 8 * width), ("fc7", 8 * width)):
        lines.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                     f"inner_product_param {{ num_output: {n} }} }}")
        lines.append(f'layer {{ name: "relu{name[2:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        lines.append(f'layer {{ name: "drop{name[2:]}" type: "Dropout" bottom: "{name}" top: "{name}" }}')
        bottom = name
    lines.append(f'layer {{ name: "fc8" type: "InnerProduct" bottom: "{bottom}" top: "fc8" '
                 "inner_product_param { num_output: 10 } }")
    lines.append('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }')
    lines.append('layer { name: "accuracy" type: "Accuracy" bottom: "fc8" bottom: "label" top: "accuracy" '
                 "include { phase: TEST } }")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("depth", [16, 19])
def test_vgg_train_val_at_small_width(tmp_path, depth):
    proto = tmp_path / f"vgg{depth}.prototxt"
    proto.write_text(_vgg(depth, 4))
    last = {16: "conv5_3", 19: "conv5_4"}[depth]
    model, _ = _check(tmp_path, proto, (3, 224, 224), {
        "conv1_2": (4, 224, 224), "pool1": (4, 112, 112), "pool2": (8, 56, 56), "pool3": (16, 28, 28),
        "pool4": (32, 14, 14), last: (32, 14, 14), "pool5": (32, 7, 7), "fc6": (32,), "fc8": (10,)}, ["fc8"])
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == depth - 3


NIN = """name: "nin_imagenet"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 224 mean_file: "imagenet_mean.binaryproto" mirror: true }
  data_param { source: "train_lmdb" batch_size: 128 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 224 mean_file: "imagenet_mean.binaryproto" mirror: false }
  data_param { source: "val_lmdb" batch_size: 200 backend: LMDB } }
"""
NIN_STAGES = [  # (conv, kernel, stride, pad, channels), then two cccp 1x1 and a pooling
    ("conv1", 11, 4, 0, 96, "pool1"), ("conv2", 5, 1, 2, 256, "pool2"), ("conv3", 3, 1, 1, 384, "pool3"),
    ("conv4-1024", 3, 1, 1, 1024, None)]


def _nin(width_div):
    lines = [NIN]
    bottom, cccp = "data", 1
    for conv, k, s, pad, channels, pool in NIN_STAGES:
        c = channels // width_div
        lines.append(f'layer {{ name: "{conv}" type: "Convolution" bottom: "{bottom}" top: "{conv}" '
                     f"convolution_param {{ num_output: {c} kernel_size: {k} stride: {s} pad: {pad} }} }}")
        lines.append(f'layer {{ name: "relu_{conv}" type: "ReLU" bottom: "{conv}" top: "{conv}" }}')
        bottom = conv
        for j in range(2):
            name = f"cccp{cccp}" + ("-1024" if pool is None else "")
            out = (1000 // width_div if j == 1 else c) if pool is None else c
            lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                         f"convolution_param {{ num_output: {out} kernel_size: 1 }} }}")
            lines.append(f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
            bottom, cccp = name, cccp + 1
        if pool:
            lines.append(f'layer {{ name: "{pool}" type: "Pooling" bottom: "{bottom}" top: "{pool}" '
                         "pooling_param { pool: MAX kernel_size: 3 stride: 2 } }")
            bottom = pool
            if pool == "pool3":
                lines.append('layer { name: "drop" type: "Dropout" bottom: "pool3" top: "pool3" }')
    lines.append(f'layer {{ name: "pool4" type: "Pooling" bottom: "{bottom}" top: "pool4" '
                 "pooling_param { pool: AVE kernel_size: 6 stride: 1 } }")
    lines.append('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool4" bottom: "label" top: "loss" }')
    lines.append('layer { name: "accuracy" type: "Accuracy" bottom: "pool4" bottom: "label" top: "accuracy" '
                 "include { phase: TEST } }")
    return "\n".join(lines) + "\n"


def test_network_in_network_train_val(tmp_path):
    proto = tmp_path / "nin.prototxt"
    proto.write_text(_nin(8))
    # crop_size 224 but the mean file (and so the channels) is not here: --input-shape
    with pytest.raises(Exception, match="input_shape=C,H,W"):
        load_caffe(proto)
    # NIN at 224: conv1 (224 - 11) / 4 + 1 = 54, pools round up: 27, 13, 6; pool4 averages 6x6.
    model, _ = _check(tmp_path, proto, (3, 224, 224), {
        "conv1": (12, 54, 54), "cccp2": (12, 54, 54), "pool1": (12, 27, 27), "pool2": (32, 13, 13),
        "pool3": (48, 6, 6), "cccp8-1024": (125, 6, 6), "pool4": (125, 1, 1)}, ["pool4"],
        input_shape="3,224,224")
    assert "from --input-shape" in caffe_notes(model)[0]


INCEPTION_BN = """name: "inception_bn_module"
input: "data"
input_shape { dim: 1 dim: 16 dim: 14 dim: 14 }
"""


def _conv_bn(name, bottom, out, k, s=1, p=0):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f"convolution_param {{ num_output: {out} kernel_size: {k} stride: {s} pad: {p} bias_term: false }} }}\n"
            f'layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" top: "{name}_bn" '
            "batch_norm_param { use_global_stats: true eps: 0.0001 } }\n"
            f'layer {{ name: "{name}_scale" type: "Scale" bottom: "{name}_bn" top: "{name}_bn" scale_param {{ bias_term: true }} }}\n'
            f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}_bn" top: "{name}_bn" }}\n')


def test_inception_bn_modules(tmp_path):
    # Inception-BN (Ioffe & Szegedy 2015): 1x1, 3x3 and double-3x3 branches plus an AVE-pool
    # projection, each conv followed by BatchNorm + Scale + ReLU; then a stride-2 reduction
    # module (two stride-2 branches and a MAX pool pass-through).
    text = (INCEPTION_BN + _conv_bn("3a_1x1", "data", 8, 1) + _conv_bn("3a_3x3_reduce", "data", 8, 1)
            + _conv_bn("3a_3x3", "3a_3x3_reduce_bn", 8, 3, p=1) + _conv_bn("3a_d3x3_reduce", "data", 8, 1)
            + _conv_bn("3a_d3x3_a", "3a_d3x3_reduce_bn", 12, 3, p=1) + _conv_bn("3a_d3x3_b", "3a_d3x3_a_bn", 12, 3, p=1)
            + 'layer { name: "3a_pool" type: "Pooling" bottom: "data" top: "3a_pool" '
              "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 } }\n"
            + _conv_bn("3a_proj", "3a_pool", 4, 1)
            + 'layer { name: "3a_out" type: "Concat" bottom: "3a_1x1_bn" bottom: "3a_3x3_bn" bottom: "3a_d3x3_b_bn" '
              'bottom: "3a_proj_bn" top: "3a_out" }\n'
            + _conv_bn("3c_3x3_reduce", "3a_out", 8, 1) + _conv_bn("3c_3x3", "3c_3x3_reduce_bn", 8, 3, s=2, p=1)
            + _conv_bn("3c_d3x3_reduce", "3a_out", 8, 1) + _conv_bn("3c_d3x3_a", "3c_d3x3_reduce_bn", 8, 3, p=1)
            + _conv_bn("3c_d3x3_b", "3c_d3x3_a_bn", 8, 3, s=2, p=1)
            + 'layer { name: "3c_pool" type: "Pooling" bottom: "3a_out" top: "3c_pool" '
              "pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n"
            + 'layer { name: "3c_out" type: "Concat" bottom: "3c_3x3_bn" bottom: "3c_d3x3_b_bn" bottom: "3c_pool" top: "3c_out" }\n'
            + 'layer { name: "gpool" type: "Pooling" bottom: "3c_out" top: "gpool" pooling_param { pool: AVE global_pooling: true } }\n'
            + 'layer { name: "fc" type: "InnerProduct" bottom: "gpool" top: "fc" inner_product_param { num_output: 5 } }\n'
            + 'layer { name: "softmax" type: "Softmax" bottom: "fc" top: "softmax" }\n')
    proto = tmp_path / "inception_bn.prototxt"
    proto.write_text(text)
    # 14 -> 7 on both stride-2 branches; Caffe's MAX pool rounds up: ceil((14 - 3) / 2) + 1 = 7.
    _check(tmp_path, proto, (16, 14, 14), {"3a_out": (32, 14, 14), "3c_out": (48, 7, 7), "gpool": (48, 1, 1),
                                           "softmax": (5,)}, ["softmax"])
