"""Shared pieces of the benchmarks: timing, BLAS report, peak matmul rate, and a PyTorch peer.

PyTorch is a benchmark-only extra (`pip install torch==2.13.0`); without it the benchmarks still
report cnnvis's own figures and say that the peer is missing.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(runs: dict, repeats: int, warmup: int = 2) -> dict:
    """Median time of each function over ``repeats`` rounds that run every function in turn, so
    that a slow phase of a shared VM hits all of them alike. Each turn starts with a 50 ms pause
    and one untimed run: the previous peer's worker threads spin for a while after its run
    (measured here: on 2 cores that made a 16 ms forward take 27 ms)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            time.sleep(0.05)
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_report() -> str:
    """Cores, BLAS kernel in use (threadpoolctl), and OpenBLAS environment overrides."""
    from threadpoolctl import threadpool_info

    blas = [f"{i.get('internal_api')} {i.get('version')} arch={i.get('architecture')} threads={i.get('num_threads')}"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    import onnxruntime as ort

    return (f"cores={os.cpu_count()} onnxruntime={ort.__version__} numpy BLAS: {'; '.join(blas) or 'unknown'}"
            f" env={env or 'none'}")


def peak_matmul_gflops(n: int = 2048, repeats: int = 5) -> tuple:
    """This machine's practical fp32 matmul rate: the best of numpy and (if present) torch."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = ("numpy", 2 * n ** 3 / median_time(lambda: a @ a, repeats) / 1e9)
    torch = try_torch()
    if torch is not None:
        t = torch.from_numpy(a)
        rate = 2 * n ** 3 / median_time(lambda: t @ t, repeats) / 1e9
        if rate > best[1]:
            best = ("torch", rate)
    return best


def try_torch():
    try:
        import torch
    except ImportError:
        print("note: PyTorch is not installed (pip install torch==2.13.0): peer figures are skipped")
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def torch_module_from_onnx(proto):
    """A torch.nn.Module computing the same function as a cnnvis NetBuilder/Caffe-style ONNX chain
    (Conv, Relu, LRN, MaxPool, AveragePool, Flatten, Reshape, Gemm, Dropout, Softmax), with the same
    weights."""
    import torch
    from onnx import helper, numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    layers = []
    for node in proto.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        op = node.op_type
        if op == "Conv":
            w = inits[node.input[1]]
            pads = a.get("pads", [0, 0, 0, 0])
            conv = torch.nn.Conv2d(w.shape[1] * a.get("group", 1), w.shape[0], w.shape[2:],
                                   stride=tuple(a.get("strides", [1, 1])), padding=tuple(pads[:2]),
                                   groups=a.get("group", 1), bias=len(node.input) > 2)
            conv.weight.data = torch.from_numpy(w.copy())
            if len(node.input) > 2:
                conv.bias.data = torch.from_numpy(inits[node.input[2]].copy())
            layers.append(conv)
        elif op == "Relu":
            layers.append(torch.nn.ReLU(inplace=True))
        elif op == "LRN":
            layers.append(torch.nn.LocalResponseNorm(a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75),
                                                     a.get("bias", 1.0)))
        elif op == "MaxPool":
            layers.append(torch.nn.MaxPool2d(a["kernel_shape"], a.get("strides"), a.get("pads", [0] * 4)[0],
                                             ceil_mode=bool(a.get("ceil_mode", 0))))
        elif op in ("Flatten", "Reshape"):
            layers.append(torch.nn.Flatten())
        elif op == "Gemm":
            w = inits[node.input[1]]
            if not a.get("transB", 0):
                w = w.T
            fc = torch.nn.Linear(w.shape[1], w.shape[0])
            fc.weight.data = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
            fc.bias.data = torch.from_numpy(inits[node.input[2]].copy())
            layers.append(fc)
        elif op == "Dropout":
            layers.append(torch.nn.Dropout(0.5))
        elif op == "Softmax":
            layers.append(torch.nn.Softmax(dim=1))
        else:
            raise ValueError(f"torch peer: op {op} not supported")
    return torch.nn.Sequential(*layers).eval()


def float64_conv1_gradients(proto, x, cls: int, limit: int = 8):
    """Per-image d logit[cls] / d conv1.weight in float64 PyTorch (a loop), for the first ``limit``
    images: the reference both cnnvis (float32) and PyTorch's float32 peers are checked against.

    float32 results of the same network can differ from each other by percents on some images
    (random AlexNet weights give huge activations; a last-bit change can flip a max-pool switch),
    so neither float32 implementation is the reference for the other.
    """
    torch = try_torch()
    module = torch_module_from_onnx(proto)[:-1].double()
    conv1 = module[0]
    out = []
    for i in range(min(limit, len(x))):
        module.zero_grad()
        module(torch.from_numpy(np.asarray(x[i:i + 1], np.float64)))[0, cls].backward()
        out.append(conv1.weight.grad.numpy().copy())
    return np.stack(out)


def relative_error(got, ref) -> float:
    """max |got - ref| / max |ref|, per image, worst image."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    axes = tuple(range(1, ref.ndim))
    return float((np.abs(got - ref).max(axis=axes) / np.abs(ref).max(axis=axes)).max())
