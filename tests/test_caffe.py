"""Caffe reader + Caffe->ONNX conversion, self-contained (no ../shared).

Every net here is a small prototxt written by the test, with a binary .caffemodel written by
cnnvis's writer (or built with the schema classes for the V1 / input_dim / double-data variants).
The converted ONNX graph runs in onnxruntime (float32) and every Caffe blob and every layer top is
compared with a float64 numpy implementation of Caffe's layer semantics written out below, to
1e-5 of the largest magnitude of each blob.
"""
import json

import numpy as np
import onnx
import pytest

from cnnvis.caffe import (
    META_BLOB_FINAL, META_BLOBS, META_LAYERS, META_PARAMS, META_PROTOTXT_SHA, META_TYPES, META_WEIGHTS,
    META_WEIGHTS_SHA, caffe_metadata, caffemodel_bytes, is_hdf5, load_caffe, parse_prototxt, read_mean_binaryproto, read_net, read_weights,
)
from cnnvis.caffe.schema import messages
from cnnvis.errors import CnnvisError
from cnnvis.manifest import sha256_file
from cnnvis.onnxgraph import create_session

RTOL = 1e-5  # float32 graph vs float64 reference, relative to each blob's largest magnitude


# ---------------------------------------------------------------- float64 Caffe reference

def ref_conv(x, w, b=None, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group=1):
    """Caffe's convolution (cross-correlation, zero padding) with one BLAS product per kernel tap."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    out = np.zeros((o, n, oh, ow))
    og = o // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilation[0], j * dilation[1]
                patch = xs[:, :, r0:r0 + stride[0] * (oh - 1) + 1:stride[0], c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
                out[g * og:(g + 1) * og] += np.tensordot(w[g * og:(g + 1) * og, :, i, j], patch, axes=([1], [1]))
    out = out.transpose(1, 0, 2, 3)
    return out + b[None, :, None, None] if b is not None else out


def ref_deconv(x, w, b=None, stride=(1, 1), pad=(0, 0), group=1):
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    cg = c // group
    fh, fw = stride[0] * (h - 1) + kh, stride[1] * (wd - 1) + kw
    full = np.zeros((n, og * group, fh, fw))
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", x[:, g * cg:(g + 1) * cg], w[g * cg:(g + 1) * cg, :, i, j])
                full[:, g * og:(g + 1) * og, i:i + stride[0] * (h - 1) + 1:stride[0],
                     j:j + stride[1] * (wd - 1) + 1:stride[1]] += contrib
    out = full[:, :, pad[0]:fh - pad[0], pad[1]:fw - pad[1]]
    if b is not None:
        out = out + b[None, :, None, None]
    return out


def ref_pool(x, kernel, stride, pad, method, ceil=True):
    """Caffe's PoolingLayer::Forward_cpu, position by position."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad

    def size(length, k, s, p):
        span = (length + 2 * p - k) / s
        out = int(np.ceil(span) if ceil else np.floor(span)) + 1
        if (ph or pw) and (out - 1) * s >= length + p:
            out -= 1
        return out

    oh, ow = size(h, kh, sh, ph), size(w, kw, sw, pw)
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            divisor = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            window = x[:, :, hs:he, ws:we]
            out[:, :, i, j] = window.max(axis=(2, 3)) if method == "MAX" else window.sum(axis=(2, 3)) / divisor
    return out


def ref_lrn_across(x, size, alpha, beta, k):
    half = (size - 1) // 2
    sq = x ** 2
    out = np.empty_like(x)
    for ch in range(x.shape[1]):
        lo, hi = max(0, ch - half), min(x.shape[1], ch + half + 1)
        out[:, ch] = x[:, ch] * (k + alpha / size * sq[:, lo:hi].sum(axis=1)) ** (-beta)
    return out


def ref_lrn_within(x, size, alpha, beta):
    half = (size - 1) // 2
    sq = np.pad(x ** 2, ((0, 0), (0, 0), (half, half), (half, half)))
    total = np.zeros_like(x)
    for i in range(size):
        for j in range(size):
            total += sq[:, :, i:i + x.shape[2], j:j + x.shape[3]]
    return x * (1 + alpha / size ** 2 * total) ** (-beta)


def ref_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------- helpers

def write_prototxt(tmp_path, name, text, blobs=None):
    """``text`` as ``<name>.prototxt`` and, given ``blobs`` ({layer: [arrays]}), the .caffemodel
    cnnvis's writer makes of them; returns (prototxt, caffemodel or None)."""
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    weights = None
    if blobs is not None:
        weights = tmp_path / f"{name}.caffemodel"
        weights.write_bytes(caffemodel_bytes(parse_prototxt(proto), blobs))
    return proto, weights


def write_net(tmp_path, body, input_shape, blobs=None, name="net"):
    """A deploy net: an Input layer of ``input_shape``, then ``body``."""
    dims = " ".join(f"dim: {d}" for d in input_shape)
    text = (f'name: "{name}"\nlayer {{ name: "data" type: "Input" top: "data" '
            f"input_param {{ shape {{ {dims} }} }} }}\n{body}")
    return write_prototxt(tmp_path, name, text, blobs)


