"""`cnnvis gradients` (gradients of a class neuron w.r.t. inputs, activations or weights) and
`cnnvis gradcheck` (the gradient engine against float64 finite differences)."""
from __future__ import annotations

import argparse
import sys

from . import common

ORDER = 47

GRADIENTS_EPILOG = """\
--wrt takes `input`, a layer name (its output) or LAYER.weight / LAYER.bias, and may be repeated.
Outputs in --out: one <wrt>.npy per --wrt (N x ... per image, or the batch sum with --batch-sum)
and gradients.h5 with the same arrays, all recorded in manifest.json.

examples:
  cnnvis gradients cat.jpg --model caffenet --class 281 --wrt conv1.weight --out out/grad
  cnnvis gradients --input-array x.npy --wrt input --wrt conv3 --rule guided --out out/guided
"""

GRADCHECK_EPILOG = """\
Compares the engine's gradient for the first image with float64 central differences on
--samples random entries. For a float32 model the engine's gradient graph also runs in float64
and that gradient is the one checked (the rules against the function at the same precision).
Entries whose finite difference straddles a non-differentiable point (a max-pool tie, a Relu or
Clip input at its bound) are reported ("k of N sampled entries sit on a kink") and replaced by
others; the verdict rests on entries away from kinks.
The float32 gradient is reported apart: its relative distance from the float64 gradient and how
many forward decisions (Relu signs, pool switches, bounds) float32 takes differently from
float64. A float32 forward that flips a decision computes the exact gradient of a slightly
different function, so a large distance with flipped decisions is a precision note, not a failure.
Verdict, exit 1 (FAILED) when: the float64 gradient's relative error (largest |difference| over
the largest |gradient| among the entries) is above --tolerance; every sampled entry sits on a
kink (no verdict); or the float32 gradient is further than --tolerance from the float64 gradient
while no decision differs. Otherwise exit 0 (OK).

example:
  cnnvis gradcheck --model net.onnx --wrt conv1.weight --samples 20
"""

