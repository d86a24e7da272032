"""Class-neuron gradients w.r.t. conv filters: closed form on a hand-set model, group comparison,
sample-class resolution, plots, and the conv-gradients / compare-classes commands end to end."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis import datasets
from cnnvis.analysis import class_gradients as cgm
from cnnvis.cli import main
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model

CLASSES = ["cat", "dog", "car", "tabby, tabby cat"]


def tiny_proto(channels=2, size=6, filters=3, classes=4, seed=0):
    """conv1 (3×3, pad 1) → relu1 → global average pool → fc8 → softmax: the class logit's gradient
    w.r.t. conv1's weights has a closed form (see closed_form)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((filters, channels, 3, 3)).astype(np.float32)
    b = np.linspace(-0.2, 0.3, filters).astype(np.float32)
    a = rng.standard_normal((classes, filters)).astype(np.float32)
    c = np.linspace(0.1, -0.1, classes).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["data", "conv1.weight", "conv1.bias"], ["conv1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["relu1"], ["pool1"], name="pool1"),
        helper.make_node("Flatten", ["pool1"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "fc8.weight", "fc8.bias"], ["fc8"], name="fc8", transB=1),
        helper.make_node("Softmax", ["fc8"], ["prob"], name="prob", axis=1),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in
             (("conv1.weight", w), ("conv1.bias", b), ("fc8.weight", a), ("fc8.bias", c))]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                            ["N", channels, size, size])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])], inits)
    return make_model(graph), (w, b, a, c)


def closed_form(x, params):
    """float64 logits and d logit_k / d W (k = every class) for the tiny model."""
    w, b, a, c = (p.astype(np.float64) for p in params)
    x = x.astype(np.float64)
    n, ch, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack([xp[:, :, u:u + h, v:v + wd] for u in range(3) for v in range(3)], axis=2)
    patches = patches.reshape(n, ch, 3, 3, h, wd)  # [n, c, u, v, i, j] = xpad[n, c, i+u, j+v]
    y = np.einsum("fcuv,ncuvij->nfij", w, patches) + b[None, :, None, None]
    on = (y > 0).astype(np.float64)
    logits = (y * on).mean(axis=(2, 3)) @ a.T + c
    dz_dw = np.einsum("nfij,ncuvij->nfcuv", on, patches) / (h * wd)  # d mean(relu(y_f)) / d W_f
    grads = np.einsum("kf,nfcuv->nkfcuv", a, dz_dw)  # [n, class, f, c, u, v]
    return logits, grads


@pytest.fixture(scope="module")
def tiny():
    proto, params = tiny_proto()
    model = Model(proto, name="tiny", sidecar={"classes": CLASSES})
    x = np.random.default_rng(5).standard_normal((7, 2, 6, 6)).astype(np.float32)
    return model, params, x


def test_tiny_model_loads_in_onnxruntime(tiny):
    model, params, x = tiny
    sess = ort.InferenceSession(tiny_proto()[0].SerializeToString(), providers=["CPUExecutionProvider"])
    logits, _ = closed_form(x, params)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(sess.run(None, {"data": x})[0], e / e.sum(1, keepdims=True), atol=1e-6)


