"""Off-screen 3-D rendering: non-blank pictures, orientation, GIF frames, and clear errors."""
import numpy as np
import pytest

from cnnvis.errors import CnnvisError
from cnnvis.export import render as R

SMALL = (160, 160)


@pytest.fixture(scope="module")
def gl():
    problem = R.gl_problem()
    if problem:
        pytest.skip(f"no OpenGL here: {problem}")


def _blob_stack():
    z, r, x = np.meshgrid(np.arange(8), np.arange(16), np.arange(20), indexing="ij")
    return np.exp(-((r - 5) ** 2 + (x - 13) ** 2) / 12.0) * (1 + z / 4.0)


def _yellow(image):
    rgb = image.astype(int)
    return (rgb[..., 0] > 180) & (rgb[..., 1] > 180) & (rgb[..., 2] < 120)  # viridis top end


@pytest.mark.parametrize("mode", R.RENDER_MODES)
def test_every_mode_renders_a_non_blank_picture(gl, mode):
    image = R.render_image(_blob_stack(), mode=mode, window_size=SMALL, threshold=0.4)
    assert image.shape == (SMALL[1], SMALL[0], 3) and image.dtype == np.uint8
    assert image.std() > 15.0                          # not a blank background
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20


@pytest.mark.parametrize("corner", ["top-left", "bottom-right"])
def test_image_row_zero_is_drawn_at_the_top(gl, corner):
    block = np.zeros((6, 20, 30))
    if corner == "top-left":
        block[:, :5, :7] = 1.0
    else:
        block[:, -5:, -7:] = 1.0
    image = R.render_image(block, mode="volume", window_size=(200, 200), azimuth=0.0,
                           elevation=0.0)
    rows, cols = np.nonzero(_yellow(image))
    assert rows.size > 100
    top, left = rows.mean() < 100, cols.mean() < 100
    assert (top, left) == ((True, True) if corner == "top-left" else (False, False))


def test_png_and_orbit_gif_files(gl, tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    stack = _blob_stack()
    R.render_png(stack, tmp_path / "volume.png", window_size=SMALL, title="conv1")
    with Image.open(tmp_path / "volume.png") as img:
        assert img.size == SMALL and np.asarray(img).std() > 15.0
    R.render_orbit_gif(stack, tmp_path / "orbit.gif", frames=4, fps=8, window_size=(96, 96),
                       mode="isosurface", threshold=0.4)
    frames = iio.imread(tmp_path / "orbit.gif", index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (96, 96)
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).mean() > 1.0  # camera moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbit.gif", "volume.png"]


def test_four_d_weights_render_as_tiles(gl):
    weights = np.random.default_rng(0).normal(size=(4, 3, 5, 5))
    image = R.render_image(weights, layout="tiles", mode="stack", normalization="symmetric",
                           window_size=SMALL)
    assert image.std() > 15.0


@pytest.mark.parametrize("array, options, message", [
    (np.zeros((4, 4)), {}, "expected a C×H×W stack"),
    (np.full((3, 4, 4), np.nan), {}, "NaN or inf"),
    (np.ones((3, 4, 4)), {"mode": "mip"}, "unknown render mode 'mip'"),
    (np.ones((3, 4, 4)), {"mode": "isosurface"}, "isosurface is empty"),
    (np.ones((3, 4, 4)), {"gap": 0.5, "mode": "stack"}, "gap 0.5"),
    (np.ones((3, 4, 4)), {"threshold": 2.0}, "threshold"),
])
def test_bad_input_raises_one_line_and_writes_nothing(tmp_path, array, options, message):
    if options.get("mode") == "isosurface" and R.gl_problem():
        pytest.skip("this check happens after the GL check")
    with pytest.raises(CnnvisError, match=message) as err:
        R.render_png(array, tmp_path / "x.png", window_size=SMALL, **options)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_gif_arguments(tmp_path):
    with pytest.raises(CnnvisError, match="frames 1"):
        R.render_orbit_gif(np.ones((2, 3, 3)), tmp_path / "o.gif", frames=1)
    with pytest.raises(CnnvisError, match="fps"):
        R.render_orbit_gif(np.ones((2, 3, 3)), tmp_path / "o.gif", fps=0)
    assert list(tmp_path.iterdir()) == []


def test_missing_gl_libraries_are_reported_before_vtk_can_crash(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW", raising=False)
    monkeypatch.setattr(R, "_loadable", lambda *names: False)
    monkeypatch.setattr(R, "_dri_driver_present", lambda: False)
    problem = R.gl_problem()
    assert "libEGL.so.1" in problem and "Mesa DRI driver" in problem
    assert problem.endswith(R.INSTALL_HINT)
    with pytest.raises(CnnvisError, match="apt-get install libegl1 libgl1-mesa-dri"):
        R.render_image(np.ones((2, 3, 3)))
    # Only the EGL vendor library missing:
    monkeypatch.setattr(R, "_loadable", lambda *names: names == ("libEGL.so.1",))
    monkeypatch.setattr(R, "_dri_driver_present", lambda: True)
    assert "EGL vendor library" in R.gl_problem()


def test_show_needs_a_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(CnnvisError, match="^show=True needs a display") as err:
        R.show_window(np.ones((2, 3, 3)))
    assert err.value.params == ("show",)  # the CLI names its --show flag (tests/test_cli_errors.py)


def test_egl_is_selected_without_a_display(gl, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW", raising=False)
    R.check_gl()
    import os

    assert os.environ["VTK_DEFAULT_OPENGL_WINDOW"] == "vtkEGLRenderWindow"
