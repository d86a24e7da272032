import os

import numpy as np
import onnx
import pytest

from cnnvis import nets
from cnnvis.errors import CnnvisError
from cnnvis.model import Model

LIGHT_ALEXNET = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_bvlc_alexnet.onnx")

# Blob shapes real Caffe reports for CaffeNet at batch 1 (../shared/README.md)
CAFFENET_SHAPES = {
    "conv1": (96, 55, 55), "pool1": (96, 27, 27), "norm1": (96, 27, 27), "conv2": (256, 27, 27),
    "pool2": (256, 13, 13), "norm2": (256, 13, 13), "conv3": (384, 13, 13), "conv4": (384, 13, 13),
    "conv5": (256, 13, 13), "pool5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,),
}


@pytest.fixture(scope="module")
def alexnet():
    return Model(nets.build_alexnet(seed=0), name="alexnet-random", sidecar={"trained": False})


def conv2d_f64(x, w, b, stride=1, pad=0, group=1):
    """Direct float64 convolution (cross-correlation, as Caffe/ONNX define it)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    w = w.astype(np.float64)
    n, c, h, wd = x.shape
    m, cg, k, _ = w.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, m, oh, ow))
    mg = m // group
    for g in range(group):
        xs = x[:, g * cg:(g + 1) * cg]
        # im2col: n × (cg·k·k) × (oh·ow)
        cols = np.stack([xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                         for i in range(k) for j in range(k)], axis=2)  # n, cg, k*k, oh, ow
        cols = cols.reshape(n, cg * k * k, oh * ow)
        wg = w[g * mg:(g + 1) * mg].reshape(mg, -1)
        out[:, g * mg:(g + 1) * mg] = np.einsum("mk,nkp->nmp", wg, cols).reshape(n, mg, oh, ow)
    return out + b.astype(np.float64)[None, :, None, None]


def test_conv1_taps_equal_float64_numpy(alexnet):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 227, 227)).astype(np.float32) * 50
    got = alexnet.run(x, ["conv1"])["conv1"]
    w, b = alexnet.param("conv1.weight"), alexnet.param("conv1.bias")
    ref = conv2d_f64(x, w, b, stride=4)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert got.shape == (2, 96, 55, 55)
    assert rel <= 1e-4, rel


def test_alexnet_layer_table_matches_caffe(alexnet):
    shapes = {layer.name: layer.output_shape for layer in alexnet.layers}
    # AlexNet normalises before pooling: norm1 is 96x55x55 (CaffeNet pools first, see below)
    assert shapes["norm1"] == (96, 55, 55)
    for name in ("conv1", "pool1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8"):
        assert shapes[name] == CAFFENET_SHAPES[name], name
    assert sum(layer.params for layer in alexnet.layers) == 60_965_224
    conv2 = alexnet.layer("conv2")
    assert conv2.weight_shape == (256, 48, 5, 5)  # group 2
    # MACs per image: conv1 = 96·55·55 outputs × 3·11·11
    assert alexnet.layer("conv1").macs == 96 * 55 * 55 * 363
    assert alexnet.layer("fc6").macs == 4096 * 9216
    assert alexnet.logits_layer.name == "fc8"


def test_caffenet_pools_before_norm():
    m = Model(nets.build_caffenet(seed=0, input_size=227), name="caffenet-random")
    shapes = {layer.name: layer.output_shape for layer in m.layers}
    for name, shape in CAFFENET_SHAPES.items():
        assert shapes[name] == shape, name
    order = [layer.name for layer in m.layers]
    assert order.index("pool1") < order.index("norm1")


def test_light_zoo_alexnet_folds_and_gets_caffe_names():
    m = Model.from_file(LIGHT_ALEXNET)
    names = [layer.name for layer in m.layers]
    assert names[:4] == ["conv1", "relu1", "norm1", "pool1"]
    assert {"conv5", "pool5", "fc6", "relu6", "drop6", "fc8", "prob"} <= set(names)
    conv1 = m.layer("conv1")
    assert conv1.weight_shape == (96, 3, 11, 11) and conv1.output_shape == (96, 54, 54)  # 224 input
    assert conv1.weight == "conv1_w_0"
    # every weight is an initializer: no ConstantOfShape left, no weight graph inputs
    assert not [n for n in m.proto.graph.node if n.op_type in ("ConstantOfShape", "Constant")]
    assert [i.name for i in m.proto.graph.input] == ["data_0"]
    # the file fixes batch 1; cnnvis runs any batch
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32) * 20
    out = m.run(x, ["pool5", "prob"])
    assert out["pool5"].shape == (3, 256, 6, 6) and out["prob"].shape == (3, 1000)
    # folding, the batch rewrite and the LRN decomposition change no value: the original file, run
    # image by image in onnxruntime (its LRN op), gives the same pool5 (its constant weights make
    # every probability 1/1000, so pool5 is where the values differ)
    import onnxruntime as ort

    original = onnx.load(LIGHT_ALEXNET)
    pool5 = m.layer("pool5").tensor
    original.graph.output.append(onnx.helper.make_tensor_value_info(pool5, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    want = np.concatenate([sess.run([pool5], {name: x[i:i + 1]})[0] for i in range(3)])
    assert np.unique(want).size > 10
    np.testing.assert_allclose(out["pool5"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert m.layer("r0").name == "conv1"  # tensor names resolve too


def tiny_model():
    b = nets.NetBuilder((3, 12, 12), seed=3)
    b.conv("conv1", 4, 3, pad=1)
    b.relu("relu1")
    b.max_pool("pool1", 2, 2)
    b.fc("fc1", 5)
    b.softmax("prob")
    return Model(b.build("tiny"), name="tiny")


def test_one_cached_session_per_tap_set_and_batch_split_is_exact():
    m = tiny_model()
    x = np.random.default_rng(0).standard_normal((7, 3, 12, 12)).astype(np.float32)
    full = m.run(x, ["conv1", "pool1", "prob"], batch_size=7)
    split = m.run(x, ["conv1", "pool1", "prob"], batch_size=2)
    for k in full:
        np.testing.assert_array_equal(full[k], split[k])
    assert len(m._sessions) == 1
    m.run(x, ["conv1", "pool1", "prob"], batch_size=3)
    assert len(m._sessions) == 1
    m.run(x, ["relu1"])
    assert len(m._sessions) == 2
    np.testing.assert_allclose(m.predict(x).sum(axis=1), 1.0, rtol=1e-6)


def test_one_gradient_engine_per_wrt_and_options_shared_by_callers():
    from cnnvis.analysis.deconv import projection_engine

    m = tiny_model()
    w = m.param_name("conv1.weight")
    a = m.gradient_engine([w], objective="logit", batch_size=4)
    assert m.gradient_engine(w, objective="logit", batch_size=4) is a
    assert m.gradient_engine([w], objective="logit", batch_size=8) is not a
    assert (a.device, a.threads) == (m.device, m.threads)
    # the deconvnet projection and a direct request with the same options get the same engine
    assert projection_engine(m, "pool1", batch_size=4) is m.gradient_engine(
        [m.input_name], objective="seed", target=m.tensor_name("pool1"), rule="deconvnet", batch_size=4)
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(a.run(x, index=1).objective, m.run(x, ["fc1"])["fc1"][:, 1], rtol=1e-5)


def test_conv_layers_in_graph_order_or_one_line():
    assert [layer.name for layer in tiny_model().conv_layers()] == ["conv1"]
    b = nets.NetBuilder((3, 4, 4), seed=0)
    b.fc("fc1", 2)
    with pytest.raises(CnnvisError, match=r"model dense has no convolution layer; name one with layer=\.\.\."):
        Model(b.build("dense"), name="dense").conv_layers()


def test_unknown_layer_lists_closest_names():
    m = tiny_model()
    with pytest.raises(CnnvisError, match=r"unknown layer 'conv2'.*closest: conv1"):
        m.layer("conv2")
    with pytest.raises(CnnvisError, match="expected LAYER.weight"):
        m.param_name("conv1.kernel")
    with pytest.raises(CnnvisError, match="has no weight"):
        m.param_name("relu1.weight")


def test_wrong_batch_shape_is_one_line():
    m = tiny_model()
    with pytest.raises(CnnvisError, match=r"expects N×3×12×12"):
        m.run(np.zeros((1, 3, 10, 10), np.float32))
    with pytest.raises(CnnvisError, match="dtype"):
        m.run(np.zeros((1, 3, 12, 12), np.int64))


def test_not_onnx_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all \xff\xfe")
    with pytest.raises(CnnvisError, match="bad.onnx: not an ONNX model"):
        Model.from_file(bad)
    good = tmp_path / "tiny.onnx"
    good.write_bytes(tiny_model().proto.SerializeToString())
    Model.from_file(good)  # loads
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CnnvisError, match="cut.onnx"):
        Model.from_file(cut)
    with pytest.raises(CnnvisError, match="missing.onnx: cannot read"):
        Model.from_file(tmp_path / "missing.onnx")


def test_sidecar_beside_file_gives_class_names(tmp_path):
    import json

    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_model().proto.SerializeToString())
    (tmp_path / "tiny.onnx.json").write_text(json.dumps({"classes": list("abcde"), "trained": False}))
    m = Model.from_file(path)
    assert m.class_names == list("abcde") and not m.trained


# ---------------------------------------------------------------- shape subgraphs and precision

def _small_classifier(dtype=np.float32, torch_flatten=True, batch="N"):
    """Conv(3->4, 3x3, pad 1) -> Relu -> MaxPool 2 -> flatten -> MatMul(64 -> 5) -> Softmax, weights
    in ``dtype``; the flatten is torch.onnx.export's Shape -> Gather -> Unsqueeze -> Concat -> Reshape
    (int64 shape arithmetic computed at run time) or a constant Reshape."""
    from onnx import TensorProto, helper, numpy_helper

    from cnnvis.onnxgraph import make_model

    rng = np.random.default_rng(3)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = (rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(dtype)
    b = (rng.normal(size=4) * 0.1).astype(dtype)
    fc = (rng.normal(size=(64, 5)) * 0.2).astype(dtype)
    inits = [numpy_helper.from_array(w, "conv1.weight"), numpy_helper.from_array(b, "conv1.bias"),
             numpy_helper.from_array(fc, "fc.weight")]
    nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], name="/conv1/Conv"),
             helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="/pool/MaxPool")]
    if torch_flatten:
        inits += [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                  numpy_helper.from_array(np.array([0], np.int64), "axes0"),
                  numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
        nodes += [helper.make_node("Shape", ["p"], ["s"], name="/Shape"),
                  helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="/Gather"),
                  helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="/Unsqueeze"),
                  helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="/Concat"),
                  helper.make_node("Reshape", ["p", "target"], ["flat"], name="/Reshape")]
    else:
        inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "target"))
        nodes.append(helper.make_node("Reshape", ["p", "target"], ["flat"], name="/Reshape"))
    nodes += [helper.make_node("MatMul", ["flat", "fc.weight"], ["logits"], name="/fc/MatMul"),
              helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="/Softmax")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", elem, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("prob", elem, [batch, 5])], inits)
    return make_model(graph)


def test_shape_subgraph_tensors_are_no_layers():
    model = Model(_small_classifier(), name="flat")
    assert [layer.tensor for layer in model.layers] == ["c", "r", "p", "flat", "logits", "prob"]
    assert [layer.name for layer in model.layers][:1] == ["conv1"] and model.layer("fc").tensor == "logits"
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    every = model.run(x, [layer.name for layer in model.layers])  # every layer tapped at once
    assert all(v.dtype == np.float32 for v in every.values())
    # the same values as a constant-shape flatten of the same weights
    plain = Model(_small_classifier(torch_flatten=False), name="plain").run(x, ["prob"])["prob"]
    np.testing.assert_array_equal(every["prob"], plain)
    with pytest.raises(CnnvisError, match="unknown layer"):
        model.layer("target")


def test_float16_model_equals_onnxruntime_on_the_file_and_says_its_precision():
    import onnxruntime as ort

    proto = _small_classifier(np.float16)
    model = Model(proto, name="fp16")
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(["prob"], {"x": x.astype(np.float16)})[0]
    # numpy casts the feed as a user's own run does: the very same float16 results, as float32
    alone = model.run(x, ["prob"], batch_size=2)["prob"]
    assert alone.dtype == np.float32
    np.testing.assert_array_equal(alone, ref.astype(np.float32))
    # tapping intermediate tensors changes which float16 roundings onnxruntime's fused kernels skip:
    # equal to float16 tolerance (2**-10 relative, a few roundings: rtol 4e-3 of the largest value)
    got = model.run(x, ["prob", "conv1", "flat"], batch_size=2)
    assert got["conv1"].dtype == np.float32 and got["flat"].shape == (5, 64)
    np.testing.assert_allclose(got["prob"], ref.astype(np.float32), rtol=0, atol=4e-3)
    np.testing.assert_array_equal(model.predict(x).argmax(1), ref.argmax(1))
    assert model.precision == "float16" and model.info()["precision"]["forward"] == "float16"
    assert model.param("conv1.weight").dtype == np.float32  # analyses get float32 weights
    assert "precision" not in Model(_small_classifier(), name="fp32").info()


def test_float16_gradients_are_the_upcast_model_s():
    """The gradient engine differentiates the float32 graph with the float16 weights upcast: equal
    (to float32 rounding, rtol 1e-5) to the same model written in float32 with those weights."""
    half = Model(_small_classifier(np.float16), name="fp16")
    proto32 = _small_classifier(np.float32)
    for init in proto32.graph.initializer:  # the same (rounded) weights in float32
        if init.data_type == 1:
            from onnx import numpy_helper
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16).astype(np.float32),
                                                  init.name))
    single = Model(proto32, name="fp32")
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    g16 = half.gradient_engine(half.input_name, objective="logit").run(x, index=[1, 3])[half.input_name]
    g32 = single.gradient_engine(single.input_name, objective="logit").run(x, index=[1, 3])[single.input_name]
    assert g16.dtype == np.float32 and np.abs(g32).max() > 0
    np.testing.assert_allclose(g16, g32, rtol=1e-5, atol=1e-7)


def test_bfloat16_model_runs_upcast_where_onnxruntime_has_no_kernels_and_says_so():
    """onnxruntime's CPU build cannot run a bfloat16 Relu; the model then runs its float32 graph
    (weights upcast) and info() records that precision. Reference: numpy on the upcast weight."""
    from onnx import TensorProto, helper

    from cnnvis.onnxgraph import make_model

    w = helper.make_tensor("w", TensorProto.BFLOAT16, [1, 2, 1, 1], [0.75, -1.5])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)], [w])
    model = Model(make_model(graph), name="bf16")
    assert model.precision == "bfloat16" and [layer.tensor for layer in model.layers] == ["m", "y"]
    x = np.random.default_rng(6).normal(size=(3, 2, 4, 4)).astype(np.float32)
    y = model.run(x, ["y"])["y"]
    expected = np.maximum(x * np.array([0.75, -1.5], np.float32).reshape(1, 2, 1, 1), 0)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)  # one float32 multiply and a max: exact
    assert model.info()["precision"]["forward"].startswith("float32 (bfloat16 weights upcast")


def test_gradients_pass_around_a_reshape_whose_shape_is_computed_at_run_time():
    """d logit / d input and d logit / d conv1.weight through torch's Shape -> Gather -> Concat ->
    Reshape flatten equal those through a constant Reshape of the same weights, exactly."""
    x = np.random.default_rng(4).normal(size=(3, 3, 8, 8)).astype(np.float32)
    grads = []
    for torch_flatten in (True, False):
        model = Model(_small_classifier(torch_flatten=torch_flatten), name="flat")
        engine = model.gradient_engine([model.input_name, "conv1.weight"], objective="logit",
                                       target=model.layer("fc").tensor)
        grads.append(engine.run(x, index=[0, 2, 4]))
    for name in ("x", "conv1.weight"):
        assert np.abs(grads[0][name]).max() > 0
        np.testing.assert_array_equal(grads[0][name], grads[1][name])


def test_float16_inside_float32_io_model():
    """A float16 model converted with float32 inputs and outputs kept (Cast after the input and
    before the output): runs in float16 exactly as onnxruntime runs the file, taps of its float16
    tensors come back as float32, and gradients run on the float32 graph (the Casts cast to float32)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = _small_classifier(np.float16)
    graph = proto.graph
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == "x":
                node.input[k] = "x16"
        for k, name in enumerate(node.output):
            if name == "prob":
                node.output[k] = "prob16"
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="/Cast_in")] + list(graph.node) \
        + [helper.make_node("Cast", ["prob16"], ["prob"], to=TensorProto.FLOAT, name="/Cast_out")]
    del graph.node[:]
    graph.node.extend(nodes)
    model = Model(proto, name="mixed")
    assert model.reduced_precision and model.precision == "float16"
    x = np.random.default_rng(5).normal(size=(4, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["prob"], {"x": x})[0]
    np.testing.assert_array_equal(model.run(x, ["prob"])["prob"], ref)
    conv = model.run(x, ["conv1"])["conv1"]
    assert conv.dtype == np.float32 and conv.shape == (4, 4, 8, 8)
    assert all(n.attribute[0].i == TensorProto.FLOAT for n in model.proto.graph.node if n.op_type == "Cast")
    g = model.gradient_engine(model.input_name, objective="logit", target=model.layer("fc").tensor).run(x, index=1)
    # the same as the all-float16 model's (whose gradients are the upcast graph's: see above)
    half = Model(_small_classifier(np.float16), name="fp16")
    ref_g = half.gradient_engine(half.input_name, objective="logit", target=half.layer("fc").tensor).run(x, index=1)
    assert g["x"].dtype == np.float32 and np.abs(g["x"]).max() > 0
    np.testing.assert_allclose(g["x"], ref_g["x"], rtol=1e-6, atol=1e-8)


def test_chunk_bounds_cover_every_item_once_in_order():
    from cnnvis.model import chunk_bounds

    assert chunk_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds(0, 4) == [] and chunk_bounds(2, 0) == [(0, 1), (1, 2)]
    # parts cut each chunk into near-equal non-empty pieces (the engine's concurrent workers)
    assert chunk_bounds(7, 4, parts=2) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert chunk_bounds(5, 5, parts=3) == [(0, 2), (2, 3), (3, 5)]


def test_gradient_engines_sessions_live_in_the_models_one_cache():
    from cnnvis.autodiff import GradientEngine

    m = tiny_model()
    w = m.param_name("conv1.weight")
    x = np.random.default_rng(2).standard_normal((5, 3, 12, 12)).astype(np.float32)
    engine = m.gradient_engine([w], objective="logit", batch_size=2)
    got = engine.run(x, index=3)
    keys = [k for k in m._sessions if k[0] == "graph"]
    assert keys and all(k[1][0] == "engine" for k in keys)
    # the same numbers as an engine holding its own sessions (built from the same graph)
    alone = GradientEngine(m.proto, [w], objective="logit", batch_size=2).run(x, index=3)
    np.testing.assert_array_equal(got[w], alone[w])
    np.testing.assert_array_equal(got.objective, alone.objective)
    # forgetting the engine's evicted graphs forgets only their sessions; release() empties the cache
    m.run(x)
    engine.sessions.drop(lambda key: False)
    assert [k for k in m._sessions if k[0] == "graph"] == [] and list(m._sessions) == [(m.output_name,)]
    m.release()
    assert m._sessions == {}


def test_from_file_external_data_beside_the_model_and_its_hash(tmp_path, monkeypatch):
    """External data is read from the model's folder whatever the current folder, and the model's
    sha256 covers it: other weight bytes give another sha256 (a rerun notices changed weights)."""
    from onnx.external_data_helper import convert_model_to_external_data

    proto = tiny_model().proto
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(proto, str(folder / "tiny.onnx"))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "weights.bin").write_bytes(b"\0" * (folder / "weights.bin").stat().st_size)
    monkeypatch.chdir(cwd)
    m = Model.from_file(folder / "tiny.onnx")
    np.testing.assert_array_equal(m.param("conv1.weight"), tiny_model().param("conv1.weight"))
    first = m.sha256
    data = bytearray((folder / "weights.bin").read_bytes())
    data[0] ^= 1
    (folder / "weights.bin").write_bytes(bytes(data))
    assert Model.from_file(folder / "tiny.onnx").sha256 != first


