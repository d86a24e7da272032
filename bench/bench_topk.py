"""Top-9 throughput of `cnnvis topk`'s streaming pass on alexnet-random, against the plain forward
pass with the same layer tapped (target: top-9 within 1.2× of the forward time), and the cost of
the second pass (deconvnet projections of the final top-9 of some maps), all measured in this run
(forward and top-9 in interleaved rounds; medians).

    python bench/bench_topk.py [--images 256] [--batch 32] [--layers conv1 conv5 fc6] [--maps 16]

Images are random arrays (the pass is the same whatever the pixels); the state file is written
after every chunk as the command does, into a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from peers import interleaved_medians, machine_report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", nargs="+", default=["conv1", "conv5", "fc6"])
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--maps", type=int, default=16, help="maps projected in the second pass")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    args = ap.parse_args(argv)

    from cnnvis import nets
    from cnnvis.analysis import deconv
    from cnnvis.analysis.topk import TopActivations
    from cnnvis.manifest import write_text
    from cnnvis.model import Model

    print(machine_report())
    model = Model(nets.build_alexnet(seed=0), name="alexnet-random", sidecar={"trained": False})
    x = np.random.default_rng(0).standard_normal((args.images, *model.input_shape)).astype(np.float32)

    def chunks():
        for s in range(0, len(x), args.batch):
            yield [f"img{i}" for i in range(s, min(s + args.batch, len(x)))], x[s:s + args.batch]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "topk_state.json"

        def save(top):
            write_text(state, json.dumps(top.to_state(), separators=(",", ":")))

        for layer in args.layers:
            def forward():
                for _, batch in chunks():
                    model.run(batch, [layer], batch_size=args.batch)

            def topk():
                return TopActivations(model, layer, k=args.k, batch_size=args.batch, on_chunk=save).run(chunks())

            times = interleaved_medians({"forward": forward, "topk": topk}, args.repeats, warmup=1)
            t_fwd, t_top = times["forward"], times["topk"]
            top = topk()
            maps = list(range(min(args.maps, top.map_shape_[0])))
            recs = [r for m in maps for r in top.units(m)]
            t0 = time.perf_counter()
            units = np.array([[r["map"], r["y"], r["x"]] for r in recs])
            deconv.Deconvnet(model, layer, batch_size=args.batch).run(
                x[[r["image"] for r in recs]], target=units, values=[r["value"] for r in recs])
            t_proj = time.perf_counter() - t0
            ratio = t_top / t_fwd
            rows.append((layer, args.images / t_fwd, args.images / t_top, ratio, len(recs) / t_proj))
            print(f"{layer:6s} forward+tap {args.images / t_fwd:7.1f} img/s   top-{args.k} {args.images / t_top:7.1f} "
                  f"img/s   ratio {ratio:4.2f}x {'(within 1.2x)' if ratio <= 1.2 else '(OVER the 1.2x target)'}   "
                  f"projections {len(recs) / t_proj:6.1f}/s ({len(recs)} of {len(maps)} maps, one-off "
                  f"{t_proj:.1f} s incl. engine build)")
    return rows


if __name__ == "__main__":
    main()
