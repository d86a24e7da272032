"""Training a small network with cnnvis's own gradients (no torch, no TensorFlow).

The gradient engine builds a training variant of the forward graph: Dropout becomes a product with
0/1 masks fed at run time (scaled by 1/(1−p)), the weights are graph inputs, and the objective is
the batch-mean cross-entropy. numpy does the optimiser step (SGD with momentum and weight decay,
cosine learning-rate decay). Seeded: the same seed on the same machine gives the same weights.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import CnnvisError


@dataclasses.dataclass
class TrainingRecipe:
    """Hyper-parameters; stored in the model's sidecar so a result can be reproduced."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # or "constant"
    warmup_steps: int = 200
    hflip: bool = True  # random horizontal flips (clothes are roughly mirror-symmetric)
    seed: int = 0
    # each batch runs as this many concurrent parts whose gradients are summed (GradientEngine's
    # workers): faster on a multi-core CPU; the sum's last bits depend on it, so it is recorded
    workers: int = 2

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    """Fit the weights of a forward ONNX classifier (a graph ending in Softmax or logits).

    Parameters
    ----------
    proto : the forward model (weights as initializers; a Softmax at the end is left out of the loss).
    recipe : :class:`TrainingRecipe`.
    device, threads : onnxruntime session options.

    After :meth:`fit`: ``params_`` (name → array), ``history_`` (one dict per epoch), ``workers_`` (the
    concurrent parts per batch actually run: fewer than the recipe's on a GPU or with fewer threads).
    """

    def __init__(self, proto: onnx.ModelProto, recipe: TrainingRecipe | None = None,
                 device: str = "auto", threads: int | None = None):
        self.proto = proto
        self.recipe = recipe or TrainingRecipe()
        self.device = device
        self.threads = threads

    def _trainable(self) -> list:
        # float weights used by Conv/Gemm (and friends); dropout ratios and shape constants are not trained
        consumers = {}
        for node in self.proto.graph.node:
            for i, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node.op_type, i))
        names = []
        for init in self.proto.graph.initializer:
            uses = consumers.get(init.name, [])
            if init.data_type == onnx.TensorProto.FLOAT and uses and all(
                    op in ("Conv", "Gemm", "MatMul", "PRelu", "BatchNormalization", "Add", "Mul") and i >= 1
                    for op, i in uses):
                names.append(init.name)
        return names

    def fit(self, x, labels, progress: bool = True, on_epoch=None) -> "Trainer":
        """Train on ``x`` (N×C×H×W float32, preprocessed) and ``labels`` (N ints).

        ``on_epoch(epoch, trainer)`` is called after each epoch (for checkpoints and evaluation).
        """
        from tqdm import tqdm

        from .autodiff import GradientEngine
        from .autodiff.graph import default_target

        r = self.recipe
        x = np.ascontiguousarray(x, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        if x.ndim != 4 or len(x) != len(labels):
            raise CnnvisError(f"training data: expected N×C×H×W images and N labels, got {x.shape} and {labels.shape}")
        names = self._trainable()
        logits = default_target(self.proto, "cross_entropy")  # the tensor the loss reads
        engine = GradientEngine(self.proto, wrt=names, objective="cross_entropy", training=True,
                                per_sample=False, outputs=[logits], batch_size=r.batch_size,
                                device=self.device, threads=self.threads, workers=r.workers)
        self.workers_ = engine.workers_
        inits = {i.name: i for i in self.proto.graph.initializer}
        self.params_ = {n: numpy_helper.to_array(inits[n]).astype(np.float32).copy() for n in names}
        velocity = {n: np.zeros_like(v) for n, v in self.params_.items()}
        decay = {n: (r.weight_decay if self.params_[n].ndim > 1 else 0.0) for n in names}  # no decay on biases
        rng = np.random.default_rng(r.seed)
        steps_per_epoch = int(math.ceil(len(x) / r.batch_size))
        total = steps_per_epoch * r.epochs
        self.history_ = []
        step = 0
        for epoch in range(1, r.epochs + 1):
            order = rng.permutation(len(x))
            loss_sum = correct = seen = 0.0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{r.epochs}", disable=not progress,
                       unit="batch", leave=True)
            for b in bar:
                idx = order[b * r.batch_size:(b + 1) * r.batch_size]
                xb, yb = x[idx], labels[idx]
                if r.hflip:
                    flip = rng.random(len(xb)) < 0.5
                    xb = np.where(flip[:, None, None, None], xb[..., ::-1], xb)
                masks = engine.dropout_masks(len(xb), xb.shape[1:], rng)
                res = engine.run(xb, labels=yb, masks=masks, params=self.params_)
                lr = self.learning_rate(step, total)
                for n in names:
                    g = res[n] + decay[n] * self.params_[n]
                    velocity[n] = r.momentum * velocity[n] - lr * g
                    self.params_[n] += velocity[n]
                step += 1
                loss_sum += float(res.objective.sum())
                correct += float((res.outputs[logits].argmax(axis=1) == yb).sum())
                seen += len(yb)
                if not np.isfinite(loss_sum):
                    raise CnnvisError(f"training diverged at epoch {epoch}, step {b} (loss is not finite); "
                                      "lower the learning rate")
                if b % 20 == 0 or b == steps_per_epoch - 1:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.4f}")
            bar.close()
            self.history_.append({"epoch": epoch, "loss": loss_sum / seen, "train_accuracy": correct / seen})
            if on_epoch is not None:
                on_epoch(epoch, self)
        return self

    def learning_rate(self, step: int, total: int) -> float:
        r = self.recipe
        if r.warmup_steps and step < r.warmup_steps:
            return r.lr * (step + 1) / r.warmup_steps
        if r.lr_schedule == "constant":
            return r.lr
        if r.lr_schedule == "cosine":
            t = (step - r.warmup_steps) / max(1, total - r.warmup_steps)
            return 0.5 * r.lr * (1.0 + math.cos(math.pi * min(1.0, t)))
        raise CnnvisError(f"lr_schedule {r.lr_schedule!r}: expected cosine or constant")

    def trained_proto(self, doc: str | None = None) -> onnx.ModelProto:
        """The forward model with the current weights (inference graph: Dropout is identity)."""
        return with_weights(self.proto, self.params_, doc)


def with_weights(proto: onnx.ModelProto, params: dict, doc: str | None = None) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name in params:
            init.CopyFrom(numpy_helper.from_array(np.asarray(params[init.name], np.float32), init.name))
    if doc is not None:
        out.graph.doc_string = doc
    return out


def evaluate(model, x, labels, batch_size: int = 256) -> dict:
    """Accuracy and confusion matrix of a :class:`cnnvis.model.Model` on preprocessed images."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = model.predict(x, batch_size=batch_size)
    pred = probs.argmax(axis=1)
    k = probs.shape[1]
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {"accuracy": float((pred == labels).mean()), "n": int(len(labels)), "confusion": confusion,
            "predictions": pred}