def test_gradients_match_closed_form(tiny):
    model, params, x = tiny
    logits, grads = closed_form(x, params)
    cg = cgm.ClassGradients(model, "conv1", batch_size=3)
    for target in (0, 2):
        res = cg.run(x, target=target)
        want = grads[:, target]
        assert res.gradients.shape == (7, 3, 2, 3, 3) and res.gradients.dtype == np.float32
        # float32 engine vs float64 closed form: 1e-5 of the largest magnitude
        np.testing.assert_allclose(res.gradients, want, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(res.importance, np.sqrt((want ** 2).sum(axis=(2, 3, 4))),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res.logits, logits, atol=1e-5)
        assert (res.targets == target).all()
        np.testing.assert_allclose(res.target_logits, logits[:, target], atol=1e-5)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(res.probabilities, e / e.sum(1, keepdims=True), atol=1e-6)


def test_default_target_is_predicted_and_per_image_targets(tiny):
    model, params, x = tiny
    logits, grads = closed_form(x, params)
    cg = cgm.ClassGradients(model)  # default layer: the first convolution
    assert cg.layer_.name == "conv1"
    res = cg.run(x)
    pred = logits.argmax(1)
    np.testing.assert_array_equal(res.targets, pred)
    np.testing.assert_array_equal(res.predicted, pred)
    want = grads[np.arange(7), pred]
    np.testing.assert_allclose(res.gradients, want, atol=1e-5 * np.abs(want).max())
    per = [3, "dog", "cat", 2, 0, 1, "tabby"]
    res = cg.run(x, target=per)
    np.testing.assert_array_equal(res.targets, [3, 1, 0, 2, 0, 1, 3])


def test_chunking_does_not_change_results(tiny):
    model, _, x = tiny
    a = cgm.ClassGradients(model, batch_size=1).run(x, 1).gradients
    b = cgm.ClassGradients(model, batch_size=7).run(x, 1).gradients
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_class_index_names_and_errors(tiny):
    model = tiny[0]
    assert model.class_index("dog") == 1
    assert model.class_index("DOG") == 1
    assert model.class_index("tabby") == 3  # alias before the comma
    assert model.class_index("tabby, tabby cat") == 3
    assert model.class_index("2") == 2 and model.class_index(np.int64(0)) == 0
    with pytest.raises(CnnvisError, match=r"\[0, 4\)"):
        model.class_index(4)
    with pytest.raises(CnnvisError, match="unknown class 'dgo'.*dog"):
        model.class_index("dgo")
    with pytest.raises(CnnvisError, match="is a Relu"):
        cgm.conv_layer(model, "relu1")


def test_numerical_check_agrees(tiny):
    model, _, x = tiny
    report = cgm.ClassGradients(model).check_numerical(x, 2, n_entries=10, seed=0)
    assert len(report.entries) == 10
    assert report.max_rel_error < 1e-4, str(report)


def _chunks(x, size):
    for s in range(0, len(x), size):
        yield [f"img{i}" for i in range(s, min(s + size, len(x)))], x[s:s + size]


def test_comparison_statistics_match_direct_computation(tiny):
    model, params, _ = tiny
    rng = np.random.default_rng(8)
    ref = rng.standard_normal((6, 2, 6, 6)).astype(np.float32)
    other = rng.standard_normal((5, 2, 6, 6)).astype(np.float32)
    other[:, 0] += 1.5  # planted: channel 0 brighter, so the gradient of channel 0's weights grows
    cmp = cgm.ClassComparison(model, batch_size=4, n_permutations=199, seed=0, top_k=3, max_vectors_per_group=4).run(
        {"reference": _chunks(ref, 4), "other": _chunks(other, 2)}, target="car")
    _, g_ref = closed_form(ref, params)
    _, g_oth = closed_form(other, params)
    g_ref, g_oth = g_ref[:, 2], g_oth[:, 2]
    assert cmp.neuron == 2 and cmp.counts == {"reference": 6, "other": 5}
    scale = max(np.abs(g_ref).max(), np.abs(g_oth).max())
    np.testing.assert_allclose(cmp.mean_gradient["reference"], g_ref.mean(0), atol=1e-5 * scale)
    np.testing.assert_allclose(cmp.difference["other"], g_ref.mean(0) - g_oth.mean(0), atol=2e-5 * scale)
    imp = np.sqrt((g_ref ** 2).sum(axis=(2, 3, 4)))
    np.testing.assert_allclose(cmp.importance_mean["reference"], imp.mean(0), rtol=1e-5)
    np.testing.assert_allclose(cmp.importance_std["reference"], imp.std(0, ddof=1), rtol=1e-4)
    norm = (imp - imp.min(1, keepdims=True)) / (imp.max(1, keepdims=True) - imp.min(1, keepdims=True))
    np.testing.assert_allclose(cmp.normalized_mean["reference"], norm.mean(0), rtol=1e-4, atol=1e-6)
    # the cosine matrix keeps the first 4 images of each group, ordered by group
    kept = np.concatenate([g_ref[:4], g_oth[:4]]).reshape(8, -1)
    unit = kept / np.linalg.norm(kept, axis=1, keepdims=True)
    np.testing.assert_allclose(cmp.cosine, unit @ unit.T, atol=1e-5)
    np.testing.assert_array_equal(cmp.cosine_groups, [0, 0, 0, 0, 1, 1, 1, 1])
    assert cmp.cosine_names == ["img0", "img1", "img2", "img3", "img0", "img1", "img2", "img3"]
    t = cmp.gradient_tests["other"]
    assert t.observed == pytest.approx(np.linalg.norm(kept[:4].mean(0) - kept[4:].mean(0)), rel=1e-4)
    assert (t.n_a, t.n_b) == (4, 4)
    it = cmp.importance_tests["other"]
    imp_o = np.sqrt((g_oth ** 2).sum(axis=(2, 3, 4)))
    assert it.observed == pytest.approx(np.linalg.norm(imp.mean(0) - imp_o.mean(0)), rel=1e-4)
    assert (it.n_a, it.n_b) == (6, 5)
    top = cmp.top_filters["other"]
    diff = imp.mean(0) - imp_o.mean(0)
    assert [f["filter"] for f in top] == list(np.argsort(-np.abs(diff), kind="stable")[:3])
    json.dumps(cmp.summary)  # JSON-ready
    assert len(cmp.images) == 11 and sum(r["kept_for_cosine"] for r in cmp.images) == 8


def test_comparison_permutation_finds_planted_difference_only(tiny):
    model = tiny[0]
    rng = np.random.default_rng(9)
    base = rng.standard_normal((24, 2, 6, 6)).astype(np.float32)
    shifted = base[12:].copy()
    shifted[:, 1] += 2.0
    kwargs = dict(n_permutations=299, seed=0, batch_size=8)
    same = cgm.ClassComparison(model, **kwargs).run({"a": _chunks(base[:12], 8), "b": _chunks(base[12:], 8)}, target=1)
    planted = cgm.ClassComparison(model, **kwargs).run({"a": _chunks(base[:12], 8), "b": _chunks(shifted, 8)}, target=1)
    assert planted.gradient_tests["b"].p_value == pytest.approx(1 / 300)
    assert same.gradient_tests["b"].p_value > 0.05
    # determinism: a second fit gives identical numbers
    again = cgm.ClassComparison(model, **kwargs).run({"a": _chunks(base[:12], 8), "b": _chunks(shifted, 8)}, target=1)
    assert json.dumps(again.summary, sort_keys=True) == json.dumps(planted.summary, sort_keys=True)
    np.testing.assert_array_equal(again.cosine, planted.cosine)


def test_comparison_needs_two_nonempty_groups(tiny):
    model, _, x = tiny
    with pytest.raises(CnnvisError, match="at least one other"):
        cgm.ClassComparison(model).run({"a": _chunks(x, 3)}, target=0)
    with pytest.raises(CnnvisError, match="group b: no images"):
        cgm.ClassComparison(model).run({"a": _chunks(x, 3), "b": iter([])}, target=0)
    with pytest.raises(CnnvisError, match="^target: the class neuron"):
        cgm.ClassComparison(model).run({"a": _chunks(x, 3), "b": _chunks(x, 3)})


def test_chunk_summaries_computed_elsewhere_give_the_same_comparison(tiny):
    """The Dask path hands run() ChunkSummary objects instead of (names, batch) chunks."""
    model, _, x = tiny
    kwargs = dict(batch_size=2, n_permutations=49, seed=3, max_vectors_per_group=3)
    here = cgm.ClassComparison(model, **kwargs).run({"a": _chunks(x[:4], 2), "b": _chunks(x[4:], 2)}, target=1)
    cg = cgm.ClassGradients(model, batch_size=2)

    def summaries(part):
        first = 0
        for names, batch in _chunks(part, 2):
            yield cgm.summarize_chunk(cg.run(batch, target=1), names, first, 3)
            first += len(batch)

    there = cgm.ClassComparison(model, **kwargs).run({"a": summaries(x[:4]), "b": summaries(x[4:])}, target=1)
    assert json.dumps(here.summary, sort_keys=True) == json.dumps(there.summary, sort_keys=True)
    np.testing.assert_array_equal(here.cosine, there.cosine)


def test_chunk_summaries_keep_the_vectors_of_the_groups_first_inputs_across_gaps(tiny):
    """Where unreadable inputs were left out, the kept gradient vectors are those of the images
    among the group's first cap inputs (by index, the left-out ones counted)."""
    model, _, x = tiny
    batch = cgm.ClassGradients(model, batch_size=4).run(x[:3], target=1)
    d = int(np.prod(batch.gradients.shape[1:]))
    for positions, cap, take in (([1, 2, 4], 3, 2), ([0, 1, 2], 3, 3), ([3, 5, 6], 3, 0), ([1, 2, 4], 5, 3)):
        kept = cgm.summarize_chunk(batch, ["a", "b", "c"], positions, cap).kept
        np.testing.assert_array_equal(kept, batch.gradients[:take].reshape(take, d))
    # an int first index is the same as consecutive indices
    np.testing.assert_array_equal(cgm.summarize_chunk(batch, ["a", "b", "c"], 1, 3).kept,
                                  cgm.summarize_chunk(batch, ["a", "b", "c"], [1, 2, 3], 3).kept)


# ------------------------------------------------------------------------------ samples and groups


def _png(path, value, size=8, channels=3):
    from PIL import Image

    rng = np.random.default_rng(int(value * 1000) % 2 ** 32)
    arr = np.clip(rng.random((size, size, channels)) * 0.5 + value, 0, 1)
    mode = "RGB" if channels == 3 else "L"
    Image.fromarray((arr * 255).astype(np.uint8).squeeze(), mode).save(path)


def _sample_folder(tmp_path, labels="csv"):
    folder = tmp_path / "samples"
    folder.mkdir()
    files = []
    for cls, value in (("cat", 0.1), ("dog", 0.4), ("car", 0.7)):
        for k in range(3):
            name = f"{cls}_{k}.png"
            _png(folder / name, value + 0.05 * k)
            files.append((name, cls))
    if labels == "csv":
        (folder / "labels.csv").write_text("file,label\n" + "".join(f"{f},{c}\n" for f, c in files))
    elif labels == "demo":  # the layout cnnvis.demo writes: index label, then name and more columns
        (folder / "labels.csv").write_text("file,label,class,test_index,predicted\n" + "".join(
            f"{f},{CLASSES.index(c)},{c},{i},{c}\n" for i, (f, c) in enumerate(files)))
    elif labels == "json":
        (folder / "labels.json").write_text(json.dumps({f: CLASSES.index(c) for f, c in files}))
    return folder, [folder / f for f, _ in files]


# ------------------------------------------------------------------------------ commands


@pytest.fixture
def cli_model(tmp_path):
    folder, files = _sample_folder(tmp_path)
    proto, _ = tiny_proto(channels=3, size=8)
    path = tmp_path / "tiny.onnx"
    onnx.save(proto, str(path))
    side = {"classes": CLASSES, "input_size": [3, 8, 8], "preprocessing": {"preset": "raw"},
            "samples": [f"samples/{f.name}" for f in files],
            "compare_classes": {"neuron": "dog", "similar": ["cat"], "dissimilar": ["car"]}}
    (tmp_path / "tiny.onnx.json").write_text(json.dumps(side))
    return path, folder


def _files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_conv_gradients_command(cli_model, tmp_path, capsys):
    path, folder = cli_model
    out = tmp_path / "out"
    args = ["conv-gradients", str(folder / "cat_0.png"), str(folder / "car_1.png"), "--model", str(path),
            "--class", "dog", "--top-k", "2", "--check-numerical", "4", "--out", str(out)]
    assert main(args) == 0
    files = _files(out)
    for img in ("cat_0", "car_1"):
        for f in ("conv1_gradient.npy", "conv1_gradient_volume.hdf", "conv1_gradient_volume_paraview.py",
                  "conv1_gradient_volume.vti", "conv1_gradient_volume.vox", "conv1_gradient_volume.hd",
                  "conv1_gradient_volume.npy", "importance.png", "importance_sorted.png", "importance.csv",
                  "top_filters.png"):
            assert f"{img}/{f}" in files
    summary = json.loads((out / "summary.json").read_text())
    assert [r["class"] for r in summary["images"]] == [1, 1]
    assert summary["gradcheck"]["entries"] == 4 and summary["gradcheck"]["max_rel_error"] < 1e-4
    # the saved gradient is the engine's gradient of the dog logit
    model = Model.from_file(path)
    from cnnvis import preprocess

    x = preprocess.load_batch([folder / "cat_0.png"], preprocess.for_model(model))
    want = cgm.ClassGradients(model).run(x, 1).gradients[0]
    np.testing.assert_array_equal(np.load(out / "cat_0" / "conv1_gradient.npy"), want)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["runs"]["conv-gradients"]["files"]}
    assert listed == set(files) - {"manifest.json"}
    first = {f: (out / f).read_bytes() for f in files if f.endswith((".png", ".csv", ".npy"))}
    assert main(args) == 0  # rerun: same bytes
    assert {f: (out / f).read_bytes() for f in first} == first
    text = capsys.readouterr().out
    assert "numerical check" in text and "top filters" in text


