"""`cnnvis convert-caffe` and `cnnvis export-caffe` from the command line."""
import json

import numpy as np
import onnx

from cnnvis.cli import main
from cnnvis.onnxgraph import create_session

from test_caffe import ref_conv, write_net

BODY = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def _net(tmp_path):
    r = np.random.default_rng(0)
    blobs = {"conv": [r.standard_normal((2, 1, 3, 3)), r.standard_normal(2)],
             "ip": [r.standard_normal((3, 72)), r.standard_normal(3)]}
    proto, weights = write_net(tmp_path, BODY, (1, 1, 8, 8), blobs, name="tiny")
    return proto, weights, blobs


def test_convert_caffe_writes_a_valid_onnx(tmp_path, capsys):
    proto, weights, blobs = _net(tmp_path)
    out = tmp_path / "out" / "tiny.onnx"
    assert main(["convert-caffe", str(proto), str(weights), "-o", str(out)]) == 0
    assert "tiny.onnx" in capsys.readouterr().out
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    prob = create_session(model, device="cpu").run(None, {"data": x})[0]
    conv = np.maximum(ref_conv(x.astype(np.float64), *blobs["conv"]), 0)
    logits = conv.reshape(2, -1) @ blobs["ip"][0].T + blobs["ip"][1]
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(prob, want / want.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    manifest = json.loads((out.parent / "manifest.json").read_text())
    run = manifest["runs"]["convert-caffe"]
    assert run["files"] == [{"path": "tiny.onnx", "kind": "onnx"}]
    assert run["inputs"] == [str(proto), str(weights)]


def test_convert_caffe_without_weights_and_errors(tmp_path, capsys, monkeypatch):
    proto, _, _ = _net(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["convert-caffe", str(proto), "--seed", "3"]) == 0
    assert (tmp_path / "tiny.onnx").is_file()
    assert "generated weights" in capsys.readouterr().out
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "x" type: "Crop" bottom: "data" top: "x" }\n')
    assert main(["convert-caffe", str(bad), "-o", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err
    assert "convert-caffe: error:" in err and "'x'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.onnx").exists()
    truncated = tmp_path / "cut.caffemodel"
    truncated.write_bytes(b"\x0a\x05ab")
    assert main(["convert-caffe", str(proto), str(truncated), "-o", str(tmp_path / "cut.onnx")]) == 2
    assert "cut.caffemodel" in capsys.readouterr().err


def test_export_caffe_round_trip(tmp_path, capsys):
    proto, weights, _ = _net(tmp_path)
    onnx_path = tmp_path / "tiny.onnx"
    assert main(["convert-caffe", str(proto), str(weights), "-o", str(onnx_path)]) == 0
    out = tmp_path / "caffe"
    assert main(["export-caffe", "--model", str(onnx_path), "--name", "again", "-o", str(out)]) == 0
    capsys.readouterr()
    from cnnvis.caffe import load_caffe

    back = load_caffe(out / "again.prototxt", out / "again.caffemodel")
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    first = create_session(onnx.load(str(onnx_path)), device="cpu").run(None, {"data": x})[0]
    second = create_session(back, device="cpu").run(None, {"data": x})[0]
    np.testing.assert_array_equal(first, second)
    kinds = {f["path"]: f["kind"] for f in json.loads((out / "manifest.json").read_text())["runs"]["export-caffe"]["files"]}
    assert kinds == {"again.prototxt": "prototxt", "again.caffemodel": "caffemodel"}
