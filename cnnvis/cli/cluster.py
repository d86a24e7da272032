"""The ``--dask`` options and the distributed path of the commands that run over datasets (topk,
compare-classes, activations --stats): shards out, partial results recorded, merged in input order.

The commands call these functions when ``--dask`` is given; everything else (outputs, second
passes over a few images) stays in the command. The cluster, the shard store and the merges are
:mod:`cnnvis.scale`.
"""
from __future__ import annotations

from . import common
from ..errors import CnnvisError


DEFAULT_SHARD_SIZE = 256  # cnnvis.scale.DEFAULT_SHARD_SIZE, without importing numpy (`cnnvis --help` stays fast)


def add_dask_options(p, restart: bool = True, no_progress: bool = True) -> None:
    """--dask and its settings (``restart``/``no_progress``: add --restart/--no-progress, unless the
    command has its own)."""
    g = p.add_argument_group("cluster (Dask)")
    g.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="run on a Dask cluster: a scheduler address (tcp://host:8786) or local:N (a cluster of "
                        "N worker processes on this machine); the output is the one-process run's")
    g.add_argument("--dask-threads", type=common.positive_int, default=1, metavar="N",
                   help="local:N: threads (concurrent shards) per worker process (default 1); each shard runs "
                        "onnxruntime with --threads threads (default 1 on workers)")
    g.add_argument("--shard-size", type=common.positive_int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"images per task, rounded up to a multiple of --batch-size (default {DEFAULT_SHARD_SIZE})")
    g.add_argument("--dask-dashboard", action="store_true",
                   help="local:N: serve the Dask dashboard and print its address")
    if no_progress:
        g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if restart:
        g.add_argument("--restart", action="store_true",
                       help="discard shard results recorded in --out by an interrupted run")


def add_dataset_options(p, groups: bool = False) -> None:
    """Inputs at scale, instead of image arguments: a list file or a class-per-subfolder tree
    (``groups``: compare-classes, whose group items may name the tree's classes)."""
    g = p.add_argument_group("datasets")
    if groups:
        g.add_argument("--image-tree", default=None, metavar="DIR",
                       help="a class-per-subfolder tree (ImageNet's DIR/n01440764/*.JPEG layout): a group item "
                            "naming a subfolder, or a class index/name of the model (through --synsets), "
                            "means that subfolder's images")
    else:
        g.add_argument("--image-list", default=None, metavar="FILE",
                       help="a text file of image paths, one a line, each optionally followed by a label "
                            "(tab, comma or space); relative paths are relative to the file")
        g.add_argument("--image-tree", default=None, metavar="DIR",
                       help="a class-per-subfolder tree (ImageNet's DIR/n01440764/*.JPEG layout): every image of "
                            "every subfolder, folders and files in name order")
    g.add_argument("--synsets", default=None, metavar="FILE",
                   help="with --image-tree: the synset file naming the classes (line i = class i: "
                        "'n01440764 tench, Tinca tinca')")


def tree_items(args, model, items) -> list:
    """compare-classes with --image-tree: items naming a class of the tree (its subfolder, or a
    class index or name of the model matched to the subfolder of that class index) become that
    subfolder; other items are kept as given."""
    from pathlib import Path

    from .. import datasets

    tree = getattr(args, "image_tree", None)
    if not tree:
        if getattr(args, "synsets", None):
            raise CnnvisError("--synsets: names the classes of an --image-tree; give --image-tree too")
        return list(items)
    classes = datasets.tree_classes(tree, getattr(args, "synsets", None))
    by_folder = {folder: folder for folder, _, _ in classes}
    by_index = {index: folder for folder, index, _ in classes}
    out = []
    for item in items:
        text = str(item)
        folder = by_folder.get(text)
        if folder is None and not Path(text).exists():
            try:
                folder = by_index.get(model.class_index(text, "class"))
            except CnnvisError:
                folder = None
        out.append(str(Path(tree) / folder) if folder is not None else item)
    return out


