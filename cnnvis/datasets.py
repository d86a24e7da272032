"""Datasets read from their official files: Fashion-MNIST in IDX format; and image sets at scale:
a class-per-subfolder tree (ImageNet's ``n01440764/….JPEG`` layout, with a synset file naming the
classes) and a text file listing image paths with optional labels (paths only: images are decoded
later, a batch at a time); and groups of images for compare-classes (files, folders, arrays, or
classes of a model's sample images labelled by a labels file or their folders).

Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files in
``/usr/share/datasets/fashion-mnist/``; ``--data DIR`` takes any folder holding the official files
(gzipped or not).
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CnnvisError

#: names of labels files looked up in the folder of a model's sample images
LABEL_FILES = ("labels.csv", "labels.tsv", "labels.txt", "labels.json")

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
#: the 10 class names in label order (the same list the registry's "fashion_mnist" classes name)
FASHION_MNIST_CLASSES = (Path(__file__).parent / "data" / "fashion_mnist.txt").read_text(encoding="utf-8").split("\n")[:10]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
FASHION_MNIST_LICENSE = "MIT (Copyright (c) 2017 Zalando SE)"

# IDX magic: two zero bytes, a type code, the number of dimensions
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), validating the magic number and the data size."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise CnnvisError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise CnnvisError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CnnvisError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CnnvisError(f"{path}: IDX data is {len(raw) - header} bytes; dims {dims} need {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_fashion_mnist(data_dir=None) -> Path:
    """The folder with the Fashion-MNIST files: ``data_dir``, ``$CNNVIS_FASHION_MNIST`` or Debian's."""
    candidates = [data_dir] if data_dir else [os.environ.get("CNNVIS_FASHION_MNIST"), *FASHION_MNIST_DIRS]
    for cand in filter(None, candidates):
        folder = Path(cand)
        if _fashion_file(folder, FASHION_MNIST_FILES["test"][0]) is not None:
            return folder
    where = data_dir or ", ".join(FASHION_MNIST_DIRS)
    raise CnnvisError(f"Fashion-MNIST not found in {where}: install it with "
                      "`apt-get install dataset-fashion-mnist` or pass data_dir=<folder> with the official IDX "
                      "files", params="data_dir")


def _fashion_file(folder: Path, stem: str):
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    return None


def load_fashion_mnist(split: str = "train", data_dir=None):
    """``(images N×28×28 uint8, labels N int64)`` for ``split`` in train/test."""
    if split not in FASHION_MNIST_FILES:
        raise CnnvisError(f"split {split!r}: expected train or test")
    folder = find_fashion_mnist(data_dir)
    img_stem, lab_stem, count = FASHION_MNIST_FILES[split]
    img_path, lab_path = _fashion_file(folder, img_stem), _fashion_file(folder, lab_stem)
    if img_path is None or lab_path is None:
        raise CnnvisError(f"{folder}: missing {img_stem if img_path is None else lab_stem}(.gz)")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise CnnvisError(f"{img_path}: expected N×28×28 uint8 images, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),) or labels.max(initial=0) > 9:
        raise CnnvisError(f"{lab_path}: expected {len(images)} labels in 0..9, got shape {labels.shape}")
    if len(images) != count:
        raise CnnvisError(f"{img_path}: expected {count} images in the official {split} split, got {len(images)}")
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------- image sets at scale


@dataclass
class ImageSet:
    """Image files in order, with a class index per file when the layout gives one."""

    files: list
    labels: list | None = None  # class index per file
    classes: list = field(default_factory=list)  # [(folder or label text, index, name)] of a tree

    def __len__(self):
        return len(self.files)


def read_synsets(path) -> list:
    """A synset file (ImageNet's ``synset.txt``): one class per line, ``<id> <name, names…>``; the
    line number (from 0) is the class index. Returns ``[(id, name)]``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CnnvisError(f"synset file {path}: cannot read ({exc.strerror or exc})") from None
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    if not out:
        raise CnnvisError(f"synset file {path}: no classes (expected lines '<id> <name>')")
    if len({i for i, _ in out}) != len(out):
        raise CnnvisError(f"synset file {path}: a class id appears twice")
    return out


def image_tree(root, synsets=None) -> ImageSet:
    """The images of a class-per-subfolder tree: subfolders in name order, each one's image files
    in name order (the folder is scanned, never decoded). With a synset file a subfolder's class
    index is its id's line there (every subfolder must be listed); without, subfolders are numbered
    in name order."""
    from .preprocess import IMAGE_EXTENSIONS

    root = Path(root)
    classes = tree_classes(root, synsets)
    files, labels = [], []
    for folder, index, _ in classes:
        with os.scandir(root / folder) as it:
            names = sorted(e.name for e in it if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)
        files.extend(root / folder / n for n in names)
        labels.extend([index] * len(names))
    if not files:
        raise CnnvisError(f"image tree {root}: no image files in its subfolders")
    return ImageSet(files, labels, classes)


def tree_classes(root, synsets=None) -> list:
    """``[(subfolder, class index, class name)]`` of a class-per-subfolder tree, in subfolder name
    order (see :func:`image_tree`); only the top folder is scanned."""
    root = Path(root)
    if not root.is_dir():
        raise CnnvisError(f"image tree {root}: not a folder")
    with os.scandir(root) as it:
        folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise CnnvisError(f"image tree {root}: no class subfolders (expected ROOT/<class>/<image>)")
    if synsets is None:
        return [(f, i, f) for i, f in enumerate(folders)]
    table = {wnid: (i, name) for i, (wnid, name) in enumerate(read_synsets(synsets))}
    missing = [f for f in folders if f not in table]
    if missing:
        raise CnnvisError(f"image tree {root}: subfolder {missing[0]} is not in synsets={synsets}", params="synsets")
    return [(f, *table[f]) for f in folders]


def image_list(path) -> ImageSet:
    """Images named in a text file, one a line: ``path`` or ``path<TAB or comma>label`` or ``path
    label`` (the last word, when the whole line is not a file); relative paths are relative to the
    list's folder; blank lines and ``#`` comments are skipped. Labels are kept as text (a class
    index or name, resolved by the model)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CnnvisError(f"image list {path}: cannot read ({exc.strerror or exc})") from None
    files, labels = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label = None
        if "\t" in line or "," in line:
            name, label = [t.strip() for t in line.split("\t" if "\t" in line else ",", 1)]
        elif (path.parent / line).is_file() or " " not in line:
            name = line
        else:
            name, label = line.rsplit(None, 1)
        files.append(path.parent / name)
        labels.append(label or None)
    if not files:
        raise CnnvisError(f"image list {path}: no image paths")
    given = [lab is not None for lab in labels]
    if any(given) and not all(given):
        line = given.index(False) if given[0] else given.index(True)
        raise CnnvisError(f"image list {path}: image {line + 1} has {'no ' if given[0] else 'a '}label "
                          "and others do not (label every line or none)")
    return ImageSet(files, labels if all(given) else None)


