"""`cnnvis volume`, `cnnvis order`, `cnnvis render`: a layer's maps as a 3-D volume.

Each command takes its C×H×W stack(s) from one of:

* images (or a preprocessed N×C×H×W ``--input-array``) run through ``--model`` up to ``--layer``:
  one stack per image, or one over all images with ``--reduce mean|max``;
* ``--input-array`` of a 3-D C×H×W ``.npy``: that stack itself;
* ``--volume FILE``: a volume file (``.hdf``, ``.vti``, ``.vox``, ``.npy``; a 4-D N×Cin×kh×kw
  array such as conv1 weight gradients becomes a volume by ``--layout``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import common
from ..errors import CnnvisError
from ..export.volumes import FORMATS

ORDER = 30
_SUFFIXES = [f.suffix for f in FORMATS.values()]  # .hdf, .vti, .vox, .npy
SOURCES_HELP = f"""stack sources (one of):
  IMAGE ... --layer L        the layer's maps for each image (or --reduce mean|max over them)
  --input-array X.npy        a preprocessed N×C×H×W batch for the model, or a C×H×W stack as is
  --volume FILE              a volume file ({', '.join(_SUFFIXES)}; 4-D arrays by --layout)

axes: x = map column, y = map row (row 0 at the top), z = channel order of the stack"""


# ------------------------------------------------------------------------------------ options


def _add_source_options(p: argparse.ArgumentParser) -> None:
    common.add_input_options(p)
    common.add_model_options(p)
    g = p.add_argument_group("stack")
    g.add_argument("--volume", default=None, metavar="FILE",
                   help=f"use this volume file instead of a model: {', '.join(_SUFFIXES[:-1])} or "
                        f"{_SUFFIXES[-1]} (C×H×W, or N×Cin×kh×kw with --layout)")
    g.add_argument("--layer", "-l", default=None,
                   help="layer whose maps form the stack (default: the first convolution)")
    g.add_argument("--reduce", default="none", choices=("none", "mean", "max"),
                   help="one stack per image (none, default) or the mean/max over all images")
    g.add_argument("--layout", default="stack", choices=("stack", "tiles"),
                   help="how a 4-D N×Cin×kh×kw array becomes a volume: (N·Cin)×kh×kw slices "
                        "(stack) or N slices of Cin maps side by side (tiles)")


def _add_volume_look_options(p: argparse.ArgumentParser, threshold_help: str,
                             permutation: bool = True) -> None:
    g = p.add_argument_group("volume")
    g.add_argument("--normalization", default="global", choices=("global", "per-channel", "symmetric"),
                   help="how values become 0..1: min-max over the volume (global), per slice, or "
                        "symmetric around 0 (for signed values such as gradients)")
    g.add_argument("--threshold", type=common.fraction, default=0.5, help=threshold_help)
    g.add_argument("--spacing", type=common.positive_float, nargs=3, default=(1.0, 1.0, 1.0),
                   metavar=("SX", "SY", "SZ"), help="voxel spacing along x, y, z (default 1 1 1)")
    if permutation:
        g.add_argument("--permutation", default=None, metavar="ORDER.json",
                       help="reorder the slices by the 'permutation' of an order.json "
                            "(`cnnvis order`)")


def register(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("volume", epilog=SOURCES_HELP, formatter_class=raw,
                       help="a layer's C×H×W maps as 3-D volumes (.hdf for ParaView, .vti, "
                            "CNN-VIS .vox/.hd, .npy)")
    _add_source_options(p)
    _add_volume_look_options(p, "mask = normalized > THRESHOLD (the binary output of each "
                                "filter; also where ParaView's opacity starts), default 0.5")
    common.add_volume_format_option(p, "file format")
    common.add_output_options(p, "out/volumes")
    p.set_defaults(func=cmd_volume)

    p = sub.add_parser("order", epilog=SOURCES_HELP, formatter_class=raw,
                       help="reorder a stack's maps so similar ones sit together (k-means / PCA "
                            "on rows or maps, smoothest path)")
    _add_source_options(p)
    p.add_argument("--method", default="pca-maps",
                   choices=("kmeans-rows", "pca-rows", "pca-maps", "kmeans-maps", "smooth"),
                   help="ordering method (default pca-maps)")
    p.add_argument("--clusters", "-k", type=common.positive_int, default=8,
                   help="k-means clusters (default 8)")
    p.add_argument("--row", type=common.nonnegative_int, default=None,
                   help="row used by the *-rows methods and the pictures (default: the middle)")
    p.add_argument("--seed", type=common.seed, default=0, help="k-means seed (default 0)")
    p.add_argument("--n-init", type=common.positive_int, default=10,
                   help="k-means restarts (default 10)")
    p.add_argument("--separator", type=common.nonnegative_int, default=2,
                   help="white pixel rows between clusters in the pictures (default 2; 0 = none)")
    _add_volume_look_options(p, "mask threshold of the written volumes, default 0.5",
                             permutation=False)
    common.add_volume_format_option(p, "formats of the reordered volume")
    common.add_output_options(p, "out/order")
    p.set_defaults(func=cmd_order)

    p = sub.add_parser("render", epilog=SOURCES_HELP, formatter_class=raw,
                       help="3-D pictures of a stack: volume rendering, isosurface, threshold, "
                            "orthogonal slices, separated slices; orbit GIF")
    _add_source_options(p)
    from ..export import RENDER_MODES

    p.add_argument("--mode", action="append", choices=RENDER_MODES, default=None,
                   help="what to draw (repeatable; default volume)")
    p.add_argument("--gif", action="store_true", help="also write an orbit GIF of the first mode")
    p.add_argument("--frames", type=common.positive_int, default=36, help="GIF frames (default 36)")
    p.add_argument("--fps", type=common.positive_float, default=12.0, help="GIF frames per second (default 12)")
    p.add_argument("--window-size", type=common.int_range(1, common.MAX_WINDOW_SIDE), nargs=2, default=(800, 800),
                   metavar=("W", "H"), help="picture size in pixels (default 800 800)")
    p.add_argument("--azimuth", type=common.finite_float, default=35.0, help="camera azimuth in degrees")
    p.add_argument("--elevation", type=common.finite_float, default=25.0, help="camera elevation in degrees")
    p.add_argument("--gap", type=common.nonnegative_float, default=None,
                   help="distance of the planes in --mode stack, in z spacings (default: "
                        "1.5·max(W, H)/C clipped to 1..4)")
    p.add_argument("--cmap", default="viridis", help="matplotlib colormap (default viridis)")
    p.add_argument("--show", action="store_true",
                   help="open an interactive window instead of writing files (needs a display)")
    _add_volume_look_options(p, "opacity starts here (volume, stack), the isosurface value, or the "
                                "cut-off of --mode threshold, on the 0..1 scale; default 0.5")
    common.add_output_options(p, "out/render")
    p.set_defaults(func=cmd_render)


# ------------------------------------------------------------------------------------ sources


class _Source:
    """Where the stacks come from; ``stacks()`` yields ``(name, array, meta)``."""

    def __init__(self, model_info=None, inputs=(), label="volume", iterator=()):
        self.model_info = model_info
        self.inputs = list(inputs)
        self.label = label  # file stem inside each stack's folder (the layer, or "volume")
        self._iterator = iterator

    def stacks(self):
        return self._iterator


def _is_stack_array(path) -> bool:
    """True when --input-array holds a 3-D C×H×W stack (not a preprocessed N×C×H×W batch)."""
    from ..manifest import load_npy

    try:
        return load_npy(path, "--input-array", mmap=True).ndim == 3
    except CnnvisError:
        return False  # the model-input loader reports the problem in its own words


def _first_conv(model) -> str:
    for layer in model.conv_layers(transposed=True):
        if layer.output_shape is not None and len(layer.output_shape) == 3:
            return layer.name
    raise CnnvisError(f"model {model.name}: no convolution layer with C×H×W output; pass --layer")


def _open_source(args) -> _Source:
    """Resolve the stack source, validating inputs before anything is written."""
    import numpy as np

    from ..export import volumes

    if args.volume and (args.images or args.input_array):
        raise CnnvisError("--volume: give either a volume file or images/--input-array, not both")
    if args.volume or (args.input_array and _is_stack_array(args.input_array)):
        path = Path(args.volume or args.input_array)
        option = "--volume" if args.volume else "--input-array"
        if not path.is_file():
            raise CnnvisError(f"{option} {path}: no such file")
        vol = volumes.read_volume(path)
        array = vol.values
        # validate now (one-line errors before anything is staged); the command converts later
        if array.ndim == 4:
            volumes.stack_from_array(array, layout=args.layout, name=f"{option} {path}")
        else:
            volumes.as_stack(array, name=f"{option} {path}")
        meta = {k: vol.metadata[k] for k in ("model", "layer", "image") if k in vol.metadata}
        meta["source"] = str(path)
        label = common.safe_name(meta.get("layer", "volume"))
        item = (common.safe_name(path.stem), array, meta)
        return _Source(None, [str(path)], label, iter([item]))

    model = common.load_model(args)
    layer = model.layer(args.layer).name if args.layer else _first_conv(model)
    shape = model.layer(layer).output_shape
    if shape is None or len(shape) != 3:
        raise CnnvisError(f"--layer {layer}: outputs shape {shape} per image; a volume needs "
                          "C×H×W feature maps (a convolution, pooling or LRN layer)")
    chunks = common.checked_input_chunks(args, model)  # unreadable inputs fail here, before any output is staged
    common.model_warning(model)
    meta_base = {"model": model.name, "model_sha256": model.sha256, "layer": layer}

    def per_image():
        used = {}
        for names, batch in chunks:
            acts = model.run(batch, [layer], batch_size=args.batch_size)[layer]
            for name, safe, maps in zip(names, common.unique_names(names, used), acts):
                yield safe, maps, {**meta_base, "image": name}

    def reduced():
        total, count, names = None, 0, []
        for chunk_names, batch in chunks:
            acts = model.run(batch, [layer], batch_size=args.batch_size)[layer].astype(np.float64)
            names += list(chunk_names)
            if args.reduce == "mean":
                part = acts.sum(axis=0)
                total = part if total is None else total + part
            else:
                part = acts.max(axis=0)
                total = part if total is None else np.maximum(total, part)
            count += len(acts)
        stack = total / count if args.reduce == "mean" else total
        yield args.reduce, stack.astype(np.float32), {
            **meta_base, "image": f"{args.reduce} of {count} images", "images": names}

    return _Source(model.info(), common.recorded_inputs(args, model), common.safe_name(layer),
                   per_image() if args.reduce == "none" else reduced())


def _read_permutation(path):
    if path is None:
        return None
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CnnvisError(f"--permutation {path}: not a readable JSON file ({exc})") from None
    perm = data.get("permutation") if isinstance(data, dict) else data
    if not isinstance(perm, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                             for v in perm):
        raise CnnvisError(f"--permutation {path}: expected an order.json with a 'permutation' "
                          "list of integers")
    return perm


def _check_permutation(perm, array, layout, path):
    """The permutation as checked against the stack's slice count (one-line error)."""
    from ..export import volumes

    if perm is None:
        return None
    stack, _ = volumes.stack_from_array(array, layout=layout)
    return volumes.check_permutation(perm, stack.shape[0], name=f"--permutation {path}")


