"""`cnnvis layers`, `cnnvis activations`, `cnnvis filters`."""
from __future__ import annotations

import json
import sys

from . import cluster, common

ORDER = 10


def register(sub) -> None:
    p = sub.add_parser("layers", help="the layer table of a model (names, shapes, weights, MACs)")
    common.add_model_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("activations", help="2D grids of each layer's activations, plus .npy/HDF5 stacks")
    common.add_input_options(p)
    common.add_model_options(p)
    p.add_argument("--layer", "-l", action="append", default=None,
                   help="layer to show (repeatable; 'all' or none = every computing layer)")
    p.add_argument("--normalization", default="channel", choices=("channel", "global"),
                   help="scale each map on its own (channel) or the whole layer together (global)")
    p.add_argument("--cmap", default="viridis", help="matplotlib colormap (default viridis; 'gray')")
    p.add_argument("--labels", action="store_true", help="write each map's channel index on it")
    p.add_argument("--ncols", type=common.positive_int, default=None, help="grid columns (default: near-square)")
    p.add_argument("--stats", action="store_true",
                   help="instead of per-image grids: per-channel mean, std, max and fraction active of each layer "
                        "over all the inputs (activation_stats.csv/.json; a dataset, on a cluster with --dask)")
    cluster.add_dataset_options(p)
    cluster.add_dask_options(p)
    common.add_output_options(p, "out/activations")
    p.set_defaults(func=cmd_activations)

    p = sub.add_parser("filters", help="a conv layer's filters as a tile grid (the classic conv1 picture)")
    common.add_model_options(p)
    p.add_argument("--layer", "-l", default=None, help="conv layer (default: the first)")
    p.add_argument("--ncols", type=common.positive_int, default=None)
    p.add_argument("--cmap", default="gray", help="colormap for single-channel filters")
    common.add_output_options(p, "out/filters")
    p.set_defaults(func=cmd_filters)