def options(args):
    from ..scale import ClusterOptions, parse_address

    parse_address(args.dask)  # a bad address fails before anything is read
    if getattr(args, "input_array", None):
        raise CnnvisError("--dask: needs image files (workers are sent paths, never pixels), not --input-array")
    return ClusterOptions(args.dask, threads=args.dask_threads, shard_size=args.shard_size,
                          dashboard=args.dask_dashboard, progress=not getattr(args, "no_progress", False),
                          debug=bool(getattr(args, "debug", False)))


def worker_model_ref(args, model):
    from .. import registry
    from ..scale import model_ref

    # workers run one onnxruntime thread per shard unless --threads says otherwise
    return model_ref(args.model or registry.default_model_name(), args.weights, args.device,
                     args.threads or 1, model.sha256)


# ----------------------------------------------------------------------------- topk


def topk(args, model, inputs, layer: str, out):
    """The top-k of ``layer`` over ``inputs`` on the cluster: ``(top, readable inputs, skipped)``,
    ``top`` indexed and named as the one-process run over the readable inputs."""
    from .. import scale

    opts = options(args)
    files = [str(f) for f in inputs.files]
    fingerprint = {"command": "topk", "model_sha256": model.sha256, "layer": layer, "k": args.k,
                   "inputs": scale.input_digest(files), "n_inputs": len(files),
                   "preprocessing": inputs.pre.to_dict(), "batch_size": args.batch_size,
                   "shard_size": opts.shard_size}
    shards = scale.make_shards(files, opts.shard_size, args.batch_size, named=inputs.named)
    job = {"model": worker_model_ref(args, model), "preprocessing": inputs.pre.to_dict(), "layer": layer,
           "k": args.k, "batch_size": args.batch_size}
    with scale.connect(opts, "cnnvis topk") as client:
        store = scale.ShardStore(out, "topk", fingerprint, restart=args.restart)
        scale.run_shards(client, scale.topk_shard, job, shards, store, "cnnvis topk", progress=opts.progress)
    parts, readable, skipped = [], [], []
    for _, res in scale.results(store, shards):
        skipped.extend(res.meta["skipped"])
        if res.meta["map_shape"] is not None:
            a = res.arrays
            parts.append((res.meta["map_shape"], a["values"], a["images"], a["positions"]))
            readable.extend(int(i) for i in a["readable"])
    if not readable:
        store.remove()  # nothing to resume: every input was read and none could be
        raise common.none_readable(len(files), skipped)
    top = scale.merge_topk(parts, args.k)
    if skipped:
        inputs = inputs.subset(readable)
    scale.compact_topk(top, readable, inputs.names)
    common.report_skipped("topk", skipped)
    return top, inputs, skipped, store


# ----------------------------------------------------------------------------- compare-classes


