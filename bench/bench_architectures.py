#!/usr/bin/env python3
"""Real full-size torchvision (and timm) classifiers through cnnvis: correctness matrix and speed.

``matrix``: per architecture, the full-size torchvision classifier is built with seeded random
weights (BatchNorm statistics from one seeded random batch, so activations keep a realistic
range), exported by ``torch.onnx.export`` with the default (dynamo) exporter at opset 18 and the
TorchScript one at opset 17 (dynamic batch axis: the exported graphs compute shapes at run time
as users' files do), then checked:

- forward: cnnvis's ``Model.run`` on the .onnx against PyTorch, ``max |cnnvis - torch| / max |torch|``
  over the logits (tolerance 1e-4) and the same top-1;
- every analysis command as ``python -m cnnvis`` in a child process of its own (layers, activations, filters,
  volume, order, conv-gradients, compare-classes, deconv, topk, occlusion, invariance, maximize with
  3 steps, saliency, gradients, gradcheck): exit code 0 and every written .npy/.json/.csv finite
  (top-k projections may hold NaN: it marks pixels outside the image); a failure is kept as its
  first line (the CnnvisError message, or the exception and the cnnvis frame that raised it);
- input gradients: d logit[predicted class] / d input from cnnvis's gradient engine against PyTorch
  autograd in float64 (the reference; each normalization's eps and the Hardsigmoid/Hardswish slope
  1/6 rounded to float32, the values the ONNX file stores), ``max |got - ref| / max |ref|`` per image,
  worst image:
  cnnvis's float32 engine on the file (onnxruntime; tolerance 1e-4), with PyTorch's own float32
  gradient against the same reference beside it as the float32 noise floor; and cnnvis's gradient
  graph run in float64 by onnx's reference evaluator (tolerance 1e-5) on a second export of the same
  model without folding (``export(fold=False)``), which holds PyTorch's weights unchanged and so
  computes PyTorch's function: like with like, this checks the backward rules themselves. The same
  float64 run on the file itself is reported beside it: the exporters fold BatchNormalization into
  the Conv weights in float32, which makes the file a slightly different function (efficientnet_b0:
  1.1e-5 against PyTorch float64, 5e-14 without folding).
  Kinks: a Relu/Clip/max-pool... decision that a forward takes differently from PyTorch float64 (a
  unit within ~1e-6 of its bound) makes its gradient the exact gradient of a function that differs
  there, by up to percents on deep networks (densenet121: one ReLU input of one image is -3.9e-7 in
  PyTorch float64, +1.1e-6 in the folded file, +2.7e-6 in PyTorch float32: 3.2e-3 on that image).
  The decisions (``cnnvis.autodiff.gradcheck``'s kink points) of the file's float32 forward and of
  the folded file's float64 forward are compared per image with those of the float64 forward of
  the export without folding; a cell names the images that differ ("kink") and judges the tolerance
  on the other images.

Results are merged into ``--results`` (JSON) so architectures can run one per process; ``table``
prints the table of everything recorded there.

``speed``: input gradients (saliency) of full-size ResNet-50 at 224×224, batch 16: cnnvis's
gradient engine against PyTorch eager autograd, and cnnvis's forward with every layer tapped
against the untapped forward, in interleaved rounds (``peers.interleaved_medians``); prints the
median ratios (targets: gradients at least as fast as PyTorch eager; taps within 10%).

PyTorch, torchvision, timm and onnxscript are the ``bench`` extra (``pip install -e ".[bench]"``),
never a runtime or test dependency.

    python bench/bench_architectures.py matrix --arch resnet18 --threads 1
    python bench/bench_architectures.py table
    python bench/bench_architectures.py speed --rounds 7
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORWARD_TOL = 1e-4   # max |cnnvis - torch| / max |torch| over the logits
GRADIENT_TOL = 1e-4  # per image max |cnnvis - torch float64| / max |torch float64|, worst image
# cnnvis's gradient graph run in float64 (onnx's reference evaluator, as gradcheck runs it) on the
# export without folding, against PyTorch float64 with each eps and HardSigmoid/HardSwish alpha as the
# file stores them (mobilenet_v3_small: 6.7e-7 with PyTorch's exact 1/6, 7e-15 with it): one function
# with the same float32 weights, so only the float64 rounding of two op orders separates them
# (measured: 2e-15 on densenet121, 5e-14 on efficientnet_b0). The folded file is reported beside it:
# BatchNormalization folded into Conv in float32 makes it a function about 1e-7 relative per weight
# away (1.1e-5 on efficientnet_b0's input gradients; on densenet121 a ReLU input 4e-7 from zero
# changes side)
GRADIENT64_TOL = 1e-5

# name -> (torchvision constructor keyword arguments, smallest input side the bench uses)
TORCHVISION = {
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "mobilenet_v3_large": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "densenet121": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 96),  # 75 is its smallest input
    "shufflenet_v2_x1_0": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "convnext_tiny": ({}, 64),
}
DEFAULT_ARCHS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                 "googlenet", "shufflenet_v2_x1_0", "squeezenet1_1", "convnext_tiny"]
EXPORTERS = {"dynamo": 18, "torchscript": 17}  # exporter -> opset


# ------------------------------------------------------------------ PyTorch side

def import_torchvision():
    """torchvision, also when its compiled ops do not load (the PyPI wheel of torchvision 0.28 is a
    CUDA build; with the CPU torch its ``_C`` library fails to load and ``_meta_registrations``
    then stops at ``register_fake("torchvision::nms")``). The classifiers need none of those
    detection ops: their two schemas are declared so that the import goes through."""
    import torch

    try:
        import torchvision
        return torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.keep = lib  # the definitions live as long as the Library object
    import torchvision
    return torchvision


def build_torch_model(name: str, seed: int, size: int):
    """The full-size classifier ``name`` (torchvision, or ``timm:<name>``) with seeded random weights
    and BatchNorm running statistics taken from one seeded random batch, in eval mode."""
    import torch

    torch.manual_seed(seed)
    if name.startswith("timm:"):
        import_torchvision()
        import timm
        model = timm.create_model(name[5:], pretrained=False)
    else:
        tv = import_torchvision()
        model = getattr(tv.models, name)(weights=None, **TORCHVISION[name][0])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of exactly this batch
        model.train()
        with torch.no_grad():
            model(torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((8, 3, size, size),
                                                                                  dtype=np.float32)))
    return model.eval()


def export(model, x, exporter: str, path: Path, dynamic: bool = True, fold: bool = True) -> str | None:
    """Write ``model`` as ONNX with ``exporter`` (``dynamic``: a dynamic batch axis); return None, or the
    first line of its failure.

    ``fold=False``: an export that keeps PyTorch's weights as they are. Both exporters by default fold
    each BatchNormalization that follows a Conv into the Conv's weights and bias, computed in float32
    (the TorchScript exporter's eval peephole under ``do_constant_folding``; the onnxscript optimizer's
    BatchNormalization fusion after a dynamo export), so the file computes a function a few 1e-8
    relative per weight away from PyTorch's. Without folding: TorchScript with
    ``do_constant_folding=False``; dynamo with ``optimize=False`` and then only onnxscript's constant
    folding (which evaluates the exporter's shape/cast chains and fuses nothing)."""
    import logging

    import torch

    opset = EXPORTERS[exporter]
    example = (torch.from_numpy(x),)
    quiet = logging.getLogger("torch")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the dynamo exporter logs whole tracebacks of guards it retries
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if exporter == "dynamo":
                shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
                if fold:
                    torch.onnx.export(model, example, str(path), dynamo=True, opset_version=opset,
                                      input_names=["input"], output_names=["logits"],
                                      dynamic_shapes=shapes, external_data=False)
                else:
                    import onnxscript.optimizer

                    program = torch.onnx.export(model, example, dynamo=True, opset_version=opset,
                                                input_names=["input"], output_names=["logits"],
                                                dynamic_shapes=shapes, optimize=False)
                    onnxscript.optimizer.fold_constants(program.model)
                    onnxscript.optimizer.remove_unused_nodes(program.model)
                    program.save(str(path), external_data=False)
            else:
                axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
                torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"], dynamic_axes=axes,
                                  do_constant_folding=fold)
    except Exception as exc:  # noqa: BLE001 - the bench records any exporter failure
        return first_line(exc).replace("\x1b[96m", "").replace("\x1b[0m", "")
    finally:
        quiet.setLevel(level)
    return None


