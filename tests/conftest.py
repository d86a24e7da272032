import os
import shutil
import subprocess
import time
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


def write_pickled_npy(path) -> None:
    """A hostile .npy holding a pickled object array: the one place the tests write a pickle
    (allow_pickle=True on purpose, to make the file); cnnvis must refuse it, never unpickle it."""
    import numpy as np

    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


@pytest.fixture
def bad_npy_files(tmp_path):
    """.npy files every user-file loader must refuse with one line: by name, a path each (the pickled
    one from :func:`write_pickled_npy`)."""
    import numpy as np

    folder = tmp_path / "bad_npy"
    folder.mkdir()
    files = {name: folder / f"{name}.npy" for name in ("pickled", "empty", "text", "truncated", "archive")}
    write_pickled_npy(files["pickled"])
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


def _display_answers(display: str) -> bool:
    """Whether an X client can connect to ``display`` now (Xlib through ctypes; else its socket)."""
    import ctypes

    try:
        xlib = ctypes.CDLL("libX11.so.6")
    except OSError:
        return Path(f"/tmp/.X11-unix/X{display[1:]}").exists()
    xlib.XOpenDisplay.restype = ctypes.c_void_p
    xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
    xlib.XCloseDisplay.argtypes = [ctypes.c_void_p]
    handle = xlib.XOpenDisplay(display.encode())
    if handle:
        xlib.XCloseDisplay(handle)
    return bool(handle)


@pytest.fixture
def x_display():
    """A private Xvfb server that already answers X clients; yields its DISPLAY (skips without
    Xvfb). Its own display number (not xvfb-run's shared guess), free of lock files."""
    if shutil.which("Xvfb") is None:
        pytest.skip("needs Debian's xvfb (Xvfb) for an X display")
    start = os.getpid() % 800
    for number in [100 + (start + 7 * k) % 800 for k in range(40)]:
        if Path(f"/tmp/.X{number}-lock").exists():
            continue
        display = f":{number}"
        server = subprocess.Popen(["Xvfb", display, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while server.poll() is None and time.monotonic() < deadline and not _display_answers(display):
            time.sleep(0.1)
        if server.poll() is None and _display_answers(display):
            break
        server.kill()
        server.wait(timeout=10)
    else:
        pytest.skip("no Xvfb server started")
    try:
        yield display
    finally:
        server.terminate()
        server.wait(timeout=10)