def _volume_kwargs(args, array, meta, permutation):
    return dict(layout=args.layout, permutation=permutation, normalization=args.normalization,
                threshold=args.threshold, spacing=tuple(args.spacing),
                metadata={k: v for k, v in meta.items() if k != "images"})


# ------------------------------------------------------------------------------------ commands


def cmd_volume(args) -> int:
    from ..manifest import RunOutput

    formats = common.volume_formats(args)
    perm_list = _read_permutation(args.permutation)
    source = _open_source(args)
    params = {"formats": formats, "layout": args.layout, "normalization": args.normalization,
              "threshold": args.threshold, "spacing": list(args.spacing), "reduce": args.reduce,
              "permutation": args.permutation, "volume": args.volume, "input_array": args.input_array}
    written = 0
    with RunOutput(args.out, "volume", params=params, inputs=source.inputs,
                   model=source.model_info) as run:
        for name, array, meta in source.stacks():
            perm = _check_permutation(perm_list, array, args.layout, args.permutation)
            common.write_run_volumes(run, f"{name}/{source.label}", array, formats, "volume", meta,
                                     **_volume_kwargs(args, array, meta, perm))
            written += 1
            print(f"cnnvis volume: {name}: {'×'.join(map(str, array.shape))} -> "
                  f"{name}/{source.label}.{{{','.join(formats)}}}")
    print(f"cnnvis volume: {written} volume(s) -> {args.out}")
    return 0


