"""`cnnvis conv-gradients` and `cnnvis compare-classes`: gradients of a class neuron (the logit
before the softmax) with respect to a convolution layer's filters, per image and between groups."""
from __future__ import annotations

import argparse

from . import cluster, common
from ..errors import CnnvisError
from ..export.tables import csv_text

ORDER = 45
ROLES = ("reference", "similar", "dissimilar")
#: the cosine matrix is also written as CSV up to this many images (always as .npy)
COSINE_CSV_MAX = 1000

CONV_EPILOG = """outputs per image (folder IMAGE/):
  LAYER_gradient.npy                 d logit / d weights, O×Cin×kh×kw float32
  LAYER_gradient_volume.{hdf,...}    the same as a 3-D volume ((O·Cin)×kh×kw slices) for ParaView
  importance.png, importance_sorted.png, importance.csv   per-filter L2 norm of the gradient
  top_filters.png                    rows: the top-k filters; columns: weights, gradient
and summary.csv / summary.json (predicted class and probability, class differentiated, ...)."""

COMPARE_EPILOG = """groups: each of --reference/--similar/--dissimilar takes image files, folders, preprocessed
N×C×H×W .npy arrays, or class names/indices of the model's sample images. Defaults come from the
model sidecar's "compare_classes" entry; --reference defaults to the samples of --neuron's class.

outputs: summary.json, images.csv, importance.csv, importance_raw.png, importance_normalized.png,
cosine_similarity.{png,npy} (+ .csv up to 1000 images), cosine_images.csv, permutation_tests.csv, top_filters_GROUP.{csv,png},
volumes/mean_GROUP.* and volumes/difference_REFERENCE-minus-GROUP.* (ParaView), manifest.json."""


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("conv-gradients", epilog=CONV_EPILOG, formatter_class=raw,
                       help="per image: gradient of a class logit w.r.t. a conv layer's filters (volume, "
                            "per-filter importance, top filters beside their weights)")
    common.add_input_options(p)
    common.add_model_options(p)
    p.add_argument("--class", "-c", dest="target", default=None, metavar="K",
                   help="class index or name whose logit is differentiated (default: each image's "
                        "predicted class)")
    p.add_argument("--seed", type=common.seed, default=0,
                   help="seed choosing the --check-numerical entries (default 0)")
    _add_layer_options(p)
    cluster.add_dataset_options(p)
    cluster.add_dask_options(p)
    common.add_output_options(p, "out/conv_gradients")
    p.set_defaults(func=cmd_conv_gradients)

    p = sub.add_parser("compare-classes", epilog=COMPARE_EPILOG, formatter_class=raw,
                       help="how one class neuron's filter gradients differ between groups of images "
                            "(reference / similar / dissimilar): means, cosine similarity, permutation tests")
    common.add_model_options(p)
    p.add_argument("--preprocess", default=None, metavar="PRESET",
                   help="preprocessing preset (default: the model's own)")
    p.add_argument("--neuron", "-n", default=None, metavar="K",
                   help="class index or name whose logit is differentiated (default: the sidecar's)")
    for role in ROLES:
        p.add_argument(f"--{role}", nargs="+", default=None, metavar="ITEM",
                       help=f"the {role} group: files, folders, .npy arrays or sample class names")
    p.add_argument("--per-item", action="store_true", default=None,
                   help="make each item of --similar/--dissimilar its own group (e.g. one per class; "
                        "default: the sidecar's per_item, else one group per option)")
    p.add_argument("--permutations", type=common.int_range(1, common.MAX_PERMUTATIONS), default=999,
                   help="relabellings per permutation test (default 999)")
    p.add_argument("--seed", type=common.seed, default=0, help="seed of the permutation tests and checks (default 0)")
    p.add_argument("--max-vectors-per-group", type=common.int_range(1, common.MAX_VECTORS_PER_GROUP), default=1000,
                   help="images per group kept (those among its first N inputs; an unreadable one skipped "
                        "still counts) for the cosine matrix and the gradient permutation test; means, stds "
                        "and importance tests use all (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tmp-dir", type=common.writable_folder, default=None, metavar="DIR",
                   help="folder for the temporary float32 memmap of the kept gradient vectors "
                        "(default: the system's temporary folder; up to 4·d bytes per kept image)")
    _add_layer_options(p)
    cluster.add_dataset_options(p, groups=True)
    cluster.add_dask_options(p, no_progress=False)
    common.add_output_options(p, "out/compare_classes")
    p.set_defaults(func=cmd_compare_classes)