# ----------------------------------------------------------------------------- groups of images
# (compare-classes: a group is image files, folders, preprocessed .npy arrays or classes of the
# model's labelled sample images)


def sample_classes(model) -> dict:
    """Class index → sample image paths of ``model`` (its sidecar's ``samples``).

    The class of each sample comes from a labels file in the samples' folder (one of
    :data:`LABEL_FILES`): CSV/TSV/whitespace lines ``file,label`` (a header line is allowed; the
    label is a class index or name; the file is relative to that folder or a bare file name), or
    JSON ``{"file": label}`` / ``[{"file": ..., "label": ...}]``. Without a labels file, a
    sample's parent folder named after a class gives its class.
    """
    samples = [Path(s) for s in (model.sidecar.get("samples") or [])]
    if not samples:
        return {}
    folders = {p.parent for p in samples}
    root = Path(_common_parent(samples))
    labels_path = next((root / n for n in LABEL_FILES if (root / n).is_file()), None)
    by_class: dict = {}
    if labels_path is not None:
        table = read_labels(labels_path)
        for p in samples:
            key = _relative_key(p, root)
            label = table.get(key, table.get(p.name))
            if label is None:
                continue
            try:
                idx = model.class_index(label, "label")
            except CnnvisError as exc:
                raise CnnvisError(f"{labels_path}: sample {p.name}: {exc}") from None
            by_class.setdefault(idx, []).append(p)
        return by_class
    names = model.class_names
    for p in samples:
        if len(folders) > 1 and p.parent.name in names:
            by_class.setdefault(names.index(p.parent.name), []).append(p)
    return by_class


def _common_parent(paths) -> str:
    import os

    parents = [str(Path(p).resolve().parent) for p in paths]
    return os.path.commonpath(parents)


