"""The committed demo model: files, sidecar, accuracy, samples, Caffe copy."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cnnvis import demo, registry
from cnnvis.errors import CnnvisError
from cnnvis.manifest import sha256_file

MODELS = Path(__file__).resolve().parents[1] / "models"
SIDECAR = MODELS / "fashion_caffenet.json"


@pytest.fixture(scope="module")
def sidecar():
    return json.loads(SIDECAR.read_text())


@pytest.fixture(scope="module")
def model():
    return registry.load("fashion_caffenet")


def test_files_and_sidecar(sidecar):
    path = MODELS / sidecar["file"]
    assert path.stat().st_size < 5 * 2 ** 20 and path.stat().st_size == sidecar["size"]
    assert sha256_file(path) == sidecar["sha256"]
    assert sidecar["trained"] is True and sidecar["default"] is True
    assert sidecar["test_accuracy"] >= 0.90
    assert sidecar["input_size"] == [1, 28, 28] and sidecar["classes"] == "fashion_mnist"
    assert sidecar["training"]["recipe"]["seed"] == 0 and sidecar["data_licence"].startswith("Fashion-MNIST")
    assert registry.default_model_name() == "fashion_caffenet"
    for rel in sidecar["checkpoints"]:
        assert (MODELS / rel).is_file()


def test_layers_follow_caffenet(model):
    names = [layer.name for layer in model.layers]
    expected = ["conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "pool2", "norm2", "conv3", "relu3",
                "conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6", "drop6", "fc7", "relu7",
                "drop7", "fc8", "prob"]
    assert [n for n in names if n in expected] == expected
    assert model.layer("conv2").weight_shape[1] * 2 == model.layer("conv1").output_shape[0]  # group 2
    assert model.layer("pool1").output_shape[1:] == (14, 14)  # ceil rounding: 28 -> 14 with 3/2


def test_committed_samples_are_classified(model, sidecar):
    from cnnvis import preprocess

    files = [MODELS / s for s in sidecar["samples"]]
    assert len(files) == 100
    with open(MODELS / "samples" / "labels.csv") as f:
        rows = {r["file"]: int(r["label"]) for r in csv.DictReader(line for line in f if not line.startswith("#"))}
    labels = np.array([rows[p.name] for p in files])
    assert np.bincount(labels).tolist() == [10] * 10
    x = preprocess.load_batch(files, preprocess.for_model(model))
    correct = int((model.predict(x).argmax(axis=1) == labels).sum())
    assert correct >= 85, correct
    assert (MODELS / "samples" / "LICENSE.txt").read_text().count("MIT") >= 1


def test_caffe_copy_computes_the_same(model, sidecar):
    from cnnvis import caffe
    from cnnvis.model import Model

    files = sidecar["caffe_files"]
    converted = Model(caffe.load_caffe(MODELS / files["prototxt"], MODELS / files["caffemodel"]), name="caffe")
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    a = model.run(x, ["fc8"])["fc8"]
    b = converted.run(x, ["fc8"])["fc8"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_accuracy_reproduces_on_the_full_test_set(model, sidecar):
    try:
        result = demo.evaluate_on_fashion_mnist(model)
    except CnnvisError as exc:
        pytest.skip(str(exc))
    assert result["n"] == 10000
    assert abs(result["accuracy"] - sidecar["test_accuracy"]) < 1e-4


def test_checkpoints_carry_the_demo_preprocessing(sidecar):
    from cnnvis import preprocess

    for rel in sidecar["checkpoints"]:
        m = registry.load(str(MODELS / rel))
        assert m.trained is True
        assert preprocess.for_model(m) == demo.preprocessing()
        assert m.class_names[6] == "Shirt"
        assert len(registry.sample_images(m)) == 100 and all(p.is_file() for p in registry.sample_images(m))
