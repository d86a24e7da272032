"""`cnnvis run-all`: every analysis on one model and its sample images, then the HTML report.

Each step is an ordinary cnnvis command writing into its own subfolder of --out, so the report
finds one manifest per analysis. A failing step is reported and the others still run.
"""
from __future__ import annotations

import sys
import time

from . import INTERRUPTED, common

ORDER = 90


def register(sub) -> None:
    p = sub.add_parser("run-all", help="run every analysis on a model's sample images and write the HTML report")
    common.add_model_options(p)
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGE",
                   help="images to analyse (default: the model's samples)")
    p.add_argument("--skip", nargs="+", default=[], metavar="STEP", help="steps to leave out (see --list)")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run just these steps")
    p.add_argument("--list", action="store_true", help="list the steps and exit")
    common.add_output_options(p, "out")
    p.set_defaults(func=cmd_run_all)


def plan(model, model_args: list, images: list, out: str) -> list:
    """``[(step, argv)]``: the commands run-all runs, in order, for ``model`` and ``images``."""
    convs = model.conv_layers()
    first, last = convs[0].name, convs[-1].name
    # up to ten images spread over the list (the demo samples are ten per class, class by class)
    step = max(1, len(images) // 10)
    few = images[::step][:10]
    one = few[:1]
    m = list(model_args)
    steps = [
        ("activations", ["activations", *few, *m, "--out", f"{out}/activations"]),
        ("filters", ["filters", *m, "--layer", first, "--out", f"{out}/filters"]),
        ("volume", ["volume", *one, *m, "--layer", first, "--out", f"{out}/volumes"]),
        ("order-kmeans-rows", ["order", *one, *m, "--layer", first, "--method", "kmeans-rows",
                               "--out", f"{out}/order/kmeans-rows"]),
        ("order-pca-rows", ["order", *one, *m, "--layer", first, "--method", "pca-rows",
                            "--out", f"{out}/order/pca-rows"]),
        ("order-pca-maps", ["order", *one, *m, "--layer", first, "--method", "pca-maps",
                            "--out", f"{out}/order/pca-maps"]),
        ("order-kmeans-maps", ["order", *one, *m, "--layer", first, "--method", "kmeans-maps",
                               "--out", f"{out}/order/kmeans-maps"]),
        ("order-smooth", ["order", *one, *m, "--layer", first, "--method", "smooth",
                          "--out", f"{out}/order/smooth"]),
        ("render", ["render", *one, *m, "--layer", first, "--gif", "--out", f"{out}/render"]),
        ("conv-gradients", ["conv-gradients", *few, *m, "--layer", first, "--check-numerical", "10",
                            "--out", f"{out}/conv_gradients"]),
        ("compare-classes", ["compare-classes", *m, "--layer", first, "--out", f"{out}/compare_classes"]),
        ("deconv", ["deconv", *one, *m, "--layer", first, "--out", f"{out}/deconv"]),
        ("topk", ["topk", *images, *m, "--layer", last, "--restart", "--out", f"{out}/topk"]),
        ("occlusion", ["occlusion", *few[:3], *m, "--out", f"{out}/occlusion"]),
        ("invariance", ["invariance", *one, *m, "--out", f"{out}/invariance"]),
        ("maximize", ["maximize", *m, "--layer", last, "--out", f"{out}/maximize"]),
        ("saliency", ["saliency", *few[:3], *m, "--out", f"{out}/saliency"]),
    ]
    paths = [str(p) for p in common.model_checkpoints(model)]
    if len(paths) >= 2:
        steps.append(("evolution", ["evolution", *few[:3], "--layer", first, "--checkpoints", *paths,
                                    "--device", model_args[model_args.index("--device") + 1],
                                    "--out", f"{out}/evolution"]))
    if "compare_classes" not in (model.sidecar or {}):
        steps = [s for s in steps if s[0] != "compare-classes"]  # needs groups the model's sidecar names
    return steps


def cmd_run_all(args) -> int:
    with common.sharing_models():  # the model is loaded (a Caffe one converted) once for every step
        return _run_all(args)


def _run_all(args) -> int:
    from . import main as cli_main

    from .. import registry

    model = common.load_model(args)
    model_args = ["--model", args.model or registry.default_model_name(), "--device", args.device]
    if args.weights:
        model_args += ["--weights", args.weights]
    if args.threads:
        model_args += ["--threads", str(args.threads)]
    model_args += ["--batch-size", str(args.batch_size)]
    images = [str(p) for p in (args.images or common.default_images(model))]
    steps = plan(model, model_args, images, args.out.rstrip("/"))
    names = [name for name, _ in steps]
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [s for s in (args.only or []) + args.skip if s not in names]
    if unknown:
        from ..errors import CnnvisError

        raise CnnvisError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}")
    chosen = [(n, a) for n, a in steps if n not in args.skip and (args.only is None or n in args.only)]
    from ..export.render import gl_problem

    problem = gl_problem() if any(n == "render" for n, _ in chosen) else None
    if problem:  # a machine without GL libraries still gets every other analysis, and is told why
        print(f"cnnvis run-all: skipping render: {problem}", file=sys.stderr)
        chosen = [(n, a) for n, a in chosen if n != "render"]
    from ..manifest import check_output_folders

    check_output_folders([args.out, *(argv[argv.index("--out") + 1] for _, argv in chosen if "--out" in argv)])
    common.model_warning(model)
    print(f"cnnvis run-all: model {model.name}, {len(images)} image(s), {len(chosen)} step(s) -> {args.out}/")
    failed = []
    for name, argv in chosen:
        t0 = time.perf_counter()
        print(f"== {name}: cnnvis {' '.join(argv[:1])} ...", flush=True)
        try:
            code = cli_main(argv)
        except Exception as exc:  # a bug in one analysis must not cost the others (and the report)
            if getattr(args, "debug", False):
                raise
            print(f"cnnvis {argv[0]}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        if code == INTERRUPTED:  # Ctrl-C stops the whole run, not just this step
            print(f"cnnvis run-all: interrupted during {name}; no report written", file=sys.stderr)
            return INTERRUPTED
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"   {name}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)
        if code != 0:
            failed.append(name)
    code = cli_main(["report", args.out])
    if code != 0:
        failed.append("report")
    print(f"\nResults: {args.out}/ — open {args.out}/index.html in a browser.")
    if failed:
        print(f"cnnvis run-all: {len(failed)} step(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