def eps_as_stored(model) -> None:
    """Round every module's ``eps`` (BatchNorm, LayerNorm, GroupNorm...) to float32 in place: ONNX
    stores a normalization's epsilon as a float32 attribute, so this is the function the file computes.
    PyTorch float64 otherwise adds 1e-5 where the file adds 9.99999974738e-06; on channels whose
    running variance is near 1e-5 (efficientnet_b0 with these weights: down to 4.6e-6) that alone
    moves float64 input gradients by 3e-8 relative. float32 computations are unchanged."""
    for m in model.modules():
        if isinstance(getattr(m, "eps", None), float):
            m.eps = float(np.float32(m.eps))


@contextlib.contextmanager
def hard_activations_as_stored(model):
    """Within the block, every ``Hardsigmoid``/``Hardswish`` module of ``model`` computes
    ``clamp(alpha x + 1/2, 0, 1)`` (times x) with alpha = float32(1/6), the function the ONNX file
    computes: both exporters write HardSigmoid with the float32 attribute alpha = 0.16666667, and
    ONNX's HardSwish is a HardSigmoid with that attribute. PyTorch computes relu6(x + 3) / 6 (exactly
    1/6 in float64): the ramp's slope differs by 3e-8 relative, which alone moves mobilenet_v3_small's
    float64 input gradients by 6.7e-7. The modules are restored on exit (exports keep PyTorch's ops)."""
    import torch

    alpha = float(np.float32(1.0 / 6.0))

    class StoredHardsigmoid(torch.nn.Module):
        def forward(self, v):
            return torch.clamp(v * alpha + 0.5, 0.0, 1.0)

    class StoredHardswish(torch.nn.Module):
        def forward(self, v):
            return v * torch.clamp(v * alpha + 0.5, 0.0, 1.0)

    swapped = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            new = (StoredHardsigmoid() if isinstance(child, torch.nn.Hardsigmoid)
                   else StoredHardswish() if isinstance(child, torch.nn.Hardswish) else None)
            if new is not None:
                swapped.append((parent, name, child))
                setattr(parent, name, new)
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def torch_input_gradients(model, x, classes, dtype):
    """d logit[classes[i]] / d x[i] by PyTorch autograd in ``dtype`` (the model is converted in place)."""
    import torch

    model.to(dtype)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype).requires_grad_(True)
    logits = model(xt)
    picked = logits[torch.arange(len(x)), torch.as_tensor(classes)]
    (g,) = torch.autograd.grad(picked.sum(), xt)
    model.to(torch.float32)
    return g.detach().numpy().astype(np.float64)


