#!/usr/bin/env python3
"""Benchmark: per-sample conv1 weight gradients of one class logit on the AlexNet topology (CPU).

Reports, per image: cnnvis's forward time, cnnvis's per-sample gradient time (one onnxruntime
run for the whole batch) and their ratio, beside PyTorch CPU doing the same job in the same run —
the fastest of a per-sample loop, torch.func vmap(grad), and one batched backward followed by a
per-sample unfold/einsum. Every figure is the median of interleaved rounds (each peer once per round).
torch is optional (pip install torch==2.13.0); without it only the cnnvis numbers are reported.

Targets: >= 1.5x faster than PyTorch's best; <= 2.5x cnnvis's own forward time.

    python bench/bench_gradients.py --batch 32
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASS = 281


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    rows = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture', '?')}, {i.get('num_threads')} threads)"
            for i in threadpool_info()]
    return "; ".join(rows) or "no BLAS found by threadpoolctl"


# ------------------------------------------------------------------ PyTorch, from the same ONNX graph

def torch_forward_fn(model):
    """A PyTorch function computing the ONNX AlexNet graph, with conv1's weight as an argument."""
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper

    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    conv1_weight = nodes[0].input[1]

    def forward(x, w1):
        env = {model.graph.input[0].name: x}
        for node in nodes:
            a = {k.name: helper.get_attribute_value(k) for k in node.attribute}
            ins = [w1 if n == conv1_weight else env[n] if n in env else weights[n] for n in node.input if n]
            op = node.op_type
            if op == "Conv":
                p = a.get("pads", [0, 0, 0, 0])
                y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, stride=a.get("strides", [1, 1]),
                             padding=(p[0], p[1]), groups=a.get("group", 1))
            elif op == "Relu":
                y = F.relu(ins[0])
            elif op == "LRN":
                y = F.local_response_norm(ins[0], a["size"], alpha=a.get("alpha", 1e-4), beta=a.get("beta", 0.75),
                                          k=a.get("bias", 1.0))
            elif op == "MaxPool":
                p = a.get("pads", [0, 0, 0, 0])
                y = F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides", [1, 1]), padding=(p[0], p[1]),
                                 ceil_mode=bool(a.get("ceil_mode", 0)))
            elif op == "Flatten":
                y = ins[0].flatten(1)
            elif op == "Gemm":
                y = F.linear(ins[0], ins[1], ins[2]) if a.get("transB", 0) else ins[0] @ ins[1] + ins[2]
            elif op in ("Dropout", "Identity"):
                y = ins[0]
            elif op == "Softmax":
                y = F.softmax(ins[0], dim=a.get("axis", -1))
            else:
                raise RuntimeError(f"bench: op {op} not mapped to PyTorch")
            env[node.output[0]] = y
        return env

    return forward, weights[conv1_weight], conv1_weight