def test_conv_gradients_bad_class(cli_model, tmp_path, capsys):
    path, folder = cli_model
    assert main(["conv-gradients", str(folder), "--model", str(path), "--class", "zebra",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown class 'zebra'" in capsys.readouterr().err


def test_compare_classes_command(cli_model, tmp_path, capsys):
    path, folder = cli_model
    out = tmp_path / "cmp"
    extra = tmp_path / "extra"
    extra.mkdir()
    for k in range(2):
        _png(extra / f"e{k}.png", 0.2 * k)
    args = ["compare-classes", "--model", str(path), "--neuron", "cat", "--similar", "dog", str(extra),
            "--dissimilar", "car", "--permutations", "49", "--top-k", "2", "-f", "hdf", "-f", "npy",
            "--check-numerical", "3", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    files = _files(out)
    expected = ["summary.json", "images.csv", "importance.csv", "importance_raw.png", "importance_normalized.png",
                "cosine_similarity.png", "cosine_similarity.csv", "cosine_similarity.npy", "cosine_images.csv",
                "permutation_tests.csv",
                "top_filters_similar.csv", "top_filters_similar.png", "top_filters_dissimilar.csv",
                "top_filters_dissimilar.png", "volumes/mean_reference.hdf", "volumes/mean_reference.npy",
                "volumes/mean_reference_paraview.py", "volumes/mean_similar.hdf", "volumes/mean_dissimilar.npy",
                "volumes/difference_reference-minus-similar.hdf",
                "volumes/difference_reference-minus-dissimilar.npy", "manifest.json"]
    missing = [f for f in expected if f not in files]
    assert not missing, missing
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"reference": 3, "similar": 5, "dissimilar": 3}
    assert summary["neuron_name"] == "cat"
    assert summary["gradient_tests"]["similar"]["n_permutations"] == 49
    assert summary["gradient_tests"]["similar"]["seed"] == 0
    assert summary["gradcheck"]["max_rel_error"] < 1e-4
    assert np.load(out / "cosine_similarity.npy").shape == (11, 11)
    from cnnvis.export import volumes

    vol = volumes.read_volume(out / "volumes" / "difference_reference-minus-similar.npy")
    ref = volumes.read_volume(out / "volumes" / "mean_reference.npy").values
    sim = volumes.read_volume(out / "volumes" / "mean_similar.npy").values
    np.testing.assert_allclose(vol.values, ref - sim, atol=1e-6)
    first = {f: (out / f).read_bytes() for f in files if f.endswith((".png", ".csv", ".npy"))}
    assert main(args) == 0
    assert {f: (out / f).read_bytes() for f in first} == first
    assert "reference vs similar" in capsys.readouterr().out


def test_compare_classes_per_item_and_errors(cli_model, tmp_path, capsys):
    path, folder = cli_model
    out = tmp_path / "cmp2"
    assert main(["compare-classes", "--model", str(path), "--neuron", "0", "--similar", "dog", "car",
                 "--per-item", "--permutations", "9", "-f", "npy", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"] == ["reference", "similar-dog", "similar-car", "dissimilar"]  # + the sidecar's
    assert main(["compare-classes", "--model", str(path), "--similar", "nothing", "--out", str(tmp_path / "x")]) == 2
    assert "--similar 'nothing': not an image file, folder or .npy" in capsys.readouterr().err
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_compare_classes_defaults_from_the_sidecar_file(cli_model, tmp_path, capsys):
    path, _ = cli_model
    out = tmp_path / "d"
    assert main(["compare-classes", "--model", str(path), "--permutations", "9", "-f", "npy", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["neuron_name"] == "dog" and summary["counts"] == {"reference": 3, "similar": 3, "dissimilar": 3}
    params = json.loads((out / "manifest.json").read_text())["runs"]["compare-classes"]["params"]
    assert params["groups"] == {"reference": ["dog"], "similar": ["cat"], "dissimilar": ["car"]}
    side = json.loads((path.parent / "tiny.onnx.json").read_text())
    del side["compare_classes"]
    (path.parent / "tiny.onnx.json").write_text(json.dumps(side))
    assert main(["compare-classes", "--model", str(path), "--similar", "dog", "--out", str(tmp_path / "x")]) == 2
    assert "no compare_classes defaults" in capsys.readouterr().err
    assert main(["compare-classes", "--model", str(path), "--neuron", "cat", "--out", str(tmp_path / "x")]) == 2
    assert "--similar/--dissimilar" in capsys.readouterr().err
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_any_conv_layer_grouped_conv2_of_the_demo_topology():
    from cnnvis.nets import build_fashion_caffenet

    model = Model(build_fashion_caffenet(seed=0), name="demo", sidecar={"trained": False})
    x = np.random.default_rng(2).random((3, 1, 28, 28)).astype(np.float32)
    cg = cgm.ClassGradients(model, "conv2", batch_size=2)
    res = cg.run(x, target=6)
    assert res.gradients.shape == (3, 64, 24, 5, 5)  # group 2: 48 input channels split in two
    report = cg.check_numerical(x, 6, n_entries=6, seed=1, analytic=res.gradients[0])
    assert report.max_rel_error < 1e-3, str(report)  # float32 engine vs float64 differences


def test_groups_from_sidecar_defaults_and_npy_items(tmp_path):
    import argparse

    from cnnvis.cli import classes

    folder, files = _sample_folder(tmp_path)
    proto, _ = tiny_proto(channels=3, size=8)
    side = {"classes": CLASSES, "samples": [str(f) for f in files],
            "compare_classes": {"neuron": "cat", "similar": ["dog", "car"], "per_item": True}}
    model = Model(proto, name="t", sidecar=side)
    arr = tmp_path / "extra.npy"
    np.save(arr, np.random.default_rng(0).random((5, 3, 8, 8)).astype(np.float32))
    args = argparse.Namespace(neuron=None, reference=None, similar=None, dissimilar=[str(arr)], per_item=None)
    neuron, groups, per_item = classes._groups_from_args(args, model)
    assert neuron == 0 and per_item is True
    assert list(groups) == ["reference", "similar-dog", "similar-car", "dissimilar"]
    assert [p.name for p in groups["reference"][1]] == ["cat_0.png", "cat_1.png", "cat_2.png"]
    assert datasets.group_size(model, groups["dissimilar"][1]) == 5
    from cnnvis import preprocess

    chunks = list(datasets.iter_group_chunks(model, groups["dissimilar"][1] + groups["similar-dog"][1],
                                        preprocess.for_model(model), 3))
    assert [names for names, _, _ in chunks] == [["extra[0]", "extra[1]", "extra[2]"], ["extra[3]", "extra[4]"],
                                                 ["dog_0", "dog_1", "dog_2"]]
    assert [positions for _, _, positions in chunks] == [[0, 1, 2], [3, 4], [5, 6, 7]]
    args.per_item = False
    assert list(classes._groups_from_args(args, model)[1]) == ["reference", "similar", "dissimilar"]
