import gzip
import struct

import numpy as np
import pytest

from test_class_gradients import CLASSES, _png, _sample_folder, tiny_proto

from cnnvis import datasets
from cnnvis.errors import CnnvisError
from cnnvis.model import Model


def write_idx(path, array, gz=True):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def test_read_idx_roundtrip_gz_and_plain(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, gz=False)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a"), a)
    b = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "b", b, gz=False)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "b"), [1, -2, 70000])


def test_corrupt_idx_files_are_one_line(tmp_path):
    (tmp_path / "magic").write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(CnnvisError, match="magic.*not an IDX file"):
        datasets.read_idx(tmp_path / "magic")
    a = np.zeros((4, 5), np.uint8)
    write_idx(tmp_path / "short", a, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(CnnvisError, match="short: IDX data is 17 bytes; dims \\(4, 5\\) need 20"):
        datasets.read_idx(tmp_path / "short")
    (tmp_path / "badgz.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(CnnvisError, match="badgz.gz: cannot read IDX"):
        datasets.read_idx(tmp_path / "badgz.gz")


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(CnnvisError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist("test", data_dir=tmp_path)


def test_real_fashion_mnist_when_installed():
    try:
        images, labels = datasets.load_fashion_mnist("test")
    except CnnvisError as exc:
        pytest.skip(str(exc))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- image sets at scale


def _touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")  # listing never decodes


def test_image_tree_with_synsets(tmp_path):
    syn = tmp_path / "synset.txt"
    syn.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                   "n01484850 great white shark\n")
    _touch_images(tmp_path / "tree" / "n01484850", ["b.JPEG", "a.JPEG", "notes.txt"])
    _touch_images(tmp_path / "tree" / "n01440764", ["x.jpg"])
    s = datasets.image_tree(tmp_path / "tree", syn)
    assert [p.relative_to(tmp_path / "tree").as_posix() for p in s.files] == \
        ["n01440764/x.jpg", "n01484850/a.JPEG", "n01484850/b.JPEG"]
    assert s.labels == [0, 2, 2]  # the synset line, not the folder's rank in the tree
    assert s.classes == [("n01440764", 0, "tench, Tinca tinca"), ("n01484850", 2, "great white shark")]
    plain = datasets.image_tree(tmp_path / "tree")
    assert plain.labels == [0, 1, 1]
    _touch_images(tmp_path / "tree" / "n09999999", ["c.png"])
    with pytest.raises(CnnvisError, match="subfolder n09999999 is not in synsets="):
        datasets.image_tree(tmp_path / "tree", syn)
    with pytest.raises(CnnvisError, match="no class subfolders"):
        datasets.image_tree(tmp_path / "tree" / "n01440764")


def test_image_list_paths_and_labels(tmp_path):
    _touch_images(tmp_path / "imgs", ["a.png", "b c.png"])
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nimgs/a.png 3\n\nimgs/b c.png\t7\n")
    s = datasets.image_list(lst)
    assert s.files == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b c.png"] and s.labels == ["3", "7"]
    lst.write_text("imgs/a.png\nimgs/b c.png\n")  # a whole line that is a file keeps its spaces
    s = datasets.image_list(lst)
    assert s.files[1].name == "b c.png" and s.labels is None
    lst.write_text("imgs/a.png,1\nimgs/b c.png\n")
    with pytest.raises(CnnvisError, match="image 2 has no label"):
        datasets.image_list(lst)
    lst.write_text("# nothing\n")
    with pytest.raises(CnnvisError, match="no image paths"):
        datasets.image_list(lst)


# ----------------------------------------------------------------------------- groups of images

@pytest.mark.parametrize("labels", ["csv", "json", "demo"])
def test_sample_classes_from_labels_file(tmp_path, labels):
    folder, files = _sample_folder(tmp_path, labels)
    proto, _ = tiny_proto(channels=3, size=8)
    model = Model(proto, name="t", sidecar={"classes": CLASSES, "samples": [str(f) for f in files]})
    by_class = datasets.sample_classes(model)
    assert sorted(by_class) == [0, 1, 2]
    assert [p.name for p in by_class[1]] == ["dog_0.png", "dog_1.png", "dog_2.png"]
    got = datasets.resolve_group(model, ["car", str(folder / "cat_0.png")], "--similar")
    assert [p.name for p in got] == ["car_0.png", "car_1.png", "car_2.png", "cat_0.png"]
    with pytest.raises(CnnvisError, match="classes with samples: cat, dog, car"):
        datasets.resolve_group(model, ["tabby"], "--similar")


def test_sample_classes_from_class_folders(tmp_path):
    files = []
    for cls in ("cat", "car"):
        (tmp_path / cls).mkdir()
        for k in range(2):
            _png(tmp_path / cls / f"{k}.png", 0.3)
            files.append(tmp_path / cls / f"{k}.png")
    proto, _ = tiny_proto(channels=3, size=8)
    model = Model(proto, name="t", sidecar={"classes": CLASSES, "samples": [str(f) for f in files]})
    assert {k: [p.parent.name for p in v] for k, v in datasets.sample_classes(model).items()} == \
        {0: ["cat", "cat"], 2: ["car", "car"]}


def test_compare_defaults_from_sidecar():
    model = Model(tiny_proto()[0], name="t", sidecar={"classes": CLASSES, "compare_classes": {
        "neuron": "cat", "reference": "cat", "similar": ["tabby"], "dissimilar": ["car"]}})
    assert datasets.compare_defaults(model) == {"neuron": "cat", "reference": ["cat"], "similar": ["tabby"],
                                           "dissimilar": ["car"]}
    bad = Model(tiny_proto()[0], name="t", sidecar={"compare_classes": {"neurons": 1}})
    with pytest.raises(CnnvisError, match="unknown key 'neurons'"):
        datasets.compare_defaults(bad)
    assert datasets.compare_defaults(Model(tiny_proto()[0], name="t")) == {}


def test_labels_file_variants_and_bad_label(tmp_path):
    folder, files = _sample_folder(tmp_path, labels=None)
    proto, _ = tiny_proto(channels=3, size=8)
    model = Model(proto, name="t", sidecar={"classes": CLASSES, "samples": [str(f) for f in files]})
    (folder / "labels.txt").write_text("# made by hand\nfilename class\ncat_0.png 0\ncat_1.png cat\n"
                                       "dog_0.png\tdog\n")
    assert {k: [p.name for p in v] for k, v in datasets.sample_classes(model).items()} == \
        {0: ["cat_0.png", "cat_1.png"], 1: ["dog_0.png"]}
    (folder / "labels.txt").write_text("cat_0.png,zebra\n")
    with pytest.raises(CnnvisError, match=r"labels.txt: sample cat_0.png: unknown class 'zebra'"):
        datasets.sample_classes(model)
