"""The embedded default model: a CaffeNet-shaped network trained on Fashion-MNIST.

`train_and_write` trains it (cnnvis.training) and writes, through one :class:`RunOutput`:
``fashion_caffenet.onnx`` with its JSON sidecar, checkpoints of chosen epochs, the same network as
a Caffe deploy prototxt + caffemodel, and ``samples/`` (10 test images per class as PNG with their
labels and the dataset's licence). ``cnnvis train-demo --out models`` refreshes the committed copy.
"""
from __future__ import annotations

import io
import time

import numpy as np

from . import datasets, nets
from .manifest import RunOutput, dumps_json, sha256_file
from .training import Trainer, TrainingRecipe, evaluate

MODEL_NAME = "fashion_caffenet"
#: mean and std of the Fashion-MNIST training pixels in [0, 1] (the preprocessing of the demo model)
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
PREPROCESSING = {"preset": "grey28", "mean": [PIXEL_MEAN], "std": [PIXEL_STD]}
SAMPLES_PER_CLASS = 10
COMPARE_CLASSES = {"neuron": "Shirt", "reference": ["Shirt"], "similar": ["T-shirt/top", "Pullover", "Coat"], "per_item": True,
                   "dissimilar": ["Sneaker", "Bag", "Trouser"]}


def preprocessing():
    from .preprocess import Preprocessing

    return Preprocessing.from_dict(PREPROCESSING, source="demo model").with_input_shape((1, 28, 28))


def to_model_input(images_u8) -> np.ndarray:
    """N×28×28 uint8 dataset images → N×1×28×28 float32, exactly as the image pipeline does it for
    the sample PNGs (pixels/255, minus mean, over std)."""
    return preprocessing().normalize(np.asarray(images_u8, dtype=np.float64)[:, None] / 255.0)


def pick_samples(labels, per_class: int = SAMPLES_PER_CLASS) -> np.ndarray:
    """Indices of the first ``per_class`` test images of each class (stable, documented choice)."""
    return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(labels.max() + 1)])


def slug(name: str) -> str:
    return "".join(ch.lower() if ch.isalnum() else "-" for ch in name).strip("-")


def evaluate_on_fashion_mnist(model, data_dir=None, batch_size: int = 256) -> dict:
    images, labels = datasets.load_fashion_mnist("test", data_dir)
    return evaluate(model, to_model_input(images), labels, batch_size=batch_size)


def architecture_summary(proto) -> dict:
    from .model import Model

    m = Model(proto, name=MODEL_NAME)
    return {
        "spec": nets.FASHION_CAFFENET,
        "layers": [{"name": layer.name, "op": layer.op_type, "output": list(layer.output_shape or []),
                    "weight": list(layer.weight_shape or []), "params": layer.params} for layer in m.layers],
        "parameters": int(sum(layer.params for layer in m.layers)),
        "macs_per_image": int(sum(layer.macs for layer in m.layers)),
    }


