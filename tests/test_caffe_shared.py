"""Caffe import against the real Caffe files and real Caffe 1.0 outputs in ../shared.

cifar10_quick: a third-party Caffe model whose binary snapshot holds a *training* net (Data and
SoftmaxWithLoss layers); the deploy prototxt is matched to it by layer name. The reference .npz
holds every blob after Caffe's forward pass and each layer's top right after that layer ran.
"""
import numpy as np
import onnx
import pytest

from cnnvis.caffe import (
    META_BLOB_FINAL, META_LAYERS, META_PARAMS, caffe_metadata, is_hdf5, load_caffe, read_weights,
)
from cnnvis.onnxgraph import create_session, static_shapes

TOL = 1e-5  # relative to each reference blob's largest magnitude


def _all_tensors(model):
    meta = caffe_metadata(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    wanted = set(meta[META_BLOB_FINAL].values()) | {t for ts in meta[META_LAYERS].values() for t in ts}
    for name in sorted(wanted - have):
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m, meta


@pytest.fixture(scope="module")
def cifar(shared_dir):
    root = shared_dir / "caffe" / "cifar10_quick"
    ref = shared_dir / "reference" / "caffe_cifar10_quick"
    return {
        "prototxt": root / "cifar10_quick.prototxt",
        "binary": root / "cifar10_quick_iter_4000.caffemodel",
        "h5": root / "cifar10_quick_iter_5000.caffemodel.h5",
        "input": np.load(ref / "cifar_input.npz")["input"],
        "forward": dict(np.load(ref / "cifar10_quick_iter4000_forward.npz")),
    }


def test_cifar10_quick_reproduces_every_caffe_blob(cifar):
    model = load_caffe(cifar["prototxt"], cifar["binary"])
    onnx.checker.check_model(model)
    m, meta = _all_tensors(model)
    # Node names are the layer names: the node writing each layer's output carries its name.
    producers = {o: n.name for n in model.graph.node for o in n.output}
    for layer, tensors in meta[META_LAYERS].items():
        if layer != "data":
            assert [producers[t] for t in tensors] == [layer]
    session = create_session(m, device="cpu", threads=1)
    x = cifar["input"]
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"data": x})))
    values["data"] = x
    checked = []
    for key, want in cifar["forward"].items():
        if key.startswith("blobs_"):
            tensor = meta[META_BLOB_FINAL][key[len("blobs_"):]]
        else:
            layer, _blob = key[len("layer_"):].split("__top_")
            tensor = meta[META_LAYERS][layer][0]
        got = values[tensor]
        assert got.shape == want.shape, key
        err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
        assert err <= TOL, f"{key}: {err:.3g}"
        checked.append(key)
    assert len(checked) == 23  # 10 blobs + 13 layer tops
    # pool1 before the in-place relu1 has negative values; after it, none.
    assert values[meta[META_LAYERS]["pool1"][0]].min() < 0
    assert values[meta[META_BLOB_FINAL]["pool1"]].min() >= 0
    np.testing.assert_array_equal(values["prob"].argmax(1), cifar["forward"]["blobs_prob"].argmax(1))


