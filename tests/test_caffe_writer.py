"""ONNX -> Caffe writer: round trips through files and the Caffe importer give the same outputs."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.caffe import (
    META_BLOB_FINAL, load_caffe, onnx_to_caffe, parse_prototxt, read_weights, write_caffe,
)
from cnnvis.errors import CnnvisError
from cnnvis.onnxgraph import create_session, make_model

from test_caffe import write_net


def _model(nodes, inits, outputs, shape=("N", 3, 12, 12)):
    graph = helper.make_graph(
        nodes, "written", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f" else np.int64), k)
         for k, v in inits.items()])
    model = make_model(graph)
    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in model.graph.output:
        out.CopyFrom(typed[out.name])
    onnx.checker.check_model(model)
    return model


def _run(model, x, names=None):
    session = create_session(model, device="cpu", threads=1)
    names = names or [o.name for o in session.get_outputs()]
    if names != [o.name for o in session.get_outputs()]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        del m.graph.output[:]
        m.graph.output.extend([helper.make_empty_tensor_value_info(n) for n in names])
        session = create_session(m, device="cpu", threads=1)
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


def _round_trip(model, tmp_path):
    proto, weights = write_caffe(model, tmp_path / "w.prototxt", tmp_path / "w.caffemodel")
    back = load_caffe(proto, weights)
    onnx.checker.check_model(back)
    return back, proto, weights


def _final(back):
    import json

    return json.loads({p.key: p.value for p in back.metadata_props}[META_BLOB_FINAL])


def _exact_model(r):
    """Ops that map one to one onto Caffe layers and back (same ONNX ops after the round trip)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("LRN", ["relu1"], ["norm1"], name="norm1", size=3, alpha=1e-3, beta=0.75, bias=2.0),
        # floor rounding: 12 -> 5 where Caffe's default ceil gives 6 (written as round_mode FLOOR)
        helper.make_node("MaxPool", ["norm1"], ["pool1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "w2"], ["conv2"], name="conv2", group=2, kernel_shape=[3, 1],
                         pads=[1, 0, 1, 0]),
        helper.make_node("LeakyRelu", ["conv2"], ["leaky"], name="leaky", alpha=0.2),
        helper.make_node("PRelu", ["leaky", "slope"], ["prelu"], name="prelu"),
        helper.make_node("AveragePool", ["prelu"], ["avg"], name="avg", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("AveragePool", ["prelu"], ["avg_in"], name="avg_in", kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Sigmoid", ["avg"], ["sig"], name="sig"),
        helper.make_node("Tanh", ["avg"], ["tanh"], name="tanh"),
        helper.make_node("Add", ["sig", "tanh"], ["esum"], name="esum"),
        helper.make_node("Mul", ["sig", "tanh"], ["eprod"], name="eprod"),
        helper.make_node("Max", ["sig", "tanh", "esum"], ["emax"], name="emax"),
        helper.make_node("Sub", ["sig", "tanh"], ["ediff"], name="ediff"),
        helper.make_node("Concat", ["esum", "eprod", "emax", "ediff"], ["cat"], name="cat", axis=1),
        helper.make_node("Mul", ["cat", "gamma"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"], name="scale_bias"),
        helper.make_node("Mul", ["shifted", "two"], ["p_mul"], name="power"),
        helper.make_node("Add", ["p_mul", "half"], ["p_add"], name="power_shift"),
        helper.make_node("Pow", ["p_add", "two"], ["p_pow"], name="power_pow"),
        helper.make_node("Flatten", ["p_pow"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Dropout", ["fc1", "ratio"], ["drop"], name="drop"),
        helper.make_node("Gemm", ["drop", "w4", "b4"], ["fc2"], name="fc2", transB=1),
        helper.make_node("Softmax", ["fc2"], ["prob"], name="prob", axis=1),
        helper.make_node("GlobalAveragePool", ["prelu"], ["gap"], name="gap"),
        helper.make_node("GlobalMaxPool", ["prelu"], ["gmp"], name="gmp"),
        helper.make_node("Reshape", ["gap", "shape"], ["gap_flat"], name="gap_flat"),
        helper.make_node("ConvTranspose", ["relu1", "wt", "bt"], ["up"], name="up", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["cat", "split"], ["part_a", "part_b"], name="parts", axis=1),
        helper.make_node("Identity", ["part_b"], ["copy"], name="copy"),
        helper.make_node("BatchNormalization", ["cat", "ones", "zeros", "mean", "var"], ["bn"], name="bn", epsilon=1e-3),
    ]
    inits = {
        "w1": r.standard_normal((8, 3, 3, 3)), "b1": r.standard_normal(8),
        "w2": r.standard_normal((8, 4, 3, 1)), "slope": r.uniform(0, 0.5, (8, 1, 1)),
        "gamma": r.standard_normal((32, 1, 1)), "beta": r.standard_normal((32, 1, 1)),
        "two": np.float32(2.0), "half": np.float32(0.5),
        "w3": r.standard_normal((16, 288)) * 0.1, "b3": r.standard_normal(16), "ratio": np.float32(0.3),
        "w4": r.standard_normal((10, 16)), "b4": r.standard_normal(10),
        "shape": np.array([0, -1], np.int64), "wt": r.standard_normal((8, 4, 4, 4)), "bt": r.standard_normal(4),
        "split": np.array([12, 20], np.int64), "ones": np.ones(32), "zeros": np.zeros(32),
        "mean": r.standard_normal(32), "var": r.uniform(0.5, 2, 32),
    }
    outputs = ["prob", "gap_flat", "gmp", "up", "part_a", "copy", "avg_in", "bn"]
    return _model(nodes, inits, outputs)


def test_round_trip_gives_identical_outputs(tmp_path):
    r = np.random.default_rng(0)
    model = _exact_model(r)
    back, proto, weights = _round_trip(model, tmp_path)
    x = r.standard_normal((3, 3, 12, 12)).astype(np.float32)
    want = _run(model, x)
    final = _final(back)
    got = _run(back, x, [final[name] for name in want])
    for name, value in want.items():
        np.testing.assert_array_equal(got[final[name]], value, err_msg=name)
    # The prototxt uses Caffe's layer types and parameters (round_mode FLOOR only where needed).
    net = parse_prototxt(proto)
    layers = {layer.name: layer for layer in net.layer}
    assert layers["pool1"].pooling_param.round_mode == layers["pool1"].pooling_param.FLOOR
    assert not layers["avg"].pooling_param.HasField("round_mode")
    assert layers["conv2"].convolution_param.kernel_h == 3 and layers["conv2"].convolution_param.kernel_w == 1
    assert layers["conv2"].convolution_param.group == 2 and not layers["conv2"].convolution_param.bias_term
    assert layers["ediff"].type == "Eltwise" and list(layers["ediff"].eltwise_param.coeff) == [1, -1]
    assert layers["scale_bias"].type == "Scale" and layers["scale_bias"].scale_param.bias_term
    assert (layers["power_pow"].type, layers["power_pow"].power_param.power,
            layers["power_pow"].power_param.scale, layers["power_pow"].power_param.shift) == ("Power", 2, 2, 0.5)
    assert layers["fc1"].bottom == ["p_pow"]  # the Flatten is folded into InnerProduct
    assert "flat" not in layers
    assert layers["parts"].type == "Slice" and list(layers["parts"].slice_param.slice_point) == [12]
    assert layers["x"].type == "Input" and list(layers["x"].input_param.shape[0].dim) == [1, 3, 12, 12]
    # The caffemodel holds the ONNX weights as Caffe blobs.
    blobs = read_weights(weights).layers
    np.testing.assert_array_equal(blobs["conv1"][0].array, r_weights(model, "w1"))
    np.testing.assert_array_equal(blobs["prelu"][0].array, r_weights(model, "slope").reshape(-1))
    assert [b.shape for b in blobs["bn"]] == [(32,), (32,), (1,)]


def r_weights(model, name):
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def test_round_trip_of_transformed_parameters(tmp_path):
    """Gemm with transB=0 and alpha/beta, MatMul+Add and an affine BatchNormalization are written
    as InnerProduct / BatchNorm+Scale with rearranged parameters: equal to float32 rounding."""
    r = np.random.default_rng(1)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "w", "b"], ["fc"], name="fc", alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["flat", "w2"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b2"], ["mm_b"], name="mm_b"),
        helper.make_node("BatchNormalization", ["x", "g", "beta", "mean", "var"], ["bn"], name="bn"),
    ]
    inits = {"w": r.standard_normal((12, 5)), "b": r.standard_normal(5), "w2": r.standard_normal((12, 4)),
             "b2": r.standard_normal(4), "g": r.standard_normal(3), "beta": r.standard_normal(3),
             "mean": r.standard_normal(3), "var": r.uniform(0.5, 2, 3)}
    model = _model(nodes, inits, ["fc", "mm_b", "bn"], shape=("N", 3, 2, 2))
    back, proto, _ = _round_trip(model, tmp_path)
    layers = {layer.name: layer for layer in parse_prototxt(proto).layer}
    assert layers["bn"].type == "BatchNorm" and layers["bn_scale"].type == "Scale"
    assert layers["mm_b"].type == "InnerProduct"
    x = r.standard_normal((2, 3, 2, 2)).astype(np.float32)
    want = _run(model, x)
    final = _final(back)
    got = _run(back, x, [final[n] for n in want])
    for name, value in want.items():
        np.testing.assert_allclose(got[final[name]], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_caffe_onnx_caffe_onnx_is_identical(tmp_path):
    """Every layer type of the importer survives Caffe -> ONNX -> Caffe -> ONNX unchanged."""
    r = np.random.default_rng(2)
    body = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "within" type: "LRN" bottom: "conv" top: "within" lrn_param { local_size: 3 alpha: 0.2 norm_region: WITHIN_CHANNEL } }
layer { name: "across" type: "LRN" bottom: "within" top: "across" lrn_param { local_size: 5 alpha: 0.1 } }
layer { name: "pool" type: "Pooling" bottom: "across" top: "pool" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool0" type: "Pooling" bottom: "across" top: "pool0" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "mpool" type: "Pooling" bottom: "across" top: "mpool" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "slice" type: "Slice" bottom: "pool" top: "s1" top: "s2" slice_param { slice_point: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "s1" bottom: "s1" top: "sum" eltwise_param { coeff: 0.5 coeff: 3 } }
layer { name: "power" type: "Power" bottom: "s2" top: "power" power_param { power: 2 shift: 1 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "power" bottom: "mpool" top: "cat" }
layer { name: "ip_axis2" type: "InnerProduct" bottom: "cat" top: "ip_axis2" inner_product_param { num_output: 4 axis: 2 } }
layer { name: "flat" type: "Flatten" bottom: "ip_axis2" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
    blobs = {"conv": [r.standard_normal((6, 3, 3, 3)), r.standard_normal(6)],
             "bn": [r.standard_normal(6), r.uniform(0.5, 2, 6), np.array([3.0])],
             "scale": [r.standard_normal(6), r.standard_normal(6)], "prelu": [r.uniform(0, 0.3, 6)],
             "ip_axis2": [r.standard_normal((4, 25)), r.standard_normal(4)],  # cat is 12x5x5
             "ip": [r.standard_normal((5, 48)), r.standard_normal(5)]}
    proto, weights = write_net(tmp_path, body, (1, 3, 8, 8), blobs)
    first = load_caffe(proto, weights)
    second, _, _ = _round_trip(first, tmp_path)
    assert sorted(n.op_type for n in first.graph.node) == sorted(n.op_type for n in second.graph.node)
    x = r.standard_normal((2, 3, 8, 8)).astype(np.float32)
    final1, final2 = _final(first), _final(second)
    blob_names = [b for b in final1 if b != "data" and final1[b] in final2]
    # Only the Flatten before an InnerProduct disappears (InnerProduct flattens by itself).
    assert set(final1) - set(blob_names) == {"data", "flat"}
    v1 = _run(first, x, [final1[b] for b in blob_names])
    v2 = _run(second, x, [final2[final1[b]] for b in blob_names])
    for b in blob_names:
        np.testing.assert_array_equal(v2[final2[final1[b]]], v1[final1[b]], err_msg=b)


def _error(model):
    with pytest.raises(CnnvisError) as info:
        onnx_to_caffe(model)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_writer_refuses_what_caffe_cannot_compute():
    r = np.random.default_rng(3)
    transpose = _model([helper.make_node("Transpose", ["x"], ["t"], name="perm", perm=[0, 1, 3, 2])], {}, ["t"])
    message = _error(transpose)
    assert "'perm'" in message and "Transpose" in message and "Conv" in message
    asym = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="c", pads=[0, 0, 1, 1])],
                  {"w": r.standard_normal((2, 3, 3, 3))}, ["c"])
    assert "asymmetric pads" in _error(asym)
    # count_include_pad=0 with padding divides border windows by the in-image count; Caffe doesn't.
    avg = _model([helper.make_node("AveragePool", ["x"], ["a"], name="a", kernel_shape=[3, 3], strides=[2, 2],
                                   pads=[1, 1, 1, 1])], {}, ["a"])
    assert "divisor" in _error(avg)
    # ONNX ceil mode without Caffe's "last window must start inside" rule: 7 -> 4 windows here,
    # Caffe would give 3 (ceil) or 3 (floor).
    ceil = _model([helper.make_node("MaxPool", ["x"], ["m"], name="m", kernel_shape=[3, 3], strides=[3, 3],
                                    pads=[2, 2, 2, 2], ceil_mode=1)], {}, ["m"], shape=("N", 3, 7, 7))
    assert "rounding" in _error(ceil)
    flat0 = _model([helper.make_node("Flatten", ["x"], ["f"], name="f", axis=2)], {}, ["f"])
    assert "axis 2" in _error(flat0)


def test_classic_zoo_layers_round_trip(tmp_path):
    """The layers the classic zoo adds (ELU, AbsVal, BNLL, two-bottom Scale as in SE blocks,
    Deconvolution, Eltwise PROD/MAX, global pooling, Softmax on an axis, shared PReLU) go
    Caffe -> ONNX -> Caffe -> ONNX with bit-identical values, and equal a float64 numpy reference."""
    from test_caffe import ref_deconv

    r = np.random.default_rng(4)
    body = """
layer { name: "elu" type: "ELU" bottom: "data" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "abs" type: "AbsVal" bottom: "data" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "data" top: "bnll" }
layer { name: "prod" type: "Eltwise" bottom: "elu" bottom: "abs" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "bnll" top: "max" eltwise_param { operation: MAX } }
layer { name: "gap" type: "Pooling" bottom: "max" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gate" type: "Sigmoid" bottom: "gap" top: "gate" }
layer { name: "flat" type: "Flatten" bottom: "gate" top: "flat" }
layer { name: "se" type: "Scale" bottom: "max" bottom: "flat" top: "se" scale_param { axis: 0 } }
layer { name: "deconv" type: "Deconvolution" bottom: "se" top: "deconv" convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "prelu" type: "PReLU" bottom: "deconv" top: "prelu" prelu_param { channel_shared: true } }
layer { name: "gmax" type: "Pooling" bottom: "prelu" top: "gmax" pooling_param { pool: MAX global_pooling: true } }
layer { name: "tanh" type: "TanH" bottom: "prelu" top: "tanh" }
layer { name: "soft" type: "Softmax" bottom: "tanh" top: "soft" softmax_param { axis: 2 } }
"""
    w, b, slope = r.standard_normal((3, 2, 3, 3)), r.standard_normal(2), np.array([0.2])
    proto, weights = write_net(tmp_path, body, (1, 3, 5, 6), {"deconv": [w, b], "prelu": [slope]})
    first = load_caffe(proto, weights)
    second, proto2, _ = _round_trip(first, tmp_path)
    text = proto2.read_text()
    for kind in ("ELU", "AbsVal", "BNLL", "Scale", "Deconvolution", "Eltwise", "PReLU", "Softmax"):
        assert f'type: "{kind}"' in text, kind
    assert sorted(n.op_type for n in first.graph.node) == sorted(n.op_type for n in second.graph.node)
    x = r.standard_normal((2, 3, 5, 6))
    final1, final2 = _final(first), _final(second)
    blob_names = [b for b in final1 if b != "data" and final1[b] in final2]
    assert set(final1) - set(blob_names) == {"data"}
    v1 = _run(first, x.astype(np.float32), [final1[b] for b in blob_names])
    v2 = _run(second, x.astype(np.float32), [final2[final1[b]] for b in blob_names])
    for name in blob_names:
        np.testing.assert_array_equal(v2[final2[final1[name]]], v1[final1[name]], err_msg=name)
    # float64 reference of Caffe's formulas
    elu = np.where(x > 0, x, 0.5 * np.expm1(x))
    bnll = np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))
    mx = np.maximum(elu * np.abs(x), bnll)
    se = mx * (1 / (1 + np.exp(-mx.mean(axis=(2, 3)))))[:, :, None, None]
    deconv = ref_deconv(se, w, b, stride=(2, 2), pad=(1, 1))
    prelu = np.where(deconv > 0, deconv, 0.2 * deconv)
    t = np.tanh(prelu)
    soft = np.exp(t) / np.exp(t).sum(axis=2, keepdims=True)
    for name, want in {"se": se, "deconv": deconv, "gmax": prelu.max(axis=(2, 3), keepdims=True),
                       "soft": soft}.items():
        got = v2[final2[final1[name]]].astype(np.float64)
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name


def test_shape_layers_round_trip(tmp_path):
    """Flatten (axis, end_axis), Reshape (0, -1, axis, num_axes), InnerProduct (axis, transpose),
    Slice (slice_dim), Concat (concat_dim), Softmax (axis), Power and FLOOR pooling survive
    Caffe -> ONNX -> Caffe -> ONNX with bit-identical values."""
    r = np.random.default_rng(5)
    body = """
layer { name: "flat_mid" type: "Flatten" bottom: "data" top: "flat_mid" flatten_param { axis: 1 end_axis: 2 } }
layer { name: "reshape" type: "Reshape" bottom: "data" top: "reshape" reshape_param { axis: 2 num_axes: 1 shape { dim: 2 dim: -1 } } }
layer { name: "reshape0" type: "Reshape" bottom: "data" top: "reshape0" reshape_param { shape { dim: 0 dim: 0 dim: -1 } } }
layer { name: "ip_t" type: "InnerProduct" bottom: "reshape0" top: "ip_t" inner_product_param { num_output: 3 axis: 2 transpose: true } }
layer { name: "slice" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { slice_dim: 1 slice_point: 1 } }
layer { name: "cat" type: "Concat" bottom: "b" bottom: "a" top: "cat" concat_param { concat_dim: 1 } }
layer { name: "soft" type: "Softmax" bottom: "cat" top: "soft" softmax_param { axis: 3 } }
layer { name: "power" type: "Power" bottom: "soft" top: "power" power_param { power: 3 scale: 2 shift: -0.5 } }
layer { name: "floor" type: "Pooling" bottom: "power" top: "floor" pooling_param { pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR } }
"""
    w, b = r.standard_normal((20, 3)), r.standard_normal(3)  # transposed storage (K, N); K = 4 * 5
    proto, weights = write_net(tmp_path, body, (1, 3, 4, 5), {"ip_t": [w, b]})
    first = load_caffe(proto, weights)
    second, proto2, _ = _round_trip(first, tmp_path)
    x = r.standard_normal((2, 3, 4, 5)).astype(np.float32)
    final1, final2 = _final(first), _final(second)
    blob_names = [n for n in final1 if n != "data" and final1[n] in final2]
    assert set(final1) - set(blob_names) == {"data"}
    v1 = _run(first, x, [final1[n] for n in blob_names])
    v2 = _run(second, x, [final2[final1[n]] for n in blob_names])
    for name in blob_names:
        np.testing.assert_array_equal(v2[final2[final1[name]]], v1[final1[name]], err_msg=name)
    x64 = x.astype(np.float64)
    cat = np.concatenate([x64[:, 1:], x64[:, :1]], axis=1)
    soft = np.exp(cat) / np.exp(cat).sum(axis=3, keepdims=True)
    power = (2 * soft - 0.5) ** 3
    want = {"flat_mid": x64.reshape(2, 12, 5), "reshape": x64.reshape(2, 3, 2, 2, 5),
            "ip_t": x64.reshape(2, 3, 20) @ w + b, "power": power,
            # FLOOR: 4x5 -> 2x2 windows of 2x2, the last column unused
            "floor": power[:, :, :4, :4].reshape(2, 3, 2, 2, 2, 2).max(axis=(3, 5))}
    for name, value in want.items():
        got = v2[final2[final1[name]]].astype(np.float64)
        assert got.shape == value.shape, name
        assert np.abs(got - value).max() <= 1e-5 * np.abs(value).max(), name
