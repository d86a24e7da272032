"""`cnnvis gradients` and `cnnvis gradcheck` on a tiny model saved to a temporary .onnx file."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.autodiff import GradientEngine
from cnnvis.cli import main
from cnnvis.onnxgraph import make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_onnx(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["data", "conv1.weight", "conv1.bias"], ["conv1"], name="conv1",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["pool1"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5, name) for name, s in
             (("conv1.weight", (4, 3, 3, 3)), ("conv1.bias", (4,)), ("fc.weight", (5, 4 * 4 * 4)), ("fc.bias", (5,)))]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])], inits)
    path = tmp_path / "tiny.onnx"
    onnx.save(make_model(g), path)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return path, tmp_path / "x.npy", x


def test_gradients_command_writes_npy_hdf5_and_manifest(tiny_onnx, tmp_path):
    model_path, x_path, x = tiny_onnx
    out = tmp_path / "out"
    code = main(["gradients", "--input-array", str(x_path), "--model", str(model_path), "--class", "2",
                 "--wrt", "conv1.weight", "--wrt", "input", "--wrt", "relu1", "--out", str(out)])
    assert code == 0
    w = np.load(out / "conv1.weight.npy")
    assert w.shape == (3, 4, 3, 3, 3)
    expected = GradientEngine(onnx.load(model_path), ["conv1.weight", "data", "relu1"], target="fc").run(x, index=2)
    np.testing.assert_allclose(w, expected["conv1.weight"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.load(out / "input.npy"), expected["data"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.load(out / "relu1.npy"), expected["relu1"], rtol=1e-6, atol=1e-7)
    assert expected["relu1"].shape == (3, 4, 8, 8)
    with h5py.File(out / "gradients.h5", "r") as h5:
        np.testing.assert_array_equal(h5["conv1.weight"][()], w)
        assert list(h5["classes"][()]) == [2, 2, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f["path"]: f for f in manifest["runs"]["gradients"]["files"]}
    assert files["conv1.weight.npy"]["kind"] == "gradient" and files["conv1.weight.npy"]["shape"] == [3, 4, 3, 3, 3]
    # --batch-sum: what Caffe stores
    code = main(["gradients", "--input-array", str(x_path), "--model", str(model_path), "--class", "2",
                 "--wrt", "conv1.weight", "--batch-sum", "--rule", "guided", "--out", str(tmp_path / "sum")])
    assert code == 0
    summed = np.load(tmp_path / "sum" / "conv1.weight.npy")
    guided = GradientEngine(onnx.load(model_path), ["conv1.weight"], target="fc", rule="guided",
                            per_sample=False).run(x, index=2)["conv1.weight"]
    assert summed.shape == (4, 3, 3, 3)
    np.testing.assert_allclose(summed, guided, rtol=1e-6, atol=1e-7)
    assert not np.allclose(guided, w.sum(0), rtol=1e-3)  # the guided rule is not the plain gradient


def test_gradients_bad_input_is_a_one_line_error_and_writes_nothing(tiny_onnx, tmp_path, capsys):
    model_path, x_path, _ = tiny_onnx
    out = tmp_path / "bad"
    code = main(["gradients", "--input-array", str(x_path), "--model", str(model_path), "--class", "2",
                 "--wrt", "conv9.weight", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "conv9" in err
    assert not (out / "manifest.json").exists()
    code = main(["gradients", "--input-array", str(x_path), "--model", str(model_path), "--class", "7",
                 "--out", str(out)])
    assert code == 2 and "[0, 5)" in capsys.readouterr().err


def test_gradcheck_command_passes_and_fails_on_tolerance(tiny_onnx, capsys):
    model_path, x_path, _ = tiny_onnx
    args = ["gradcheck", "--model", str(model_path), "--input-array", str(x_path), "--class", "1",
            "--wrt", "conv1.weight", "--wrt", "input", "--samples", "12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "conv1.weight: 12 entries" in out and "OK" in out
    line = next(line for line in out.splitlines() if "conv1.weight: 12 entries" in line)
    # the rule check (the float64 gradient graph against float64 differences) is float64-tight
    rel = float(line.split("max relative error ")[1].split(";")[0])
    assert rel <= 1e-6
    # the float32 gradient apart: within float32 rounding of the float64 one, no decision flipped
    note = line.split("float32 gradient vs float64 gradient (same rules): relative distance ")[1]
    assert float(note.split(",")[0]) <= 1e-4
    assert note.split(", ")[1].startswith("0 of ")
    assert main(args + ["--tolerance", "1e-12"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_gradcheck_runs_as_a_module_command(tiny_onnx):
    model_path, _, _ = tiny_onnx
    proc = subprocess.run([sys.executable, "-m", "cnnvis", "gradcheck", "--model", str(model_path), "--wrt",
                           "fc.weight", "--samples", "5", "--class", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "fc.weight: 5 entries" in proc.stdout


def test_an_op_without_a_rule_stops_gradient_commands_and_the_named_commands_still_run(tiny_onnx, tmp_path, capsys):
    # Floor has no backward rule: saliency stops with one line naming the node, the op and the
    # commands that need no gradients; those commands then run on the same model
    from cnnvis.autodiff.rules import GRADIENT_FREE_COMMANDS

    path, x_path, _ = tiny_onnx
    model = onnx.load(path)
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    relu.output[0] = "relu1_pre"
    model.graph.node.insert(2, helper.make_node("Floor", ["relu1_pre"], ["relu1"], name="floor1"))
    floor_path = tmp_path / "floor.onnx"
    onnx.save(model, floor_path)
    common = ["--model", str(floor_path), "--input-array", str(x_path)]
    capsys.readouterr()
    assert main(["saliency", *common, "--out", str(tmp_path / "sal")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'floor1' (Floor): no backward rule" in err
    assert ", ".join(GRADIENT_FREE_COMMANDS) in err
    assert not (tmp_path / "sal").exists() or not any((tmp_path / "sal").iterdir())  # nothing written
    for command in ("activations", "occlusion", "invariance"):
        assert command in GRADIENT_FREE_COMMANDS
        out = tmp_path / command
        assert main([command, *common, "--out", str(out)]) == 0, command
        assert json.loads((out / "manifest.json").read_text())


def test_gradcheck_command_reports_kinks_on_a_zero_background(tmp_path, capsys):
    # an MNIST-like net on a digit with an exactly zero background: max-pool ties are reported and
    # excluded, and the check passes (it used to print a bare FAILED)
    from test_autodiff_gradcheck import digit, mnist_like_net

    path = tmp_path / "mnistlike.onnx"
    onnx.save(mnist_like_net(), path)
    np.save(tmp_path / "digit.npy", digit().astype(np.float32))
    capsys.readouterr()
    assert main(["gradcheck", "--model", str(path), "--input-array", str(tmp_path / "digit.npy"), "--class", "3",
                 "--wrt", "input", "--samples", "20"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "input: 20 entries" in line)
    assert "sampled entries sit on a kink (a tie or bound under the finite difference); excluded" in line
    assert "OK" in out


def test_gradcheck_lists_the_ops_with_rules(capsys):
    from cnnvis.autodiff.rules import markdown_table

    assert main(["gradcheck", "--list-ops"]) == 0
    assert capsys.readouterr().out == markdown_table()


def test_gradcheck_command_on_a_float32_decision_flip_passes_with_a_precision_note(tmp_path, capsys, monkeypatch):
    # float32 rounds a Relu input to 0 where float64 keeps it positive: the rules are right (the
    # float64 gradient graph matches the differences), the float32 distance is a note; a wrong rule
    # still exits 1
    from test_autodiff_gradcheck import break_rule, flip_input, flipping_net

    path = tmp_path / "flip.onnx"
    onnx.save(flipping_net(), path)
    np.save(tmp_path / "x.npy", flip_input())
    args = ["gradcheck", "--model", str(path), "--input-array", str(tmp_path / "x.npy"), "--class", "0", "--samples", "3"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "relative distance 0.00596, 1 of 3 forward decisions (Relu signs, pool switches, bounds) differ" in out
    assert "OK" in out
    break_rule(monkeypatch, "MatMul")
    assert main(args + ["--tolerance", "1e-4"]) == 1
    assert "FAILED: input: relative error" in capsys.readouterr().err


def test_gradient_commands_run_a_batch_one_dynamo_as_strided_file(tmp_path, capsys):
    """A file with its batch fixed at 1 and a dynamo as_strided (Reshape [-1] -> Gather of constant
    indices): `gradients` on 3 images writes per-image input and conv-weight gradients equal to the
    float64 central differences of the unmodified file (test_autodiff_ops' reference, to 1e-3), and
    `gradcheck` passes; the file with a Transpose before the flatten (indices mixing images) stops
    in one line and writes nothing."""
    from test_autodiff_ops import _as_strided_net, _central_differences

    x = np.random.default_rng(6).standard_normal((3, 3, 3, 3))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "x1.npy", x[:1].astype(np.float32))
    onnx.save(_as_strided_net(np.float32), tmp_path / "strided.onnx")
    out = tmp_path / "out"
    assert main(["gradients", "--input-array", str(tmp_path / "x.npy"), "--model", str(tmp_path / "strided.onnx"),
                 "--class", "1", "--wrt", "input", "--wrt", "w", "--out", str(out)]) == 0
    want = _central_differences(_as_strided_net(np.float64), x, ["x", "w"], 1)
    for name, file in (("x", "input.npy"), ("w", "w.npy")):
        got = np.load(out / file)
        assert got.shape == want[name].shape
        assert np.max(np.abs(got - want[name])) <= 1e-3 * np.max(np.abs(want[name]))
    assert main(["gradcheck", "--input-array", str(tmp_path / "x1.npy"), "--model", str(tmp_path / "strided.onnx"),
                 "--wrt", "input", "--wrt", "w"]) == 0
    capsys.readouterr()
    onnx.save(_as_strided_net(np.float32, batch_first=False), tmp_path / "mixed.onnx")
    bad = tmp_path / "bad"
    code = main(["gradients", "--input-array", str(tmp_path / "x.npy"), "--model", str(tmp_path / "mixed.onnx"),
                 "--out", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.endswith("node 'p_node' (Gather): Gather along the batch axis cannot be differentiated per sample")
    assert not bad.exists() or not any(bad.rglob("*.npy"))