def test_cifar10_quick_hdf5_snapshot(cifar):
    import h5py

    assert is_hdf5(cifar["h5"]) and not is_hdf5(cifar["binary"])
    weights = read_weights(cifar["h5"])
    assert weights.format == "hdf5"
    with h5py.File(cifar["h5"], "r") as f:
        for layer in ("conv1", "conv2", "conv3", "ip1", "ip2"):
            for i, blob in enumerate(weights.layers[layer]):
                np.testing.assert_array_equal(blob.array, f[f"data/{layer}/{i}"][()])
    model = load_caffe(cifar["prototxt"], cifar["h5"])
    meta = caffe_metadata(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(inits[meta[META_PARAMS]["conv1"][0]], weights.layers["conv1"][0].array)
    probs = create_session(model, device="cpu").run(None, {"data": cifar["input"]})[0]
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    # A different snapshot: same architecture, other weights.
    binary = read_weights(cifar["binary"])
    assert not np.array_equal(binary.layers["conv1"][0].array, weights.layers["conv1"][0].array)


def test_cifar10_quick_train_test_prototxt_with_its_snapshot(cifar, tmp_path):
    """The BVLC example's train/test prototxt (tests/data/caffe) with the real snapshot: the TEST
    data layer becomes the input (channels from conv1's weights; 32x32 is in the LMDB, so
    --input-shape), the loss and Accuracy are dropped, and every blob equals real Caffe's."""
    from pathlib import Path

    from cnnvis.caffe import caffe_notes
    from cnnvis.errors import CnnvisError

    proto = Path(__file__).parent / "data" / "caffe" / "cifar10_quick_train_test.prototxt"
    with pytest.raises(CnnvisError, match="image size .* input_shape=C,H,W"):
        load_caffe(proto, cifar["binary"])
    model = load_caffe(proto, cifar["binary"], input_shape="3,32,32")
    (note,) = caffe_notes(model)
    assert "dropped 2 layer(s)" in note and "(Accuracy, SoftmaxWithLoss)" in note and "output 'ip2'" in note
    assert [o.name for o in model.graph.output] == ["ip2"]
    m, meta = _all_tensors(model)
    session = create_session(m, device="cpu", threads=1)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"data": cifar["input"]})))
    compared = 0
    for key, want in cifar["forward"].items():
        blob = key[len("blobs_"):]
        if not key.startswith("blobs_") or blob in ("data", "prob"):
            continue
        got = values[meta[META_BLOB_FINAL][blob]].astype(np.float64)
        assert got.shape == want.shape and np.abs(got - want).max() / np.abs(want).max() <= TOL, key
        compared += 1
    assert compared == 8  # conv1..3, pool1..3, ip1, ip2
    logits = values["ip2"].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, cifar["forward"]["blobs_prob"], rtol=0, atol=1e-5)
    # The snapshot's own net is the TRAIN net: its only data layer is not in the TEST phase.
    from google.protobuf import text_format

    from cnnvis.caffe.schema import raw_messages

    net = raw_messages().NetParameter.FromString(cifar["binary"].read_bytes())
    for layer in net.layer:
        del layer.blobs[:]
    train_only = tmp_path / "snapshot_net.prototxt"
    train_only.write_text(text_format.MessageToString(net))
    with pytest.raises(CnnvisError, match="layer 'cifar' writing it is not in the TEST phase"):
        load_caffe(train_only, cifar["binary"], input_shape="3,32,32")


# Shapes real Caffe reports for CaffeNet at batch 1 (../shared/README.md); AlexNet normalises
# before pooling, so its norm1 is 96x55x55.
CAFFENET_SHAPES = {
    "conv1": (96, 55, 55), "pool1": (96, 27, 27), "norm1": (96, 27, 27), "conv2": (256, 27, 27),
    "pool2": (256, 13, 13), "norm2": (256, 13, 13), "conv3": (384, 13, 13), "conv4": (384, 13, 13),
    "conv5": (256, 13, 13), "pool5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,),
    "prob": (1000,),
}


@pytest.mark.parametrize("name", ["bvlc_reference_caffenet", "bvlc_alexnet"])
def test_bvlc_deploy_prototxts_convert(shared_dir, name):
    model = load_caffe(shared_dir / "caffe" / name / "deploy.prototxt")
    onnx.checker.check_model(model)
    meta = caffe_metadata(model)
    shapes = static_shapes(model, (1, 3, 227, 227))
    expected = dict(CAFFENET_SHAPES)
    if name == "bvlc_alexnet":
        expected.update(norm1=(96, 55, 55), pool1=(96, 27, 27), norm2=(256, 27, 27))
    for blob, shape in expected.items():
        assert shapes[meta[META_LAYERS][blob][0]] == (1,) + shape, blob
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    params = sum(sizes[n] for names in meta[META_PARAMS].values() for n in names)
    assert params == 60_965_224
    groups = {n.name: [a.i for a in n.attribute if a.name == "group"][0] for n in model.graph.node if n.op_type == "Conv"}
    assert groups == {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
    if name == "bvlc_reference_caffenet":  # one forward pass is enough to show it runs
        x = np.random.default_rng(0).standard_normal((1, 3, 227, 227)).astype(np.float32)
        probs = create_session(model, device="cpu", threads=1).run(None, {"data": x})[0]
        assert probs.shape == (1, 1000) and abs(float(probs.sum()) - 1) < 1e-4
