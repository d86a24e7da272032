"""Caffe train/test prototxts opened as deploy nets: data layers, phase rules, dropped losses.

Each net is written by the test. The converted graph of a train/test net is compared with the
converted deploy net written out by hand (the same layers, an Input layer, no losses) and with a
float64 numpy implementation of Caffe's layers (from test_caffe).
"""
import numpy as np
import onnx
import pytest

from cnnvis.caffe import caffe_notes, load_caffe, read_net
from cnnvis.caffe.schema import messages
from cnnvis.cli import main
from cnnvis.onnxgraph import create_session

from test_caffe import _error, assert_close, ref_conv, ref_pool, rng, write_prototxt

DATA_TRAIN_TEST = """
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 9 mean_value: 104 mean_value: 117 }
  data_param { source: "train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 9 mean_value: 104 mean_value: 117 }
  data_param { source: "val_lmdb" batch_size: 50 backend: LMDB } }
"""

# A GoogLeNet-like body: an auxiliary classifier with its own loss (and Accuracy), the main
# classifier with loss and top-1/top-5 Accuracy, a BatchNorm trained with batch statistics.
BODY = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: false } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "aux/pool" type: "Pooling" bottom: "conv1" top: "aux/pool" pooling_param { pool: AVE kernel_size: 3 stride: 3 } }
layer { name: "aux/fc" type: "InnerProduct" bottom: "aux/pool" top: "aux/fc" inner_product_param { num_output: 3 } }
layer { name: "aux/loss" type: "SoftmaxWithLoss" bottom: "aux/fc" bottom: "label" top: "aux/loss" loss_weight: 0.3 }
layer { name: "aux/top-1" type: "Accuracy" bottom: "aux/fc" bottom: "label" top: "aux/top-1" include { phase: TEST } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool1" top: "pool1" dropout_param { dropout_ratio: 0.4 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "top-1" type: "Accuracy" bottom: "fc" bottom: "label" top: "top-1" include { phase: TEST } }
layer { name: "top-5" type: "Accuracy" bottom: "fc" bottom: "label" top: "top-5" include { phase: TEST }
  accuracy_param { top_k: 2 } }
"""


def _weights():
    r = rng(30)
    return {"conv1": [r.standard_normal((4, 2, 3, 3)), r.standard_normal(4)],
            "bn1": [r.standard_normal(4), r.uniform(0.5, 2, 4), np.array([1.0])],
            "aux/fc": [r.standard_normal((3, 16)), r.standard_normal(3)],
            "fc": [r.standard_normal((3, 64)), r.standard_normal(3)]}


def _reference(x, blobs):
    """Caffe's TEST-phase forward of BODY in float64 (BatchNorm with the stored statistics)."""
    w, b = blobs["conv1"]
    mean, var, factor = blobs["bn1"]
    conv = ref_conv(x, w, b)
    bn = (conv - (mean / factor)[None, :, None, None]) / np.sqrt((var / factor)[None, :, None, None] + 1e-5)
    pool = ref_pool(np.maximum(bn, 0), (2, 2), (2, 2), (0, 0), "MAX")
    return pool.reshape(len(x), -1) @ blobs["fc"][0].T + blobs["fc"][1]


def _forward(model, x):
    return create_session(model, device="cpu", threads=1).run(None, {model.graph.input[0].name: x.astype(np.float32)})


def test_train_val_net_opens_as_its_deploy_net(tmp_path):
    blobs = _weights()
    proto, weights = write_prototxt(tmp_path, "train_val", 'name: "tv"\n' + DATA_TRAIN_TEST + BODY, blobs)
    model = load_caffe(proto, weights)
    onnx.checker.check_model(model)
    # The TEST data layer is the input: 2 channels from the 2 mean values, 9x9 from crop_size.
    (inp,) = model.graph.input
    assert inp.name == "data"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 2, 9, 9]
    # Losses and Accuracy are gone, and so is the auxiliary classifier that only fed them.
    assert [o.name for o in model.graph.output] == ["fc"]
    names = {n.name.split("/")[0] for n in model.graph.node}
    assert not any(n.startswith(("aux", "loss", "top-")) for n in names)
    notes = caffe_notes(model)
    assert len(notes) == 1 and "\n" not in notes[0]
    note = notes[0]
    assert "dropped 5 layer(s)" in note and "Accuracy, SoftmaxWithLoss" in note
    assert "2 layer(s) that only fed them" in note and "1 BatchNorm" in note
    assert "'data' 2x9x9" in note and "crop_size" in note and "mean_value" in note and "output 'fc'" in note
    x = rng(31).standard_normal((3, 2, 9, 9))
    (fc,) = _forward(model, x)
    assert_close(fc, _reference(x, blobs), "fc")
    # The hand-written deploy net (Input layer, no losses, no auxiliary branch) computes the same.
    deploy_body = "\n".join(line for line in BODY.strip().splitlines()
                            if not any(k in line for k in ("aux/", "Loss", "Accuracy", "top-5", "accuracy_param")))
    deploy_body = deploy_body.replace("batch_norm_param { use_global_stats: false }", "")
    deploy, _ = write_prototxt(tmp_path, "deploy", 'name: "tv"\nlayer { name: "data" type: "Input" top: "data" '
                       "input_param { shape { dim: 1 dim: 2 dim: 9 dim: 9 } } }\n" + deploy_body)
    plain = load_caffe(deploy, weights)
    assert caffe_notes(plain) == []
    np.testing.assert_array_equal(_forward(plain, x)[0], fc)