def run_all(model, feeds):
    """Every tensor named in the Caffe metadata, computed by onnxruntime."""
    meta = caffe_metadata(model)
    wanted = set(meta[META_BLOB_FINAL].values()) | {t for ts in meta[META_LAYERS].values() for t in ts}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for name in sorted(wanted - have):
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = create_session(m, device="cpu", threads=1)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    values.update(feeds)
    return values, meta


def assert_close(got, want, what=""):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max() / scale
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"


def check_blobs(model, x, expected_blobs, expected_layers=None):
    values, meta = run_all(model, {"data": x.astype(np.float32)})
    for blob, want in expected_blobs.items():
        assert_close(values[meta[META_BLOB_FINAL][blob]], want, f"blob {blob}")
    for layer, want in (expected_layers or {}).items():
        assert_close(values[meta[META_LAYERS][layer][0]], want, f"layer {layer}")
    onnx.checker.check_model(model)
    return values, meta


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- layers against numpy

def test_convolution_variants_and_inplace_relu(tmp_path):
    r = rng(1)
    x = r.standard_normal((2, 4, 9, 11))
    wa, ba = r.standard_normal((6, 2, 3, 2)), r.standard_normal(6)
    wb = r.standard_normal((6, 6, 3, 3))
    wd, bd = r.standard_normal((6, 2, 3, 3)), r.standard_normal(4)
    body = """
layer { name: "conv_a" type: "Convolution" bottom: "data" top: "conv_a"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1 group: 2 } }
layer { name: "relu_a" type: "ReLU" bottom: "conv_a" top: "conv_a" }
layer { name: "conv_b" type: "Convolution" bottom: "conv_a" top: "conv_b"
  convolution_param { num_output: 6 kernel_size: 3 pad: 2 dilation: 2 bias_term: false } }
layer { name: "deconv" type: "Deconvolution" bottom: "conv_b" top: "deconv"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
"""
    proto, weights = write_net(tmp_path, body, (1, 4, 9, 11),
                               {"conv_a": [wa, ba], "conv_b": [wb], "deconv": [wd, bd]})
    model = load_caffe(proto, weights)
    conv_a = ref_conv(x, wa, ba, stride=(2, 1), pad=(1, 0), group=2)
    relu_a = np.maximum(conv_a, 0)
    conv_b = ref_conv(relu_a, wb, None, pad=(2, 2), dilation=(2, 2))
    deconv = ref_deconv(conv_b, wd, bd, stride=(2, 2), pad=(1, 1), group=2)
    values, meta = check_blobs(model, x, {"conv_a": relu_a, "conv_b": conv_b, "deconv": deconv},
                               {"conv_a": conv_a, "relu_a": relu_a})
    # In place: the Caffe blob conv_a ends as relu_a's tensor, layer conv_a keeps its own.
    assert meta[META_LAYERS]["conv_a"] == ["conv_a"]
    assert meta[META_LAYERS]["relu_a"] == ["relu_a"]
    assert meta[META_BLOB_FINAL]["conv_a"] == "relu_a"
    assert meta[META_BLOBS]["conv_a"] == ["conv_a", "relu_a"]
    assert meta[META_TYPES]["deconv"] == "Deconvolution"
    assert meta[META_PARAMS]["conv_a"] == ["conv_a/weight", "conv_a/bias"]
    assert deconv.shape == (2, 4, 9, 19)  # conv_b is 5x10; deconv: 2*(5-1)+3-2, 2*(10-1)+3-2
    nodes = {n.name: n.op_type for n in model.graph.node}
    assert nodes == {"conv_a": "Conv", "relu_a": "Relu", "conv_b": "Conv", "deconv": "ConvTranspose"}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert model.opset_import[0].version == 17 and model.ir_version == 8