def format_layer_table(model) -> str:
    rows = [("layer", "op", "output", "weight", "bias", "params", "MACs", "caffe blob")]
    caffe = any(layer.caffe_type for layer in model.layers)
    for layer in model.layers:
        fmt = lambda s: "×".join(map(str, s)) if s else "-"  # noqa: E731
        op = f"{layer.op_type} ({layer.caffe_type})" if caffe and layer.caffe_type else layer.op_type
        rows.append((layer.name, op, fmt(layer.output_shape), fmt(layer.weight_shape),
                     fmt(layer.bias_shape), f"{layer.params:,}" if layer.params else "-",
                     f"{layer.macs:,}" if layer.macs else "-", layer.caffe_blob or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    total_p = sum(layer.params for layer in model.layers)
    total_m = sum(layer.macs for layer in model.layers)
    status = {True: "trained", False: "UNTRAINED (random weights)", None: "training state unknown"}[model.trained]
    head = (f"model {model.name}: input {model.input_name} N×{'×'.join(map(str, model.input_shape))}, "
            f"{status}, sha256 {model.sha256[:16]}…")
    return "\n".join([head, *lines, f"total: {total_p:,} parameters, {total_m:,} MACs per image"])


def cmd_layers(args) -> int:
    model = common.load_model(args)
    if args.json:
        json.dump({"model": model.info(), "layers": [layer.as_dict() for layer in model.layers]},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_layer_table(model))
    return 0


def cmd_activations(args) -> int:
    from ..analysis import activations
    from ..export import figures
    from ..manifest import RunOutput, hdf5_file, save_npy

    if args.stats:
        return _activation_stats(args)
    if args.dask:
        from ..errors import CnnvisError

        raise CnnvisError("--dask: activations runs on a cluster with --stats only (per-image grids are "
                          "written by this process)")
    model = common.load_model(args)
    layers = activations.resolve_layers(model, args.layer)
    chunks = common.checked_input_chunks(args, model)  # bad inputs fail here, before anything is staged
    common.model_warning(model)
    params = {"layers": layers, "normalization": args.normalization, "cmap": args.cmap, "ncols": args.ncols,
              "batch_size": args.batch_size, "input_array": args.input_array}
    used = {}
    preprocessing_json = ("--input-array (preprocessed by the user)" if args.input_array else
                          json.dumps(common.preprocessing_for(args, model).to_dict(), sort_keys=True))
    # the layer table rides along in this run's model card (the report shows it)
    card = dict(model.info(), layers=[layer.as_dict() for layer in model.layers])
    with RunOutput(args.out, "activations", params=params, inputs=common.recorded_inputs(args, model), model=card) as run:
        analysis = activations.Activations(model, layers, batch_size=args.batch_size)
        for names, acts in ((names, analysis.run(batch).values) for names, batch in chunks):
            for i, (name, safe) in enumerate(zip(names, common.unique_names(names, used))):
                h5_path = run.path(f"{safe}/activations.h5", kind="stack-hdf5", image=name)
                with hdf5_file(h5_path) as h5:
                    h5.attrs["image"] = name
                    h5.attrs["model"] = model.name
                    h5.attrs["model_sha256"] = model.sha256
                    h5.attrs["preprocessing"] = preprocessing_json
                    for layer in layers:
                        values = acts[layer][i]
                        lname = common.safe_name(layer)
                        ds = h5.create_dataset(layer, data=values, compression="gzip", compression_opts=4,
                                               shuffle=True)
                        ds.attrs["layer"] = layer
                        ds.attrs["shape"] = values.shape
                        figures_meta = figures.grid_png(
                            run.path(f"{safe}/{lname}.png", kind="grid", layer=layer, image=name),
                            activations.as_maps(values), ncols=args.ncols, normalization=args.normalization,
                            cmap=args.cmap, labels=args.labels)
                        save_npy(run.path(f"{safe}/{lname}.npy", kind="stack", layer=layer, image=name,
                                          shape=list(values.shape), **{"grid": figures_meta}), values)
    print(f"cnnvis activations: {len(used)} image(s) × {len(layers)} layer(s) -> {args.out}")
    return 0


def _activation_stats(args) -> int:
    """`activations --stats`: per-channel statistics over every input, in chunks (or on a cluster)."""
    from ..analysis import activations
    from ..export.tables import csv_text
    from ..manifest import RunOutput, write_json

    model = common.load_model(args)
    if args.dask:
        cluster.options(args)  # a bad address or --input-array fails before anything is read
    layers = activations.resolve_layers(model, args.layer)
    inputs = common.Inputs(args, model)
    common.model_warning(model)
    skipped, store = [], None
    if args.dask:
        result, skipped, store = cluster.activation_stats(args, model, inputs, layers)
    else:
        result, analysis = activations.DatasetChannelStats(), activations.Activations(model, layers, args.batch_size)
        for _, x, _ in inputs.readable_chunks(0, args.batch_size, skipped):
            result.update(analysis.run(x).values)
        if result.n_images_ == 0:
            raise common.none_readable(len(inputs), skipped)
        common.report_skipped("activations", skipped)
    summary = result.summary()
    params = {"layers": layers, "stats": True, "batch_size": args.batch_size, "input_array": args.input_array}
    rows = [[layer, c, s["values_per_channel"], s["mean"][c], s["std"][c], s["max"][c], s["fraction_active"][c]]
            for layer, s in summary.items() for c in range(len(s["mean"]))]
    with RunOutput(args.out, "activations", params=params, inputs=inputs.sources, model=model.info()) as run:
        if skipped:
            run.extra["skipped"] = common.skipped_record(skipped)
        write_json(run.path("activation_stats.json", kind="activation-stats"),
                   {"n_images": result.n_images_, "layers": {
                       layer: {"shape": list(model.layer(layer).output_shape or []), **s}
                       for layer, s in summary.items()},
                    "definition": "per channel, over every value of the channel (all images and positions): "
                                  "mean, population standard deviation, maximum, fraction of values > 0"})
        run.path("activation_stats.csv", kind="activation-stats-table").write_text(csv_text(
            ["layer", "channel", "values", "mean", "std", "max", "fraction_active"], rows), encoding="utf-8")
    if store is not None:
        store.remove()
    print(f"cnnvis activations: per-channel statistics of {len(layers)} layer(s) over {result.n_images_} image(s) "
          f"-> {args.out}")
    return 0


def cmd_filters(args) -> int:
    import numpy as np

    from ..export import figures
    from ..manifest import RunOutput, save_npy

    model = common.load_model(args)
    if args.layer:
        layer = model.layer(args.layer)
    else:
        layer = model.conv_layers()[0]
    if layer.op_type not in ("Conv", "ConvTranspose") or layer.weight is None:
        from ..errors import CnnvisError

        raise CnnvisError(f"--layer {layer.name}: is a {layer.op_type}; filters need a convolution layer")
    weights = model.param(layer.weight)
    order = common.preprocessing_for(args, model).channel_order if weights.shape[1] == 3 else "RGB"
    tiles = figures.filters_rgb_stack(weights, channel_order=order)
    common.model_warning(model)
    with RunOutput(args.out, "filters", params={"layer": layer.name}, model=model.info()) as run:
        lname = common.safe_name(layer.name)
        meta = figures.grid_png(run.path(f"{lname}_filters.png", kind="filters", layer=layer.name),
                                tiles, ncols=args.ncols, cmap=args.cmap, normalization="channel",
                                scale=max(2, figures.auto_scale(*tiles.shape[1:3], target=48)))
        save_npy(run.path(f"{lname}_weights.npy", kind="weights", layer=layer.name,
                          shape=list(weights.shape), grid=meta), np.asarray(weights))
    print(f"cnnvis filters: {layer.name} {'×'.join(map(str, weights.shape))} -> {args.out}")
    return 0