def _ordering_params(args, stack):
    params = {}
    if args.method in ("kmeans-rows", "kmeans-maps"):
        params.update(n_clusters=args.clusters, seed=args.seed, n_init=args.n_init)
    if args.method in ("kmeans-rows", "pca-rows"):
        params["row"] = stack.shape[1] // 2 if args.row is None else args.row
    return params


def _check_order_args(args, stack, name):
    c, h, _ = stack.shape
    if args.method.startswith("kmeans") and args.clusters > c:
        raise CnnvisError(f"--clusters {args.clusters}: more clusters than the {c} channels of "
                          f"{name}; expected 1..{c}")
    if args.row is not None and not 0 <= args.row < h:
        raise CnnvisError(f"--row {args.row}: the maps of {name} have {h} rows; expected "
                          f"0..{h - 1}")


def cmd_order(args) -> int:
    from ..analysis import ordering
    from ..export import plots, volumes
    from ..manifest import RunOutput, dumps_json

    formats = common.volume_formats(args)
    if args.separator < 0:
        raise CnnvisError(f"--separator {args.separator}: expected 0 or more pixel rows")
    source = _open_source(args)
    params = {"method": args.method, "clusters": args.clusters, "row": args.row,
              "seed": args.seed, "n_init": args.n_init, "formats": formats,
              "layout": args.layout, "normalization": args.normalization, "reduce": args.reduce,
              "volume": args.volume, "input_array": args.input_array}
    summaries = []
    with RunOutput(args.out, "order", params=params, inputs=source.inputs,
                   model=source.model_info) as run:
        for name, array, meta in source.stacks():
            stack, _ = volumes.stack_from_array(array, layout=args.layout, name=name)
            _check_order_args(args, stack, name)
            est = ordering.make_ordering(args.method, **_ordering_params(args, stack))
            result = dict(est.fit(stack).result_)
            result.update({k: v for k, v in meta.items() if k != "images"})
            folder = f"{name}/{args.method}"
            row = result.get("row", stack.shape[1] // 2 if args.row is None else args.row)
            plots.save_before_after(
                run.path(f"{folder}/before_after.png", kind="order-picture", image=meta.get("image")),
                stack, result, row=row, separator=args.separator)
            if args.method.endswith("-rows"):
                plots.save_slice_png(
                    run.path(f"{folder}/slice_row{row}.png", kind="order-slice", row=row),
                    stack, result, row=row, separator=args.separator)
            kwargs = _volume_kwargs(args, stack, meta, result["permutation"])
            kwargs["layout"] = "stack"
            kwargs["metadata"]["ordering"] = args.method
            common.write_run_volumes(run, f"{folder}/{source.label}_ordered", stack, formats, "ordered-volume",
                                     meta, **kwargs)
            run.path(f"{folder}/order.json", kind="order", method=args.method).write_text(
                dumps_json(result), encoding="utf-8")
            summaries.append((name, result))
            print(f"cnnvis order: {name}: {args.method} smoothness {result['smoothness']:.6g} "
                  f"(input order {result['smoothness_unordered']:.6g}, ratio {result['ratio']:.4f})")
        run.extra["summary"] = {n: {"smoothness": r["smoothness"], "ratio": r["ratio"]}
                                for n, r in summaries}
    print(f"cnnvis order: {len(summaries)} stack(s) -> {args.out}")
    return 0


def cmd_render(args) -> int:
    from ..export import render
    from ..manifest import RunOutput

    modes = list(dict.fromkeys(args.mode or ["volume"]))
    render.check_gl(show=args.show)  # before any model work: VTK would crash later instead of raising
    if args.frames < 2 and args.gif:
        raise CnnvisError(f"--frames {args.frames}: an orbit needs at least 2")
    if not args.fps > 0:
        raise CnnvisError(f"--fps {args.fps}: expected a positive number")
    perm_list = _read_permutation(args.permutation)
    source = _open_source(args)

    def options(mode, array, meta, perm):
        title = " ".join(str(meta[k]) for k in ("layer", "image") if meta.get(k)) or None
        return dict(mode=mode, window_size=tuple(args.window_size), threshold=args.threshold,
                    normalization=args.normalization, spacing=tuple(args.spacing),
                    layout=args.layout, permutation=perm, cmap=args.cmap, gap=args.gap,
                    azimuth=args.azimuth, elevation=args.elevation, title=title)

    if args.show:
        for name, array, meta in source.stacks():
            perm = _check_permutation(perm_list, array, args.layout, args.permutation)
            for mode in modes:
                render.show_window(array, **options(mode, array, meta, perm))
        return 0

    params = {"modes": modes, "gif": args.gif, "frames": args.frames, "fps": args.fps,
              "window_size": list(args.window_size), "threshold": args.threshold,
              "normalization": args.normalization, "spacing": list(args.spacing),
              "layout": args.layout, "permutation": args.permutation, "gap": args.gap,
              "azimuth": args.azimuth, "elevation": args.elevation, "cmap": args.cmap,
              "reduce": args.reduce, "volume": args.volume, "input_array": args.input_array}
    count = 0
    with RunOutput(args.out, "render", params=params, inputs=source.inputs,
                   model=source.model_info) as run:
        for name, array, meta in source.stacks():
            perm = _check_permutation(perm_list, array, args.layout, args.permutation)
            for mode in modes:
                path = run.path(f"{name}/{source.label}_{mode}.png", kind="render", mode=mode,
                                layer=meta.get("layer"), image=meta.get("image"))
                render.render_png(array, path, **options(mode, array, meta, perm))
                count += 1
            if args.gif:
                path = run.path(f"{name}/{source.label}_{modes[0]}_orbit.gif", kind="render-orbit",
                                mode=modes[0], frames=args.frames)
                render.render_orbit_gif(array, path, frames=args.frames, fps=args.fps,
                                        **options(modes[0], array, meta, perm))
                count += 1
            print(f"cnnvis render: {name}: {', '.join(modes)}{' + orbit GIF' if args.gif else ''}")
    print(f"cnnvis render: {count} file(s) -> {args.out}")
    return 0
