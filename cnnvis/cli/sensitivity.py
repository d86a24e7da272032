"""`cnnvis occlusion`, `cnnvis invariance`, `cnnvis maximize`, `cnnvis saliency`: what the output
is sensitive to (Zeiler & Fergus sections 4.2 and 4.4, activation maximisation, saliency maps)."""
from __future__ import annotations

import argparse

from . import cluster, common
from ..errors import CnnvisError
from ..export.tables import csv_text

ORDER = 45


# ------------------------------------------------------------------------------------ options

def _number_list(text: str) -> list:
    try:
        return [common.finite_float(v) for v in text.replace(",", " ").split()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected finite numbers separated by commas, got {text!r}") from None


def _window_pair(text: str):
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size N or HxW, got {text!r}")
    return (values[0], values[-1])


def register(sub) -> None:
    p = sub.add_parser("occlusion", help="occlusion sensitivity: slide a grey square, map class probability, "
                                         "most probable class and a feature map's activity (Z&F Fig. 7)")
    common.add_input_options(p)
    common.add_model_options(p)
    g = p.add_argument_group("occlusion")
    g.add_argument("--window", type=_window_pair, default=None, metavar="N|HxW",
                   help="occluder size in input pixels (default: 35 at 227, scaled to the input)")
    g.add_argument("--stride", type=_window_pair, default=None, metavar="N|HxW",
                   help="occluder step (default: 8 at 227, scaled to the input)")
    g.add_argument("--class", dest="target", default=None,
                   help="class index or name whose probability is mapped (default: the predicted class)")
    g.add_argument("--layer", "-l", default=None,
                   help="layer whose strongest feature map's total activation is mapped "
                        "(default: the last layer with C×H×W maps; 'none' to skip)")
    g.add_argument("--channel", type=common.nonnegative_int, default=None,
                   help="feature map of --layer (default: the strongest in the unoccluded image)")
    g.add_argument("--fill", type=common.finite_float, default=None,
                   help="occluder value in model-input units (default: the preprocessing mean, i.e. grey)")
    g.add_argument("--no-incremental", action="store_true",
                   help="run the whole network for every window (default: recompute only the changed "
                        "part of the early layers when that saves work; same numbers)")
    _add_picture_options(p)
    cluster.add_dataset_options(p)
    cluster.add_dask_options(p)
    common.add_output_options(p, "out/occlusion")
    p.set_defaults(func=cmd_occlusion)

    p = sub.add_parser("invariance", help="feature distance and class probability under translation, "
                                          "scaling and rotation (Z&F Fig. 5)")
    common.add_input_options(p)
    common.add_model_options(p)
    g = p.add_argument_group("invariance")
    g.add_argument("--layer", "-l", action="append", default=None,
                   help="layer whose feature vector is compared (repeatable; default: the first "
                        "convolution block and the top hidden layer)")
    g.add_argument("--translations", type=_number_list, default=None, metavar="LIST",
                   help="shifts in pixels, e.g. --translations=-20,-10,0,10,20 (default: ±H/4; '' to skip)")
    g.add_argument("--scales", type=_number_list, default=None, metavar="LIST",
                   help="scale factors (default 0.6..1.8 by 0.1; '' to skip)")
    g.add_argument("--rotations", type=_number_list, default=None, metavar="LIST",
                   help="angles in degrees, counter-clockwise (default 0..360 by 30; '' to skip)")
    g.add_argument("--axis", default="vertical", choices=("vertical", "horizontal"),
                   help="direction of the translations (default vertical, as in the paper)")
    g.add_argument("--class", dest="target", default=None,
                   help="class whose probability is plotted (default: each image's predicted class)")
    common.add_output_options(p, "out/invariance")
    p.set_defaults(func=cmd_invariance)

    p = sub.add_parser("maximize", help="activation maximisation: input patterns that excite the first N "
                                        "channels of a layer (or classes), optimised in one batch")
    common.add_model_options(p)
    p.add_argument("--preprocess", default=None, metavar="PRESET",
                   help="preprocessing preset defining grey, pixel range and display (default: the model's)")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="channel_mean", choices=("channel_mean", "logit"),
                   help="a channel's mean activation at --layer, or a class logit")
    g.add_argument("--layer", "-l", default=None, help="layer (default: the last layer with C×H×W maps)")
    g.add_argument("--channels", type=common.positive_int, default=16, metavar="N",
                   help="optimise the first N channels / classes (default 16)")
    g.add_argument("--index", type=common.nonnegative_int, action="append", default=None,
                   help="a channel / class index (repeatable; instead of --channels)")
    g = p.add_argument_group("ascent and regularisers")
    g.add_argument("--steps", type=common.positive_int, default=200, help="gradient steps (default 200)")
    g.add_argument("--lr", type=common.positive_float, default=0.05,
                   help="step size as a fraction of the pixel range per unit-RMS gradient (default 0.05)")
    g.add_argument("--jitter", type=common.nonnegative_int, default=2,
                   help="random roll of up to N pixels per step (default 2)")
    g.add_argument("--blur-sigma", type=common.nonnegative_float, default=0.5,
                   help="Gaussian blur sigma in pixels (0: none)")
    g.add_argument("--blur-every", type=common.positive_int, default=4, help="blur every N steps (default 4)")
    g.add_argument("--decay", type=common.fraction, default=0.01, help="L2 decay towards grey per step (default 0.01)")
    g.add_argument("--clip", default="range", choices=("range", "none"),
                   help="keep pixels in the valid range of the preprocessing (default) or not")
    g.add_argument("--norm-bound", type=common.positive_float, default=None,
                   help="keep each pattern within this L2 distance (input units) of the grey")
    g.add_argument("--init-scale", type=common.nonnegative_float, default=0.1,
                   help="starting noise, fraction of the pixel range")
    g.add_argument("--seed", type=common.seed, default=0, help="seed of the starting noise and the jitter")
    g.add_argument("--ncols", type=common.positive_int, default=None, help="grid columns")
    common.add_output_options(p, "out/maximize")
    p.set_defaults(func=cmd_maximize)

    p = sub.add_parser("saliency", help="saliency heat maps: vanilla gradient, guided backpropagation, "
                                        "Grad-CAM, overlaid on the image")
    common.add_input_options(p)
    common.add_model_options(p)
    g = p.add_argument_group("saliency")
    g.add_argument("--method", action="append", default=None, choices=("gradient", "guided", "gradcam"),
                   help="method (repeatable; default: all three)")
    g.add_argument("--class", dest="target", default=None,
                   help="class index or name (default: each image's predicted class)")
    g.add_argument("--layer", "-l", default=None,
                   help="Grad-CAM layer (default: the last layer with C×H×W maps)")
    _add_picture_options(p)
    common.add_output_options(p, "out/saliency")
    p.set_defaults(func=cmd_saliency)