def test_a_deploy_net_keeps_refusing_batch_statistics(tmp_path):
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { use_global_stats: false } }\n')
    proto, _ = write_prototxt(tmp_path, "deploy_bn", text)
    assert "use_global_stats" in _error(load_caffe, proto)


@pytest.mark.parametrize("layer, shape, how", [
    ('type: "Data" transform_param { crop_size: 5 force_gray: true } data_param { source: "x" batch_size: 8 }',
     (1, 5, 5), "force_gray, crop_size"),
    ('type: "Data" data_param { source: "x" batch_size: 8 crop_size: 6 } transform_param { mean_value: 1 mean_value: 2 mean_value: 3 }',
     (3, 6, 6), "crop_size, mean_value"),
    ('type: "ImageData" image_data_param { source: "list.txt" new_height: 7 new_width: 8 is_color: false }',
     (1, 7, 8), "is_color, new_height/new_width"),
    ('type: "ImageData" image_data_param { source: "list.txt" new_height: 7 new_width: 8 } transform_param { crop_size: 4 }',
     (3, 4, 4), "is_color, crop_size"),
    ('type: "MemoryData" memory_data_param { batch_size: 4 channels: 2 height: 5 width: 6 }', (2, 5, 6), "MemoryData"),
    ('type: "DummyData" dummy_data_param { shape { dim: 10 dim: 3 dim: 4 dim: 5 } shape { dim: 10 } }',
     (3, 4, 5), "DummyData shape"),
    ('type: "DummyData" dummy_data_param { num: 10 channels: 2 height: 6 width: 3 num: 10 channels: 1 height: 1 width: 1 }',
     (2, 6, 3), "DummyData channels/height/width"),
    ('type: "WindowData" window_data_param { source: "windows.txt" batch_size: 8 crop_size: 6 }', (3, 6, 6), "crop_size"),
])
def test_data_layer_kinds_give_the_input_shape(tmp_path, layer, shape, how):
    text = (f'layer {{ name: "src" {layer} top: "data" top: "label" }}\n'
            'layer { name: "gap" type: "Pooling" bottom: "data" top: "gap" pooling_param { pool: AVE global_pooling: true } }\n'
            'layer { name: "loss" type: "EuclideanLoss" bottom: "gap" bottom: "label" top: "loss" }\n')
    proto, _ = write_prototxt(tmp_path, "kinds", text)
    model = load_caffe(proto)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert tuple(dims) == shape
    assert [o.name for o in model.graph.output] == ["gap"]
    (note,) = caffe_notes(model)
    assert how in note and "EuclideanLoss" in note
    x = rng(32).standard_normal((2,) + shape)
    assert_close(_forward(model, x)[0], x.mean(axis=(2, 3), keepdims=True), "gap")


