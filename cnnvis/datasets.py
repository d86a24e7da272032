"""Datasets read from their official files: Fashion-MNIST in IDX format; and image sets at scale:
a class-per-subfolder tree (ImageNet's ``n01440764/….JPEG`` layout, with a synset file naming the
classes) and a text file listing image paths with optional labels (paths only: images are decoded
later, a batch at a time).

Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files in
``/usr/share/datasets/fashion-mnist/``; ``--data DIR`` takes any folder holding the official files
(gzipped or not).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CnnvisError

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
                      "`apt-get install dataset-fashion-mnist` or pass --data DIR with the official IDX files")


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
        raise CnnvisError(f"--synsets {path}: cannot read ({exc.strerror or exc})") from None
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    if not out:
        raise CnnvisError(f"--synsets {path}: no classes (expected lines '<id> <name>')")
    if len({i for i, _ in out}) != len(out):
        raise CnnvisError(f"--synsets {path}: a class id appears twice")
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
        raise CnnvisError(f"--image-tree {root}: no image files in its subfolders")
    return ImageSet(files, labels, classes)


def tree_classes(root, synsets=None) -> list:
    """``[(subfolder, class index, class name)]`` of a class-per-subfolder tree, in subfolder name
    order (see :func:`image_tree`); only the top folder is scanned."""
    root = Path(root)
    if not root.is_dir():
        raise CnnvisError(f"--image-tree {root}: not a folder")
    with os.scandir(root) as it:
        folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise CnnvisError(f"--image-tree {root}: no class subfolders (expected ROOT/<class>/<image>)")
    if synsets is None:
        return [(f, i, f) for i, f in enumerate(folders)]
    table = {wnid: (i, name) for i, (wnid, name) in enumerate(read_synsets(synsets))}
    missing = [f for f in folders if f not in table]
    if missing:
        raise CnnvisError(f"--image-tree {root}: subfolder {missing[0]} is not in --synsets {synsets}")
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
        raise CnnvisError(f"--image-list {path}: cannot read ({exc.strerror or exc})") from None
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
        raise CnnvisError(f"--image-list {path}: no image paths")
    given = [lab is not None for lab in labels]
    if any(given) and not all(given):
        line = given.index(False) if given[0] else given.index(True)
        raise CnnvisError(f"--image-list {path}: image {line + 1} has {'no ' if given[0] else 'a '}label "
                          "and others do not (label every line or none)")
    return ImageSet(files, labels if all(given) else None)