def compare_classes(args, model, cmp, neuron: int, groups, pre):
    """Run ``cmp`` (a ClassComparison) on the class ``neuron`` from chunk summaries computed on the
    cluster; returns ``(result, skipped, store)``. ``groups``: name → (items, files), the reference
    first."""
    from pathlib import Path

    from .. import preprocess, scale
    from ..analysis import class_gradients as cgm

    opts = options(args)
    named_of = {g: preprocess.named_positions(items, files) for g, (items, files) in groups.items()}
    for g, (_, files) in groups.items():
        arrays = [f for f in files if Path(f).suffix.lower() == ".npy"]
        if arrays:
            raise CnnvisError(f"--dask: group {g}: {arrays[0]} is an array; workers are sent image paths, "
                              "never pixels (give image files or folders)")
    layer = cgm.conv_layer(model, args.layer).name
    cap = int(args.max_vectors_per_group)
    files_of = {g: [str(f) for f in files] for g, (_, files) in groups.items()}
    fingerprint = {"command": "compare-classes", "model_sha256": model.sha256, "layer": layer,
                   "neuron": neuron, "batch_size": args.batch_size, "max_vectors_per_group": cap,
                   "groups": {g: scale.input_digest(f) for g, f in files_of.items()},
                   "preprocessing": pre.to_dict(), "shard_size": opts.shard_size}
    shards_of = {}
    for gi, (g, files) in enumerate(files_of.items()):
        first = sum(len(s) for s in shards_of.values())
        shards_of[g] = scale.make_shards(files, opts.shard_size, args.batch_size, group=gi, first_index=first,
                                         named=named_of[g])
    shards = [s for group in shards_of.values() for s in group]
    job = {"model": worker_model_ref(args, model), "preprocessing": pre.to_dict(), "layer": layer,
           "neuron": int(neuron), "batch_size": args.batch_size, "cap": cap}
    with scale.connect(opts, "cnnvis compare-classes") as client:
        store = scale.ShardStore(args.out, "compare-classes", fingerprint, restart=args.restart)
        scale.run_shards(client, scale.class_gradient_shard, job, shards, store, "cnnvis compare-classes",
                         progress=opts.progress)
    skipped = []
    for g in files_of:
        readable = 0
        for _, res in scale.results(store, shards_of[g]):
            skipped.extend([[g, *s] for s in res.meta["skipped"]])
            readable += int(res.meta["readable"])
        if not readable:
            store.remove()  # nothing to resume: every input was read and none of this group could be
            raise common.none_readable(len(files_of[g]), [s[1:] for s in skipped if s[0] == g], group=g)
    names_of = {g: preprocess.display_names(files) for g, files in files_of.items()}

    def summaries(g):
        for _, res in scale.results(store, shards_of[g]):
            for j in range(len(res.meta["chunks"])):
                arrays = {k.split(".", 1)[1]: v for k, v in res.arrays.items() if k.split(".", 1)[0] == str(j)}
                names = [names_of[g][int(p)] for p in arrays.pop("positions")]
                yield cgm.ChunkSummary.from_arrays(names, arrays)

    gradcheck = None
    if args.check_numerical:
        ref = next(iter(files_of))
        first = next(summaries(ref), None)
        if first is not None:
            position = names_of[ref].index(first.names[0])
            x = preprocess.load_batch([files_of[ref][position]], pre)
            cg = cgm.ClassGradients(model, layer, args.batch_size)
            report = cg.check_numerical(x, int(neuron), args.check_numerical, args.seed,
                                        analytic=first.kept[0].reshape(cg.weights_.shape))
            gradcheck = (report, first.names[0])
    res = cmp.run({g: summaries(g) for g in files_of}, target=neuron, gradcheck=gradcheck)
    common.report_skipped("compare-classes", skipped)
    return res, skipped, store


# ----------------------------------------------------------------------------- activations --stats


def activation_stats(args, model, inputs, layers):
    """Per-channel statistics of ``layers`` over ``inputs`` on the cluster:
    ``(DatasetChannelStats, skipped, store)``."""
    from .. import scale
    from ..analysis import activations

    opts = options(args)
    files = [str(f) for f in inputs.files]
    fingerprint = {"command": "activations-stats", "model_sha256": model.sha256, "layers": list(layers),
                   "inputs": scale.input_digest(files), "n_inputs": len(files),
                   "preprocessing": inputs.pre.to_dict(), "batch_size": args.batch_size,
                   "shard_size": opts.shard_size}
    shards = scale.make_shards(files, opts.shard_size, args.batch_size, named=inputs.named)
    job = {"model": worker_model_ref(args, model), "preprocessing": inputs.pre.to_dict(), "layers": list(layers),
           "batch_size": args.batch_size}
    with scale.connect(opts, "cnnvis activations") as client:
        store = scale.ShardStore(args.out, "activations", fingerprint, restart=args.restart)
        scale.run_shards(client, scale.channel_stats_shard, job, shards, store, "cnnvis activations",
                         progress=opts.progress)
    result, skipped = activations.DatasetChannelStats(), []
    for _, res in scale.results(store, shards):
        skipped.extend(res.meta["skipped"])
        for j, n in enumerate(res.meta["chunks"]):
            part = {}
            for key, value in res.arrays.items():
                chunk, rest = key.split(".", 1)
                if chunk == str(j):
                    layer, name = rest.rsplit(".", 1)
                    part.setdefault(layer, {})[name] = value
            result.merge({layer: part[layer] for layer in layers}, n)
    if result.n_images_ == 0:
        store.remove()  # nothing to resume: every input was read and none could be
        raise common.none_readable(len(files), skipped)
    common.report_skipped("activations", skipped)
    return result, skipped, store


# ----------------------------------------------------------------------------- per-image commands