def test_pooling_ceil_overhang_divisor_and_global(tmp_path):
    r = rng(2)
    x = r.standard_normal((2, 3, 7, 8)) - 8  # all negative: zero padding would win a MAX
    body = """
layer { name: "max_p1" type: "Pooling" bottom: "data" top: "max_p1" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_p1" type: "Pooling" bottom: "data" top: "ave_p1" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_p0" type: "Pooling" bottom: "data" top: "ave_p0" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "max_p0" type: "Pooling" bottom: "data" top: "max_p0" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "rect" type: "Pooling" bottom: "data" top: "rect"
  pooling_param { pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 2 } }
layer { name: "drop_last" type: "Pooling" bottom: "data" top: "drop_last" pooling_param { pool: AVE kernel_size: 3 stride: 3 pad: 2 } }
layer { name: "floor" type: "Pooling" bottom: "data" top: "floor" pooling_param { pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR } }
layer { name: "gmax" type: "Pooling" bottom: "data" top: "gmax" pooling_param { pool: MAX global_pooling: true } }
layer { name: "gave" type: "Pooling" bottom: "data" top: "gave" pooling_param { pool: AVE global_pooling: true } }
"""
    proto, _ = write_net(tmp_path, body, (1, 3, 7, 8))
    model = load_caffe(proto)
    expected = {
        "max_p1": ref_pool(x, (3, 3), (2, 2), (1, 1), "MAX"),
        "ave_p1": ref_pool(x, (3, 3), (2, 2), (1, 1), "AVE"),
        "ave_p0": ref_pool(x, (3, 3), (2, 2), (0, 0), "AVE"),
        "max_p0": ref_pool(x, (3, 3), (2, 2), (0, 0), "MAX"),
        "rect": ref_pool(x, (2, 3), (1, 2), (1, 2), "AVE"),
        "drop_last": ref_pool(x, (3, 3), (3, 3), (2, 2), "AVE"),
        "floor": ref_pool(x, (3, 3), (2, 2), (0, 0), "AVE", ceil=False),
        "gmax": x.max(axis=(2, 3), keepdims=True),
        "gave": x.mean(axis=(2, 3), keepdims=True),
    }
    # Caffe's sizes: ceil rounding (W 8, k3 s2 p0: ceil(2.5) + 1 = 4 where floor gives 3), and
    # the "minus one" rule: H 7 with k3 s3 p2 rounds up to 4 windows, but the 4th would start at
    # 9 >= H + pad = 9, in the padding, so 3 remain (W 8: the 4th starts at 9 < 10 and stays).
    assert expected["ave_p0"].shape == (2, 3, 3, 4)
    assert expected["drop_last"].shape == (2, 3, 3, 4)
    assert expected["floor"].shape == (2, 3, 3, 3)
    assert x.max() < 0 and expected["max_p1"].max() < 0
    check_blobs(model, x, expected)
    # Hand-computed border windows. ave_p0 [2, 3]: rows 4..6, columns 6..8 of which 6..7 are in
    # the image; the divisor clips at W + pad = 8, so it is 3 * 2 = 6.
    assert_close(expected["ave_p0"][:, :, 2, 3], x[:, :, 4:7, 6:8].sum(axis=(2, 3)) / 6)
    # ave_p1 [3, 4]: rows 5..7 (clipped at H + pad = 8: 3 rows, 2 in the image), columns 7..9
    # (clipped at W + pad = 9: 2 columns, 1 in the image): 2 elements divided by 6.
    assert_close(expected["ave_p1"][:, :, 3, 4], x[:, :, 5:7, 7:8].sum(axis=(2, 3)) / 6)


def test_lrn_both_regions(tmp_path):
    x = rng(3).standard_normal((2, 5, 6, 7)) * 4
    body = """
layer { name: "across" type: "LRN" bottom: "data" top: "across" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 k: 2 } }
layer { name: "within" type: "LRN" bottom: "data" top: "within"
  lrn_param { local_size: 3 alpha: 0.2 beta: 0.6 norm_region: WITHIN_CHANNEL } }
layer { name: "default" type: "LRN" bottom: "data" top: "default" }
"""
    proto, _ = write_net(tmp_path, body, (1, 5, 6, 7))
    model = load_caffe(proto)
    check_blobs(model, x, {
        "across": ref_lrn_across(x, 3, 0.1, 0.75, 2.0),
        "within": ref_lrn_within(x, 3, 0.2, 0.6),
        "default": ref_lrn_across(x, 5, 1.0, 0.75, 1.0),
    })


def test_inner_product_axis_transpose_and_no_bias(tmp_path):
    r = rng(4)
    x = r.standard_normal((2, 3, 4, 5))
    w1, b1 = r.standard_normal((6, 60)), r.standard_normal(6)
    w2, b2 = r.standard_normal((7, 20)), r.standard_normal(7)
    w3 = r.standard_normal((6, 4))  # transposed storage: (K, N)
    w4 = r.standard_normal((3, 6))
    body = """
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 6 } }
layer { name: "ip_axis2" type: "InnerProduct" bottom: "data" top: "ip_axis2" inner_product_param { num_output: 7 axis: 2 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "ip1" top: "ip_t" inner_product_param { num_output: 4 transpose: true bias_term: false } }
layer { name: "ip_nb" type: "InnerProduct" bottom: "ip1" top: "ip_nb" inner_product_param { num_output: 3 bias_term: false } }
"""
    proto, weights = write_net(tmp_path, body, (1, 3, 4, 5),
                               {"ip1": [w1, b1], "ip_axis2": [w2, b2], "ip_t": [w3], "ip_nb": [w4]})
    model = load_caffe(proto, weights)
    ip1 = x.reshape(2, -1) @ w1.T + b1
    check_blobs(model, x, {
        "ip1": ip1,
        "ip_axis2": x.reshape(2, 3, 20) @ w2.T + b2,
        "ip_t": ip1 @ w3,
        "ip_nb": ip1 @ w4.T,
    })