def torch_methods(model, logits_name, x_np, cls):
    """PyTorch's ways of computing the per-sample gradients: {name: (function, error vs the loop)}, and
    the loop's result."""
    import torch
    from torch.func import grad, vmap

    forward, w1, _ = torch_forward_fn(model)
    x = torch.from_numpy(x_np)
    n = len(x_np)

    def loop():
        out = []
        for i in range(n):
            w = w1.detach().requires_grad_(True)
            logit = forward(x[i:i + 1], w)[logits_name][0, cls]
            (g,) = torch.autograd.grad(logit, w)
            out.append(g)
        return torch.stack(out)

    def one(w, xi):
        return forward(xi[None], w)[logits_name][0, cls]

    per_sample_grad = vmap(grad(one), in_dims=(None, 0))

    def vmapped():
        return per_sample_grad(w1, x)

    conv1 = model.graph.node[0]
    attrs = {a.name: list(a.ints) if a.ints else a.i for a in conv1.attribute}

    def batched_unfold():
        w = w1.detach().requires_grad_(True)
        env = forward(x, w)
        c1 = env[conv1.output[0]]
        total = env[logits_name][:, cls].sum()
        (g_out,) = torch.autograd.grad(total, c1)  # per-sample output gradients (samples independent)
        pads = attrs.get("pads", [0, 0, 0, 0])
        cols = torch.nn.functional.unfold(x, w1.shape[2:], padding=(pads[0], pads[1]), stride=attrs.get("strides", [1, 1]))
        return torch.einsum("nmp,nkp->nmk", g_out.flatten(2), cols).reshape(n, *w1.shape)

    ref = loop()
    results = {}
    for name, fn in (("per-sample loop", loop), ("torch.func vmap(grad)", vmapped),
                     ("batched backward + unfold/einsum", batched_unfold)):
        got = fn()
        err = float((got - ref).abs().max() / ref.abs().max())
        results[name] = (fn, err)
    return results, ref.numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime/torch threads (default: all cores)")
    args = ap.parse_args(argv)

    from cnnvis.autodiff import GradientEngine
    from cnnvis.nets import build_alexnet
    from cnnvis.onnxgraph import create_session, decompose_lrn

    model = build_alexnet(seed=0)
    image = model.graph.input[0].name
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 227, 227)).astype(np.float32) * 50
    print(f"AlexNet topology (seeded random weights), batch {args.batch}, CPU, {os.cpu_count()} cores")
    print(f"BLAS (threadpoolctl): {blas_info()}")

    # cnnvis's own forward: the session cnnvis.model.Model runs (LRN decomposed, faster than the op)
    sess = create_session(decompose_lrn(model), device="cpu", threads=args.threads)
    engine = GradientEngine(model, [model.graph.node[0].input[1]], objective="logit", per_sample=True,
                            batch_size=args.batch, device="cpu", threads=args.threads)
    t0 = time.perf_counter()
    res = engine.run(x, index=CLASS)
    print(f"cnnvis: gradient graph built and first run in {time.perf_counter() - t0:.2f} s")
    runs = {"cnnvis forward": lambda: sess.run(None, {image: x}),
            "cnnvis per-sample conv1 gradients": lambda: engine.run(x, index=CLASS)}
    errors = {}
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch: not installed (pip install torch==2.13.0) - comparison skipped")
    if torch is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        methods, ref = torch_methods(model, engine.graph_info(x.shape[1:]).target, x, CLASS)
        ours = res[model.graph.node[0].input[1]]
        from peers import float64_conv1_gradients, relative_error

        ref64 = float64_conv1_gradients(model, x, CLASS)
        print(f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads); against a float64 PyTorch reference "
              f"(first {len(ref64)} images): cnnvis {relative_error(ours[:len(ref64)], ref64):.1e}, "
              f"PyTorch float32 {relative_error(ref[:len(ref64)], ref64):.1e}")
        for name, (fn, err) in methods.items():
            runs[name], errors[name] = fn, err
    from peers import interleaved_medians

    times = interleaved_medians(runs, args.repeats, warmup=1)
    ms = 1000 / args.batch
    fwd, grad = times.pop("cnnvis forward"), times.pop("cnnvis per-sample conv1 gradients")
    print(f"median of {args.repeats} interleaved rounds:")
    print(f"cnnvis forward:                      {fwd * ms:8.2f} ms/image")
    print(f"cnnvis per-sample conv1 gradients:   {grad * ms:8.2f} ms/image  = {grad / fwd:.2f}x forward "
          f"(target <= 2.5x: {'met' if grad / fwd <= 2.5 else 'NOT met'})")
    if not times:
        return 0
    for name, t in times.items():
        print(f"  {name:34s} {t * ms:8.2f} ms/image (vs loop: {errors[name]:.1e})")
    best_name, best = min(times.items(), key=lambda kv: kv[1])
    speedup = best / grad
    print(f"cnnvis vs PyTorch's best ({best_name}): {speedup:.2f}x faster "
          f"(target >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
