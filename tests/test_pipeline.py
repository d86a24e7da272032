"""`cnnvis run-all` on the embedded demo model: every analysis end to end, then the report."""
import json

import pytest

from cnnvis.cli import main
from cnnvis.cli import pipeline


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runall") / "out"
    code = main(["run-all", "--out", str(out)])
    return code, out


def test_run_all_runs_every_step_and_writes_the_report(full_run, capsys):
    code, out = full_run
    assert code == 0
    manifests = sorted(out.rglob("manifest.json"))
    commands = set()
    for m in manifests:
        for record in json.loads(m.read_text())["runs"].values():
            commands.add(record["command"])
            for f in record["files"]:
                assert (m.parent / f["path"]).is_file(), f["path"]
    assert {"activations", "filters", "volume", "order", "render", "conv-gradients", "compare-classes",
            "deconv", "topk", "occlusion", "invariance", "maximize", "saliency", "evolution"} <= commands
    html = (out / "index.html").read_text()
    assert "fashion_caffenet" in html and "compare-classes" in html
    # compare-classes on the demo defaults: the Shirt neuron, one group per similar/dissimilar class
    summary = json.loads((out / "compare_classes" / "summary.json").read_text())
    assert "Shirt" in json.dumps(summary)


def test_a_failing_step_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    real_plan = pipeline.plan

    def plan_with_a_broken_step(model, model_args, images, out):
        steps = real_plan(model, model_args, images, out)[:2]
        return [("broken", ["layers", "--model", "/no/such/model.onnx"])] + steps

    monkeypatch.setattr(pipeline, "plan", plan_with_a_broken_step)
    code = main(["run-all", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "1 step(s) failed: broken" in err
    assert (tmp_path / "o" / "activations" / "manifest.json").is_file()
    assert (tmp_path / "o" / "index.html").is_file()


def test_ctrl_c_stops_the_whole_run(tmp_path, monkeypatch, capsys):
    import cnnvis.cli as cli

    calls = []
    real = cli.main

    def interrupted(argv=None):
        calls.append(argv[0] if argv else None)
        return 130 if argv and argv[0] != "run-all" else real(argv)

    monkeypatch.setattr(cli, "main", interrupted)
    code = real(["run-all", "--out", str(tmp_path / "o")])
    assert code == 130 and len(calls) == 1  # the first step was interrupted: no further step, no report
    assert "interrupted during" in capsys.readouterr().err and not (tmp_path / "o" / "index.html").exists()


def test_unknown_step_is_one_line(capsys):
    assert main(["run-all", "--only", "nonsense", "--out", "unused"]) == 2
    assert "unknown step(s) nonsense" in capsys.readouterr().err


def test_without_gl_libraries_render_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    from cnnvis.export import render

    monkeypatch.setattr(render, "gl_problem", lambda show=False: "off-screen 3D rendering needs libEGL.so.1")
    code = main(["run-all", "--only", "filters", "render", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0 and "skipping render: off-screen 3D rendering needs libEGL.so.1" in err
    assert (tmp_path / "o" / "filters" / "manifest.json").is_file()
    assert not (tmp_path / "o" / "render").exists()


def test_steps_share_one_loaded_model(tmp_path, monkeypatch):
    from cnnvis import registry

    loads = []
    real_load = registry.load

    def counting_load(*a, **k):
        loads.append(a[0] if a else k.get("spec"))
        return real_load(*a, **k)

    monkeypatch.setattr(registry, "load", counting_load)
    assert main(["run-all", "--only", "activations", "volume", "--out", str(tmp_path / "o")]) == 0
    assert len(loads) == 1  # run-all's own load serves both steps (a Caffe model is converted once)
    loads.clear()
    assert main(["layers"]) == 0 and len(loads) == 1  # outside run-all nothing is shared