def _relative_key(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def read_labels(path: Path) -> dict:
    """A labels file of sample images: file (posix, relative to the labels folder) → label text.
    CSV/TSV/whitespace lines ``file,label`` (a header line is allowed) or JSON ``{"file": label}``
    / ``[{"file": ..., "label": ...}]`` (an ``--image-list`` is :func:`image_list`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CnnvisError(f"{path}: cannot read labels file ({exc.strerror or exc})") from None
    table = {}
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CnnvisError(f"{path}: labels file is not valid JSON ({exc})") from None
        if isinstance(data, dict):
            items = data.items()
        elif isinstance(data, list) and all(isinstance(d, dict) and {"file", "label"} <= set(d) for d in data):
            items = [(d["file"], d["label"]) for d in data]
        else:
            raise CnnvisError(f"{path}: expected {{\"file\": label}} or a list of {{\"file\", \"label\"}} objects")
        return {Path(str(f)).as_posix(): str(lab) for f, lab in items}
    first_row = True
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line or "\t" in line:
            row = next(csv.reader([line], delimiter="\t" if "\t" in line else ","))
        else:
            row = line.split(None, 1)
        if len(row) < 2:
            raise CnnvisError(f"{path}:{line_no}: expected 'file,label', got {line!r}")
        file, label = row[0].strip(), row[1].strip()
        header = first_row and file.lower() in ("file", "filename", "path", "image")
        first_row = False
        if header:
            continue
        table[Path(file).as_posix()] = label
    return table


def resolve_group(model, items, what: str = "group") -> list:
    """Image files (or ``.npy`` arrays) for one group: each item is an image file, a folder, a
    preprocessed ``N×C×H×W`` ``.npy``, or a class name/index of the model's sample images."""
    from . import preprocess

    files = []
    by_class = None
    for item in items:
        p = Path(str(item))
        if p.suffix.lower() == ".npy" and p.is_file():
            files.append(p)
        elif p.exists():
            files.extend(preprocess.list_images([p]))
        else:
            if by_class is None:
                by_class = sample_classes(model)
            try:
                idx = model.class_index(str(item), what)
            except CnnvisError:
                idx = None
            if idx is None or idx not in by_class:
                known = ", ".join(model.class_names[i] for i in sorted(by_class)) or "none"
                raise CnnvisError(f"{what} {item!r}: not an image file, folder or .npy, nor a class of "
                                  f"model {model.name}'s sample images (classes with samples: {known})")
            files.extend(by_class[idx])
    if not files:
        raise CnnvisError(f"{what}: no images")
    return files


def iter_group_chunks(model, files, preprocessing, batch_size: int, skipped: list | None = None, named=()):
    """``(names, batch, positions)`` chunks of at most ``batch_size`` images of a group (lazy
    decoding); ``.npy`` items are split the same way. ``positions``: each image's index in the
    group's inputs (an array's rows count one each). With a ``skipped`` list, unreadable image
    files are left out and appended to it as ``[position, path, reason]``, except those at
    positions ``named`` (files named explicitly: their error is raised) — read by
    :func:`cnnvis.preprocess.read_chunk`, as a Dask worker reads its shard."""
    from . import preprocess

    images = [f for f in files if Path(f).suffix.lower() != ".npy"]
    names = iter(preprocess.display_names(images) if images else [])
    named = set(named)
    pending, index = [], 0  # pending: (file, name, strict) since the last array; index: of the next input
    for position, f in enumerate(files):
        if Path(f).suffix.lower() == ".npy":
            if pending:
                yield from _image_chunks(pending, index - len(pending), preprocessing, batch_size, skipped)
                pending = []
            arr = preprocess.load_input_array(f, expected_shape=model.input_shape)
            stem = Path(f).stem
            for start in range(0, len(arr), batch_size):
                part = arr[start:start + batch_size]
                yield [f"{stem}[{start + i}]" for i in range(len(part))], part, list(range(index, index + len(part)))
                index += len(part)
        else:
            pending.append((f, next(names), position in named))
            index += 1
    if pending:
        yield from _image_chunks(pending, index - len(pending), preprocessing, batch_size, skipped)


def _image_chunks(pending, first: int, preprocessing, batch_size, skipped):
    """Chunks of a run of image files (``pending``: (file, name, named explicitly) of the inputs
    ``first``, ``first + 1``, … of the group)."""
    from . import preprocess

    for start in range(0, len(pending), batch_size):
        run = pending[start:start + batch_size]
        begin = first + start
        strict = [begin + j for j, (_, _, s) in enumerate(run) if s]
        positions, batch = preprocess.read_chunk([f for f, _, _ in run], preprocessing, begin, skipped, strict)
        if batch is not None:
            yield [run[p - begin][1] for p in positions], batch, positions


def group_size(model, files) -> int:
    """Number of images in a resolved group (``.npy`` arrays counted by their first axis)."""
    from .manifest import load_npy

    total = 0
    for f in files:
        if Path(f).suffix.lower() == ".npy":
            array = load_npy(f, "image group file", "an N×C×H×W array", mmap=True)
            if array.ndim == 0:
                raise CnnvisError(f"image group file {f}: a single value; expected an N×C×H×W array")
            total += int(array.shape[0])
        else:
            total += 1
    return total


def compare_defaults(model) -> dict:
    """The model's sidecar ``compare_classes`` entry: ``{"neuron": ..., "reference": [...],
    "similar": [...], "dissimilar": [...], "per_item": false}`` (lists of class names, files or
    folders; ``per_item``: each item of similar/dissimilar its own group); {} if none."""
    entry = model.sidecar.get("compare_classes") or {}
    if not isinstance(entry, dict):
        raise CnnvisError(f"model {model.name}: sidecar 'compare_classes' must be an object")
    out = {}
    for key, value in entry.items():
        if key == "neuron":
            out[key] = value
        elif key == "per_item":
            if not isinstance(value, bool):
                raise CnnvisError(f"model {model.name}: sidecar compare_classes.per_item must be true or false")
            out[key] = value
        elif key in ("reference", "similar", "dissimilar"):
            out[key] = [value] if isinstance(value, (str, int)) else list(value)
        else:
            raise CnnvisError(f"model {model.name}: sidecar 'compare_classes' has unknown key {key!r} "
                              "(known: neuron, reference, similar, dissimilar, per_item)")
    return out
