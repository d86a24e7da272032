"""The ``--dask`` options and the distributed path of the commands that run over datasets (topk,
compare-classes, activations --stats): shards out, partial results recorded, merged in input order.

The commands call these functions when ``--dask`` is given; everything else (outputs, second
passes over a few images) stays in the command. The cluster, the shard store and the merges are
:mod:`cnnvis.scale`.
"""
from __future__ import annotations

import sys

from . import common
from ..errors import CnnvisError


def add_dask_options(p, restart: bool = True) -> None:
    from ..scale import DEFAULT_SHARD_SIZE

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
    if restart:
        g.add_argument("--restart", action="store_true",
                       help="discard shard results recorded in --out by an interrupted run")


def options(args):
    from ..scale import ClusterOptions, parse_address

    parse_address(args.dask)  # a bad address fails before anything is read
    if getattr(args, "input_array", None):
        raise CnnvisError("--dask: needs image files (workers are sent paths, never pixels), not --input-array")
    return ClusterOptions(args.dask, threads=args.dask_threads, shard_size=args.shard_size,
                          dashboard=args.dask_dashboard, progress=not getattr(args, "no_progress", False))


def worker_model_ref(args, model):
    from .. import registry
    from ..scale import model_ref

    # workers run one onnxruntime thread per shard unless --threads says otherwise
    return model_ref(args.model or registry.default_model_name(), args.weights, args.device,
                     args.threads or 1, model.sha256)


def _report_skipped(command: str, skipped: list) -> None:
    if skipped:
        print(f"cnnvis {command}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0][1]}: "
              f"{skipped[0][2]} (all listed in manifest.json)", file=sys.stderr)


def skipped_record(skipped: list) -> dict:
    """What manifest.json records of unreadable inputs."""
    return {"count": len(skipped), "files": [{"position": int(p), "path": path, "reason": reason}
                                             for p, path, reason in skipped]}


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
    store = scale.ShardStore(out, "topk", fingerprint, restart=args.restart)
    shards = scale.make_shards(files, opts.shard_size, args.batch_size)
    job = {"model": worker_model_ref(args, model), "preprocessing": inputs.pre.to_dict(), "layer": layer,
           "k": args.k, "batch_size": args.batch_size}
    with scale.connect(opts, "cnnvis topk") as client:
        scale.run_shards(client, scale.topk_shard, job, shards, store, "cnnvis topk", progress=opts.progress)
    parts, readable, skipped = [], [], []
    for _, res in scale.results(store, shards):
        skipped.extend(res.meta["skipped"])
        if res.meta["map_shape"] is not None:
            a = res.arrays
            parts.append((res.meta["map_shape"], a["values"], a["images"], a["positions"]))
            readable.extend(int(i) for i in a["readable"])
    if not readable:
        raise CnnvisError(f"topk: none of the {len(files)} input image(s) is readable")
    top = scale.merge_topk(parts, args.k)
    if skipped:
        inputs = inputs.subset(readable)
    scale.compact_topk(top, readable, inputs.names)
    _report_skipped("topk", skipped)
    return top, inputs, skipped, store