def test_activations_power_dropout_softmax(tmp_path):
    r = rng(5)
    x = r.standard_normal((2, 3, 4, 5)) * 2
    slope_c, slope_1 = r.standard_normal(3), np.array([0.3])
    body = """
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
layer { name: "leaky" type: "ReLU" bottom: "data" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "prelu" type: "PReLU" bottom: "data" top: "prelu" }
layer { name: "prelu_shared" type: "PReLU" bottom: "data" top: "prelu_shared" prelu_param { channel_shared: true } }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "power" type: "Power" bottom: "sig" top: "power" power_param { power: 2.5 scale: 0.5 shift: 1 } }
layer { name: "power_id" type: "Power" bottom: "data" top: "power_id" }
layer { name: "drop" type: "Dropout" bottom: "data" top: "drop" dropout_param { dropout_ratio: 0.3 } }
layer { name: "soft1" type: "Softmax" bottom: "data" top: "soft1" }
layer { name: "soft3" type: "Softmax" bottom: "data" top: "soft3" softmax_param { axis: -1 } }
"""
    proto, weights = write_net(tmp_path, body, (1, 3, 4, 5), {"prelu": [slope_c], "prelu_shared": [slope_1]})
    model = load_caffe(proto, weights)
    sig = 1 / (1 + np.exp(-x))
    check_blobs(model, x, {
        "relu": np.maximum(x, 0),
        "leaky": np.where(x > 0, x, 0.1 * x),
        "prelu": np.maximum(x, 0) + slope_c[None, :, None, None] * np.minimum(x, 0),
        "prelu_shared": np.maximum(x, 0) + 0.3 * np.minimum(x, 0),
        "sig": sig,
        "tanh": np.tanh(x),
        "power": (1 + 0.5 * sig) ** 2.5,
        "power_id": x,
        "drop": x,
        "soft1": ref_softmax(x, 1),
        "soft3": ref_softmax(x, 3),
    })


def test_concat_flatten_reshape_eltwise_split_slice(tmp_path):
    x = rng(6).standard_normal((2, 6, 4, 3))
    body = """
layer { name: "split" type: "Split" bottom: "data" top: "a" top: "b" }
layer { name: "cat1" type: "Concat" bottom: "a" bottom: "b" top: "cat1" }
layer { name: "cat2" type: "Concat" bottom: "a" bottom: "b" top: "cat2" concat_param { axis: 2 } }
layer { name: "flat" type: "Flatten" bottom: "data" top: "flat" }
layer { name: "flat_hw" type: "Flatten" bottom: "data" top: "flat_hw" flatten_param { axis: 2 } }
layer { name: "reshape" type: "Reshape" bottom: "data" top: "reshape" reshape_param { shape { dim: 0 dim: -1 dim: 6 } } }
layer { name: "reshape_batch" type: "Reshape" bottom: "data" top: "reshape_batch" reshape_param { shape { dim: -1 dim: 72 } } }
layer { name: "reshape_mid" type: "Reshape" bottom: "data" top: "reshape_mid"
  reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: 3 } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "data" top: "sum" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 } }
layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "cat1_half" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "a" bottom: "neg" bottom: "sum" top: "max" eltwise_param { operation: MAX } }
layer { name: "slice" type: "Slice" bottom: "data" top: "s1" top: "s2" top: "s3" slice_param { slice_point: 1 slice_point: 4 } }
layer { name: "slice_even" type: "Slice" bottom: "data" top: "e1" top: "e2" slice_param { axis: 2 } }
"""
    # 'cat1_half' and 'neg' come from layers inserted before their use.
    body = body.replace(
        'layer { name: "prod"',
        'layer { name: "half" type: "Power" bottom: "a" top: "cat1_half" power_param { scale: 0.5 } }\n'
        'layer { name: "negate" type: "Power" bottom: "b" top: "neg" power_param { scale: -1 } }\n'
        'layer { name: "prod"')
    proto, _ = write_net(tmp_path, body, (1, 6, 4, 3))
    model = load_caffe(proto)
    sum_ = 0.5 * x - 2 * x + x
    values, meta = check_blobs(model, x, {
        "a": x, "b": x,
        "cat1": np.concatenate([x, x], axis=1),
        "cat2": np.concatenate([x, x], axis=2),
        "flat": x.reshape(2, -1),
        "flat_hw": x.reshape(2, 6, 12),
        "reshape": x.reshape(2, 12, 6),
        "reshape_batch": x.reshape(2, 72),
        "reshape_mid": x.reshape(2, 2, 3, 4, 3),
        "sum": sum_,
        "prod": x * (0.5 * x),
        "max": np.maximum(np.maximum(x, -x), sum_),
        "s1": x[:, :1], "s2": x[:, 1:4], "s3": x[:, 4:],
        "e1": x[:, :, :2], "e2": x[:, :, 2:],
    })
    assert meta[META_LAYERS]["split"] == ["a", "b"]
    assert meta[META_LAYERS]["slice"] == ["s1", "s2", "s3"]


def test_batchnorm_scale_factor_and_scale(tmp_path):
    r = rng(7)
    x = r.standard_normal((2, 3, 4, 5)) * 2 + 1
    mean, var, factor = r.standard_normal(3) * 2.5, r.uniform(0.5, 2, 3) * 2.5, np.array([2.5])
    gamma, beta = r.standard_normal(3), r.standard_normal(3)
    gamma_ch = r.standard_normal((3, 4))
    body = """
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "bn0" }
layer { name: "scale2" type: "Scale" bottom: "data" top: "scale2" scale_param { axis: 1 num_axes: 2 } }
"""
    proto, weights = write_net(tmp_path, body, (1, 3, 4, 5), {
        "bn": [mean, var, factor], "scale": [gamma, beta],
        "bn0": [mean, var, np.array([0.0])], "scale2": [gamma_ch]})
    model = load_caffe(proto, weights)
    bn = (x - (mean / 2.5)[None, :, None, None]) / np.sqrt((var / 2.5)[None, :, None, None] + 1e-3)
    scaled = bn * gamma[None, :, None, None] + beta[None, :, None, None]
    check_blobs(model, x, {
        "bn": scaled,
        "bn0": x / np.sqrt(1e-5),  # scale factor 0: statistics are 0
        "scale2": x * gamma_ch[None, :, :, None],
    }, {"bn": bn, "scale": scaled})