# ------------------------------------------------------------------ cnnvis side

def first_line(exc: BaseException) -> str:
    """``Type: message`` (first line) and, for a bug, the innermost cnnvis frame that raised it."""
    text = str(exc).strip().splitlines()
    where = ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}cnnvis{os.sep}" in f.filename]
    if frames:
        f = frames[-1]
        where = f" [{f.filename.split(os.sep + 'cnnvis' + os.sep, 1)[-1]}:{f.lineno} {f.name}]"
    return f"{type(exc).__name__}: {text[0] if text else ''}{where}"


def non_finite_output(folder: Path, nan_allowed: bool) -> str | None:
    """The first written file with a non-finite number (.npy arrays; numbers in .json/.csv, which
    Python writes as NaN/Infinity/nan/inf), or None. ``nan_allowed``: NaN may mark missing values."""
    for f in sorted(folder.rglob("*.npy")):
        arr = np.load(f, allow_pickle=False)
        if np.issubdtype(arr.dtype, np.floating):
            bad = np.isinf(arr).any() if nan_allowed else not np.isfinite(arr).all()
            if bad or (nan_allowed and arr.size and not np.isfinite(arr).any()):
                return f"{f.relative_to(folder)}: non-finite values"
    pattern = r"\b(-?Infinity|-?inf)\b" if nan_allowed else r"\b(-?Infinity|-?inf|NaN|nan)\b"
    for f in sorted(folder.rglob("*.json")) + sorted(folder.rglob("*.csv")):
        if re.search(pattern, f.read_text()):
            return f"{f.relative_to(folder)}: non-finite number"
    return None