def _add_picture_options(p):
    g = p.add_argument_group("pictures")
    g.add_argument("--cmap", default="jet", help="colormap of heat maps (default jet)")
    g.add_argument("--alpha", type=common.fraction, default=0.5, help="heat-map opacity over the image (default 0.5)")


# ------------------------------------------------------------------------------------ helpers

def _scaled_default(value, base: int, input_hw) -> tuple:
    if value is not None:
        return tuple(value)
    return tuple(max(1, int(round(base * s / 227))) for s in input_hw)


def _class_name(model, k) -> str:
    names = model.class_names
    return names[k] if 0 <= k < len(names) else f"class {k}"


# ------------------------------------------------------------------------------------ occlusion

def cmd_occlusion(args) -> int:
    import numpy as np

    from ..analysis import inputspace, occlusion
    from ..export import figures, plots
    from ..manifest import RunOutput, save_npy, write_json
    from ..preprocess import InputSpace

    model = common.load_model(args)
    if args.dask:
        cluster.options(args)  # a bad address or --input-array fails before anything is read
    pre = common.preprocessing_for(args, model)
    space = InputSpace(pre, model.input_shape)
    target = inputspace.resolve_class(model, args.target, "--class")
    hw = model.input_shape[1:]
    window = _scaled_default(args.window, 35, hw)
    stride = _scaled_default(args.stride, 8, hw)
    layer = None if args.layer in (None, "") else (False if args.layer.lower() == "none" else model.layer(args.layer).name)
    fill = space.grey_ if args.fill is None else args.fill
    options = {"window": window, "stride": stride, "layer": layer, "channel": args.channel, "fill": fill,
               "incremental": False if args.no_incremental else "auto"}
    analysis = occlusion.Occlusion(model, preprocessing=pre, batch_size=args.batch_size, **options)
    skipped, store, recorded = [], None, common.recorded_inputs(args, model)
    if args.dask:  # the shard results are recorded in --out while the cluster runs, outside RunOutput
        common.model_warning(model)
        _, items, skipped, store = cluster.occlusion(args, model, common.Inputs(args, model), options, target)
    else:
        chunks = common.checked_input_chunks(args, model, skipped)
        common.model_warning(model)
        items = ((name, x, res, None) for names, batch in chunks
                 for name, x, res in zip(names, batch, analysis.run(batch, target=target)))
    params = {"window": list(window), "stride": list(stride), "class": target, "layer": layer, "channel": args.channel,
              "fill": "preprocessing mean (grey)" if args.fill is None else args.fill,
              "incremental": not args.no_incremental, "batch_size": args.batch_size, "cmap": args.cmap,
              "alpha": args.alpha, "preprocessing": pre.to_dict(), "input_array": args.input_array}
    used, summaries, plan = {}, [], None
    with RunOutput(args.out, "occlusion", params=params, inputs=recorded, model=model.info()) as run:
        for name, x, res, plan in items:
            safe = common.unique_names([name], used)[0]
            meta = dict(image=name, layer=res.layer)
            for key in ("probability", "top_class", "top_probability", "activation"):
                value = getattr(res, key)
                if value is not None:
                    save_npy(run.path(f"{safe}/{key}.npy", kind=f"occlusion-{key}", shape=list(value.shape),
                                      **meta), value)
            rgb = space.to_display(x)
            figures.save_png(run.path(f"{safe}/probability.png", kind="occlusion-map", **meta),
                             plots.heat_picture(res.probability, args.cmap))
            figures.save_png(run.path(f"{safe}/probability_overlay.png", kind="occlusion-overlay", **meta),
                             plots.enlarge(plots.overlay_heatmap(rgb, res.to_pixels(res.probability), args.alpha,
                                                                 args.cmap)))
            colours = plots.class_colours(np.unique(res.top_class).tolist())
            figures.save_png(run.path(f"{safe}/top_class.png", kind="occlusion-map", **meta),
                             plots.category_picture(res.top_class, colours))
            if res.activation is not None:
                figures.save_png(run.path(f"{safe}/activation.png", kind="occlusion-map", **meta),
                                 plots.heat_picture(res.activation, args.cmap))
                figures.save_png(run.path(f"{safe}/activation_overlay.png", kind="occlusion-overlay", **meta),
                                 plots.enlarge(plots.overlay_heatmap(rgb, res.to_pixels(res.activation),
                                                                     args.alpha, args.cmap)))
            plots.occlusion_figure(run.path(f"{safe}/figure.png", kind="occlusion-figure", **meta),
                                   res, rgb, colours, lambda k: _class_name(model, k), args.cmap)
            summary = res.summary()
            summary.update(image=name, target_name=_class_name(model, res.target),
                           base_top_class_name=_class_name(model, res.base_top_class),
                           top_class_names={str(k): _class_name(model, k) for k in summary["top_classes"]},
                           top_class_colours={str(k): list(c) for k, c in colours.items()})
            summaries.append(summary)
            print(f"cnnvis occlusion: {name}: p({_class_name(model, res.target)}) {res.base_probability:.3f} "
                  f"-> min {summary['min_probability']:.3f} at window {summary['min_probability_window']}")
        if args.dask:
            run.extra["incremental"] = plan if summaries else None
        else:
            run.extra["incremental"] = analysis.plan_.describe() if summaries else None
            common.report_skipped("occlusion", skipped)
        if skipped:
            run.extra["skipped"] = common.skipped_record(skipped)
        write_json(run.path("occlusion.json", kind="occlusion-summary"),
                   {"images": summaries, "window": list(window), "stride": list(stride)})
    if store is not None:
        store.remove()
    print(f"cnnvis occlusion: {len(summaries)} image(s) -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------ invariance

def cmd_invariance(args) -> int:
    import numpy as np

    from ..analysis import inputspace, invariance
    from ..export import figures, plots
    from ..manifest import RunOutput, write_json, write_text
    from ..preprocess import InputSpace

    model = common.load_model(args)
    pre = common.preprocessing_for(args, model)
    space = InputSpace(pre, model.input_shape)
    target = inputspace.resolve_class(model, args.target, "--class")
    amounts = {"translation": args.translations, "scale": args.scales, "rotation": args.rotations}
    analysis = invariance.Invariance(model, layers=args.layer, amounts=amounts, axis=args.axis,
                                     preprocessing=pre, batch_size=args.batch_size, keep_inputs=True)
    sweeps = analysis.sweeps()
    layers = analysis.layer_names()
    chunks = common.checked_input_chunks(args, model)
    common.model_warning(model)
    params = {"layers": layers, "amounts": {k: v.tolist() for k, v in sweeps.items()}, "axis": args.axis,
              "class": target, "distance": "||f(Tx) - f(x)|| / ||f(x)||", "batch_size": args.batch_size,
              "preprocessing": pre.to_dict(), "input_array": args.input_array}
    used, rows, curves = {}, [], []
    with RunOutput(args.out, "invariance", params=params, inputs=common.recorded_inputs(args, model), model=model.info()) as run:
        for names, batch in chunks:
            for name, safe, x in zip(names, common.unique_names(names, used), batch):
                res = analysis.run(x[None], target=target)[0]  # one at a time: it keeps every transformed image
                rows.extend(res.rows(name))
                curves.append((name, res))
                for kind, values in sweeps.items():
                    tiles = np.stack([space.to_display(t) for t in res.inputs[kind]])
                    figures.grid_png(run.path(f"examples/{safe}_{kind}.png", kind="invariance-examples", image=name,
                                              transform=kind), tiles, ncols=len(values), normalization="global",
                                     scale=plots.zoom_for(model.input_shape[1:], 96))
                print(f"cnnvis invariance: {name}: class {_class_name(model, res.target)}")
        fields = ["image", "transform", "amount", "target", "probability", "top_class"] + \
            [f"distance_{layer}" for layer in layers]
        write_text(run.path("invariance.csv", kind="table"), csv_text(fields, [[row[k] for k in fields] for row in rows]))
        write_json(run.path("invariance.json", kind="invariance", layers=layers),
                   {"layers": layers, "distance": params["distance"], "class_names": {
                       str(r["target"]): _class_name(model, r["target"]) for r in rows}, "records": rows})
        plots.invariance_figure(run.path("invariance.png", kind="invariance-figure"), curves, sweeps, layers)
    print(f"cnnvis invariance: {len(curves)} image(s) × {sum(len(v) for v in sweeps.values())} transform(s) -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------ maximize

def cmd_maximize(args) -> int:
    import numpy as np

    from ..analysis import maximize
    from ..export import figures
    from ..manifest import RunOutput, save_npy, write_json

    model = common.load_model(args)
    pre = common.preprocessing_for(args, model)
    analysis = maximize.ActivationMaximization(
        model, layer=args.layer, objective=args.objective, steps=args.steps, learning_rate=args.lr,
        jitter=args.jitter, blur_sigma=args.blur_sigma, blur_every=args.blur_every, decay=args.decay,
        clip=args.clip, norm_bound=args.norm_bound, init_scale=args.init_scale, seed=args.seed,
        preprocessing=pre, batch_size=args.batch_size)
    layer = analysis.target_layer()
    size = (layer.output_shape or (0,))[0]
    indices = np.asarray(args.index if args.index else range(min(args.channels, size)), dtype=np.int64)
    common.model_warning(model)
    params = {"objective": args.objective, "layer": layer.name, "indices": indices.tolist(), "steps": args.steps,
              "lr": args.lr, "jitter": args.jitter, "blur_sigma": args.blur_sigma, "blur_every": args.blur_every,
              "decay": args.decay, "clip": args.clip, "norm_bound": args.norm_bound, "init_scale": args.init_scale,
              "seed": args.seed, "batch_size": args.batch_size, "preprocessing": pre.to_dict()}
    res = analysis.run(None, target=indices)
    lname = common.safe_name(layer.name)
    labels = [_class_name(model, int(k)) for k in indices] if args.objective == "logit" else [int(k) for k in indices]
    with RunOutput(args.out, "maximize", params=params, model=model.info()) as run:
        tiles = res.display_tiles()
        meta = figures.grid_png(run.path(f"{lname}_patterns.png", kind="maximize-grid", layer=layer.name),
                                tiles, ncols=args.ncols, normalization="channel", cmap="gray",
                                labels=[str(v) for v in labels], scale=max(1, figures.auto_scale(*tiles.shape[1:3],
                                                                                                 target=96)))
        save_npy(run.path(f"{lname}_patterns.npy", kind="maximize-patterns", layer=layer.name,
                          shape=list(res.patterns.shape), grid=meta), res.patterns)
        write_json(run.path(f"{lname}_maximize.json", kind="maximize", layer=layer.name), {
            "layer": layer.name, "objective": args.objective, "indices": indices.tolist(), "labels": labels,
            "final_objective": res.objective.tolist(), "start_objective": res.history[0].tolist()
            if len(res.history) else [], "history_every_10": res.history[::10].tolist()})
    gain = res.objective - (res.history[0] if len(res.history) else res.objective)
    print(f"cnnvis maximize: {layer.name}: {len(indices)} pattern(s), objective gain median "
          f"{float(np.median(gain)):.4g} -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------ saliency

def cmd_saliency(args) -> int:
    from ..analysis import inputspace, saliency
    from ..export import figures, plots
    from ..manifest import RunOutput, save_npy, write_json
    from ..preprocess import InputSpace

    model = common.load_model(args)
    pre = common.preprocessing_for(args, model)
    space = InputSpace(pre, model.input_shape)
    target = inputspace.resolve_class(model, args.target, "--class")
    methods = list(dict.fromkeys(args.method or saliency.METHODS))
    runners = {m: saliency.Saliency(model, method=m, layer=args.layer, batch_size=args.batch_size) for m in methods}
    if "gradcam" in methods:  # a bad --layer fails before anything is staged
        layer = model.layer(args.layer or inputspace.default_feature_layer(model))
        if layer.output_shape is None or len(layer.output_shape) != 3:
            raise CnnvisError(f"--layer {layer.name}: Grad-CAM needs a layer with C×H×W maps")
    chunks = common.checked_input_chunks(args, model)
    common.model_warning(model)
    params = {"methods": methods, "class": target, "layer": args.layer, "cmap": args.cmap, "alpha": args.alpha,
              "batch_size": args.batch_size, "preprocessing": pre.to_dict(), "input_array": args.input_array}
    used, records = {}, []
    with RunOutput(args.out, "saliency", params=params, inputs=common.recorded_inputs(args, model), model=model.info()) as run:
        for names, batch in chunks:
            probs = model.predict(batch, batch_size=args.batch_size)  # one forward pass for every method
            results = {m: r.run(batch, target=target, probs=probs) for m, r in runners.items()}
            for i, (name, safe) in enumerate(zip(names, common.unique_names(names, used))):
                rgb = space.to_display(batch[i])
                first = results[methods[0]]
                record = {"image": name, "class": int(first.targets[i]),
                          "class_name": _class_name(model, int(first.targets[i])),
                          "probability": float(first.probability[i]), "files": {}}
                for m, res in results.items():
                    meta = dict(image=name, method=m, layer=res.layer)
                    save_npy(run.path(f"{safe}/{m}_heatmap.npy", kind="saliency-heatmap", **meta), res.heatmap[i])
                    figures.save_png(run.path(f"{safe}/{m}_heatmap.png", kind="saliency-map", **meta),
                                     plots.heat_picture(res.heatmap[i], args.cmap))
                    figures.save_png(run.path(f"{safe}/{m}_overlay.png", kind="saliency-overlay", **meta),
                                     plots.enlarge(plots.overlay_heatmap(rgb, res.heatmap[i], args.alpha,
                                                                         args.cmap)))
                    if res.gradient is not None:
                        figures.save_png(run.path(f"{safe}/{m}_gradient.png", kind="saliency-gradient", **meta),
                                         plots.picture(plots.gradient_picture(res.gradient[i], pre.channel_order)))
                    if res.cam is not None:
                        save_npy(run.path(f"{safe}/{m}_cam.npy", kind="saliency-cam", **meta), res.cam[i])
                    record["files"][m] = f"{safe}/{m}_overlay.png"
                records.append(record)
                print(f"cnnvis saliency: {name}: {record['class_name']} (p={record['probability']:.3f})")
        write_json(run.path("saliency.json", kind="saliency-summary"), {"methods": methods, "images": records})
    print(f"cnnvis saliency: {len(records)} image(s) × {len(methods)} method(s) -> {args.out}")
    return 0
