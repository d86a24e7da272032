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
