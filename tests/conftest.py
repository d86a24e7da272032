import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CNNVIS_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir():
    """../shared (reference material); tests that need it skip when it is absent."""
    if not (SHARED / "README.md").exists():
        pytest.skip(f"reference material not present at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # Never touch the user's cache from tests.
    monkeypatch.setenv("CNNVIS_HOME", str(tmp_path_factory.getbasetemp() / "cnnvis_home"))


@pytest.fixture
def bad_npy_files(tmp_path):
    """.npy files every user-file loader must refuse with one line: by name, a path each. The pickled
    one is written with allow_pickle=True on purpose (here only): cnnvis must never unpickle it."""
    import numpy as np

    folder = tmp_path / "bad_npy"
    folder.mkdir()
    files = {name: folder / f"{name}.npy" for name in ("pickled", "empty", "text", "truncated", "archive")}
    np.save(files["pickled"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    files["empty"].write_bytes(b"")
    files["text"].write_text("not an array")
    np.save(files["truncated"], np.zeros((2, 3, 4, 5), np.float32))
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:200])
    with open(files["archive"], "wb") as f:
        np.savez(f, a=np.zeros((2, 3, 4, 5), np.float32))
    return files


@pytest.fixture(scope="session")
def templates():
    """24 noisy copies of 3 random 8×8 templates, shuffled; returns (stack, template id): a
    feature-map stack whose right ordering is known (the orderings and their pictures use it)."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 8, 8))
    ids = np.repeat(np.arange(3), 8)
    rng.shuffle(ids)
    return base[ids] + 0.1 * rng.normal(size=(24, 8, 8)), ids
