"""Occlusion maps on alexnet-random (227×227, window 35, stride 8 = 625 windows): cnnvis
(incremental early layers, and the whole network per window) beside Captum's ``Occlusion`` on the
same weights in PyTorch at several ``perturbations_per_eval`` — all measured in this run. The maps
are checked to agree before anything is timed.

    python bench/bench_occlusion.py [--repeats 3] [--ppe 1 4 16 32] [--input-size 227]

Captum is a benchmark-only extra (``pip install captum``); without it (or without PyTorch) a plain
PyTorch batched occlusion loop is the peer, and without PyTorch only cnnvis is timed.
"""
from __future__ import annotations

import argparse

import numpy as np
from onnx import numpy_helper

from peers import machine_report, median_time, torch_module_from_onnx, try_torch


def torch_occlusion_loop(torch, module, x, target, window, stride, fill, batch):
    """The plain PyTorch peer: occluded copies in batches, softmax probability of ``target``."""
    c, h, w = x.shape
    ys = range(0, h - window + 1, stride)
    xs = range(0, w - window + 1, stride)
    corners = [(y, xx) for y in ys for xx in xs]
    base = torch.from_numpy(x)[None]
    out = []
    with torch.inference_mode():
        for start in range(0, len(corners), batch):
            chunk = corners[start:start + batch]
            imgs = base.repeat(len(chunk), 1, 1, 1)
            for k, (y, xx) in enumerate(chunk):
                imgs[k, :, y:y + window, xx:xx + window] = fill
            out.append(module(imgs)[:, target])
    return torch.cat(out).numpy().reshape(len(ys), len(xs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppe", type=int, nargs="+", default=[1, 4, 16, 32],
                    help="Captum perturbations_per_eval values to try")
    ap.add_argument("--input-size", type=int, default=227, help="smaller for a quick smoke run")
    ap.add_argument("--window", type=int, default=35)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="cnnvis windows per onnxruntime call")
    args = ap.parse_args(argv)

    from cnnvis import nets
    from cnnvis.analysis.occlusion import Occlusion, coverage_mean, input_space
    from cnnvis.model import Model

    print(machine_report())
    proto = nets.build_alexnet(seed=0, input_size=args.input_size)
    size = args.input_size
    # a caffe-range input: pixels in [0, 1] through the caffe preprocessing
    pixels = np.random.default_rng(0).random((size, size, 3))
    probe = Model(proto, name="alexnet-random", sidecar={"preprocessing": {"preset": "caffe"}})
    from cnnvis.preprocess import for_model

    x = for_model(probe).from_pixels(pixels)
    # random weights give huge logits (probabilities of exactly 0 or 1, flat maps): scale the last
    # layer (a softmax temperature) so the logits have a std near 0.5; the layers before keep their
    # natural magnitudes
    logits = probe.run(x[None], [probe.logits_layer.name])[probe.logits_layer.name]
    factor = np.float32(0.5 / float(logits.std()))
    last = probe.logits_layer
    for init in proto.graph.initializer:
        if init.name in (last.weight, last.bias):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    model = Model(proto, name="alexnet-random", sidecar={"trained": False, "preprocessing": {"preset": "caffe"}})
    fill = float(input_space(model).grey_.reshape(-1)[0])  # the mean: 0 in input space
    n_windows = ((size - args.window) // args.stride + 1) ** 2
    print(f"alexnet-random {size}x{size}, window {args.window}, stride {args.stride}: {n_windows} windows "
          f"(+1 unoccluded forward)")

    results = {}
    ref_maps = {}
    for label, inc in (("cnnvis incremental", "auto"), ("cnnvis whole network", False)):
        occ = Occlusion(model, window=args.window, stride=args.stride, layer=False, batch_size=args.batch_size,
                        incremental=inc)
        res = occ.run(x[None])[0]  # warm-up: builds sessions
        ref_maps[label] = res
        results[label] = median_time(lambda: occ.run(x[None], target=res.target), args.repeats, warmup=0)
        if inc == "auto":
            print(f"  incremental plan: {occ.plan_.describe()}")
    a, b = ref_maps["cnnvis incremental"], ref_maps["cnnvis whole network"]
    assert np.abs(a.probability - b.probability).max() < 1e-5, "incremental and whole-network maps differ"
    print(f"  p(class {a.target}) unoccluded {a.base_probability:.4f}, over windows "
          f"{a.probability.min():.4f}..{a.probability.max():.4f}")
    target = a.target

    torch = try_torch()
    if torch is not None:
        module = torch_module_from_onnx(proto)
        tx = torch.from_numpy(x)[None]
        try:
            from captum.attr import Occlusion as CaptumOcclusion
        except ImportError:
            CaptumOcclusion = None
            print("note: captum is not installed (pip install captum): the peer is a plain PyTorch loop")
        if CaptumOcclusion is not None:
            captum = CaptumOcclusion(module)

            def run_captum(ppe):
                with torch.inference_mode():
                    return captum.attribute(tx, sliding_window_shapes=(3, args.window, args.window),
                                            strides=(3, args.stride, args.stride), baselines=fill, target=target,
                                            perturbations_per_eval=ppe)

            # Captum's attribution: per pixel, the mean over covering windows of (p_base - p_window)
            attr = run_captum(max(args.ppe))[0, 0].numpy().astype(np.float64)
            ours = coverage_mean(a.base_probability - a.probability, a.ys, a.xs, a.window, a.image_hw)
            covered = np.isfinite(ours)
            diff = np.abs(attr[covered] - ours[covered]).max()
            print(f"  Captum attribution vs cnnvis map: max abs difference {diff:.2e}")
            assert diff < 1e-4, "Captum computes something else"
            for ppe in args.ppe:
                results[f"Captum ppe={ppe}"] = median_time(lambda: run_captum(ppe), args.repeats, warmup=0)
        else:
            loop = torch_occlusion_loop(torch, module, x, target, args.window, args.stride, fill, args.batch_size)
            assert np.abs(loop - a.probability).max() < 1e-4, "the PyTorch loop computes something else"
            results["PyTorch batched loop"] = median_time(
                lambda: torch_occlusion_loop(torch, module, x, target, args.window, args.stride, fill, args.batch_size),
                args.repeats, warmup=0)

    peers = {k: v for k, v in results.items() if not k.startswith("cnnvis")}
    best_peer = min(peers, key=peers.get) if peers else None
    print()
    for name, t in results.items():
        ratio = f"  {peers[best_peer] / t:5.2f}x vs {best_peer}" if best_peer else ""
        print(f"  {name:22s} {t:8.2f} s  {n_windows / t:7.1f} windows/s{ratio}")
    return results


if __name__ == "__main__":
    main()