def child_failure(code: int, stderr: str) -> str:
    """The first line of a failed ``python -m cnnvis`` child: for a bug (a traceback), ``Type: message``
    and the innermost cnnvis frame that raised it, as :func:`first_line` words it; else
    ``exit <code>: <the line saying error>``."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if "Traceback (most recent call last):" in stderr:
        tb = stderr[stderr.rindex("Traceback (most recent call last):"):]
        last = next((ln for ln in reversed(tb.splitlines()) if ln.strip() and not ln.startswith(" ")), "")
        kind, _, message = last.partition(":")
        where = ""
        frames = [f for f in re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb) if f"{os.sep}cnnvis{os.sep}" in f[0]]
        if frames:
            path, line, func = frames[-1]
            where = f" [{path.split(os.sep + 'cnnvis' + os.sep, 1)[-1]}:{line} {func}]"
        return f"{kind.rsplit('.', 1)[-1]}: {message.strip()}{where}"
    message = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "")
    return f"exit {code}: {message}"


def run_command(argv, out: Path | None) -> dict:
    """One ``cnnvis`` command, as a user runs it: ``python -m cnnvis`` in a child process (this
    checkout's cnnvis); {"ok", "seconds", "error"}. ``out``: its --out folder (None for the commands
    that write nothing: layers, gradcheck). A child of its own so that a command's memory is its own:
    in the bench's process it would add to PyTorch, the exports and the bench's session, and to the
    heap the earlier commands leave behind (convnext_tiny: 14 commands grow the address space from
    0.7 to 4.1 GB before gradcheck; with the bench's own, gradcheck ran out of a 10 GB ``ulimit -v``)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "cnnvis", *argv, *(["--out", str(out)] if out is not None else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"ok": False, "seconds": seconds, "error": child_failure(proc.returncode, proc.stderr)}
    if out is not None:
        bad = non_finite_output(out, nan_allowed=argv[0] == "topk")
        if bad:
            return {"ok": False, "seconds": seconds, "error": bad}
    return {"ok": True, "seconds": seconds, "error": None}


def forward_decisions(proto, x, float64: bool, threads=None) -> list:
    """The forward's decisions at its non-differentiable points (Relu/Clip/HardSwish... sides, max-pool
    switches, Max/Min winners: ``cnnvis.autodiff.gradcheck._decision_outputs``, the points gradcheck
    calls kinks), one array per point with the images on axis 0: ``float64`` in float64 by onnx's
    reference evaluator, else in the file's float32 by onnxruntime (as cnnvis's float32 engine runs)."""
    import onnx

    from cnnvis.autodiff.backend import Runner
    from cnnvis.autodiff.gradcheck import _decision_outputs, to_float64
    from cnnvis.autodiff.graph import prepare_forward
    from cnnvis.onnxgraph import real_inputs

    m = onnx.ModelProto()
    m.CopyFrom(to_float64(prepare_forward(proto)) if float64 else prepare_forward(proto))
    image = real_inputs(m)[0].name
    dtype = np.float64 if float64 else np.float32
    names = _decision_outputs(m, [image], dtype)
    if not names:
        return []
    res = Runner(m, backend="reference" if float64 else "onnxruntime", threads=threads)({image: x.astype(dtype)}, names)
    return [np.asarray(res[n]) for n in names]


def decisions_differ(a: list, b: list) -> list | None:
    """Per image, how many decisions differ between two forwards' :func:`forward_decisions` (of the
    same file, or of a folded and an unfolded export of one model: folding removes no decision point);
    None when the two lists do not pair up point by point."""
    if len(a) != len(b) or any(u.shape != v.shape for u, v in zip(a, b)):
        return None
    n = a[0].shape[0] if a else 0
    return [int(sum(np.count_nonzero(u[i] != v[i]) for u, v in zip(a, b))) for i in range(n)]


def per_image_errors(got, ref) -> list:
    """``relative_error`` (max |got - ref| / max |ref|) of each image."""
    from peers import relative_error

    return [relative_error(got[i:i + 1], ref[i:i + 1]) for i in range(len(ref))]


COMMANDS = ("layers", "activations", "filters", "volume", "order", "conv-gradients", "compare-classes", "deconv", "topk",
            "occlusion", "invariance", "maximize", "saliency", "gradients", "gradcheck")


def command_lines(model, path: Path, arrays: dict, threads: int, size: int) -> dict:
    """Every analysis command on the exported file, as a user would type it."""
    m = ["--model", str(path), "--device", "cpu", "--threads", str(threads)]
    convs = model.conv_layers()
    first, last = convs[0].name, convs[-1].name
    x, one = str(arrays["x"]), str(arrays["one"])
    window = str(max(4, size // 4))
    return {
        "layers": ["layers", "--model", str(path), "--json"],
        "activations": ["activations", *m, "--input-array", x],
        "filters": ["filters", *m, "--layer", first],
        "volume": ["volume", *m, "--input-array", x, "--layer", first],
        "order": ["order", *m, "--input-array", x, "--layer", first, "--method", "pca-maps"],
        "conv-gradients": ["conv-gradients", *m, "--input-array", x, "--layer", first],
        "compare-classes": ["compare-classes", *m, "--layer", first, "--neuron", "0", "--reference", str(arrays["a"]),
                            "--similar", str(arrays["b"]), "--dissimilar", str(arrays["c"]), "--permutations", "99",
                            "--no-progress"],
        "deconv": ["deconv", *m, "--input-array", x, "--layer", last],
        "topk": ["topk", *m, "--input-array", x, "--layer", last, "--restart"],
        "occlusion": ["occlusion", *m, "--input-array", one, "--window", window, "--stride", window],
        "invariance": ["invariance", *m, "--input-array", one],
        "maximize": ["maximize", *m, "--layer", last, "--channels", "2", "--steps", "3"],
        "saliency": ["saliency", *m, "--input-array", x],
        "gradients": ["gradients", *m, "--input-array", x, "--wrt", "input", "--wrt", f"{first}.weight"],
        "gradcheck": ["gradcheck", *m, "--input-array", one, "--wrt", "input", "--wrt", f"{first}.weight",
                      "--samples", "12"],
    }


def check_architecture(name: str, exporter: str, args, work: Path) -> dict:
    import torch

    from cnnvis.autodiff import GradientEngine
    from cnnvis.autodiff.gradcheck import to_float64
    from cnnvis.model import Model
    from cnnvis.onnxgraph import real_inputs
    from peers import relative_error

    size = args.size or (TORCHVISION[name][1] if name in TORCHVISION else 64)
    row = {"architecture": name, "exporter": exporter, "opset": EXPORTERS[exporter], "input": [3, size, size],
           "export_error": None, "forward_error": None, "top1_equal": None, "commands": {},
           "gradient_error": None, "torch_float32_gradient_error": None, "gradient64_error": None}
    folder = work / re.sub(r"[^A-Za-z0-9_.-]", "_", name) / exporter
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((2, 3, size, size), dtype=np.float32)
    tmodel = build_torch_model(name, args.seed, size)
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.onnx"
    t0 = time.perf_counter()
    row["export_error"] = export(tmodel, x[:1], exporter, path)
    row["batch_axis"] = "dynamic"
    if row["export_error"]:  # recorded; then the export users fall back to: a fixed batch of one
        row["dynamic_export_error"] = row["export_error"]
        row["export_error"] = export(tmodel, x[:1], exporter, path, dynamic=False)
        row["batch_axis"] = "fixed 1"
    row["export_seconds"] = round(time.perf_counter() - t0, 1)
    if row["export_error"]:
        return row
    try:
        model = Model.from_file(path, device="cpu", threads=args.threads)
    except Exception as exc:  # noqa: BLE001
        row["load_error"] = first_line(exc)
        return row
    row["ops"] = sorted({n.op_type for n in model.native_proto.graph.node})
    row["layers"] = len(model.layers)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x)).numpy()
    try:
        got = model.run(x)[model.output_name]
    except Exception as exc:  # noqa: BLE001
        row["forward_failure"] = first_line(exc)
        return row
    row["forward_error"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    row["top1_equal"] = bool((got.argmax(1) == ref.argmax(1)).all())

    arrays = {"x": folder / "x.npy", "one": folder / "x1.npy", "a": folder / "a.npy", "b": folder / "b.npy",
              "c": folder / "c.npy"}
    np.save(arrays["x"], x)
    np.save(arrays["one"], x[:1])
    for key, k in zip("abc", range(3)):
        np.save(arrays[key], rng.standard_normal((2, 3, size, size), dtype=np.float32) * (1 + 0.5 * k))
    for cmd, argv in command_lines(model, path, arrays, args.threads, size).items():
        if args.commands is not None and cmd not in args.commands:
            continue
        print(f"  {name} [{exporter}] {cmd} ...", end="", flush=True)
        out = None if cmd in ("layers", "gradcheck") else folder / "out" / cmd
        if out is not None and out.exists():
            shutil.rmtree(out)  # a rerun checks only what this run wrote
        res = run_command(argv, out)
        row["commands"][cmd] = res
        print(f" {'ok' if res['ok'] else 'FAILED'} ({res['seconds']:.1f} s){'' if res['ok'] else ': ' + res['error']}",
              flush=True)

    classes = ref.argmax(1)
    x64 = x.astype(np.float64)
    try:
        ours = model.gradient_engine(model.input_name, objective="logit").run(x, index=classes)[model.input_name]
        ours64_folded = GradientEngine(to_float64(model.proto), model.input_name, objective="logit",
                                       backend="reference").run(x64, index=classes)[model.input_name]
        seen32 = forward_decisions(model.proto, x, float64=False, threads=args.threads)
        seen64_folded = forward_decisions(model.proto, x, float64=True)
    except Exception as exc:  # noqa: BLE001
        row["gradient_failure"] = first_line(exc)
        return row
    finally:
        model.release()
    eps_as_stored(tmodel)  # after the export, which writes the same float32 epsilon either way
    with hard_activations_as_stored(tmodel):
        ref64 = torch_input_gradients(tmodel, x, classes, torch.float64)
    ref32 = torch_input_gradients(tmodel, x, classes, torch.float32)
    row["gradient_errors"] = per_image_errors(ours, ref64)
    row["gradient_error"] = max(row["gradient_errors"])
    row["torch_float32_gradient_error"] = relative_error(ref32, ref64)
    row["gradient64_folded_errors"] = per_image_errors(ours64_folded, ref64)
    row["gradient64_folded_error"] = max(row["gradient64_folded_errors"])
    # like with like: the same exporter without folding keeps PyTorch's weights, so its float64 run
    # and PyTorch float64 compute one function and only the backward rules (and float64 rounding)
    # separate the gradients; its float64 forward also takes PyTorch float64's decisions, against
    # which the float32 file's and the folded file's are counted
    unfolded = folder / f"{path.stem}_unfolded.onnx"
    row["unfolded_export_error"] = export(tmodel, x[:1], exporter, unfolded, dynamic=row["batch_axis"] == "dynamic",
                                          fold=False)
    if row["unfolded_export_error"]:
        return row
    try:
        import onnx

        plain = onnx.load(str(unfolded))
        image = real_inputs(plain)[0].name
        ours64 = GradientEngine(to_float64(plain), image, objective="logit",
                                backend="reference").run(x64, index=classes)[image]
        seen64 = forward_decisions(plain, x, float64=True)
    except Exception as exc:  # noqa: BLE001
        row["gradient64_failure"] = first_line(exc)
        return row
    row["unfolded_ops"] = sorted({n.op_type for n in plain.graph.node})
    row["gradient64_error"] = relative_error(ours64, ref64)
    row["kink_decisions"] = decisions_differ(seen32, seen64)
    row["folded_kink_decisions"] = decisions_differ(seen64_folded, seen64)
    return row


# ------------------------------------------------------------------ results

def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


KINK_LEGEND = ("kink: images on which the compared forward (the file in float32 by onnxruntime; the folded file in "
               "float64) takes some Relu/Clip/max-pool... decision differently from the float64 forward of the export "
               "without folding, i.e. from PyTorch float64: its gradient is then the exact gradient of a function that "
               "differs there (by up to percents on deep networks); the tolerance is judged on the other images")


def kink_note(kinks: list) -> str:
    """' (kink: k of n images, d decisions)' for per-image counts of differing decisions."""
    flipped = sum(1 for k in kinks if k)
    return f" (kink: {flipped} of {len(kinks)} images, {sum(kinks)} decision{'s' if sum(kinks) != 1 else ''})"


def gradient_cell(errors, worst: float, kinks, tol: float, tol_text: str, beside: str = "") -> str:
    """The worst image's error, then ``beside``; with kinks (per-image differing decisions, see
    KINK_LEGEND) a note with their count and the worst error of the other images, the tolerance
    judged on those."""
    cell = f"{worst:.1e}"
    if not errors or not kinks or not any(kinks):
        return cell + ("" if worst <= tol else f" (over {tol_text})") + beside
    clean = [e for e, k in zip(errors, kinks) if not k]
    cell += beside + "; " + kink_note(kinks)[2:-1]
    if clean:
        cell += f", the others {max(clean):.1e}" + ("" if max(clean) <= tol else f" (over {tol_text})")
    return cell


def table(results: dict) -> str:
    rows = ["| architecture | exporter | forward max error | commands ok / failed | input gradient max rel error against "
            "PyTorch float64: cnnvis float32 (PyTorch float32) | cnnvis float64: export without folding; folded file |",
            "| --- | --- | --- | --- | --- | --- |"]
    failures = []
    kinked = False
    for key in sorted(results):
        r = results[key]
        arch, exp = r["architecture"], f"{r['exporter']} (opset {r['opset']})"
        if r.get("dynamic_export_error"):
            exp += ", batch fixed at 1"
            failures.append(f"{arch} [{r['exporter']}] export with a dynamic batch axis: {r['dynamic_export_error']}")
        stop = [(what, r.get(key)) for what, key in (("export", "export_error"), ("cnnvis load", "load_error"),
                                                      ("cnnvis forward", "forward_failure")) if r.get(key)]
        if stop:
            rows.append(f"| {arch} | {exp} | {stop[0][0]} failed | | | |")
            failures.append(f"{arch} [{r['exporter']}] {stop[0][0]}: {stop[0][1]}")
            continue
        fwd = f"{r['forward_error']:.1e}" + ("" if r["forward_error"] <= FORWARD_TOL else " (over 1e-4)")
        if not r["top1_equal"]:
            fwd += ", top-1 differs"
        cmds = r["commands"]
        ok = sum(c["ok"] for c in cmds.values())
        bad = [c for c in cmds if not cmds[c]["ok"]]
        cell = f"{ok} / {len(bad)}" + (f" ({', '.join(bad)})" if bad else "")
        skipped = [c for c in COMMANDS if c not in cmds]
        if skipped:
            cell += f"; not run: {', '.join(skipped)}"
        if r.get("gradient_error") is None:
            grad, grad64 = "failed", "failed"
            failures.append(f"{arch} [{r['exporter']}] input gradients: {r.get('gradient_failure')}")
        else:
            kinks = r.get("kink_decisions")
            grad = gradient_cell(r.get("gradient_errors"), r["gradient_error"], kinks, GRADIENT_TOL, "1e-4",
                                 beside=f" ({r['torch_float32_gradient_error']:.1e})")
            e64 = r.get("gradient64_error")
            if "gradient64_folded_error" not in r:  # a row recorded before the export without folding
                grad64 = "not run" if e64 is None else f"{e64:.1e}" + ("" if e64 <= GRADIENT64_TOL else " (over 1e-5)")
            else:
                for what, field in (("export without folding", "unfolded_export_error"),
                                    ("float64 gradients of the export without folding", "gradient64_failure")):
                    if r.get(field):
                        failures.append(f"{arch} [{r['exporter']}] {what}: {r[field]}")
                grad64 = "failed" if e64 is None else f"{e64:.1e}" + ("" if e64 <= GRADIENT64_TOL else " (over 1e-5)")
                folded = r.get("folded_kink_decisions")
                grad64 += f"; {r['gradient64_folded_error']:.1e}" + (kink_note(folded) if folded and any(folded) else "")
            kinked = kinked or any(r.get(k) and any(r[k]) for k in ("kink_decisions", "folded_kink_decisions"))
        rows.append(f"| {arch} | {exp} | {fwd} | {cell} | {grad} | {grad64} |")
        failures += [f"{arch} [{r['exporter']}] {c}: {cmds[c]['error']}" for c in bad]
    if kinked:
        rows += ["", KINK_LEGEND]
    return "\n".join(rows + ([""] + ["failures (first line):"] + [f"- {f}" for f in failures] if failures else []))


# ------------------------------------------------------------------ speed

def speed(args) -> int:
    import torch

    from cnnvis.model import Model
    from peers import interleaved_medians, machine_report, relative_error

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(machine_report())
    size = args.size or 224
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tmodel = build_torch_model("resnet50", args.seed, size)
    x = np.random.default_rng(args.seed).standard_normal((args.batch, 3, size, size), dtype=np.float32)
    path = work / f"resnet50_{size}_{args.exporter}.onnx"
    failure = export(tmodel, x[:1], args.exporter, path)
    if failure:
        print(f"export ({args.exporter}) failed: {failure}")
        return 1
    model = Model.from_file(path, device="cpu", threads=args.threads)
    taps = [layer.name for layer in model.layers]
    with torch.no_grad():
        classes = tmodel(torch.from_numpy(x)).argmax(1).numpy()
    engine = model.gradient_engine(model.input_name, objective="logit", per_sample=True, batch_size=args.batch)
    xt = torch.from_numpy(x)

    def torch_saliency():
        xg = xt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(tmodel(xg)[torch.arange(len(x)), torch.from_numpy(classes)].sum(), xg)
        return g

    ours = engine.run(x, index=classes)[model.input_name]
    ours32 = torch_saliency().numpy()
    k = min(2, len(x))  # the float64 reference on the first images
    ref64 = torch_input_gradients(tmodel, x[:k], classes[:k], torch.float64)
    print(f"ResNet-50 ({args.exporter} export), {size}x{size}, batch {args.batch}, threads {args.threads or 'all'}; "
          f"{len(taps)} layers tapped")
    print(f"input gradients against PyTorch float64 autograd (first {k} images; max |diff| / max |ref|, worst "
          f"image): cnnvis {relative_error(ours[:k], ref64):.1e}, PyTorch float32 {relative_error(ours32[:k], ref64):.1e}")
    # the memory floor of tapping: every tapped tensor has to leave the blocked layout onnxruntime's
    # convolutions work in, so at least one read and one write of its bytes; timed as a plain copy of
    # that many bytes on the same threads
    floats = len(x) * sum(int(np.prod(layer.output_shape)) for layer in model.layers if layer.output_shape)
    src, dst = np.ones(floats, np.float32), np.zeros(floats, np.float32)
    halves = np.array_split(np.arange(floats), max(1, args.threads or os.cpu_count() or 1))
    bounds = [(int(h[0]), int(h[-1]) + 1) for h in halves if len(h)]
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(len(bounds))

    def copy_taps():
        list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))

    print(f"tapped tensors: {floats / len(x) * 4 / 1e6:.1f} MB per image")
    runs = {
        "cnnvis input gradients": lambda: engine.run(x, index=classes),
        "PyTorch eager autograd": torch_saliency,
        "cnnvis forward": lambda: model.run(x, batch_size=args.batch),
        "cnnvis forward, every layer tapped": lambda: model.run(x, taps, batch_size=args.batch),
        "copy of the tapped bytes (floor)": copy_taps,
    }
    t = interleaved_medians(runs, args.rounds, warmup=1)
    ms = 1000 / args.batch
    for name, sec in t.items():
        print(f"{name:36s} {sec * ms:9.2f} ms/image")
    grad_ratio = t["PyTorch eager autograd"] / t["cnnvis input gradients"]
    tap_ratio = t["cnnvis forward, every layer tapped"] / t["cnnvis forward"]
    print(f"input gradients: cnnvis {grad_ratio:.2f}x PyTorch eager's speed (target >= 1.0: "
          f"{'met' if grad_ratio >= 1.0 else 'NOT met'}); median of {args.rounds} interleaved rounds")
    floor = (t["cnnvis forward"] + t["copy of the tapped bytes (floor)"]) / t["cnnvis forward"]
    print(f"forward, every layer tapped: {tap_ratio:.3f}x the untapped forward (target <= 1.10: "
          f"{'met' if tap_ratio <= 1.10 else 'NOT met'}); the untapped forward plus one copy of the tapped "
          f"bytes: {floor:.3f}x")
    return 0


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    mx = sub.add_parser("matrix", help="export, forward, every command, input gradients per architecture")
    mx.add_argument("--arch", nargs="+", default=DEFAULT_ARCHS,
                    help=f"torchvision names or timm:<name> (default: {' '.join(DEFAULT_ARCHS)}; "
                         f"also known: {' '.join(sorted(set(TORCHVISION) - set(DEFAULT_ARCHS)))})")
    mx.add_argument("--exporter", nargs="+", choices=sorted(EXPORTERS), default=["dynamo", "torchscript"])
    mx.add_argument("--commands", nargs="*", choices=COMMANDS, metavar="COMMAND", help="only these commands (default: all; none: forward and "
                    "gradients only); recorded results of the others are kept")
    mx.add_argument("--size", type=int, help="input side (default: per architecture, 64 where it allows)")
    tb = sub.add_parser("table", help="print the table of the recorded results")
    sp = sub.add_parser("speed", help="ResNet-50 input gradients vs PyTorch eager; tapped vs untapped forward")
    sp.add_argument("--batch", type=int, default=16)
    sp.add_argument("--rounds", type=int, default=7)
    sp.add_argument("--size", type=int, help="input side (default 224)")
    sp.add_argument("--exporter", choices=sorted(EXPORTERS), default="dynamo")
    for p in (mx, sp):
        p.add_argument("--threads", type=int, default=None, help="onnxruntime/torch threads (default: all cores)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--work", default="out/bench_architectures", help="folder of exported files and outputs")
    for p in (mx, tb):
        p.add_argument("--results", default="out/bench_architectures/results.json")
    args = ap.parse_args(argv)

    if args.what == "speed":
        return speed(args)
    results_path = Path(args.results)
    if args.what == "table":
        print(table(load_results(results_path)))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [a for a in args.arch if a not in TORCHVISION and not a.startswith("timm:")]
    if unknown:
        ap.error(f"--arch: unknown {', '.join(unknown)}; known: {', '.join(TORCHVISION)} or timm:<name>")
    work = Path(args.work)
    for name in args.arch:
        for exporter in args.exporter:
            t0 = time.perf_counter()
            row = check_architecture(name, exporter, args, work)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results = load_results(results_path)
            old = results.get(f"{name} {exporter}")
            if args.commands is not None and old:  # a partial rerun: keep the other commands' results
                row["commands"] = {**old.get("commands", {}), **row["commands"]}
            results[f"{name} {exporter}"] = row
            save_results(results_path, results)
            print(table({f"{name} {exporter}": row}), flush=True)
    print()
    print(table(load_results(results_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