def train_and_write(out, recipe: TrainingRecipe | None = None, data_dir=None, limit: int | None = None,
                    checkpoints=(1, 2, 4, 8), device: str = "auto", threads=None, caffe: bool = True,
                    progress: bool = True) -> dict:
    """Train the demo model and write it, its sidecar, checkpoints, Caffe files and samples."""
    from .model import Model

    recipe = recipe or TrainingRecipe()
    train_x, train_y = datasets.load_fashion_mnist("train", data_dir)
    test_x, test_y = datasets.load_fashion_mnist("test", data_dir)
    if limit:
        train_x, train_y = train_x[:limit], train_y[:limit]
    proto = nets.build_fashion_caffenet(seed=recipe.seed)
    params = {"recipe": recipe.as_dict(), "limit": limit, "checkpoints": list(checkpoints), "data": str(
        datasets.find_fashion_mnist(data_dir))}
    with RunOutput(out, "train-demo", params=params) as run:
        saved = []

        def on_epoch(epoch, trainer):
            if epoch in checkpoints:
                path = run.path(f"checkpoints/{MODEL_NAME}_epoch{epoch:02d}.onnx", kind="checkpoint", epoch=epoch)
                path.write_bytes(trainer.trained_proto().SerializeToString())
                run.path(f"checkpoints/{path.name}.json", kind="sidecar", epoch=epoch).write_text(
                    dumps_json(checkpoint_sidecar(epoch, recipe.epochs)), encoding="utf-8")
                saved.append(f"checkpoints/{path.name}")

        t0 = time.perf_counter()
        trainer = Trainer(proto, recipe, device=device, threads=threads)
        trainer.fit(to_model_input(train_x), train_y, progress=progress, on_epoch=on_epoch)
        train_seconds = time.perf_counter() - t0
        final = trainer.trained_proto(doc="CaffeNet-shaped network trained on Fashion-MNIST by cnnvis "
                                          "(numpy SGD, gradients from cnnvis backward graphs)")
        model_path = run.path(f"{MODEL_NAME}.onnx", kind="model")
        model_path.write_bytes(final.SerializeToString())
        model = Model(final, name=MODEL_NAME, sidecar={"classes": datasets.FASHION_MNIST_CLASSES,
                                                      "preprocessing": PREPROCESSING})
        result = evaluate(model, to_model_input(test_x), test_y)
        sample_idx = pick_samples(test_y)
        sample_files = _write_samples(run, test_x, test_y, sample_idx, result["predictions"])
        caffe_files = _write_caffe(run, final) if caffe else None
        sidecar = {
            "name": MODEL_NAME, "kind": "onnx", "file": f"{MODEL_NAME}.onnx", "default": True,
            "display_name": "CaffeNet-shaped network trained on Fashion-MNIST (cnnvis demo)",
            "trained": True, "input_size": [1, 28, 28], "preprocessing": PREPROCESSING,
            "classes": "fashion_mnist", "sha256": sha256_file(model_path),
            "size": model_path.stat().st_size,
            "source": "trained by `cnnvis train-demo` (cnnvis.demo)",
            "licence": "BSD-2-Clause (model weights, generated by cnnvis)",
            "data_licence": f"Fashion-MNIST, {datasets.FASHION_MNIST_LICENSE}",
            "architecture": architecture_summary(final),
            "training": {"recipe": recipe.as_dict(), "workers_used": trainer.workers_,
                         "train_images": int(len(train_x)),
                         "history": trainer.history_,
                         "optimizer": "SGD with momentum, weight decay on weights (not biases), "
                                      "linear warm-up then cosine decay; random horizontal flips"},
            "test_accuracy": round(result["accuracy"], 4),
            "samples": sample_files, "checkpoints": saved,
            "compare_classes": COMPARE_CLASSES,
            "notes": ("Input: 28x28 grey, white object on black as in Fashion-MNIST; pixels/255, "
                      f"minus {PIXEL_MEAN}, over {PIXEL_STD}. Layers follow CaffeNet's order: "
                      "conv1-relu1-pool1-norm1, conv2(group 2)-relu2-pool2-norm2, conv3-relu3, "
                      "conv4(group 2)-relu4, conv5(group 2)-relu5-pool5, fc6-relu6-drop6, fc7-relu7-drop7, fc8, prob."),
        }
        if caffe_files:
            sidecar["caffe_files"] = caffe_files
        run.path(f"{MODEL_NAME}.json", kind="sidecar").write_text(dumps_json(sidecar), encoding="utf-8")
        run.extra["test_accuracy"] = result["accuracy"]
        run.extra["train_seconds"] = round(train_seconds, 1)  # here, not in the sidecar: reruns give identical files
    return {"test_accuracy": result["accuracy"], "test_n": result["n"], "history": trainer.history_}


def checkpoint_sidecar(epoch: int, epochs: int) -> dict:
    """The sidecar beside a checkpoint: the demo model's preprocessing, classes and samples, so
    that a checkpoint loaded on its own (e.g. by `cnnvis evolution`) sees what the model saw."""
    samples = [f"../samples/{slug(name)}_{i:02d}.png" for name in datasets.FASHION_MNIST_CLASSES
               for i in range(SAMPLES_PER_CLASS)]
    return {"display_name": f"{MODEL_NAME} after epoch {epoch} of {epochs}", "trained": True,
            "input_size": [1, 28, 28], "preprocessing": PREPROCESSING, "classes": "fashion_mnist",
            "samples": samples, "notes": "a training checkpoint of the cnnvis demo model"}


def _write_samples(run, images, labels, indices, predictions) -> list:
    from PIL import Image

    names = datasets.FASHION_MNIST_CLASSES
    files, rows = [], ["file,label,class,test_index,predicted"]
    counts = {}
    for i in indices:
        k = int(labels[i])
        counts[k] = counts.get(k, 0) + 1
        rel = f"samples/{slug(names[k])}_{counts[k] - 1:02d}.png"
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        run.path(rel, kind="sample", label=k).write_bytes(buf.getvalue())
        files.append(rel)
        rows.append(f"{rel[len('samples/'):]},{k},{names[k]},{int(i)},{names[int(predictions[i])]}")
    run.path("samples/labels.csv", kind="table").write_text("\n".join(rows) + "\n", encoding="utf-8")
    run.path("samples/LICENSE.txt", kind="licence").write_text(
        "The images in this folder are from the Fashion-MNIST test set\n"
        "(Zalando Research, https://github.com/zalandoresearch/fashion-mnist),\n"
        f"licensed under the MIT License: {datasets.FASHION_MNIST_LICENSE}.\n"
        "The MIT License text applies to these images:\n\n" + _MIT_TEXT, encoding="utf-8")
    return files


def _write_caffe(run, proto) -> dict:
    from .caffe.writer import write_caffe

    prototxt = run.path(f"caffe/{MODEL_NAME}.prototxt", kind="caffe-prototxt")
    caffemodel = run.path(f"caffe/{MODEL_NAME}.caffemodel", kind="caffe-model")
    write_caffe(proto, prototxt, caffemodel, name=MODEL_NAME)
    return {"prototxt": f"caffe/{prototxt.name}", "caffemodel": f"caffe/{caffemodel.name}"}


_MIT_TEXT = """Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