def test_check_runs_refuses_a_model_that_cannot_run(tmp_path):
    """A conv whose weight has 2 input channels for a 3-channel input passes onnx's checker and
    fails only when run: at load, in one line naming the file."""
    proto = tiny_model().proto
    w = next(i for i in proto.graph.initializer if i.name == "conv1.weight")
    arr = onnx.numpy_helper.to_array(w)[:, :2]
    w.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(arr), "conv1.weight"))
    onnx.checker.check_model(proto, full_check=True)  # the checker accepts it
    path = tmp_path / "bad.onnx"
    onnx.save_model(proto, str(path))
    with pytest.raises(CnnvisError, match=r"^.*bad\.onnx: onnxruntime cannot run this model \(.*\)$") as info:
        Model.from_file(path)
    assert "\n" not in str(info.value)


def test_session_cache_builds_each_key_once_and_drops_only_graphs_failing_keep():
    from cnnvis.model import SessionCache

    m = tiny_model()
    builds = []

    def build():
        builds.append(1)
        return m.proto

    cache = SessionCache()
    cache[("tap",)] = "a tap session"  # a Model keeps its tap sessions under their output names
    first = cache(("a", 1), build, threads=1, device="cpu")
    assert cache(("a", 1), build, threads=1, device="cpu") is first and len(builds) == 1
    second = cache(("b", 2), build, threads=1, device="cpu")
    assert second is not first and len(builds) == 2
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32)
    np.testing.assert_array_equal(first.run(None, {m.input_name: x})[0], m.run(x)[m.output_name])
    cache.drop(lambda key: key[0] == "b")
    assert sorted(cache, key=repr) == [("graph", ("b", 2)), ("tap",)]
    # the model's cache is one: its graph sessions go through the same class
    assert type(m._sessions) is SessionCache
    assert m.session(key=("k",), build=build) is m._sessions[("graph", ("k",))] and len(builds) == 3