def test_elu_absval_bnll(tmp_path):
    x = rng(20).standard_normal((2, 3, 4, 5)) * 3
    body = """
layer { name: "elu" type: "ELU" bottom: "data" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "elu1" type: "ELU" bottom: "data" top: "elu1" }
layer { name: "abs" type: "AbsVal" bottom: "data" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }
"""
    proto, _ = write_net(tmp_path, body, (1, 3, 4, 5))
    model = load_caffe(proto)
    # Caffe's formulas: ELU x > 0 ? x : alpha (exp(x) - 1); AbsVal |x|; BNLL (as Caffe's kernel
    # writes it to avoid overflow) x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x)).
    bnll = np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))
    check_blobs(model, x, {
        "elu": np.where(x > 0, x, 0.7 * (np.exp(x) - 1)),
        "elu1": np.where(x > 0, x, np.exp(x) - 1),
        "abs": np.abs(x),
        "bnll": bnll,
    })
    assert {n.name: n.op_type for n in model.graph.node} == {"elu": "Elu", "elu1": "Elu", "abs": "Abs",
                                                           "bnll": "Softplus"}


def test_crop_axes_and_offsets(tmp_path):
    x = rng(21).standard_normal((2, 4, 6, 7))
    body = """
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "slice" type: "Slice" bottom: "pool" top: "p1" top: "p3" slice_param { slice_point: 1 } }
layer { name: "wslice" type: "Slice" bottom: "data" top: "w_ref" top: "w_rest" slice_param { axis: 3 slice_point: 3 } }
layer { name: "crop_hw" type: "Crop" bottom: "data" bottom: "pool" top: "crop_hw" crop_param { offset: 1 offset: 2 } }
layer { name: "crop_chw" type: "Crop" bottom: "data" bottom: "p3" top: "crop_chw" crop_param { axis: 1 offset: 1 } }
layer { name: "crop_w" type: "Crop" bottom: "data" bottom: "w_ref" top: "crop_w" crop_param { axis: -1 } }
"""
    proto, _ = write_net(tmp_path, body, (1, 4, 6, 7))
    model = load_caffe(proto)
    # pool is 2x4x3x4 (Caffe rounds 7 -> 4 windows up), p3 2x3x3x4, w_ref 2x4x6x3. Caffe's
    # CropLayer: axes before `axis` are kept; the others take the reference's size, starting at
    # their offset (one offset: the same for every cropped axis; none: 0).
    check_blobs(model, x, {
        "crop_hw": x[:, :, 1:4, 2:6],
        "crop_chw": x[:, 1:4, 1:4, 1:5],
        "crop_w": x[:, :, :, 0:3],
    })
    body = """
layer { name: "p" type: "Pooling" bottom: "data" top: "small" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "bad" type: "Crop" bottom: "data" bottom: "small" top: "bad" crop_param { offset: 5 } }
"""
    proto, _ = write_net(tmp_path, body, (1, 4, 6, 7), name="badcrop")
    message = _error(load_caffe, proto)
    assert "'bad'" in message and "offset 5" in message


def test_scale_with_a_second_bottom(tmp_path):
    x = rng(22).standard_normal((2, 4, 3, 5))
    body = """
layer { name: "gap" type: "Pooling" bottom: "data" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gate" type: "Sigmoid" bottom: "gap" top: "gate" }
layer { name: "flat" type: "Flatten" bottom: "gate" top: "flat" }
layer { name: "se" type: "Scale" bottom: "data" bottom: "flat" top: "se" scale_param { axis: 0 } }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
layer { name: "full" type: "Scale" bottom: "data" bottom: "tanh" top: "full" scale_param { axis: 0 } }
"""
    proto, _ = write_net(tmp_path, body, (1, 4, 3, 5))
    model = load_caffe(proto)
    gate = 1 / (1 + np.exp(-x.mean(axis=(2, 3))))  # (N, C)
    # Caffe's two-bottom Scale: y = x * s, s's axes matching x's from `axis` on, broadcast over
    # the rest; here s is (N, C): an SE block's gate.
    check_blobs(model, x, {"se": x * gate[:, :, None, None], "full": x * np.tanh(x)})
    # bias_term adds a parameter blob shaped like s: with s covering the batch axis, a blob per
    # batch position, which cnnvis refuses (images would not be independent).
    body = """
layer { name: "gap" type: "Pooling" bottom: "data" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "gap" top: "flat" }
layer { name: "sb" type: "Scale" bottom: "data" bottom: "flat" top: "sb" scale_param { axis: 0 bias_term: true } }
"""
    proto, _ = write_net(tmp_path, body, (1, 4, 3, 5), name="batchbias")
    assert "bias" in _error(load_caffe, proto)
    body = """
layer { name: "gap" type: "Pooling" bottom: "data" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "bad" type: "Scale" bottom: "data" bottom: "gap" top: "bad" scale_param { axis: 0 } }
"""
    proto, _ = write_net(tmp_path, body, (1, 4, 3, 5), name="badscale")
    message = _error(load_caffe, proto)
    assert "'bad'" in message and "(N, 4, 1, 1)" in message and "(N, 4, 3, 5)" in message