def per_image(args, model, inputs, command: str, fn, params: dict):
    """Run a per-image analysis (``fn``, a worker function of :mod:`cnnvis.scale`) over ``inputs``
    on the cluster. Returns ``(readable inputs, chunks, skipped, store)``; ``chunks`` yields
    ``(names, first, meta, arrays)`` per chunk in input order (``first``: index of its first image in
    the readable inputs; ``arrays`` without the chunk prefix) from the recorded shard results."""
    from .. import scale

    opts = options(args)
    files = [str(f) for f in inputs.files]
    fingerprint = {"command": command, "model_sha256": model.sha256, "inputs": scale.input_digest(files),
                   "n_inputs": len(files), "preprocessing": inputs.pre.to_dict(), "batch_size": args.batch_size,
                   "shard_size": opts.shard_size, "params": params}
    shards = scale.make_shards(files, opts.shard_size, args.batch_size, named=inputs.named)
    job = {"model": worker_model_ref(args, model), "preprocessing": inputs.pre.to_dict(),
           "batch_size": args.batch_size, **params}
    label = f"cnnvis {command}"
    with scale.connect(opts, label) as client:
        store = scale.ShardStore(args.out, command, fingerprint, restart=args.restart)
        scale.run_shards(client, fn, job, shards, store, label, progress=opts.progress)
    skipped, readable = [], []
    for _, res in scale.results(store, shards):
        skipped.extend(res.meta["skipped"])
        readable.extend(int(p) for j in range(len(res.meta["chunks"])) for p in res.arrays[f"{j}.positions"])
    if not readable:
        store.remove()  # nothing to resume: every input was read and none could be
        raise common.none_readable(len(files), skipped)
    if skipped:
        inputs = inputs.subset(readable)
    common.report_skipped(command, skipped)

    def chunks():
        first = 0
        for _, res in scale.results(store, shards):
            for j, n in enumerate(res.meta["chunks"]):
                arrays = {key.split(".", 1)[1]: v for key, v in res.arrays.items() if key.split(".", 1)[0] == str(j)}
                arrays.pop("positions")
                yield inputs.names[first:first + n], first, res.meta, arrays
                first += n

    return inputs, chunks(), skipped, store


def conv_gradients(args, model, inputs, layer: str, target):
    """conv-gradients on the cluster: ``(readable inputs, batches, skipped, store)``; ``batches``
    yields ``(names, ClassGradientBatch, first image)`` as the one-process loop computes them (the
    first image, for --check-numerical, is loaded here for the first chunk only)."""
    from .. import preprocess, scale
    from ..analysis import class_gradients as cgm
    from ..model import softmax

    inputs, chunks, skipped, store = per_image(args, model, inputs, "conv-gradients", scale.conv_gradient_shard,
                                               {"layer": layer, "target": target})

    def batches():
        for names, first, _, a in chunks:
            grads, logits = a["gradients"], a["logits"]
            x1 = preprocess.load_batch(inputs.files[first:first + 1], inputs.pre) if first == 0 else None
            yield names, cgm.ClassGradientBatch(grads, cgm.filter_importance(grads), a["targets"], logits,
                                                softmax(logits)), x1

    return inputs, batches(), skipped, store


def occlusion(args, model, inputs, options: dict, target):
    """occlusion on the cluster: ``(readable inputs, items, skipped, store)``; ``items`` yields
    ``(name, image, OcclusionMaps, incremental plan description)`` per image in input order."""
    from .. import scale
    from ..analysis.occlusion import OcclusionMaps

    inputs, chunks, skipped, store = per_image(args, model, inputs, "occlusion", scale.occlusion_shard,
                                               {"options": options, "target": target})

    def items():
        done_in_shard, last_meta = 0, None
        for names, first, meta, arrays in chunks:
            if meta is not last_meta:
                done_in_shard, last_meta = 0, meta
            x = inputs.load(range(first, first + len(names)))
            for i, name in enumerate(names):
                values = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == str(i)}
                yield (name, x[i], scale.from_record(OcclusionMaps, meta["records"][done_in_shard], values),
                       meta["incremental"])
                done_in_shard += 1

    return inputs, items(), skipped, store
