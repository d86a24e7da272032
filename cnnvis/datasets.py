"""Datasets read from their official files: Fashion-MNIST in IDX format.

Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files in
``/usr/share/datasets/fashion-mnist/``; ``--data DIR`` takes any folder holding the official files
(gzipped or not).
"""
from __future__ import annotations

import gzip
import os
import struct
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