def test_channels_from_weights_and_mean_file(tmp_path, monkeypatch):
    r = rng(33)
    w = r.standard_normal((2, 3, 3, 3))  # group 1: 3 input channels
    text = ('layer { name: "d" type: "Data" top: "data" top: "label" transform_param { crop_size: 6 } '
            'data_param { source: "x" batch_size: 4 } }\n'
            'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 bias_term: false } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv" bottom: "label" top: "loss" }\n')
    proto, weights = write_prototxt(tmp_path, "fromweights", text, {"conv": [w]})
    model = load_caffe(proto, weights)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 6, 6]
    assert "the first convolution's weights" in caffe_notes(model)[0]
    x = r.standard_normal((2, 3, 6, 6))
    assert_close(_forward(model, x)[0], ref_conv(x, w), "conv")
    # without weights nothing says the channels: the error asks for --input-shape
    message = _error(load_caffe, proto)
    assert "'d' (Data)" in message and "channels" in message and "input_shape=C,H,W" in message
    # a mean file (C x H x W) beside the prototxt gives channels and, without crop_size, the size
    m = messages()
    mean = m.BlobProto(num=1, channels=2, height=5, width=4)
    mean.data.extend(np.zeros(40).tolist())
    (tmp_path / "mean.binaryproto").write_bytes(mean.SerializeToString())
    text = ('layer { name: "d" type: "Data" top: "data" top: "label" transform_param { mean_file: "mean.binaryproto" } '
            'data_param { source: "x" batch_size: 4 } }\n'
            'layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }\n'
            'layer { name: "acc" type: "Accuracy" bottom: "sig" bottom: "label" top: "acc" }\n')
    proto, _ = write_prototxt(tmp_path, "meanfile", text)
    monkeypatch.chdir(tmp_path.parent)  # found beside the prototxt, not only in the working folder
    model = load_caffe(proto)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [2, 5, 4]
    assert "mean_file mean.binaryproto" in caffe_notes(model)[0]


def test_input_shape_option_and_shapes_that_cannot_be_derived(tmp_path):
    text = ('layer { name: "h5" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "files.txt" batch_size: 4 } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }\n'
            'layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    proto, _ = write_prototxt(tmp_path, "h5", text)
    message = _error(load_caffe, proto)
    assert "'h5' (HDF5Data)" in message and "input_shape=C,H,W" in message
    for spec in ("3,4,5", "1,3,4,5", "3x4x5", (3, 4, 5)):
        model = load_caffe(proto, input_shape=spec)
        assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 4, 5]
    assert "from --input-shape" in caffe_notes(model)[0]
    assert "input_shape=3,a" in _error(load_caffe, proto, input_shape="3,a")
    assert "input_shape=0,4,4" in _error(load_caffe, proto, input_shape="0,4,4")
    # it also replaces the shape of a deploy net's input, which stays a deploy net (no note)
    old = tmp_path / "old.prototxt"
    old.write_text('input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                   'layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }\n')
    model = load_caffe(old, input_shape="3,5,6")
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 5, 6]
    assert caffe_notes(model) == []
    two = tmp_path / "two.prototxt"
    two.write_text('input: "a"\ninput: "b"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                   'input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                   'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }\n')
    assert "2 inputs" in _error(load_caffe, two, input_shape="3,5,6")


def test_phase_stage_and_level_rules_for_test(tmp_path):
    text = """
name: "rules"
state { level: 2 stage: "val" }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "train_only" type: "TanH" bottom: "data" top: "a" include { phase: TRAIN } }
layer { name: "not_test" type: "TanH" bottom: "data" top: "b" exclude { phase: TEST } }
layer { name: "level_ok" type: "AbsVal" bottom: "data" top: "c" include { phase: TEST min_level: 1 max_level: 2 } }
layer { name: "level_low" type: "AbsVal" bottom: "data" top: "d" include { min_level: 3 } }
layer { name: "stage_ok" type: "Sigmoid" bottom: "data" top: "e" include { stage: "val" } }
layer { name: "stage_no" type: "Sigmoid" bottom: "data" top: "f" include { not_stage: "val" } }
layer { name: "either" type: "ELU" bottom: "data" top: "g" include { phase: TRAIN } include { stage: "val" } }
layer { name: "excluded_stage" type: "ELU" bottom: "data" top: "h" exclude { stage: "val" } }
"""
    proto, _ = write_prototxt(tmp_path, "rules", text)
    assert [l.name for l in read_net(proto).layers] == ["data", "level_ok", "stage_ok", "either"]
    model = load_caffe(proto)
    assert [o.name for o in model.graph.output] == ["c", "e", "g"]


def test_label_read_by_a_kept_layer_is_an_error(tmp_path):
    text = ('layer { name: "d" type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 1 channels: 1 height: 2 width: 2 } }\n'
            'layer { name: "use" type: "Sigmoid" bottom: "label" top: "use" }\n')
    proto, _ = write_prototxt(tmp_path, "label", text)
    message = _error(load_caffe, proto)
    assert "'use'" in message and "'label'" in message and "'d'" in message


