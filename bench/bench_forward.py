"""Forward throughput of alexnet-random on CPU: cnnvis (onnxruntime), plain and with every
conv/pool/LRN/fc layer tapped, beside PyTorch eager and torch.compile on the same weights, and as a
fraction of this machine's peak fp32 matmul rate — all measured in this run.

    python bench/bench_forward.py [--batches 1 32] [--repeats 7]
"""
from __future__ import annotations

import argparse

import numpy as np

from peers import interleaved_medians, machine_report, peak_matmul_gflops, torch_module_from_onnx, try_torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to warm up)")
    args = ap.parse_args(argv)

    from cnnvis import nets
    from cnnvis.model import Model

    print(machine_report())
    proto = nets.build_alexnet(seed=0)
    model = Model(proto, name="alexnet-random", sidecar={"trained": False})
    taps = [layer.name for layer in model.layers if layer.op_type in ("Conv", "MaxPool", "LRN", "Gemm")]
    gflop = 2 * sum(layer.macs for layer in model.layers) / 1e9
    peak_src, peak = peak_matmul_gflops()
    print(f"alexnet-random: {gflop:.3f} GFLOP per 227x227 image; peak fp32 matmul {peak:.0f} GFLOP/s ({peak_src})")
    print(f"tapped layers ({len(taps)}): {', '.join(taps)}")
    torch = try_torch()
    tmod = torch_module_from_onnx(proto) if torch else None
    compiled = None
    if torch is not None and not args.no_compile:
        compiled = torch.compile(tmod)

    rows = []
    for n in args.batches:
        x = np.random.default_rng(0).standard_normal((n, 3, 227, 227)).astype(np.float32)
        runs = {"cnnvis": lambda: model.run(x, batch_size=n), "cnnvis+taps": lambda: model.run(x, taps, batch_size=n)}
        if torch is not None:
            tx = torch.from_numpy(x)
            with torch.inference_mode():
                ref = tmod(tx).numpy()
            got = model.run(x, batch_size=n)[model.output_name]
            assert np.abs(ref - got).max() < 1e-4, "torch peer computes something else"

            def in_inference_mode(fn):
                def run():
                    with torch.inference_mode():
                        return fn(tx)
                return run

            runs["torch eager"] = in_inference_mode(tmod)
            if compiled is not None:
                runs["torch.compile"] = in_inference_mode(compiled)
        res = interleaved_medians(runs, args.repeats)
        for name, t in res.items():
            rows.append((n, name, n / t, gflop * n / t / peak))
        base = res.get("torch.compile") or res.get("torch eager")
        print(f"\nbatch {n}:")
        for name, t in res.items():
            ratio = f"  {base / t:5.2f}x vs {'torch.compile' if 'torch.compile' in res else 'torch eager'}" if base else ""
            print(f"  {name:14s} {n / t:8.1f} img/s  {gflop * n / t / peak * 100:5.1f}% of peak{ratio}")
        print(f"  tap cost: {(res['cnnvis+taps'] / res['cnnvis'] - 1) * 100:+.1f}% time")
    return rows


if __name__ == "__main__":
    main()
