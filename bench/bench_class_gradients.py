"""Per-image class-gradient throughput on alexnet-random (CPU): d logit[class] / d conv1.weight for
every image of a group (96×3×11×11 per image), cnnvis (one gradient-engine call per batch) beside
PyTorch on the same weights in the same run, plus the whole `compare-classes` analysis.

    python bench/bench_class_gradients.py [--images 256] [--batch-size 32] [--repeats 3]

PyTorch peers: ``torch autograd+unfold`` back-propagates the batch's summed class logits to conv1's
output (images are independent, so each image's slice is its own gradient) and forms each image's
weight gradient as (output gradient) × (unfolded input); ``torch.func vmap(grad)`` vectorises the
per-image gradient directly. Both are checked against cnnvis's numbers before being timed.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from peers import machine_report, median_time, torch_module_from_onnx, try_torch

CLASS = 281  # tabby cat


def torch_unfold_peer(torch, module, x, target, batch_size):
    conv1 = module[0]
    rest = module[1:-1]  # up to fc8 (the logits), without the final softmax
    k, stride, pad = conv1.kernel_size, conv1.stride, conv1.padding
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        # a leaf for conv1's output; the clone keeps the in-place ReLU off it
        y = conv1(xb).detach().requires_grad_(True)
        logits = rest(y.clone())
        logits[:, target].sum().backward()
        cols = torch.nn.functional.unfold(xb, k, padding=pad, stride=stride)  # N × (C·k·k) × L
        dy = y.grad.flatten(2)  # N × O × L
        out.append(torch.bmm(dy, cols.transpose(1, 2)).reshape(len(xb), *conv1.weight.shape))
    return torch.cat(out)


def torch_vmap_peer(torch, module, x, target, batch_size):
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in module.named_parameters()}
    head = module[:-1]

    def logit(w, xi):
        return functional_call(head, {**params, "0.weight": w}, (xi[None],))[0, target]

    per_image = vmap(grad(logit), in_dims=(None, 0))
    return torch.cat([per_image(params["0.weight"], x[s:s + batch_size]) for s in range(0, len(x), batch_size)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="group size (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--permutations", type=int, default=999, help="of the compare-classes timing")
    args = ap.parse_args(argv)

    from cnnvis import nets
    from cnnvis.analysis import class_gradients as cgm
    from cnnvis.model import Model

    print(machine_report())
    proto = nets.build_alexnet(seed=0)
    model = Model(proto, name="alexnet-random", sidecar={"trained": False})
    n, bs = args.images, args.batch_size
    x = np.random.default_rng(0).standard_normal((n, 3, 227, 227)).astype(np.float32) * 50
    cg = cgm.ClassGradients(model, "conv1", batch_size=bs)
    t0 = time.perf_counter()
    mine = cg.run(x[:min(n, bs)], CLASS).gradients  # builds the gradient graph once
    print(f"graph build + first batch: {time.perf_counter() - t0:.2f} s")
    res = {"cnnvis": median_time(lambda: cg.run(x, CLASS), args.repeats, warmup=0)}

    def compare():
        half = n // 2
        chunks = lambda a: ((["i"] * len(a[s:s + bs]), a[s:s + bs]) for s in range(0, len(a), bs))  # noqa: E731
        cgm.ClassComparison(model, batch_size=bs, n_permutations=args.permutations).run(
            {"reference": chunks(x[:half]), "other": chunks(x[half:])}, target=CLASS)

    if n >= 2:
        res["cnnvis compare-classes (incl. build)"] = median_time(compare, 1, warmup=0)

    torch = try_torch()
    if torch is not None:
        module = torch_module_from_onnx(proto)
        tx = torch.from_numpy(x)
        from peers import float64_conv1_gradients, relative_error

        ref = float64_conv1_gradients(proto, x[:len(mine)], CLASS)
        print(f"cnnvis (float32) vs PyTorch float64 reference: {relative_error(mine[:len(ref)], ref):.1e}")
        for name, peer in (("torch autograd+unfold", torch_unfold_peer), ("torch.func vmap(grad)", torch_vmap_peer)):
            try:
                got = peer(torch, module, tx[:len(mine)], CLASS, bs).detach().numpy()
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                print(f"note: {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            res[name] = median_time(lambda: peer(torch, module, tx, CLASS, bs), args.repeats, warmup=1)
            print(f"{name} (float32) vs the float64 reference: {relative_error(got[:len(ref)], ref):.1e}")

    print(f"\n{n} images, batch {bs}, d logit[{CLASS}] / d conv1.weight (96×3×11×11) per image:")
    base = res.get("torch autograd+unfold")
    for name, t in res.items():
        ratio = f"  {base / t:5.2f}x vs torch autograd+unfold" if base else ""
        print(f"  {name:38s} {n / t:8.1f} img/s  {t / n * 1e3:7.2f} ms/img{ratio}")
    return res


if __name__ == "__main__":
    main()
