import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis import registry
from cnnvis.cli import main
from cnnvis.errors import CnnvisError
from cnnvis.onnxgraph import make_model
from test_download import PAYLOAD, PAYLOAD_SHA1, PAYLOAD_SHA256, dead_url, server  # noqa: F401 (fixture)

# ---------------------------------------------------------------------- fetch through sidecars

@pytest.fixture
def models_path(tmp_path, monkeypatch):
    folder = tmp_path / "sidecars"
    folder.mkdir()
    monkeypatch.setenv("CNNVIS_MODEL_PATH", str(folder))
    return folder


def write_sidecar(folder, name, **fields):
    data = {"name": name, **fields}
    (folder / f"{name}.json").write_text(json.dumps(data))
    return data


def test_fetch_by_name_verifies_and_caches(server, models_path):
    write_sidecar(models_path, "loop-caffe", kind="caffe", file="loop.caffemodel",
                  url=server.url("good"), sha1=PAYLOAD_SHA1, size=len(PAYLOAD))
    assert not registry.is_present("loop-caffe")
    path = registry.fetch("loop-caffe", progress=False)
    assert path == registry.cache_dir() / "loop.caffemodel" and path.read_bytes() == PAYLOAD
    assert registry.is_present("loop-caffe")
    entry = registry.resolve("loop-caffe")
    assert entry.kind == "caffe" and entry.weights == path and entry.path is None
    # Present: verified again, not downloaded again.
    registry.fetch("loop-caffe", progress=False)
    assert len(server.requests) == 1
    path.write_bytes(b"tampered")
    with pytest.raises(CnnvisError, match="failed verification.*force=True"):
        registry.fetch("loop-caffe", progress=False)
    registry.fetch("loop-caffe", progress=False, force=True)
    assert path.read_bytes() == PAYLOAD
    path.unlink()