def test_net_outputs_are_unconsumed_blobs(tmp_path):
    body = """
layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }
"""
    proto, _ = write_net(tmp_path, body, (1, 2, 3, 3))
    model = load_caffe(proto)
    assert [o.name for o in model.graph.output] == ["sig", "tanh"]
    meta = caffe_metadata(model)
    assert meta[META_BLOB_FINAL]["data"] == "relu"
    assert meta[META_BLOBS]["data"] == ["data", "relu"]
    assert meta[META_LAYERS]["data"] == ["data"]


# ---------------------------------------------------------------- file variants

def _v1_net(double=False):
    """A V1 net (enum layer types, input/input_dim, legacy 4-D blob shapes)."""
    m = messages()
    r = rng(8)
    w_conv, b_conv = r.standard_normal((2, 3, 3, 3)), r.standard_normal(2)
    w_ip, b_ip = r.standard_normal((4, 8)), r.standard_normal(4)  # conv 3x3 -> pool 2x2, 2 channels
    net = m.NetParameter(name="v1net")
    net.input.append("data")
    net.input_dim.extend([1, 3, 7, 7])
    V1 = m.V1LayerParameter
    conv = net.layers.add(name="conv", type=V1.CONVOLUTION, bottom=["data"], top=["conv"])
    conv.convolution_param.num_output = 2
    conv.convolution_param.kernel_size.append(3)
    conv.convolution_param.stride.append(2)
    net.layers.add(name="relu", type=V1.RELU, bottom=["conv"], top=["conv"])
    pool = net.layers.add(name="pool", type=V1.POOLING, bottom=["conv"], top=["pool"])
    pool.pooling_param.pool = m.PoolingParameter.MAX
    pool.pooling_param.kernel_size = 2
    pool.pooling_param.stride = 1
    ip = net.layers.add(name="ip", type=V1.INNER_PRODUCT, bottom=["pool"], top=["ip"])
    ip.inner_product_param.num_output = 4
    net.layers.add(name="prob", type=V1.SOFTMAX, bottom=["ip"], top=["prob"])
    deploy = m.NetParameter()
    deploy.CopyFrom(net)
    for layer, arrays in ((conv, (w_conv, b_conv)), (ip, (w_ip, b_ip))):
        for a in arrays:
            legacy = (1,) * (4 - a.ndim) + a.shape
            blob = layer.blobs.add(num=legacy[0], channels=legacy[1], height=legacy[2], width=legacy[3])
            (blob.double_data if double else blob.data).extend(a.ravel().tolist())
    return deploy, net, (w_conv, b_conv, w_ip, b_ip)


@pytest.mark.parametrize("double", [False, True])
def test_v1_layers_input_dim_legacy_shapes(tmp_path, double):
    from google.protobuf import text_format

    deploy, full, (w_conv, b_conv, w_ip, b_ip) = _v1_net(double)
    proto = tmp_path / "v1.prototxt"
    proto.write_text(text_format.MessageToString(deploy))
    assert "type: CONVOLUTION" in proto.read_text() and "input_dim: 7" in proto.read_text()
    weights = tmp_path / "v1.caffemodel"
    weights.write_bytes(full.SerializeToString())
    net = read_net(proto)
    assert [(l.name, l.type) for l in net.layers] == [
        ("conv", "Convolution"), ("relu", "ReLU"), ("pool", "Pooling"), ("ip", "InnerProduct"), ("prob", "Softmax")]
    assert net.inputs == [("data", (1, 3, 7, 7))]
    loaded = read_weights(weights)
    assert [b.shape for b in loaded.layers["ip"]] == [(1, 1, 4, 8), (1, 1, 1, 4)]
    assert all(b.legacy for b in loaded.layers["ip"])
    model = load_caffe(proto, weights)
    x = rng(9).standard_normal((3, 3, 7, 7))
    conv = np.maximum(ref_conv(x, w_conv, b_conv, stride=(2, 2)), 0)
    pool = ref_pool(conv, (2, 2), (1, 1), (0, 0), "MAX")
    ip = pool.reshape(3, -1) @ w_ip.T + b_ip
    check_blobs(model, x, {"conv": conv, "pool": pool, "ip": ip, "prob": ref_softmax(ip, 1)})


