"""Dataset scale on Dask: the top-9 pass of `cnnvis topk --dask local:2` (two worker processes, one
thread each) against the one-process pass with two onnxruntime threads (target: >= 0.9x its
throughput), and throughput per worker with 1 and 2 workers (target: flat), in interleaved rounds
(medians); then the projected time of ImageNet train's top-9 on 1, 8 and 64 worker cores.

    python bench/bench_scale.py [--images 2000] [--model alexnet-random] [--layer conv5]
                                [--batch 32] [--shard-size 256] [--rounds 3]

Images are random JPEGs of 256x256 written to a temporary folder (decoding is part of the work,
as with real files). The distributed pass is the one `topk --dask` runs (shards sent as paths,
results recorded in a shard folder, merged in shard order); its result is checked equal to the
one-process result. Cluster start-up is timed apart (it is paid once per command). Run it on an
otherwise idle machine: the cores are the measurement.

A control separates the machine from the cluster: the plain one-thread top-9 pass (no shards, no
store, no merge; the model already loaded) timed inside the worker processes themselves, in one
worker alone and in two workers at the same time (``Client.run``). Its per-worker ratio is what the
cores give two independent processes; the cluster's own per-worker ratio is compared with it.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peers import machine_report

IMAGENET_TRAIN = 1_281_167


def write_images(folder: Path, n: int, size: int = 256, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    files = []
    for i in range(n):  # a few distinct images, re-encoded with a shift so every file differs
        pixels = np.roll(base, (i * 7) % size, axis=i % 2)
        path = folder / f"img{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        files.append(str(path))
    return files


def control_pass(job: dict, halves: dict, dask_worker=None) -> float:
    """In a worker process: the one-thread top-9 pass over this worker's part of the images (its
    address keys ``halves``), timed here, after a warm-up batch; returns images per second."""
    from cnnvis import preprocess, scale
    from cnnvis.analysis.topk import TopActivations

    files = halves[dask_worker.address]
    model = scale.worker_model(job["model"])
    pre = preprocess.Preprocessing.from_dict(job["preprocessing"])
    batch = job["batch_size"]

    def chunks(paths):
        for s in range(0, len(paths), batch):
            yield paths[s:s + batch], preprocess.load_batch(paths[s:s + batch], pre)

    TopActivations(model, job["layer"], k=job["k"], batch_size=batch).run(chunks(files[:batch]))
    t0 = time.perf_counter()
    TopActivations(model, job["layer"], k=job["k"], batch_size=batch).run(chunks(files))
    return len(files) / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="alexnet-random")
    ap.add_argument("--layer", default="conv5")
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    from cnnvis import preprocess, registry, scale
    from cnnvis.analysis.topk import TopActivations

    print(machine_report())
    model = registry.load(args.model, threads=2)  # builds/fetches it once, before workers look for it
    pre = preprocess.for_model(model)
    layer = model.layer(args.layer).name
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        t0 = time.perf_counter()
        files = write_images(tmp / "images", args.images)
        print(f"{len(files)} images written in {time.perf_counter() - t0:.1f} s; model {model.name}, layer {layer}, "
              f"batch {args.batch}, shard {args.shard_size}")

        def one_process():
            def chunks():
                for s in range(0, len(files), args.batch):
                    yield files[s:s + args.batch], preprocess.load_batch(files[s:s + args.batch], pre)
            return TopActivations(model, layer, k=args.k, batch_size=args.batch).run(chunks())

        ref = scale.model_ref(args.model, None, "cpu", 1, model.sha256)
        job = {"model": ref, "preprocessing": pre.to_dict(), "layer": layer, "k": args.k, "batch_size": args.batch}
        shards = scale.make_shards(files, args.shard_size, args.batch)
        clusters, starts = {}, {}
        for n in (1, 2):
            t0 = time.perf_counter()
            lc = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                              silence_logs=logging.ERROR, **scale.local_dashboard(False))
            clusters[n] = (lc, Client(lc))
            starts[n] = time.perf_counter() - t0

        def distributed(n, round_no):
            store = scale.ShardStore(tmp / f"out{n}-{round_no}", "topk", {"round": round_no, "n": n})
            scale.run_shards(clusters[n][1], scale.topk_shard, job, shards, store, f"bench local:{n}", progress=False)
            parts = []
            for _, res in scale.results(store, shards):
                a = res.arrays
                parts.append((res.meta["map_shape"], a["values"], a["images"], a["positions"]))
            top = scale.merge_topk(parts, args.k)
            store.remove()
            return top

        # warm-up: every worker loads the model and builds its session once (paid once per command)
        expect = one_process()
        for n in (1, 2):
            got = distributed(n, -1)
            if not (np.array_equal(got.values_, expect.values_) and np.array_equal(got.images_, expect.images_)
                    and np.array_equal(got.positions_, expect.positions_)):
                sys.exit(f"local:{n}: the distributed top-{args.k} differs from the one-process result")
        times = {"one process, 2 threads": [], "local:2, 1 thread each": [], "local:1, 1 thread": []}
        control = {1: [], 2: []}
        for r in range(args.rounds):
            for name, fn in (("one process, 2 threads", one_process),
                             ("local:2, 1 thread each", lambda: distributed(2, r)),
                             ("local:1, 1 thread", lambda: distributed(1, r))):
                time.sleep(0.05)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            for n in (1, 2):  # the control: plain passes in n worker processes at once
                client = clusters[n][1]
                workers = sorted(client.scheduler_info()["workers"])
                halves = {w: files[i::n] for i, w in enumerate(workers)}
                time.sleep(0.05)
                control[n].append(sum(client.run(control_pass, job, halves).values()))
        for lc, client in clusters.values():
            client.close()
            lc.close()

    rate = {name: args.images / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:24s} {rate[name]:7.1f} img/s (median of {len(t)}: "
              + ", ".join(f"{args.images / x:.1f}" for x in t) + ")")
    c1, c2 = statistics.median(control[1]), statistics.median(control[2])
    print(f"control, plain one-thread pass inside the workers: 1 worker {c1:.1f} img/s, 2 workers at once "
          f"{c2:.1f} img/s in all (medians of {len(control[1])}); per worker {c2 / 2 / c1:.2f}")
    print(f"cluster start-up: local:1 {starts[1]:.1f} s, local:2 {starts[2]:.1f} s (once per command)")
    ratio = rate["local:2, 1 thread each"] / rate["one process, 2 threads"]
    per_worker = (rate["local:2, 1 thread each"] / 2) / rate["local:1, 1 thread"]
    print(f"local:2 / one process: {ratio:.2f}x {'(>= 0.9x: met)' if ratio >= 0.9 else '(UNDER the 0.9x target)'}")
    print(f"throughput per worker, 2 workers / 1 worker: {per_worker:.2f} "
          f"{'(flat within 10%)' if per_worker >= 0.9 else '(drops by more than 10%)'}; the same ratio of the "
          f"control (two processes on these cores, no cluster): {c2 / 2 / c1:.2f}; the cluster's own share "
          f"{per_worker / (c2 / 2 / c1):.2f}")
    core = rate["local:2, 1 thread each"] / 2
    for cores in (1, 8, 64):
        print(f"ImageNet train ({IMAGENET_TRAIN:,} images) top-{args.k} of {layer} on {cores:2d} worker core(s) at "
              f"{core:.1f} img/s per core: {IMAGENET_TRAIN / (core * cores) / 3600:6.1f} h")
    return rate, ratio, per_worker, (c1, c2)


if __name__ == "__main__":
    main()
