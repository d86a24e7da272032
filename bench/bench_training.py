"""Training throughput of the demo network (Fashion-MNIST CaffeNet shape) on CPU: cnnvis (backward
ONNX graphs in onnxruntime + numpy SGD) beside PyTorch training the same network with the same batch
size, in the same run; plus the projected time of the committed recipe.

    python bench/bench_training.py [--batch-size 64] [--steps 40]
"""
from __future__ import annotations

import argparse

import numpy as np

from peers import interleaved_medians, machine_report, torch_module_from_onnx, try_torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="timed steps (after warm-up)")
    ap.add_argument("--repeats", type=int, default=5, help="median over this many timed runs")
    args = ap.parse_args(argv)

    from cnnvis import nets
    from cnnvis.training import Trainer, TrainingRecipe

    print(machine_report())
    n = args.batch_size * args.steps
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, n)
    proto = nets.build_fashion_caffenet(seed=0)

    recipe = TrainingRecipe(epochs=1, batch_size=args.batch_size, warmup_steps=0)

    def cnnvis_run():
        Trainer(proto, recipe).fit(x, y, progress=False)

    runs = {"cnnvis": cnnvis_run}
    torch = try_torch()
    if torch is not None:
        model = torch_module_from_onnx(proto)[:-1].train()  # logits; softmax is in the loss
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def torch_epoch():
            for s in range(args.steps):
                sl = slice(s * args.batch_size, (s + 1) * args.batch_size)
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(tx[sl]), ty[sl])
                loss.backward()
                opt.step()

        runs["PyTorch"] = torch_epoch
    times = interleaved_medians(runs, args.repeats, warmup=1)
    ours = n / times["cnnvis"]
    print(f"cnnvis  : {ours:7.1f} img/s (batch {args.batch_size}, {recipe.workers} concurrent parts per batch; "
          "includes engine set-up per fit)")
    if "PyTorch" in times:
        theirs = n / times["PyTorch"]
        print(f"PyTorch : {theirs:7.1f} img/s (eager, {torch.get_num_threads()} threads, same network and batch)")
        print(f"ratio   : cnnvis = {ours / theirs:.2f}x PyTorch (target >= 0.7x)")
    recipe = TrainingRecipe()
    minutes = 60000 * recipe.epochs / ours / 60
    print(f"committed recipe ({recipe.epochs} epochs x 60,000 images): ~{minutes:.0f} min at this rate (target < 30)")


if __name__ == "__main__":
    main()
