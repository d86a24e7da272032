import gzip
import struct

import numpy as np
import pytest

from cnnvis import datasets
from cnnvis.errors import CnnvisError


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