def test_fetch_url_override_and_cli(server, models_path, capsys):
    write_sidecar(models_path, "loop-onnx", kind="onnx", file="loop.onnx", url=dead_url(), sha256=PAYLOAD_SHA256)
    # The sidecar's URL is dead; a mirror serves the registry's file, checked against its sha256.
    path = registry.fetch("loop-onnx", progress=False, url=server.url("good"))
    assert path.read_bytes() == PAYLOAD
    path.unlink()
    assert main(["fetch", "loop-onnx", "--no-progress", "--url", server.url("good"), "--sha256", PAYLOAD_SHA256]) == 0
    assert str(path) in capsys.readouterr().out
    path.unlink()
    assert main(["fetch", "loop-onnx", "--no-progress", "--retries", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnnvis fetch: error: cannot download loop-onnx")
    assert main(["fetch", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNVIS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cache_is_empty():
    return not registry.cache_dir().exists() or list(registry.cache_dir().iterdir()) == []


def test_fetch_url_still_checks_the_registry_checksum(server, models_path, home, capsys):
    write_sidecar(models_path, "loop-onnx", kind="onnx", file="loop.onnx", url=dead_url(), sha256=PAYLOAD_SHA256)
    # file:// (the issue's `--url file:///etc/passwd`) and other schemes: refused before anything
    assert main(["fetch", "loop-onnx", "--no-progress", "--url", "file:///etc/passwd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cnnvis fetch: error: --url file:///etc/passwd: only http:// and https:// URLs are downloaded"]
    # a mirror serving other bytes fails the registry's sha256 (no --sha256 needed to notice)
    assert main(["fetch", "loop-onnx", "--no-progress", "--url", server.url("corrupt")]) == 2
    assert "download failed verification (sha256" in capsys.readouterr().err
    # a --sha256 other than the registry's does not replace it
    assert main(["fetch", "loop-onnx", "--no-progress", "--url", server.url("corrupt"), "--sha256", "ab" * 32]) == 2
    assert f"the registry's sha256 of loop-onnx is {PAYLOAD_SHA256}" in capsys.readouterr().err
    assert _cache_is_empty()
    assert [p for p, _ in server.requests] == ["/files/corrupt"]


def test_fetch_of_a_model_without_checksum_needs_sha256(server, models_path, home, capsys):
    write_sidecar(models_path, "plain", kind="onnx", file="plain.onnx", url=server.url("good"))
    assert main(["fetch", "plain", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("gives no sha256 or sha1 to verify a download with; pass --sha256 <64 hex digits>")
    assert main(["fetch", "plain", "--no-progress", "--url", server.url("good")]) == 2
    assert server.requests == [] and _cache_is_empty()
    assert main(["fetch", "plain", "--no-progress", "--url", server.url("good"), "--sha256", PAYLOAD_SHA256]) == 0
    assert (registry.cache_dir() / "plain.onnx").read_bytes() == PAYLOAD


def test_a_failed_download_leaves_nothing_in_the_cache(server, models_path, home):
    write_sidecar(models_path, "cut", kind="onnx", file="cut.onnx", url=server.url("short"), sha256=PAYLOAD_SHA256)
    with pytest.raises(CnnvisError, match="gave up"):
        registry.fetch("cut", progress=False, retries=0, backoff=0.0)
    assert _cache_is_empty()
    assert (registry.partial_dir() / "cut.onnx.part").is_file()  # kept outside the cache, for a resume


def test_a_cached_model_is_verified_before_use(server, models_path, capsys):
    write_sidecar(models_path, "loop-caffe", kind="caffe", file="loop.caffemodel", url=server.url("good"),
                  sha256=PAYLOAD_SHA256, size=len(PAYLOAD))
    path = registry.fetch("loop-caffe", progress=False)
    assert registry.resolve("loop-caffe").weights == path
    # Same size, other bytes (the cache was tampered with): refused at use, in one line.
    data = bytearray(PAYLOAD)
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CnnvisError, match=r"^loop-caffe: .*loop\.caffemodel failed verification \(sha256 "):
        registry.resolve("loop-caffe")
    assert main(["layers", "--model", "loop-caffe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed verification" in err[0]


def test_not_downloaded_model_says_how_to_fetch(models_path):
    write_sidecar(models_path, "far", kind="onnx", file="far.onnx", url="http://127.0.0.1:9/far.onnx", size=2_000_000)
    with pytest.raises(CnnvisError, match=r"not downloaded yet: run `cnnvis fetch far` \(2.0 MB\)"):
        registry.resolve("far")


# ---------------------------------------------------------------------- the known models

def test_known_models_and_zoo_facts():
    known = registry.known_models()
    assert {"alexnet", "caffenet", "bvlc_alexnet", "bvlc_reference_caffenet", "alexnet-random",
            "caffenet-random"} <= set(known)
    alex, caffe = known["alexnet"], known["caffenet"]
    assert (alex["size"], alex["sha256"]) == (243863787, "6b0da9510f27f234ee96a85dc3809dd210150fdefad87f6850f9788513216945")
    assert (caffe["size"], caffe["sha256"]) == (243863798, "ea563e5c47d1f58e1717cf1a2d8bf288b8adc07af0ad228b622096cd243aeecb")
    for side, folder, file in ((alex, "alexnet", "bvlcalexnet-12.onnx"), (caffe, "caffenet", "caffenet-12.onnx")):
        # Git LFS files: the media URL serves the content, the raw URL redirects there.
        path = f"validated/vision/classification/{folder}/model/{file}"
        assert side["url"] == f"https://media.githubusercontent.com/media/onnx/models/main/{path}"
        assert side["mirrors"] == [f"https://github.com/onnx/models/raw/main/{path}"]
        assert side["input_size"] == [3, 224, 224] and side["input_name"] == "data_0"
    assert (alex["output_name"], caffe["output_name"]) == ("softmaxout_1", "prob_1")
    for name in ("alexnet-random", "caffenet-random"):
        entry_side = known[name]
        assert entry_side["trained"] is False and "UNTRAINED" in entry_side["warning"]
    assert registry.default_model_name() == "fashion_caffenet"  # the embedded demo model (present, "default")
    pre = registry.ModelEntry("alexnet", "onnx", None, alex, sidecar_path=registry.REPO_MODELS_DIR / "alexnet.json").preprocessing
    assert pre.size == (224, 224) and pre.resize_to == (256, 256) and pre.channel_order == "BGR"


def test_caffe_sha1_match_the_bvlc_readmes(shared_dir):
    known = registry.known_models()
    for name in ("bvlc_alexnet", "bvlc_reference_caffenet"):
        text = (shared_dir / "caffe" / name / "readme.md").read_text()
        assert known[name]["sha1"] == re.search(r"^sha1:\s*(\w+)", text, re.M).group(1)
        assert known[name]["url"] == re.search(r"^caffemodel_url:\s*(\S+)", text, re.M).group(1)


def test_imagenet_class_names_in_caffe_order(shared_dir):
    names = registry.imagenet_class_names()
    lines = (shared_dir / "imagenet" / "synset.txt").read_text().splitlines()
    assert len(names) == 1000 == len(lines)
    assert names == [line.split(" ", 1)[1] for line in lines]


def test_builtin_class_lists():
    assert registry.class_list("cifar10")[3] == "cat" and len(registry.class_list("cifar10")) == 10
    assert registry.class_list("fashion_mnist")[9] == "Ankle boot"
    assert len(registry.class_list("imagenet1k")) == 1000


def test_models_command(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alexnet"]["present"] is False and rows["alexnet"]["size"] == 243863787
    assert rows["alexnet-random"]["trained"] is False and rows["alexnet-random"]["default"] is False
    assert rows["fashion_caffenet"]["trained"] is True and rows["fashion_caffenet"]["default"] is True
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "fashion_caffenet (default)" in table and "alexnet-random (default)" not in table
    # Built by an earlier test in this session or not: either way the table says where it is.
    assert "built on first use" in table or "alexnet-random-v1-seed0.onnx" in table


# ---------------------------------------------------------------------- builders

def test_builder_model_is_built_once_and_loads(models_path):
    # The AlexNet topology at a small input keeps this test quick; the mechanism is the one
    # alexnet-random uses (nets.build_alexnet, cache keyed by name, version and seed).
    write_sidecar(models_path, "tiny-alexnet", kind="builder", builder="alexnet", seed=3, version="t1",
                  trained=False, input_size=[3, 67, 67], classes="imagenet1k", preprocessing={"preset": "caffe"})
    entry = registry.resolve("tiny-alexnet")
    assert entry.path == registry.cache_dir() / "tiny-alexnet-vt1-seed3.onnx" and entry.path.is_file()
    assert not entry.trained and "UNTRAINED" in entry.warning
    stamp = entry.path.stat().st_mtime_ns
    assert registry.resolve("tiny-alexnet").path.stat().st_mtime_ns == stamp  # cached, not rebuilt
    proto = onnx.load(str(entry.path))
    assert (proto.ir_version, proto.opset_import[0].version) == (8, 17)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(entry.path), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, 67, 67), np.float32)
    (prob,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert prob.shape == (1, 1000) and abs(float(prob.sum()) - 1) < 1e-4
    model = registry.load("tiny-alexnet", device="cpu")
    assert model.trained is False and len(model.class_names) == 1000 and model.class_names[0].startswith("tench")
    assert model.sidecar["preprocessing"]["size"] == [67, 67]
    # Deterministic weights: same seed gives the same file contents.
    (registry.cache_dir() / "tiny-alexnet-vt1-seed3.onnx").rename(registry.cache_dir() / "old.onnx")
    again = registry.resolve("tiny-alexnet").path
    good = (registry.cache_dir() / "old.onnx").read_bytes()
    assert again.read_bytes() == good
    (registry.cache_dir() / "old.onnx").unlink()
    # A cached build that changed (same size, other bytes) is built again, never loaded as it is.
    tampered = bytearray(good)
    tampered[-100] ^= 0xFF
    again.write_bytes(bytes(tampered))
    assert registry.resolve("tiny-alexnet").path.read_bytes() == good
    stamp = again.stat().st_mtime_ns
    assert registry.resolve("tiny-alexnet").path.stat().st_mtime_ns == stamp  # matches its record: kept


def test_default_model_follows_present_default_sidecar(models_path, tmp_path):
    write_sidecar(models_path, "demo", kind="onnx", file="demo.onnx", default=True)
    assert registry.default_model_name() == "fashion_caffenet"  # demo.onnx not present yet: the repo's default
    (models_path / "demo.onnx").write_bytes(b"x")
    assert registry.default_model_name() == "demo"


# ---------------------------------------------------------------------- file specs

def tiny_onnx(path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "conv1.weight")
    fw = numpy_helper.from_array(rng.standard_normal((3, 2 * 6 * 6)).astype(np.float32), "fc.weight")
    nodes = [helper.make_node("Conv", ["data", "conv1.weight"], ["conv1"], name="conv1"),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
             helper.make_node("Flatten", ["relu1"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc.weight"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 3])], [w, fw])
    onnx.save(make_model(graph), str(path))
    return path


def test_onnx_path_with_sidecar_beside(tmp_path):
    model_file = tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    (tmp_path / "tiny.onnx.json").write_text(json.dumps(
        {"display_name": "Tiny", "classes": {"file": "names.txt"}, "preprocessing": {"preset": "grey28", "mean": [0.5]}}))
    entry = registry.resolve(str(model_file))
    assert entry.kind == "onnx" and entry.name == "tiny.onnx" and entry.display_name == "Tiny"
    assert entry.class_names == ["zero", "one", "two"] and entry.trained
    assert entry.preprocessing_for((1, 8, 8)).size == (8, 8)
    model = registry.load(str(model_file), device="cpu")
    assert model.class_names == ["zero", "one", "two"]
    from cnnvis import preprocess

    pre = preprocess.for_model(model)
    assert pre.size == (8, 8) and pre.channels == 1 and pre.mean == (0.5,)
    names, batch = preprocess.load_images(registry.sample_images(model), pre)
    assert batch.shape == (len(names), 1, 8, 8)
    prob = model.predict(batch)
    np.testing.assert_allclose(prob.sum(axis=1), 1, atol=1e-5)


def test_onnx_sidecar_in_a_registry_folder_registers_the_file(models_path):
    tiny_onnx(models_path / "small.onnx")
    (models_path / "small.onnx.json").write_text(json.dumps({"classes": ["x", "y", "z"], "trained": True}))
    assert registry.known_models()["small"]["kind"] == "onnx"
    entry = registry.resolve("small")
    assert entry.path == models_path / "small.onnx" and entry.class_names == ["x", "y", "z"]
    assert registry.is_present("small")


def test_onnx_path_without_sidecar_guesses_preprocessing(tmp_path):
    model_file = tiny_onnx(tmp_path / "bare.onnx")
    model = registry.load(str(model_file), device="cpu")
    assert model.sidecar["preprocessing"]["preset"] == "grey28"
    assert model.sidecar["preprocessing"]["size"] == [8, 8]


def test_prototxt_spec_and_errors(tmp_path, models_path):
    proto = tmp_path / "deploy.prototxt"
    proto.write_text('name: "x"\n')
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(b"\0")
    entry = registry.resolve(str(proto), weights=weights)
    assert (entry.kind, entry.path, entry.weights) == ("caffe", proto, weights)
    assert entry.preprocessing_for((3, 227, 227)).preset == "caffe"
    onnx_file = tiny_onnx(tmp_path / "t.onnx")
    cases = [
        (dict(spec=str(tmp_path / "missing.onnx")), "missing.onnx: no such file"),
        (dict(spec=str(onnx_file), weights=weights), "only used with a Caffe .prototxt"),
        (dict(spec=str(proto), weights=tmp_path / "nope.caffemodel"), "nope.caffemodel: no such file"),
        (dict(spec=str(weights)), "expected an .onnx file or a Caffe .prototxt"),
        (dict(spec="alexnet-random", weights=weights), "not a Caffe model"),
        (dict(spec="alexnett"), "unknown model 'alexnett'; closest: alexnet"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(CnnvisError, match=pattern):
            registry.resolve(**kwargs)


def test_bad_sidecars_are_one_line_errors(models_path, tmp_path):
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({"kind": "onnx", "licence": 3}), "field 'licence' must be str"),
        (json.dumps({"kind": "onnx", "sha256": "abc"}), "sha256 must be 64 hex digits"),
        (json.dumps({"kind": "tflite"}), "kind 'tflite'"),
        (json.dumps({"kind": "onnx", "mean": [1]}), r"unknown sidecar field\(s\) mean"),
        (json.dumps({"file": "x.onnx"}), "needs 'kind'"),
        (json.dumps({"kind": "builder"}), "needs a 'builder' field"),
        (json.dumps({"kind": "onnx", "input_size": [3, 224]}), r"input_size must be \[C, H, W\]"),
        (json.dumps({"kind": "onnx", "classes": "imagenet21k"}), "classes 'imagenet21k'"),
        (json.dumps({"kind": "onnx", "preprocessing": {"preset": "caffe", "size": 0}}), "broken.json: preprocessing size"),
    ]
    for text, pattern in cases:
        (models_path / "broken.json").write_text(text)
        with pytest.raises(CnnvisError, match=pattern) as info:
            entry = registry.known_models()
            registry.ModelEntry("broken", "onnx", None, entry["broken"], sidecar_path=models_path / "broken.json").preprocessing
        assert "broken.json" in str(info.value) and "\n" not in str(info.value)


def test_sample_images(tmp_path):
    photos = registry.sample_images()
    assert [p.name for p in photos] == ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]

    class WithSamples:
        name = "m"
        sidecar = {"samples": [str(tmp_path / "missing.png")]}

    with pytest.raises(CnnvisError, match="missing.png"):
        registry.sample_images(WithSamples())
    Path(tmp_path / "missing.png").write_bytes(b"")
    assert registry.sample_images(WithSamples()) == [tmp_path / "missing.png"]


TINY_DEPLOY = """name: "tiny"
input: "data"
input_shape { dim: 1 dim: 1 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def tiny_caffemodel(path, rng):
    """A binary .caffemodel for TINY_DEPLOY, written with cnnvis's runtime copy of Caffe's schema."""
    from cnnvis.caffe.schema import messages

    m = messages()
    net = m.NetParameter(name="tiny")
    params = {"conv1": [rng.standard_normal((2, 1, 3, 3)), rng.standard_normal(2)],
              "fc": [rng.standard_normal((3, 72)), rng.standard_normal(3)]}
    for name, blobs in params.items():
        layer = net.layer.add(name=name, type="Convolution" if name == "conv1" else "InnerProduct")
        for array in blobs:
            blob = layer.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(array.astype(np.float32).ravel().tolist())
    path.write_bytes(net.SerializeToString())
    return params


def test_registry_caffe_model_with_deploy_beside_sidecar(models_path):
    (models_path / "tiny.prototxt").write_text(TINY_DEPLOY)
    params = tiny_caffemodel(models_path / "tiny.caffemodel", np.random.default_rng(5))
    sha1 = hashlib.sha1((models_path / "tiny.caffemodel").read_bytes()).hexdigest()
    write_sidecar(models_path, "tiny-caffe", kind="caffe", file="tiny.caffemodel", sha1=sha1, deploy="tiny.prototxt",
                  classes=["a", "b", "c"], input_size=[1, 8, 8], preprocessing={"preset": "grey28"})
    assert registry.is_present("tiny-caffe")  # the file beside the sidecar counts
    assert registry.fetch("tiny-caffe", progress=False) == models_path / "tiny.caffemodel"  # verified, kept
    entry = registry.resolve("tiny-caffe")
    assert registry.deploy_prototxt(entry) == models_path / "tiny.prototxt"
    model = registry.load("tiny-caffe", device="cpu")
    assert model.class_names == ["a", "b", "c"] and model.input_shape == (1, 8, 8)
    np.testing.assert_allclose(model.param("conv1.weight"), params["conv1"][0], rtol=1e-6)
    np.testing.assert_allclose(model.param("fc.bias"), params["fc"][1], rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x).sum(axis=1), 1, atol=1e-5)
    # converted on first use and cached: the second load reads the cached ONNX
    cached = registry.converted_caffe_path(entry)
    assert cached.is_file() and cached.name.startswith(f"tiny-caffe-{sha1[:12]}")
    again = registry.load("tiny-caffe", device="cpu")
    assert again.source == str(cached)
    np.testing.assert_array_equal(again.predict(x), model.predict(x))


def test_generated_deploy_of_known_caffe_topologies(models_path, shared_dir):
    from cnnvis import caffe

    entry = registry.ModelEntry("bvlc_alexnet", "caffe", None, registry.known_models()["bvlc_alexnet"],
                                sidecar_path=registry.REPO_MODELS_DIR / "bvlc_alexnet.json")
    generated = caffe.read_net(registry.deploy_prototxt(entry))
    real = caffe.read_net(shared_dir / "caffe/bvlc_alexnet/deploy.prototxt")
    def layers(net):  # the input may be declared as an Input layer or with input: fields
        return [(layer.name, layer.type) for layer in net.layers if layer.type != "Input"]

    assert layers(generated) == layers(real)