def test_cli_input_shape_and_one_note(tmp_path, capsys):
    text = ('layer { name: "d" type: "Data" top: "data" top: "label" data_param { source: "x" batch_size: 4 } }\n'
            'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }\n'
            'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 3 } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n'
            'layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }\n')
    proto, _ = write_prototxt(tmp_path, "train", text)
    out = tmp_path / "train.onnx"
    assert main(["convert-caffe", str(proto), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--input-shape" in err and "'d' (Data)" in err
    assert not out.exists()
    assert main(["convert-caffe", str(proto), "-o", str(out), "--input-shape", "1,8,8"]) == 0
    err = capsys.readouterr().err
    assert err.count("cnnvis: note:") == 1 and "dropped 2 layer(s)" in err
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 8, 8]
    x = rng(34).random((2, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["activations", "--model", str(proto), "--input-shape", "1,8,8", "--input-array",
                 str(tmp_path / "x.npy"), "-o", str(tmp_path / "act")]) == 0
    err = capsys.readouterr().err
    assert err.count("cnnvis: note:") == 1 and "opened as a deploy net" in err
    assert main(["activations", "--model", str(out), "--input-shape", "1,8,8", "--input-array",
                 str(tmp_path / "x.npy"), "-o", str(tmp_path / "act2")]) == 2
    err = capsys.readouterr().err
    assert "--input-shape" in err and "only used with a Caffe model" in err


def test_v1_train_net(tmp_path):
    """A V1 ('layers', enum types) training net: DATA with crop_size in data_param (its old
    place), ACCURACY and SOFTMAX_LOSS dropped."""
    text = """
name: "v1"
layers { name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "x" batch_size: 64 crop_size: 6 } transform_param { mean_value: 1 mean_value: 2 }
  include: { phase: TEST } }
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" inner_product_param { num_output: 3 } }
layers { name: "acc" type: ACCURACY bottom: "ip" bottom: "label" top: "acc" include: { phase: TEST } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" }
"""
    r = rng(35)
    w, b = r.standard_normal((3, 72)), r.standard_normal(3)
    from google.protobuf import text_format

    proto, _ = write_prototxt(tmp_path, "v1train", text)
    net = messages().NetParameter()
    text_format.Parse(text, net)
    for layer in net.layers:
        if layer.name == "ip":
            for a in (w, b):
                blob = layer.blobs.add()
                blob.shape.dim.extend(a.shape)
                blob.data.extend(a.ravel().tolist())
    weights = tmp_path / "v1train.caffemodel"
    weights.write_bytes(net.SerializeToString())
    model = load_caffe(proto, weights)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [2, 6, 6]
    assert [o.name for o in model.graph.output] == ["ip"]
    assert "(Accuracy, SoftmaxWithLoss)" in caffe_notes(model)[0]
    x = r.standard_normal((2, 2, 6, 6))
    assert_close(_forward(model, x)[0], x.reshape(2, -1) @ w.T + b, "ip")


def test_label_given_as_an_input_is_left_out(tmp_path):
    """Nets that feed images and labels through Input layers (or input: fields) and end in a loss:
    the label input, read only by the loss, is not an input of the deploy net."""
    text = ('layer { name: "in" type: "Input" top: "data" top: "label" '
            'input_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 } } }\n'
            'layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }\n'
            'layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "sig" bottom: "label" top: "loss" }\n')
    proto, _ = write_prototxt(tmp_path, "input_label", text)
    model = load_caffe(proto)
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["sig"]
    assert "input 'label' (read only by dropped layers) left out" in caffe_notes(model)[0]
    old = tmp_path / "old_label.prototxt"
    old.write_text('input: "data"\ninput_shape { dim: 1 dim: 2 dim: 3 dim: 3 }\ninput: "label"\ninput_shape { dim: 1 }\n'
                   'layer { name: "tanh" type: "TanH" bottom: "data" top: "tanh" }\n'
                   'layer { name: "loss" type: "EuclideanLoss" bottom: "tanh" bottom: "label" top: "loss" }\n')
    model = load_caffe(old, input_shape="2,4,4")
    assert [i.name for i in model.graph.input] == ["data"]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [2, 4, 4]
    x = rng(36).standard_normal((2, 2, 4, 4))
    assert_close(_forward(model, x)[0], np.tanh(x), "tanh")