def _add_layer_options(p) -> None:
    p.add_argument("--layer", "-l", default=None, help="convolution layer (default: the first, conv1)")
    p.add_argument("--top-k", type=common.positive_int, default=8, help="filters shown and listed (default 8)")
    g = p.add_argument_group("volumes")
    common.add_volume_format_option(g, "volume formats")
    g.add_argument("--normalization", default="symmetric", choices=("symmetric", "global", "per-channel"),
                   help="how gradients become 0..1 in the volumes (default symmetric: 0 stays at 0.5)")
    g.add_argument("--threshold", type=common.fraction, default=0.5,
                   help="volume mask = normalized > THRESHOLD (default 0.5: positive gradients)")
    p.add_argument("--check-numerical", type=common.nonnegative_int, default=0, metavar="N",
                   help="check N random weights of the first image's gradient by float64 central "
                        "differences and report the error (default 0 = no check)")


# ------------------------------------------------------------------------------------ helpers


def _channel_order(args, model, weights) -> str:
    if weights.shape[1] != 3:
        return "RGB"
    return common.preprocessing_for(args, model).channel_order


def _write_volume(run, rel_base, array, formats, args, meta, kind) -> None:
    common.write_run_volumes(run, rel_base, array, formats, kind, meta, layout="stack",
                             normalization=args.normalization, threshold=args.threshold, metadata=meta)


def _check_args(args) -> None:
    if not 0.0 <= args.threshold <= 1.0:
        raise CnnvisError(f"--threshold {args.threshold}: expected a number in [0, 1]")
    if args.check_numerical < 0:
        raise CnnvisError(f"--check-numerical {args.check_numerical}: expected 0 or a positive number of entries")


# ------------------------------------------------------------------------------------ conv-gradients