RULES = ("gradient", "deconvnet", "guided")
OBJECTIVES = ("logit", "probability", "log_probability")


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("gradients", epilog=GRADIENTS_EPILOG, formatter_class=raw,
                       help="gradients of a class neuron w.r.t. the input, activations or weights")
    common.add_input_options(p)
    common.add_model_options(p)
    _add_target_options(p)
    p.add_argument("--rule", default="gradient", choices=RULES,
                   help="gradient (exact), deconvnet (Zeiler & Fergus) or guided (guided backprop)")
    p.add_argument("--batch-sum", action="store_true",
                   help="weight gradients summed over the images (what Caffe stores) instead of per image")
    common.add_output_options(p, "out/gradients")
    p.set_defaults(func=cmd_gradients)

    p = sub.add_parser("gradcheck", epilog=GRADCHECK_EPILOG, formatter_class=raw,
                       help="check the gradient engine against float64 finite differences")
    common.add_input_options(p)
    common.add_model_options(p)
    _add_target_options(p)
    p.add_argument("--samples", type=common.positive_int, default=20, help="entries checked per --wrt (default 20)")
    p.add_argument("--tolerance", type=common.positive_float, default=1e-3,
                   help="largest accepted relative error, of the rule check and of an unexplained float32 distance (default 1e-3)")
    p.add_argument("--seed", type=common.seed, default=0, help="seed of the sampled entries (and of the random input)")
    p.add_argument("--list-ops", action="store_true",
                   help="print the ops that have backward rules (a Markdown table) and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=cmd_gradcheck)


def _add_target_options(p):
    g = p.add_argument_group("gradient")
    g.add_argument("--wrt", action="append", default=None, metavar="NAME",
                   help="input, LAYER (its output) or LAYER.weight / LAYER.bias; repeatable (default: input)")
    g.add_argument("--class", dest="class_", default=None, metavar="K",
                   help="class index or name (default: each image's predicted class)")
    g.add_argument("--objective", default="logit", choices=OBJECTIVES,
                   help="the class neuron: logit (before softmax, default), probability or log_probability")


def resolve_wrt(model, spec: str) -> str:
    """ONNX name for `input`, a layer (its output tensor) or LAYER.weight / LAYER.bias."""
    from ..errors import CnnvisError

    if spec in ("input", model.input_name):
        return model.input_name
    if spec.endswith((".weight", ".bias")):
        return model.param_name(spec)
    try:
        return model.tensor_name(spec)
    except CnnvisError:
        try:
            return model.param_name(spec)  # an initializer's own name
        except CnnvisError:
            pass
        raise


def _targets(model, args, x):
    import numpy as np


    if args.class_ is not None:
        return np.full(len(x), model.class_index(args.class_), dtype=np.int64)
    logits = model.run(x, [model.logits_layer.tensor], batch_size=args.batch_size)[model.logits_layer.tensor]
    return np.argmax(logits.reshape(len(x), -1), axis=1).astype(np.int64)


def _objective_target(model, objective):
    if objective == "probability":
        return model.output_name if model.proto.graph.node[-1].op_type == "Softmax" else None
    return model.logits_layer.tensor


def cmd_gradients(args) -> int:
    import numpy as np

    from ..manifest import RunOutput, save_npy

    model = common.load_model(args)
    common.model_warning(model)
    specs = args.wrt or ["input"]
    names = {spec: resolve_wrt(model, spec) for spec in specs}
    image_names, x = common.load_inputs(args, model)
    x = model.check_batch(x)
    targets = _targets(model, args, x)
    engine = model.gradient_engine(list(dict.fromkeys(names.values())), objective=args.objective,
                                   target=_objective_target(model, args.objective), rule=args.rule,
                                   per_sample=not args.batch_sum, batch_size=args.batch_size)
    result = engine.run(x, index=targets)
    params = {"wrt": specs, "rule": args.rule, "objective": args.objective, "batch_sum": args.batch_sum,
              "classes": targets.tolist(), "model": model.name}
    with RunOutput(args.out, "gradients", params=params, inputs=common.recorded_inputs(args, model),
                   model=model.info()) as run:
        from ..manifest import hdf5_file

        h5_path = run.path("gradients.h5", kind="gradients-hdf5", wrt=specs)
        with hdf5_file(h5_path) as h5:
            h5.attrs["rule"] = args.rule
            h5.attrs["objective"] = args.objective
            h5.create_dataset("classes", data=targets)
            h5.create_dataset("objective", data=result.objective)
            for spec in specs:
                grad = result[names[spec]]
                per_image = names[spec] in engine.graph_info(x.shape[1:]).batched_wrt or not args.batch_sum
                stem = common.safe_name(spec)
                save_npy(run.path(f"{stem}.npy", kind="gradient", wrt=spec, tensor=names[spec],
                                  shape=list(grad.shape), per_image=per_image), grad)
                h5.create_dataset(stem, data=grad, compression="gzip")
                print(f"cnnvis gradients: {spec} -> {stem}.npy {tuple(grad.shape)}"
                      f"{' (per image)' if per_image else ' (batch sum)'}; max |g| {float(np.abs(grad).max()):.4g}")
        run.extra["images"] = image_names
    return 0


def cmd_gradcheck(args) -> int:
    import numpy as np

    from ..autodiff import gradcheck

    if args.list_ops:
        from ..autodiff.rules import markdown_table

        print(markdown_table(), end="")
        return 0
    model = common.load_model(args)
    specs = args.wrt or ["input"]
    names = {spec: resolve_wrt(model, spec) for spec in specs}
    if args.images or args.input_array:
        _, x = common.load_inputs(args, model)
        x = model.check_batch(x)[:1]
    else:
        x = np.random.default_rng(args.seed).standard_normal((1, *model.input_shape)).astype(np.float32)
    targets = _targets(model, args, x)
    reports = gradcheck(model.proto, x, list(dict.fromkeys(names.values())), objective=args.objective,
                        target=_objective_target(model, args.objective), index=targets, samples=args.samples,
                        rng_seed=args.seed)
    failures = []
    for spec in specs:
        r = reports[names[spec]]
        print(f"cnnvis gradcheck: {spec}: {len(r.entries)} entries, max abs error {r.max_abs_error:.3g}, "
              f"max relative error {r.max_rel_error:.3g}{r.kink_note}{r.precision_note}")
        why = r.failure(args.tolerance)
        if why:
            failures.append(f"{spec}: {why}")
    if failures:
        print(f"cnnvis gradcheck: FAILED: {'; '.join(failures)}", file=sys.stderr)
        return 1
    worst = max(reports[names[spec]].max_rel_error for spec in specs)
    print(f"cnnvis gradcheck: OK (relative error {worst:.3g} <= {args.tolerance:g})")
    return 0
