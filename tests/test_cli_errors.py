"""Library errors name parameters (``method='x'``); the CLI prints its flags (``--method 'x'``)."""
import argparse
import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis import CnnvisError
from cnnvis.cli import flag_message, main
from cnnvis.onnxgraph import make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Conv (4 maps, 3×3, pad 1) → ReLU → global pool → Flatten 'flat' → Softmax on 1×8×8 inputs."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["data", "w", "b"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["relu1"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("Softmax", ["flat"], ["prob"], name="prob", axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")])
    path = folder / "tiny.onnx"
    onnx.save(make_model(graph), path)
    x = folder / "x.npy"
    np.save(x, rng.normal(size=(2, 1, 8, 8)).astype(np.float32))
    return str(path), str(x), folder


def _flag_strings(node):
    """String pieces of ``node`` that name a CLI flag (``--word``)."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and any(part[:1].isalpha() for part in n.value.split("--")[1:])]


def test_library_messages_name_no_cli_flags():
    """No CnnvisError raised in the library below the CLI (analysis/, export/, autodiff/, caffe/,
    the catalog, downloads, output folders, datasets, Dask scale, the model, sessions, preprocessing,
    limits) spells a flag; those naming a
    parameter list it in ``params`` so the CLI can print its flag."""
    package = ROOT / "cnnvis"
    files = sorted(f for folder in ("analysis", "export", "autodiff", "caffe") for f in (package / folder).glob("*.py"))
    files += [package / f"{m}.py" for m in ("registry", "download", "manifest", "datasets", "scale", "model", "onnxgraph",
                                             "preprocess", "limits", "ops", "nets", "training", "demo")]
    offenders, named = [], 0
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "CnnvisError":
                offenders += [f"{path.name}:{node.lineno}: {s!r}" for s in _flag_strings(node)]
                named += any(k.arg == "params" for k in node.keywords)
            elif isinstance(node, ast.FunctionDef) and node.name == "gl_problem":
                offenders += [f"{path.name}:{node.lineno}: {s!r}" for s in _flag_strings(node)]
    assert offenders == []
    assert named >= 45  # the messages that used to spell --k, --method, --layer, --weights, --out, ...


def _parser():
    parser = argparse.ArgumentParser(prog="t")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("cmd")
    p.add_argument("--layer", "-l")
    p.add_argument("--norm-bound", type=float)
    p.add_argument("--show", action="store_true")
    p.add_argument("--class", dest="target")
    return parser


@pytest.mark.parametrize("message, params, printed", [
    ("method='x': expected one of a, b", ("method",), "method='x': expected one of a, b"),  # no such flag
    ("layer='fc': needs maps (use layer=...)", ("layer",), "--layer 'fc': needs maps (use --layer ...)"),
    ("norm_bound=-1.0: expected a positive number", ("norm_bound",), "--norm-bound -1.0: expected a positive number"),
    ("show=True needs a display", ("show",), "--show needs a display"),
    ("target=3, layer='c': bad", ("target", "layer"), "--class 3, --layer 'c': bad"),
    ("sublayer='c' and layer='d'", ("layer",), "sublayer='c' and --layer 'd'"),  # whole names only
    ("layer='c': not listed in params", (), "layer='c': not listed in params"),
])
def test_flag_message_maps_parameters_to_the_commands_flags(message, params, printed):
    assert flag_message(CnnvisError(message, params=params), _parser(), "cmd") == printed


def test_params_is_a_tuple_and_the_message_one_line():
    import pickle

    err = CnnvisError("method='x':\n  expected", params="method")
    assert err.params == ("method",) and str(err) == "method='x': expected"
    assert CnnvisError("plain").params == ()
    back = pickle.loads(pickle.dumps(err))  # as from a worker process
    assert str(back) == str(err) and back.params == ("method",)


def _library_message(call):
    with pytest.raises(CnnvisError) as err:
        call()
    assert "--" not in str(err.value)
    return str(err.value)


def _cli_error(argv, capsys, tmp_path):
    code = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    return err


def test_both_sides_of_each_reachable_message(tiny, tmp_path, capsys):
    """The same mistake through the library (parameter names) and through the CLI (flags)."""
    from cnnvis.analysis import activations, maximize, occlusion, saliency
    from cnnvis.export import figures
    from cnnvis import load_model

    model_path, x_path, _ = tiny
    model = load_model(model_path)
    x = np.load(x_path)
    m = ["--model", model_path, "--input-array", x_path]

    lib = _library_message(lambda: occlusion.Occlusion(model, window=(9, 9), stride=(1, 1)).run(x[:1]))
    assert lib == "window=(9, 9): larger than the 8x8 input"
    assert "error: --window (9, 9): larger than the 8x8 input" in _cli_error(
        ["occlusion", *m, "--window", "9"], capsys, tmp_path)

    lib = _library_message(lambda: saliency.Saliency(model, method="gradcam", layer="flat").run(x))
    assert lib.startswith("layer='flat': Grad-CAM needs a layer with C×H×W maps")  # (the CLI checks first)

    lib = _library_message(lambda: maximize.ActivationMaximization(model, layer="flat", steps=1).run(None, target=[0]))
    assert lib.startswith("layer='flat': outputs") and lib.endswith("(use objective='logit' for class neurons)")
    err = _cli_error(["maximize", "--model", model_path, "--layer", "flat", "--steps", "1"], capsys, tmp_path)
    assert "error: --layer 'flat': outputs" in err and "(use --objective 'logit' for class neurons)" in err

    lib = _library_message(lambda: maximize.ActivationMaximization(model, norm_bound=-1.0).run(None, target=[0]))
    assert lib == "norm_bound=-1.0: expected a positive number"  # (the CLI's checked option type refuses it first)
    assert "error: argument --norm-bound: expected a finite number > 0, got '-1'" in _cli_error(
        ["maximize", "--model", model_path, "--norm-bound", "-1"], capsys, tmp_path)

    lib = _library_message(lambda: activations.Activations(model, ["conv1"]).run(x, target=3))
    assert lib == "target=3: activations are of the layers given as layers=..."  # (no command passes a target)

    lib = _library_message(lambda: figures.colorize(np.zeros((2, 2)), cmap="no-such-map"))
    assert lib == "cmap='no-such-map': not a matplotlib colormap"
    assert "error: --cmap 'no-such-map': not a matplotlib colormap" in _cli_error(
        ["activations", *m, "--cmap", "no-such-map"], capsys, tmp_path)


def test_render_show_without_a_display_names_the_flag(tiny, tmp_path, capsys, monkeypatch):
    from cnnvis.export import render

    monkeypatch.delenv("DISPLAY", raising=False)
    assert _library_message(lambda: render.check_gl(show=True)).startswith("show=True needs a display")
    model_path, x_path, _ = tiny
    err = _cli_error(["render", "--model", model_path, "--input-array", x_path, "--show"], capsys, tmp_path)
    assert "error: --show needs a display (DISPLAY is unset" in err


def test_catalog_and_output_messages_print_the_commands_flags(tiny, tmp_path, capsys):
    """registry / manifest messages name weights= and out=; through the CLI they read --weights, --out."""
    from cnnvis import registry
    from cnnvis.manifest import ensure_writable_dir

    model_path, x_path, _ = tiny
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub"
    lib = _library_message(lambda: ensure_writable_dir(out))
    assert lib == f"out={out}: cannot write there ({blocker} is a file, not a folder)"
    code = main(["activations", "--model", model_path, "--input-array", x_path, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"cnnvis activations: error: --out {out}: cannot write there ({blocker} is a file, not a folder)\n"

    missing = tmp_path / "nope.caffemodel"
    lib = _library_message(lambda: registry.resolve(model_path, weights=missing))
    assert lib == f"weights={missing}: no such file"
    err = _cli_error(["activations", "--model", model_path, "--weights", str(missing), "--input-array", x_path],
                     capsys, tmp_path)
    assert f"error: --weights {missing}: no such file" in err