def _batch_one_reshape_model(path):
    """conv (1x3x2x2 input, 4 maps) then a Reshape to the literal target [2, 8]: right at batch 1 (16
    values), wrong at any other batch (make_batch_dynamic only rewrites targets starting with 1)."""
    from onnx import TensorProto, helper, numpy_helper

    from cnnvis.onnxgraph import make_model

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    target = numpy_helper.from_array(np.array([2, 8], np.int64), "target")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "target"], ["y"], name="flat")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    onnx.save(make_model(helper.make_graph(nodes, "g", [x], [y], [w, target])), str(path))
    return path


def test_a_run_time_onnxruntime_failure_is_one_line_naming_the_node(tmp_path, capsys):
    from cnnvis.cli import main

    path = _batch_one_reshape_model(tmp_path / "m.onnx")
    model = Model.from_file(path)  # batch 1 runs
    assert model.run(np.zeros((1, 3, 2, 2), np.float32))[model.output_name].shape == (2, 8)
    with pytest.raises(CnnvisError) as info:
        model.run(np.zeros((3, 3, 2, 2), np.float32), batch_size=3)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("m.onnx: batch of 3: node 'flat' (Reshape): ")
    assert "requested shape:{2,8}" in message and "reshape_helper" not in message
    np.save(tmp_path / "x.npy", np.zeros((3, 3, 2, 2), np.float32))
    out = tmp_path / "out"
    # the failing layer asked for (a session for the conv alone no longer runs the Reshape after it)
    code = main(["activations", "--input-array", str(tmp_path / "x.npy"), "--model", str(path), "--layer", "flat",
                 "--batch-size", "3", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "node 'flat' (Reshape)" in err, err
    assert not out.exists() or not any(out.rglob("*.npy"))


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_graph_that_fixes_its_batch_runs_one_image_at_a_time(tmp_path, batch_first):
    """A dynamo batch-1 export of adaptive_avg_pool2d: Reshape [-1] -> Gather of the fixed indices
    [1, 4, 1, 1] (as_strided). With the batch first in the flattened tensor, make_batch_dynamic
    rewrites it into a per-image Gather and a batch of 2 runs at once. With the batch second (a
    Transpose before the flatten: the indices then mix images at any batch but 1) it is left as it
    is, a batch of 2 gives 1 row, and Model.run goes on one image at a time (before, 1 row came back
    for 2 images: an IndexError later)."""
    from onnx import TensorProto, helper, numpy_helper

    from cnnvis.onnxgraph import make_model

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.arange(4, dtype=np.int64).reshape(1, 4, 1, 1), "idx")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("ReduceMean", ["c"], ["m"], name="mean", axes=[2, 3], keepdims=1)]
    if not batch_first:
        nodes.append(helper.make_node("Transpose", ["m"], ["mt"], name="swap", perm=[1, 0, 2, 3]))
    nodes += [helper.make_node("Reshape", [nodes[-1].output[0], "flat"], ["f"], name="view"),
              helper.make_node("Gather", ["f", "idx"], ["y"], name="as_strided", axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])], inits)
    path = tmp_path / "strided.onnx"
    onnx.save(make_model(graph), str(path))
    model = Model.from_file(path)
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    one = model.run(x[:1], ["as_strided"])["as_strided"]
    w = numpy_helper.to_array(inits[0])[:, :, 0, 0].astype(np.float64)
    want = np.einsum("chw,oc->o", x[0].astype(np.float64), w) / 4  # 1x1 conv, then the mean of 2x2
    np.testing.assert_allclose(one.reshape(4), want, rtol=1e-5, atol=1e-6)
    assert model.fixed_batch is None
    both = model.run(x, ["as_strided"], batch_size=2)["as_strided"]
    assert model.fixed_batch == (None if batch_first else 1) and both.shape == (2, 4, 1, 1)
    np.testing.assert_array_equal(both[:1], one)
    np.testing.assert_array_equal(both[1:], model.run(x[1:], ["as_strided"])["as_strided"])
    np.save(tmp_path / "x.npy", x)
    from cnnvis.cli import main

    assert main(["activations", "--input-array", str(tmp_path / "x.npy"), "--model", str(path),
                 "--layer", "as_strided", "--batch-size", "2", "--out", str(tmp_path / "out")]) == 0
    import h5py

    stacks = sorted((tmp_path / "out").rglob("activations.h5"))
    assert len(stacks) == 2
    with h5py.File(stacks[1]) as h5:
        np.testing.assert_array_equal(h5["as_strided"][()], both[1])


