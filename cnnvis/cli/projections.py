"""`cnnvis deconv`, `cnnvis topk`, `cnnvis evolution`: Zeiler & Fergus deconvnet projections."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import cluster, common
from ..export.tables import csv_text

ORDER = 40
STATE_FILE = "topk_state.json"
#: exit code of `cnnvis topk --max-chunks` when images are left (rerun to continue)
INCOMPLETE = 3


def register(sub) -> None:
    p = sub.add_parser("deconv", help="deconvnet projections of a layer's maps to pixels, beside the input "
                                      "patch under each unit (Zeiler & Fergus)")
    common.add_input_options(p)
    common.add_model_options(p)
    _add_projection_options(p, maps_default="0-15")
    p.add_argument("--position", default=None, metavar="Y,X",
                   help="project the activation at this position of every chosen map "
                        "(default: each map's strongest activation in the image)")
    common.add_output_options(p, "out/deconv")
    p.set_defaults(func=cmd_deconv)

    p = sub.add_parser("topk", help="the k strongest activations of every map of a layer over a folder of "
                                    "images, with deconvnet projections and patches (paper Figure 2); resumable")
    common.add_input_options(p)
    common.add_model_options(p)
    _add_projection_options(p, maps_default="0-15")
    p.add_argument("--k", type=common.int_range(1, common.MAX_TOPK), default=9,
                   help=f"activations kept per map (default 9, at most {common.MAX_TOPK})")
    p.add_argument("--restart", action="store_true",
                   help=f"discard a saved {STATE_FILE} in --out (from an interrupted or different run)")
    p.add_argument("--max-chunks", type=common.positive_int, default=None, metavar="N",
                   help=f"process at most N chunks of --batch-size images in this run, then stop with exit "
                        f"code {INCOMPLETE}; a rerun continues from the saved state")
    cluster.add_dataset_options(p)
    cluster.add_dask_options(p, restart=False)
    common.add_output_options(p, "out/topk")
    p.set_defaults(func=cmd_topk)

    p = sub.add_parser("evolution", help="per map, the projection of the strongest activation over some images, "
                                         "for each training checkpoint (paper Figure 4)")
    common.add_input_options(p)
    p.add_argument("--checkpoints", "-c", nargs="+", default=None, metavar="PATH",
                   help="ONNX checkpoints of one architecture, or folders of them; ordered by the (last) "
                        "number in each file name, e.g. epoch_5.onnx (give image arguments before this option; "
                        "default: the checkpoints the --model's sidecar lists)")
    common.add_model_options(p)
    _add_projection_options(p, maps_default="0-7")
    common.add_output_options(p, "out/evolution")
    p.set_defaults(func=cmd_evolution)


def _add_projection_options(p, maps_default: str) -> None:
    g = p.add_argument_group("projection")
    g.add_argument("--layer", "-l", default=None,
                   help="layer whose maps are projected (default: the last convolution)")
    g.add_argument("--maps", default=maps_default,
                   help=f"maps to show: 'all' or a list like 0,3,8-11 (default {maps_default}, "
                        "clipped to the layer's maps)")
    g.add_argument("--rule", default="deconvnet", choices=("deconvnet", "guided", "gradient"),
                   help="backward rule through ReLUs: deconvnet (Zeiler & Fergus, default), guided, gradient")


# ------------------------------------------------------------------------------ helpers

def parse_maps(text: str, n_maps: int, default: bool = False) -> list:
    """'all' or '0,3,8-11' → sorted unique map indices; a default range is clipped to the layer."""
    from ..errors import CnnvisError

    if text.strip() == "all":
        return list(range(n_maps))
    maps = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise CnnvisError(f"--maps {text}: expected 'all' or indices and ranges like 0,3,8-11")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise CnnvisError(f"--maps {text}: range {part} runs backwards")
        if hi >= n_maps and not default:  # (before expanding: 0-999999999 must not build a list)
            raise CnnvisError(f"--maps {text}: map {max(lo, n_maps)} out of range; the layer has maps 0..{n_maps - 1}")
        maps.extend(range(lo, min(hi, n_maps - 1) + 1))
    return sorted(set(maps))


def _maps(args, parser_default: str, n_maps: int) -> list:
    return parse_maps(args.maps, n_maps, default=args.maps == parser_default)


def default_layer(model) -> str:
    return model.conv_layers()[-1].name


def _display_cmap(model) -> str:
    return "gray" if model.input_shape[0] != 3 else "viridis"


#: float64-sized copies of a record's tiles alive at once: the projection crop and its display,
#: the image patch and its display, and the grids plots.side_by_side builds from them
TILE_COPIES = 6


def check_tiles(n_records: int, channels: int, field, what: str) -> None:
    """The memory of ``n_records`` projection and patch tiles (``field.patch_hw``, at most the
    image's size) against the budget, before any is allocated."""
    from .. import limits

    ph, pw = field.patch_hw
    limits.check_elements((n_records, max(int(channels), 3), ph, pw), 8,
                          f"{what}: {n_records} projection tiles of {ph}×{pw} pixels", copies=TILE_COPIES)


def _tiles(deconv, field, pre, images, projections, units):
    """Crops of projections and images under each unit's receptive field, as display tiles (NaN
    outside the image; a field larger than the image is cut to it, see ReceptiveField.patch)."""
    import numpy as np

    proj = np.stack([field.patch(p, int(u[1]), int(u[2])) for p, u in zip(projections, units)])
    patch = np.stack([field.patch(x, int(u[1]), int(u[2])) for x, u in zip(images, units)])
    return proj, deconv.projection_display(proj, pre), pre.to_display(patch)


# ------------------------------------------------------------------------------ deconv

def cmd_deconv(args) -> int:
    import numpy as np

    from ..analysis import deconv
    from ..errors import CnnvisError
    from ..export import plots
    from ..manifest import RunOutput, save_npy, write_json

    model = common.load_model(args)
    layer = model.layer(args.layer or default_layer(model)).name
    shape = deconv.layer_shape(model, layer)
    maps = _maps(args, "0-15", shape[0])
    position = None
    if args.position is not None:
        m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", args.position)
        if not m:
            raise CnnvisError(f"--position {args.position}: expected Y,X (two non-negative integers)")
        position = (int(m.group(1)), int(m.group(2)))
        if len(shape) == 3 and not (position[0] < shape[1] and position[1] < shape[2]):
            raise CnnvisError(f"--position {args.position}: layer {layer} maps are {shape[1]}×{shape[2]}")
    inputs = common.Inputs(args, model)
    common.model_warning(model)
    lname = common.safe_name(layer)
    params = {"layer": layer, "maps": maps, "position": position, "rule": args.rule,
              "batch_size": args.batch_size, "input_array": args.input_array}
    used = {}
    analysis = deconv.Deconvnet(model, layer, rule=args.rule, maps=maps, position=position, batch_size=args.batch_size)
    with RunOutput(args.out, "deconv", params=params, inputs=inputs.sources, model=model.info()) as run:
        for names, batch in inputs.chunks(0, args.batch_size):
            for name, safe, image in zip(names, common.unique_names(names, used), batch):
                res = analysis.run(image[None])  # one image at a time: its rows are every chosen map
                field, units = res.field, res.units
                check_tiles(len(units), image.shape[0], field, f"--layer {layer} --maps {args.maps}")
                rows = np.broadcast_to(image, (len(units), *image.shape))
                _, proj_tiles, patch_tiles = _tiles(deconv, field, inputs.pre, rows, res.projections, units)
                blocks = plots.side_by_side(proj_tiles[:, None], patch_tiles[:, None], ncols=1)
                meta = plots.save_blocks(run.path(f"{safe}/{lname}_deconv.png", kind="deconv-grid", layer=layer,
                                                  image=name), blocks, labels=maps, cmap=_display_cmap(model))
                save_npy(run.path(f"{safe}/{lname}_projections.npy", kind="projections", layer=layer, image=name,
                                  shape=list(res.projections.shape)), res.projections)
                records = [{"map": int(u[0]), "y": int(u[1]), "x": int(u[2]), "value": float(v),
                            "box": list(field.box(int(u[1]), int(u[2])))}
                           for u, v in zip(units, res.values)]
                write_json(run.path(f"{safe}/{lname}_deconv.json", kind="records", layer=layer, image=name),
                           {"image": name, "layer": layer, "rule": args.rule, "receptive_field": field.as_dict(),
                            "records": records, "grid": meta,
                            "layout": "per map: projection crop | input patch under the receptive field"})
    print(f"cnnvis deconv: {len(used)} image(s) × {len(maps)} map(s) of {layer} -> {args.out}")
    return 0


# ------------------------------------------------------------------------------ topk

def _read_state(path: Path, fingerprint: dict, names: list):
    """``(TopK, skipped)`` saved in ``path`` by an interrupted run of the same inputs; ``skipped``:
    the unreadable inputs met so far, ``[position, path, reason]``."""
    from ..analysis.topk import TopK
    from ..errors import CnnvisError

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        old = saved["fingerprint"]
        state = saved["topk"]
        if not isinstance(old, dict):
            raise TypeError("fingerprint is not an object")
        skipped = [[int(p), str(f), str(r)] for p, f, r in saved.get("skipped", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CnnvisError(f"{path}: unreadable top-k state ({exc}); use --restart to start over") from None
    if old != fingerprint:
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        key = diff[0]
        if key == "files" and isinstance(old.get("files"), list):
            raise CnnvisError(f"{path}: the input images changed since the saved state "
                              f"({_changed_inputs(old['files'], fingerprint['files'])}); use --restart to start "
                              "over or another --out")
        raise CnnvisError(f"{path}: saved by a different run ({key}: {_short(old.get(key))} there, "
                          f"{_short(fingerprint.get(key))} now); use --restart to start over or another --out")
    top = TopK.from_state(state, source=str(path))
    done = top.image_names_
    left_out = {p for p, _, _ in skipped}
    seen = len(done) + len(skipped)
    if seen > len(names) or done != [n for i, n in enumerate(names[:seen]) if i not in left_out]:
        raise CnnvisError(f"{path}: the {len(done)} images already processed are not the first images of this "
                          "input list (files changed?); use --restart to start over")
    return top, skipped


def _changed_inputs(before: list, now: list) -> str:
    """What changed among the input images between a saved top-k state and this run, in words."""
    was = {f.get("path"): f for f in before if isinstance(f, dict)}
    is_ = {f["path"]: f for f in now}
    added = [p for p in is_ if p not in was]
    removed = [p for p in was if p not in is_]
    changed = [p for p in is_ if p in was and was[p] != is_[p]]
    parts = []
    for what, paths in (("changed", changed), ("added", added), ("removed", removed)):
        if paths:
            more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
            parts.append(f"{paths[0]}{more} {'were' if more else 'was'} {what}")
    return "; ".join(parts) if parts else "the same images in another order"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _write_state(path: Path, fingerprint: dict, top, complete: bool, skipped=()) -> None:
    """The top-k so far; ``skipped`` (the unreadable inputs met so far) only when there are any,
    so that a run without them writes the state it always wrote."""
    from ..manifest import write_text

    state = {"fingerprint": fingerprint, "complete": complete, "topk": top.to_state()}
    if skipped:
        state["skipped"] = [list(entry) for entry in skipped]
    write_text(path, json.dumps(state, sort_keys=True, separators=(",", ":")) + "\n")


def _project_records(model, inputs, layer, records, rule, batch_size):
    """Projections (RF crops, raw and displayed) and display patches for top-k records, loading only
    their images, ``batch_size`` rows at a time."""
    import numpy as np

    from ..analysis import deconv
    from ..analysis.receptive import receptive_field

    field = receptive_field(model, layer)
    check_tiles(len(records), model.input_shape[0], field, f"--layer {layer}")
    analysis = deconv.Deconvnet(model, layer, rule=rule, batch_size=batch_size)
    raw, proj, patches = [], [], []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        needed = sorted({r["image"] for r in chunk})
        loaded = dict(zip(needed, inputs.load(needed)))
        x = np.stack([loaded[r["image"]] for r in chunk])
        units = np.array([[r["map"], r["y"], r["x"]] for r in chunk], np.int64)
        values = np.array([r["value"] for r in chunk], np.float32)
        p = analysis.run(x, target=units, values=values).projections
        r_crop, p_tiles, i_tiles = _tiles(deconv, field, inputs.pre, x, p, units)
        raw.append(r_crop.astype(np.float32))
        proj.append(p_tiles)
        patches.append(i_tiles)
    return field, np.concatenate(raw), np.concatenate(proj), np.concatenate(patches)


def cmd_topk(args) -> int:
    import numpy as np

    from ..analysis import deconv
    from ..export import plots
    from ..manifest import RunOutput, ensure_writable_dir, save_npy, write_json, write_text

    model = common.load_model(args)
    if args.dask:
        cluster.options(args)  # a bad address or --input-array fails before anything is read
        if args.max_chunks is not None:
            from ..errors import CnnvisError

            raise CnnvisError("--max-chunks: not with --dask (a cluster run is resumed by its recorded shards)")
    layer = model.layer(args.layer or default_layer(model)).name
    shape = deconv.layer_shape(model, layer)
    maps = _maps(args, "0-15", shape[0])
    inputs = common.Inputs(args, model)
    _check_topk_budget(args.k, len(inputs), shape, len(maps), model.input_shape)
    out = ensure_writable_dir(args.out)
    # The state file is the one thing written outside RunOutput: it must survive an interrupted run
    # (RunOutput discards its staging folder on errors). Each write is atomic (temp file + rename).
    state_path = out / STATE_FILE
    fingerprint = {"command": "topk", "model_sha256": model.sha256, "layer": layer, "k": args.k,
                   **inputs.fingerprint()}
    skipped, store = [], None
    if args.dask:
        common.model_warning(model)
        top, inputs, skipped, store = cluster.topk(args, model, inputs, layer, out)
        _write_state(state_path, fingerprint, top, complete=True, skipped=skipped)
    else:
        done = _topk_one_process(args, model, inputs, layer, state_path, fingerprint)
        if done is None:
            return INCOMPLETE
        top, skipped = done
        if skipped:  # the second pass and the records see the readable inputs only, as on a cluster
            left_out = {p for p, _, _ in skipped}
            inputs = inputs.subset([i for i in range(len(inputs)) if i not in left_out])

    # second pass: projections of the final top-k of the chosen maps only
    shown = [rec for m in maps for rec in top.units(m)]
    field, raw, proj, patches = _project_records(model, inputs, layer, shown, args.rule, args.batch_size)
    per_map = top.values_.shape[1]
    lname = common.safe_name(layer)
    records = top.records()
    for rec in records:
        rec["box"] = list(field.box(rec["y"], rec["x"]))
    params = {"layer": layer, "k": args.k, "maps": maps, "rule": args.rule, "batch_size": args.batch_size,
              "input_array": args.input_array}
    with RunOutput(out, "topk", params=params, inputs=inputs.sources, model=model.info()) as run:
        run.extra["state_file"] = STATE_FILE
        if skipped:
            run.extra["skipped"] = common.skipped_record(skipped)
        ncols = int(np.ceil(np.sqrt(per_map)))
        blocks = plots.side_by_side(proj.reshape(len(maps), per_map, *proj.shape[1:]),
                                    patches.reshape(len(maps), per_map, *patches.shape[1:]), ncols=ncols)
        meta = plots.save_blocks(run.path(f"{lname}_top{args.k}.png", kind="topk-grid", layer=layer), blocks,
                                 labels=maps, ncols=int(np.ceil(np.sqrt(len(maps)))), cmap=_display_cmap(model))
        save_npy(run.path(f"{lname}_top{args.k}_projections.npy", kind="projections", layer=layer,
                          shape=list(raw.shape), maps=maps),
                 raw.reshape(len(maps), per_map, *raw.shape[1:]))
        write_json(run.path(f"{lname}_top{args.k}.json", kind="records", layer=layer),
                   {"layer": layer, "k": args.k, "map_shape": list(top.map_shape_), "n_images": top.n_images_,
                    "receptive_field": field.as_dict(), "maps_shown": maps, "grid": meta,
                    "order": "value descending, then image order, then position (row-major)",
                    "records": records})
        write_text(run.path(f"{lname}_top{args.k}.csv", kind="records-csv", layer=layer), _records_csv(records))
    if store is not None:
        store.remove()  # the merged result is in topk_state.json and the outputs
    print(f"cnnvis topk: {top.n_images_} image(s), top {per_map} of {shape[0]} map(s) of {layer}; "
          f"{len(maps)} shown -> {args.out}")
    return 0


def _topk_one_process(args, model, inputs, layer, state_path, fingerprint):
    """The top-k in this process, chunk by chunk, saving the state after each: ``(top, skipped)``
    (the unreadable dataset files left out, as a cluster run leaves them out); None when stopped
    by --max-chunks with images left."""
    from ..analysis.topk import TopActivations, TopK

    if state_path.exists() and not args.restart:
        top, skipped = _read_state(state_path, fingerprint, inputs.names)
    else:
        top, skipped = TopK(args.k), []
    common.model_warning(model)
    start = top.n_images_ + len(skipped)  # every input before this one is in the top-k or skipped
    if start:
        print(f"cnnvis topk: continuing from {state_path}: {start} of {len(inputs)} images already done",
              file=sys.stderr)
    chunks_done, saved_skips = [0], [len(skipped)]

    def seen(top_now) -> int:
        return top_now.n_images_ + len(skipped)

    def saved(top_now):
        chunks_done[0] += 1
        saved_skips[0] = len(skipped)
        _write_state(state_path, fingerprint, top_now, complete=seen(top_now) == len(inputs), skipped=skipped)

    def limited(chunks):  # stops before reading a chunk past --max-chunks
        while args.max_chunks is None or chunks_done[0] < args.max_chunks:
            item = next(chunks, None)
            if item is None:
                return
            yield item[:2]

    top = TopActivations(model, layer, k=args.k, batch_size=args.batch_size, on_chunk=saved).run(
        limited(inputs.readable_chunks(start, args.batch_size, skipped)), resume=top)
    if seen(top) < len(inputs):
        print(f"cnnvis topk: stopped after {chunks_done[0]} chunk(s) (--max-chunks): {seen(top)} of "
              f"{len(inputs)} images done, state in {state_path}; rerun to continue", file=sys.stderr)
        return None
    if top.n_images_ == 0:
        raise common.none_readable(len(inputs), skipped)
    if chunks_done[0] == 0 or saved_skips[0] != len(skipped):  # unreadable files after the last chunk
        _write_state(state_path, fingerprint, top, complete=True, skipped=skipped)
    common.report_skipped("topk", skipped)
    return top, skipped


#: bytes one kept activation costs in TopK (value, image, position and the merge's copies)
TOPK_BYTES_PER_RECORD = 64


def _check_topk_budget(k: int, n_images: int, map_shape, n_shown: int, input_shape) -> None:
    """--k against the memory budget: the records kept per map (at most every position of every
    image) and the projections and patches of the shown maps (input-sized, four copies)."""
    import numpy as np

    from .. import limits

    positions = n_images * int(np.prod(map_shape[1:], dtype=object)) if len(map_shape) > 1 else n_images
    kept = min(int(k), positions)
    need = kept * int(map_shape[0]) * TOPK_BYTES_PER_RECORD \
        + n_shown * kept * int(np.prod(input_shape, dtype=object)) * 4 * 4
    limits.check(need, f"--k {k}: {kept:,} records for each of {map_shape[0]} maps and the projections of "
                       f"{n_shown} maps")


def _records_csv(records) -> str:
    return csv_text(["map", "rank", "value", "image", "name", "y", "x", "top", "left", "bottom", "right"],
                    [[r["map"], r["rank"], r["value"], r["image"], r["name"], r["y"], r["x"], *r["box"]]
                     for r in records])


# ------------------------------------------------------------------------------ evolution

def checkpoint_files(paths) -> list:
    """ONNX checkpoints from files and folders, ordered by the last number in each file name."""
    from ..errors import CnnvisError
    from ..manifest import list_files

    files = list_files(paths, (".onnx",), ".onnx files", label="--checkpoints")
    keyed = []
    for f in files:
        numbers = re.findall(r"\d+", f.stem)
        if not numbers:
            raise CnnvisError(f"--checkpoints {f}: expected a number in the file name (e.g. epoch_5.onnx) "
                              "to order the checkpoints")
        keyed.append((int(numbers[-1]), f.name, f))
    keyed.sort(key=lambda t: (t[0], t[1]))
    if len({str(f.resolve()) for _, _, f in keyed}) != len(keyed):
        raise CnnvisError("--checkpoints: the same file is given twice")
    return [(n, f) for n, _, f in keyed]


def _architecture(model) -> list:
    return [(layer.name, layer.op_type, layer.output_shape, layer.weight_shape) for layer in model.layers]


def cmd_evolution(args) -> int:
    import numpy as np

    from .. import registry
    from ..analysis import deconv
    from ..analysis.topk import TopActivations
    from ..errors import CnnvisError
    from ..export import figures
    from ..manifest import RunOutput, save_npy, write_json

    if args.checkpoints is None:
        shipped = common.model_checkpoints(common.load_model(args))
        if not shipped:
            raise CnnvisError(f"--checkpoints: model {args.model or registry.default_model_name()} ships no "
                              "checkpoints (no 'checkpoints' in its sidecar); give --checkpoints PATH...")
        args.checkpoints = [str(p) for p in shipped]
    checkpoints = checkpoint_files(args.checkpoints)
    first = registry.load(str(checkpoints[0][1]), device=args.device, threads=args.threads)
    layer = first.layer(args.layer or default_layer(first)).name
    shape = deconv.layer_shape(first, layer)
    maps = _maps(args, "0-7", shape[0])
    inputs = common.Inputs(args, first)
    arch = _architecture(first)
    common.model_warning(first)
    columns, raw_cols, tiles_cols = [], [], []
    for number, path in checkpoints:
        model = first if path == checkpoints[0][1] else registry.load(str(path), device=args.device,
                                                                      threads=args.threads)
        if _architecture(model) != arch or model.input_shape != first.input_shape:
            raise CnnvisError(f"--checkpoints {path}: a different architecture from {checkpoints[0][1]} "
                              "(layer names, shapes or weights differ)")
        top = TopActivations(model, layer, k=1, batch_size=args.batch_size).run(inputs.chunks(0, args.batch_size))
        shown = [top.units(m)[0] for m in maps]
        field, raw, proj, _ = _project_records(model, inputs, layer, shown, args.rule, args.batch_size)
        raw_cols.append(raw)
        tiles_cols.append(proj)
        columns.append({"checkpoint": str(path), "number": number, "sha256": model.sha256, "records": shown})
        del model
    k = len(checkpoints)
    # rows = maps, columns = checkpoints
    tiles = np.stack(tiles_cols, axis=1).reshape(len(maps) * k, *tiles_cols[0].shape[1:])
    labels = [(f"{m}" if c == 0 else "") for m in maps for c in range(k)]
    lname = common.safe_name(layer)
    params = {"layer": layer, "maps": maps, "rule": args.rule, "batch_size": args.batch_size,
              "checkpoints": [str(p) for _, p in checkpoints], "input_array": args.input_array}
    with RunOutput(args.out, "evolution", params=params, inputs=inputs.sources, model=first.info()) as run:
        meta = figures.grid_png(run.path(f"{lname}_evolution.png", kind="evolution-grid", layer=layer), tiles,
                                ncols=k, pad=2, normalization="channel", cmap=_display_cmap(first), labels=labels)
        save_npy(run.path(f"{lname}_evolution.npy", kind="projections", layer=layer,
                          shape=[len(maps), k, *raw_cols[0].shape[1:]]), np.stack(raw_cols, axis=1))
        write_json(run.path(f"{lname}_evolution.json", kind="records", layer=layer),
                   {"layer": layer, "maps": maps, "n_images": len(inputs), "receptive_field": field.as_dict(),
                    "layout": "rows = maps, columns = checkpoints in this order", "grid": meta,
                    "checkpoints": columns})
    print(f"cnnvis evolution: {len(maps)} map(s) of {layer} × {k} checkpoint(s) -> {args.out}")
    return 0