def cmd_conv_gradients(args) -> int:
    import numpy as np

    from ..analysis import class_gradients as cgm
    from ..export import plots
    from ..manifest import RunOutput, save_npy, write_json

    _check_args(args)
    formats = common.volume_formats(args)
    model = common.load_model(args)
    if args.dask:
        cluster.options(args)  # a bad address or --input-array fails before anything is read
    cg = cgm.ClassGradients(model, args.layer, args.batch_size)
    layer = cg.layer_.name
    target = None if args.target is None else model.class_index(args.target, "--class")
    skipped, store, recorded = [], None, common.recorded_inputs(args, model)
    if args.dask:  # the shard results are recorded in --out while the cluster runs, outside RunOutput
        common.model_warning(model)
        _, batches, skipped, store = cluster.conv_gradients(args, model, common.Inputs(args, model), layer, target)
    else:
        # unreadable dataset files are skipped; none readable, or an unreadable file named explicitly,
        # fails here, before anything is staged
        chunks = common.checked_input_chunks(args, model, skipped)
        common.model_warning(model)
        batches = ((names, cg.run(x, target), x[:1]) for names, x in chunks)
    weights = cg.weights_
    order = _channel_order(args, model, weights)
    top_k = min(args.top_k, weights.shape[0])
    classes = model.class_names
    params = {"layer": layer, "class": target, "top_k": top_k, "formats": formats,
              "normalization": args.normalization, "threshold": args.threshold,
              "check_numerical": args.check_numerical, "seed": args.seed, "batch_size": args.batch_size,
              "input_array": args.input_array, "objective": "logit (pre-softmax class score)"}
    rows, used, gradcheck = [], {}, None
    lname = common.safe_name(layer)
    with RunOutput(args.out, "conv-gradients", params=params, inputs=recorded, model=model.info()) as run:
        for names, batch, x1 in batches:
            if args.check_numerical and gradcheck is None:
                report = cg.check_numerical(x1, int(batch.targets[0]), args.check_numerical, args.seed,
                                            analytic=batch.gradients[0])
                gradcheck = cgm.gradcheck_dict(report, names[0])
                print(f"cnnvis conv-gradients: numerical check on {names[0]}: {report}")
            for i, (name, safe) in enumerate(zip(names, common.unique_names(names, used))):
                grad = batch.gradients[i]
                imp = batch.importance[i]
                k = int(batch.targets[i])
                top = [int(f) for f in np.argsort(-imp, kind="stable")[:top_k]]
                meta = {"model": model.name, "model_sha256": model.sha256, "layer": layer, "image": name,
                        "class": k, "class_name": classes[k], "objective": "logit"}
                save_npy(run.path(f"{safe}/{lname}_gradient.npy", kind="gradient", layer=layer, image=name,
                                  shape=list(grad.shape), **{"class": k}), grad)
                _write_volume(run, f"{safe}/{lname}_gradient_volume", grad, formats, args, meta, "gradient-volume")
                title = f"{name}: d logit[{k} {classes[k]}] / d {layer}"
                plots.plot_importance(run.path(f"{safe}/importance.png", kind="importance-plot", layer=layer,
                                               image=name), imp, title, highlight=top)
                plots.plot_importance(run.path(f"{safe}/importance_sorted.png", kind="importance-plot-sorted",
                                               layer=layer, image=name), imp, title + " (sorted)", sort=True,
                                      highlight=top)
                grid = plots.save_filters_beside(
                    run.path(f"{safe}/top_filters.png", kind="top-filters", layer=layer, image=name,
                             columns=["weights", "gradient"], filters=top),
                    [weights, grad], top, channel_order=order)
                ranks = np.empty(len(imp), dtype=np.int64)
                ranks[np.argsort(-imp, kind="stable")] = np.arange(1, len(imp) + 1)
                run.path(f"{safe}/importance.csv", kind="importance-table", layer=layer, image=name).write_text(
                    csv_text(["filter", "importance", "rank"],
                                 [(f, float(imp[f]), int(ranks[f])) for f in range(len(imp))]), encoding="utf-8")
                pred = int(batch.predicted[i])
                rows.append({
                    "image": name, "folder": safe, "predicted": pred, "predicted_name": classes[pred],
                    "predicted_probability": float(batch.probabilities[i, pred]), "class": k,
                    "class_name": classes[k], "class_logit": float(batch.target_logits[i]),
                    "class_probability": float(batch.target_probabilities[i]),
                    "gradient_norm": float(np.sqrt(np.sum(imp ** 2))), "top_filters": top, "grid": grid,
                })
                print(f"cnnvis conv-gradients: {name}: predicted {classes[pred]} ({pred}, p={rows[-1]['predicted_probability']:.3f}); "
                      f"d logit[{classes[k]}]/d {layer}: |g|={rows[-1]['gradient_norm']:.4g}, top filters {top[:5]}")
        header = ["image", "predicted", "predicted_name", "predicted_probability", "class", "class_name",
                  "class_logit", "class_probability", "gradient_norm", "top_filters"]
        run.path("summary.csv", kind="summary-table").write_text(csv_text(
            header, [[r[h] if h != "top_filters" else " ".join(map(str, r[h])) for h in header] for r in rows]),
            encoding="utf-8")
        write_json(run.path("summary.json", kind="summary"),
                   {"layer": layer, "weight_shape": list(weights.shape), "images": rows, "gradcheck": gradcheck})
        run.extra["gradcheck"] = gradcheck
        if skipped:
            run.extra["skipped"] = common.skipped_record(skipped)
        if not args.dask:
            common.report_skipped("conv-gradients", skipped)
    if store is not None:
        store.remove()
    print(f"cnnvis conv-gradients: {len(rows)} image(s), layer {layer} -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------ compare-classes


def _groups_from_args(args, model):
    """``(neuron, {group name: (items, files)}, per_item)``; the first group is the reference."""
    from .. import datasets

    defaults = datasets.compare_defaults(model)
    neuron = args.neuron if args.neuron is not None else defaults.get("neuron")
    if neuron is None:
        raise CnnvisError(f"--neuron: model {model.name} has no compare_classes defaults in its sidecar; "
                          "give the class index or name")
    neuron = model.class_index(neuron, "--neuron")
    chosen = {role: getattr(args, role) if getattr(args, role) is not None else defaults.get(role) for role in ROLES}
    if not chosen["reference"]:
        chosen["reference"] = [model.class_names[neuron]]
    if not chosen["similar"] and not chosen["dissimilar"]:
        raise CnnvisError("--similar/--dissimilar: give at least one group to compare the reference with "
                          "(or a compare_classes entry in the model's sidecar)")
    per_item = args.per_item if args.per_item is not None else defaults.get("per_item", False)
    groups = {}
    for role in ROLES:
        items = chosen[role]
        if not items:
            continue
        found = cluster.tree_items(args, model, items)  # --image-tree: class items → its subfolders
        if per_item and role != "reference" and len(items) > 1:
            for item, where in zip(items, found):
                name = f"{role}-{common.safe_name(str(item))}"
                groups[name] = ([item], datasets.resolve_group(model, [where], f"--{role} {item}"))
        else:
            groups[role] = (list(items), datasets.resolve_group(model, found, f"--{role}"))
    return neuron, groups, per_item


def cmd_compare_classes(args) -> int:
    from .. import datasets
    from ..analysis import class_gradients as cgm
    from ..manifest import RunOutput

    _check_args(args)
    formats = common.volume_formats(args)
    model = common.load_model(args)
    if args.dask:
        cluster.options(args)  # a bad address fails before anything is read
    layer = cgm.conv_layer(model, args.layer).name
    neuron, groups, per_item = _groups_from_args(args, model)
    pre = common.preprocessing_for(args, model)
    totals = {g: datasets.group_size(model, files) for g, (_, files) in groups.items()}
    common.model_warning(model)
    cmp = cgm.ClassComparison(model, layer=layer, batch_size=args.batch_size,
                              n_permutations=args.permutations, seed=args.seed,
                              max_vectors_per_group=args.max_vectors_per_group, top_k=args.top_k,
                              progress=not args.no_progress and not args.dask,
                              check_numerical=args.check_numerical,
                              tmp_dir=args.tmp_dir)
    classes = model.class_names
    params = {"neuron": neuron, "neuron_name": classes[neuron], "layer": layer,
              "groups": {g: [str(i) for i in items] for g, (items, _) in groups.items()},
              "permutations": args.permutations, "seed": args.seed, "top_k": args.top_k,
              "max_vectors_per_group": args.max_vectors_per_group, "formats": formats,
              "normalization": args.normalization, "threshold": args.threshold,
              "check_numerical": args.check_numerical, "per_item": per_item,
              "batch_size": args.batch_size, "preprocessing": pre.to_dict()}
    inputs = [str(f) for _, files in groups.values() for f in files]
    skipped, store = [], None
    if args.dask:  # the shard results are recorded in --out while the cluster runs, outside RunOutput
        res, skipped, store = cluster.compare_classes(args, model, cmp, neuron, groups, pre)
    with RunOutput(args.out, "compare-classes", params=params, inputs=inputs, model=model.info()) as run:
        if not args.dask:  # unreadable files of folders and classes are skipped, as on a cluster
            from ..preprocess import named_positions

            skipped_of = {g: [] for g in groups}
            res = cmp.run({g: _readable(datasets.iter_group_chunks(model, files, pre, args.batch_size, skipped_of[g],
                                                                   named_positions(items, files)),
                                        g, len(files), skipped_of[g])
                           for g, (items, files) in groups.items()}, target=neuron, totals=totals)
            skipped = [[g, *entry] for g, entries in skipped_of.items() for entry in entries]
            common.report_skipped("compare-classes", skipped)
        if skipped:
            run.extra["skipped"] = common.skipped_record(skipped)
        _write_comparison(run, res, args, model, formats)
        run.extra["summary"] = {
            "counts": res.counts,
            "gradient_p_values": {g: t.p_value for g, t in res.gradient_tests.items()},
            "cosine_within_mean": res.cosine_summary["within_mean"],
            "cosine_between_mean": res.cosine_summary["between_mean"],
            "gradcheck": res.summary["gradcheck"],
        }
    if store is not None:
        store.remove()
    ref = res.group_names[0]
    print(f"cnnvis compare-classes: neuron {neuron} ({classes[neuron]}), layer {layer}; "
          + ", ".join(f"{g}: {n} images" for g, n in res.counts.items()))
    for g, t in res.gradient_tests.items():
        it = res.importance_tests[g]
        top = ", ".join(str(f["filter"]) for f in res.top_filters[g][:5])
        print(f"  {ref} vs {g}: mean-gradient distance {t.observed:.4g} (p={t.p_value:.4g}, "
              f"{t.n_permutations} permutations, seed {t.seed}); importance distance p={it.p_value:.4g}; "
              f"filters differing most: {top}")
    cs = res.cosine_summary
    if cs["within_mean"] is not None and cs["between_mean"] is not None:
        print(f"  cosine similarity: within groups {cs['within_mean']:.4f}, between groups {cs['between_mean']:.4f}")
    if res.gradcheck is not None:
        print(f"  numerical check ({res.gradcheck_image}): {res.gradcheck}")
    print(f"cnnvis compare-classes: -> {args.out}")
    return 0


def _readable(chunks, group: str, n: int, skipped: list):
    """A group's chunks; a group none of whose files can be read is one error, as on a cluster."""
    empty = True
    for chunk in chunks:
        empty = False
        yield chunk
    if empty:
        raise common.none_readable(n, skipped, group=group)


def _write_comparison(run, res, args, model, formats) -> None:
    import numpy as np

    from ..export import plots
    from ..manifest import save_npy, write_json

    names = res.group_names
    ref = names[0]
    layer = res.layer
    safe = {g: common.safe_name(g) for g in names}
    neuron_label = f"{res.neuron} {model.class_names[res.neuron]}"
    write_json(run.path("summary.json", kind="summary", layer=layer), res.summary)

    header = ["group", "image", "kept_for_cosine", "predicted", "predicted_name", "predicted_probability",
              "neuron_logit", "neuron_probability", "gradient_norm"]
    run.path("images.csv", kind="images-table").write_text(
        csv_text(header, [[r[h] for h in header] for r in res.images]), encoding="utf-8")

    header = ["filter"] + [f"{g}_{s}" for g in names for s in ("mean", "std", "normalized_mean", "normalized_std")]
    rows = [[f] + [v for g in names for v in (res.importance_mean[g][f], res.importance_std[g][f],
                                              res.normalized_mean[g][f], res.normalized_std[g][f])]
            for f in range(len(res.weights))]
    run.path("importance.csv", kind="importance-table", layer=layer).write_text(csv_text(header, rows),
                                                                                 encoding="utf-8")
    plots.plot_group_importance(run.path("importance_raw.png", kind="importance-plot", layer=layer),
                                res.importance_mean, res.importance_std,
                                f"‖∂logit[{neuron_label}]/∂W_f‖₂ per {layer} filter (mean ± std)",
                                ylabel="importance")
    plots.plot_group_importance(run.path("importance_normalized.png", kind="importance-plot", layer=layer),
                                res.normalized_mean, res.normalized_std,
                                "per-image min-max normalised importance (mean ± std)", ylabel="normalised importance")

    plots.plot_cosine_matrix(run.path("cosine_similarity.png", kind="cosine-plot", layer=layer), res.cosine,
                             res.cosine_groups, names,
                             f"cosine similarity of ∂logit[{neuron_label}]/∂{layer} between images")
    labels = [f"{names[g]}/{n}" for g, n in zip(res.cosine_groups, res.cosine_names)]
    run.path("cosine_images.csv", kind="cosine-rows").write_text(
        csv_text(["row", "group", "image"], [(i, names[g], n) for i, (g, n) in
                                                 enumerate(zip(res.cosine_groups, res.cosine_names))]),
        encoding="utf-8")
    save_npy(run.path("cosine_similarity.npy", kind="cosine-matrix", rows="cosine_images.csv"),
             res.cosine.astype(np.float64))
    if len(labels) <= COSINE_CSV_MAX:  # beyond that the text matrix is too large to be useful
        run.path("cosine_similarity.csv", kind="cosine-table").write_text(
            csv_text([""] + labels, [[lab] + [float(v) for v in row] for lab, row in zip(labels, res.cosine)]),
            encoding="utf-8")

    header = ["reference", "group", "features", "statistic", "observed", "p_value", "n_permutations", "seed",
              "n_reference", "n_group"]
    rows = []
    for g in names[1:]:
        for feats, t in (("gradient", res.gradient_tests[g]), ("importance", res.importance_tests[g])):
            rows.append([ref, g, feats, t.statistic, t.observed, t.p_value, t.n_permutations, t.seed, t.n_a, t.n_b])
    run.path("permutation_tests.csv", kind="permutation-tests").write_text(csv_text(header, rows),
                                                                             encoding="utf-8")

    order = _channel_order(args, model, res.weights)
    header = ["filter", "difference", "reference_mean", "other_mean", "reference_std", "other_std",
              "effect_size", "p_value", "p_adjusted"]
    for g in names[1:]:
        top = res.top_filters[g]
        run.path(f"top_filters_{safe[g]}.csv", kind="top-filters-table", group=g).write_text(
            csv_text(header, [[t[h] for h in header] for t in top]), encoding="utf-8")
        filters = [t["filter"] for t in top]
        plots.save_filters_beside(
            run.path(f"top_filters_{safe[g]}.png", kind="top-filters", layer=layer, group=g, filters=filters,
                     columns=["weights", f"mean gradient {ref}", f"mean gradient {g}", f"{ref} - {g}"]),
            [res.weights, res.mean_gradient[ref], res.mean_gradient[g], res.difference[g]], filters,
            channel_order=order)

    base_meta = {"model": model.name, "model_sha256": model.sha256, "layer": layer, "neuron": res.neuron,
                 "neuron_name": model.class_names[res.neuron], "objective": "logit"}
    for g in names:
        _write_volume(run, f"volumes/mean_{safe[g]}", res.mean_gradient[g], formats, args,
                      {**base_meta, "image": f"mean of {res.counts[g]} images ({g})", "group": g}, "mean-gradient")
    for g in names[1:]:
        _write_volume(run, f"volumes/difference_{safe[ref]}-minus-{safe[g]}", res.difference[g], formats, args,
                      {**base_meta, "image": f"mean {ref} - mean {g}", "group": g}, "difference-gradient")