def test_input_shape_declaration_and_test_phase_filtering(tmp_path):
    text = """
name: "train_val"
input: "data"
input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }
layer { name: "train_data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true } data_param { source: "x_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "sig" bottom: "label" top: "loss" exclude { phase: TEST } }
layer { name: "only_stage" type: "TanH" bottom: "sig" top: "t" include { phase: TEST stage: "deploy" } }
"""
    proto = tmp_path / "tv.prototxt"
    proto.write_text(text)
    net = read_net(proto)
    assert [l.name for l in net.layers] == ["sig"]
    model = load_caffe(proto)
    x = rng(10).standard_normal((2, 2, 3, 3))
    check_blobs(model, x, {"sig": 1 / (1 + np.exp(-x))})


def test_hdf5_weights_detected_by_content(tmp_path):
    import h5py

    r = rng(11)
    w, b = r.standard_normal((3, 2, 2, 2)).astype(np.float32), r.standard_normal(3).astype(np.float32)
    body = 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 3 kernel_size: 2 } }\n'
    proto, binary = write_net(tmp_path, body, (1, 2, 4, 4), {"conv": [w, b]})
    h5_path = tmp_path / "weights.caffemodel"  # HDF5 content under the binary extension
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("data/conv/0", data=w)
        f.create_dataset("data/conv/1", data=b)
        f.create_group("data/relu")
    assert is_hdf5(h5_path) and not is_hdf5(binary)
    loaded = read_weights(h5_path)
    assert loaded.format == "hdf5" and loaded.layers["relu"] == []
    np.testing.assert_array_equal(loaded.layers["conv"][0].array, w)
    x = rng(12).standard_normal((1, 2, 4, 4)).astype(np.float32)
    out_h5 = create_session(load_caffe(proto, h5_path), device="cpu").run(None, {"data": x})[0]
    out_bin = create_session(load_caffe(proto, binary), device="cpu").run(None, {"data": x})[0]
    np.testing.assert_array_equal(out_h5, out_bin)
    # ... and a binary model under an HDF5-looking name is still read as binary.
    renamed = tmp_path / "binary.caffemodel.h5"
    renamed.write_bytes(binary.read_bytes())
    assert read_weights(renamed).format == "binary"
    assert_close(out_h5, ref_conv(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)))


def test_generated_weights_are_deterministic(tmp_path):
    body = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }
"""
    proto, _ = write_net(tmp_path, body, (1, 3, 6, 6))

    def weights(model):
        return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}

    a, b, c = weights(load_caffe(proto)), weights(load_caffe(proto)), weights(load_caffe(proto, seed=1))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv/weight"], c["conv/weight"])
    assert a["conv/weight"].shape == (4, 3, 3, 3) and a["ip/weight"].shape == (5, 64)
    # He: std sqrt(2 / fan_in), fan_in = 27 for conv; biases 0; BatchNorm mean 0 / variance 1.
    # 108 samples: the std estimate is within ~15% (xavier's sqrt(1/27) would be 29% off)
    assert abs(a["conv/weight"].std() / np.sqrt(2 / 27) - 1) < 0.15
    assert not a["conv/bias"].any() and not a["bn/mean"].any() and np.all(a["bn/variance"] == 1)
    xavier = weights(load_caffe(proto, fill="xavier"))["ip/weight"]
    limit = np.sqrt(3 / 64)  # uniform(-limit, limit), fan_in 64: std limit / sqrt(3)
    assert limit * 0.8 < np.abs(xavier).max() <= limit
    assert abs(xavier.std() / (limit / np.sqrt(3)) - 1) < 0.15
    with pytest.raises(CnnvisError, match="fill 'bogus'"):
        load_caffe(proto, fill="bogus")
    meta = {p.key: p.value for p in load_caffe(proto).metadata_props}
    assert json.loads(meta[META_WEIGHTS]) == {"generated": "he", "seed": 0}
    assert meta[META_PROTOTXT_SHA] == sha256_file(proto)


def test_metadata_records_source_hashes(tmp_path):
    body = 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }\n'
    proto, weights = write_net(tmp_path, body, (1, 3), {"ip": [np.ones((2, 3)), np.zeros(2)]})
    meta = {p.key: p.value for p in load_caffe(proto, weights).metadata_props}
    assert meta[META_PROTOTXT_SHA] == sha256_file(proto)
    assert meta[META_WEIGHTS_SHA] == sha256_file(weights)


def test_read_mean_binaryproto(tmp_path):
    m = messages()
    mean = rng(13).uniform(0, 255, (3, 4, 5))
    blob = m.BlobProto()
    blob.shape.dim.extend([1, 3, 4, 5])
    blob.data.extend(mean.ravel().tolist())
    (tmp_path / "shape.binaryproto").write_bytes(blob.SerializeToString())
    legacy = m.BlobProto(num=1, channels=3, height=4, width=5)
    legacy.double_data.extend(mean.ravel().tolist())
    (tmp_path / "legacy.binaryproto").write_bytes(legacy.SerializeToString())
    for name in ("shape", "legacy"):
        got = read_mean_binaryproto(tmp_path / f"{name}.binaryproto")
        assert got.dtype == np.float32 and got.shape == (3, 4, 5)
        np.testing.assert_allclose(got, mean, rtol=1e-7)
    broken = blob.SerializeToString()[:-7]
    (tmp_path / "broken.binaryproto").write_bytes(broken)
    with pytest.raises(CnnvisError, match="broken.binaryproto"):
        read_mean_binaryproto(tmp_path / "broken.binaryproto")


def test_unpacked_float_blobs_are_read(tmp_path):
    # Caffe writes packed arrays, but protobuf readers must accept the unpacked encoding too.
    values = np.arange(6, dtype=np.float32)
    payload = b"".join(b"\x2d" + v.tobytes() for v in values)  # field 5, wire type 5, one by one
    shape = messages().BlobShape(dim=[2, 3]).SerializeToString()
    blob_bytes = payload + b"\x3a" + bytes([len(shape)]) + shape
    layer = messages().LayerParameter(name="ip", type="InnerProduct")
    layer_bytes = layer.SerializeToString() + b"\x3a" + bytes([len(blob_bytes)]) + blob_bytes
    net_bytes = b"\xa2\x06" + bytes([len(layer_bytes)]) + layer_bytes  # field 100, length-delimited
    path = tmp_path / "unpacked.caffemodel"
    path.write_bytes(net_bytes)
    blobs = read_weights(path).layers["ip"]
    np.testing.assert_array_equal(blobs[0].array, values.reshape(2, 3))


# ---------------------------------------------------------------- errors (one line each)

def _error(fn, *args, **kwargs):
    with pytest.raises(CnnvisError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_unsupported_layer(tmp_path):
    body = 'layer { name: "spp1" type: "SPP" bottom: "data" top: "spp1" }\n'
    proto, _ = write_net(tmp_path, body, (1, 2, 3, 3))
    message = _error(load_caffe, proto)
    assert "'spp1'" in message and "'SPP'" in message and "Convolution" in message and "Slice" in message


def test_error_missing_and_misshapen_weights(tmp_path):
    body = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 2 } }
"""
    proto, weights = write_net(tmp_path, body, (1, 3, 5, 5), {"conv": [np.zeros((4, 3, 3, 3)), np.zeros(4)]})
    message = _error(load_caffe, proto, weights)
    assert "no weights for layer 'ip'" in message and "(2, 36)" in message
    _, wrong = write_net(tmp_path, body, (1, 3, 5, 5), {"conv": [np.zeros((4, 2, 3, 3)), np.zeros(4)],
                                                         "ip": [np.zeros((2, 36)), np.zeros(2)]}, name="wrong")
    message = _error(load_caffe, proto, wrong)
    assert "'conv'" in message and "(4, 2, 3, 3)" in message and "(4, 3, 3, 3)" in message
    _, count = write_net(tmp_path, body, (1, 3, 5, 5), {"conv": [np.zeros((4, 3, 3, 3))],
                                                         "ip": [np.zeros((2, 36)), np.zeros(2)]}, name="count")
    message = _error(load_caffe, proto, count)
    assert "'conv'" in message and "1 blobs" in message