def test_folding_shape_arithmetic_is_held_to_the_memory_budget_first():
    """A model with shape arithmetic is run at batch 2 to fold it: a declared 1x4000x4000 input
    (2 x 64 MB with its Relu) is refused against a 32 MiB budget before anything runs."""
    from onnx import TensorProto, helper

    from cnnvis import limits
    from cnnvis.onnxgraph import make_model

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Reshape", ["r", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4000, 4000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4000, 4000])])
    with limits.memory_limit_set(32 << 20):
        with pytest.raises(CnnvisError, match=r"^bomb: two 1x4000x4000 inputs and their activations: needs "):
            Model(make_model(graph), name="bomb")


def test_layer_table_sizes_same_padded_dilated_pools_as_onnxruntime_runs_them():
    """conv → SAME_UPPER MaxPool (kernel 2, dilation 2) → SAME_LOWER AveragePool (kernel 3, dilation
    2, stride 2) on 1×9×10: onnxruntime pads them by the undilated kernel, so they give 8×9 and 3×4
    where onnx shape inference says 9×10 and 4×5; the layer table says what the runs return.
    By hand: the pool pads 1 in total (9 + 1 - 3 + 1 = 8, 10 + 1 - 3 + 1 = 9); the average pool on
    8×9 pads (4 - 1) * 2 + 3 - 8 = 1 and (5 - 1) * 2 + 3 - 9 = 2 over an extent 5: (8 + 1 - 5) // 2 + 1 = 3,
    (9 + 2 - 5) // 2 + 1 = 4."""
    from onnx import TensorProto, helper, numpy_helper

    from cnnvis.onnxgraph import make_model

    nodes = [helper.make_node("Conv", ["data", "w"], ["conv"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("MaxPool", ["conv"], ["pool"], name="pool", kernel_shape=[2, 2], dilations=[2, 2],
                              auto_pad="SAME_UPPER"),
             helper.make_node("AveragePool", ["pool"], ["avg"], name="avg", kernel_shape=[3, 3], strides=[2, 2],
                              dilations=[2, 2], auto_pad="SAME_LOWER")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 1, 9, 10])],
                              [helper.make_tensor_value_info("avg", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.full((2, 1, 1, 1), 2.0, np.float32), "w")])
    m = Model(make_model(graph, opset=19), name="dilated-same")
    shapes = {layer.name: layer.output_shape for layer in m.layers}
    assert shapes == {"conv": (2, 9, 10), "pool": (2, 8, 9), "avg": (2, 3, 4)}
    ran = m.run(np.ones((3, 1, 9, 10), np.float32), ["pool", "avg"])
    assert ran["pool"].shape[1:] == shapes["pool"] and ran["avg"].shape[1:] == shapes["avg"]