def test_error_prototxt_syntax_has_line_and_column(tmp_path):
    proto = tmp_path / "bad.prototxt"
    proto.write_text('name: "x"\nlayer {\n  name: "a"\n  type "ReLU"\n}\n')
    message = _error(load_caffe, proto)
    assert f"{proto}:4:" in message and "syntax error" in message
    proto.write_text('name: "x"\nlayer {\n  name: "a"\n  kernel: 3\n}\n')
    message = _error(read_net, proto)
    assert f"{proto}:4:3" in message and "kernel" in message


def test_error_truncated_or_foreign_caffemodel(tmp_path):
    body = 'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 3 } }\n'
    proto, weights = write_net(tmp_path, body, (1, 3, 5, 5), {"conv": [np.ones((8, 3, 3, 3)), np.ones(8)]})
    data = weights.read_bytes()
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(data[: len(data) // 2])
    message = _error(load_caffe, proto, truncated)
    assert "truncated" in message and "truncated.caffemodel" in message
    foreign = tmp_path / "foreign.caffemodel"
    foreign.write_bytes(proto.read_bytes())
    message = _error(load_caffe, proto, foreign)
    assert "foreign.caffemodel" in message and "not a Caffe binary model" in message
    assert "not found" in _error(load_caffe, proto, tmp_path / "missing.caffemodel")


def test_error_v0_layers_and_bad_graphs(tmp_path):
    v0 = tmp_path / "v0.caffemodel"
    inner = b"\x0a\x03old"  # V0LayerParameter { name: "old" }
    layer = b"\x0a" + bytes([len(inner)]) + inner  # V1LayerParameter.layer (field 1)
    v0.write_bytes(b"\x12" + bytes([len(layer)]) + layer)  # NetParameter.layers (field 2)
    assert "V0" in _error(read_weights, v0)
    body = 'layer { name: "sig" type: "Sigmoid" bottom: "nothing" top: "sig" }\n'
    proto, _ = write_net(tmp_path, body, (1, 2), name="dangling")
    assert "'nothing'" in _error(load_caffe, proto)
    body = 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: MAX kernel_size: 1 stride: 3 } }\n'
    proto, _ = write_net(tmp_path, body, (1, 1, 5, 5), name="outside")
    assert "outside" in _error(load_caffe, proto)
    body = 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 axis: 0 } }\n'
    proto, _ = write_net(tmp_path, body, (1, 3), name="batchaxis")
    assert "batch" in _error(load_caffe, proto)
