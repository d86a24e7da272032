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


def _shown_more(picture, other, mode):
    """Where ``picture`` shows the blob and ``other`` does not: more colourful (on the white
    background or the faint planes), or for ``slices`` (slices fill the view) brighter."""
    a, b = picture.astype(int), other.astype(int)
    if mode == "slices":
        return a.sum(axis=2) > b.sum(axis=2) + 60
    return np.ptp(a, axis=2) > np.ptp(b, axis=2) + 40


@pytest.mark.parametrize("mode", R.RENDER_MODES)
def test_every_mode_draws_the_blob_where_it_is(gl, mode):
    """Seen straight down z, the blob (row 5, column 13 of 16×20) is drawn right of the centre and
    above it; the stack mirrored left-right is drawn mirrored about the centre, the stack
    mirrored top-bottom lower down."""
    stack = _blob_stack()
    pictures = [R.render_image(s, mode=mode, window_size=SMALL, threshold=0.4, azimuth=0.0, elevation=0.0)
                for s in (stack, stack[:, :, ::-1], stack[:, ::-1, :])]
    here, mirrored_x, mirrored_y = (np.argwhere(_shown_more(p, pictures[0] if k else pictures[1], mode))
                                    .mean(axis=0) for k, p in enumerate(pictures))
    width = SMALL[0]
    assert here[1] > width / 2 + 10 and mirrored_x[1] < width / 2 - 10
    assert abs(here[1] + mirrored_x[1] - width) <= 4  # mirror images about the centre column
    assert abs(here[0] - mirrored_x[0]) <= 2
    assert mirrored_y[0] > here[0] + 15  # row 10 of 16 is drawn below row 5


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


def _line_centres(mask, axis, min_length):
    """Centres of the straight lines (runs of ≥ ``min_length`` marked pixels along rows for
    ``axis=1``, along columns for ``axis=0``), neighbouring rows/columns merged."""
    counts = mask.sum(axis=axis)
    idx = np.flatnonzero(counts >= min_length)
    return [float(g.mean()) for g in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if g.size]


def _box_faces(image):
    """The outline's back face (z = 0, drawn smaller) and front face as (left, top, right, bottom),
    found from its long horizontal and vertical lines (grey on the white background)."""
    line = image.max(axis=2) < 235
    rows = _line_centres(line, 1, 0.4 * image.shape[1])
    cols = _line_centres(line, 0, 0.3 * image.shape[0])  # a block may hide part of a line
    assert len(rows) == 4 and len(cols) == 4, (rows, cols)
    return (cols[1], rows[1], cols[2], rows[2]), (cols[0], rows[0], cols[3], rows[3])


@pytest.mark.parametrize("rows, cols, zs", [
    ((2, 5), (13, 17), (0, 2)),    # top right, at the back (channels 0-1)
    ((2, 5), (13, 17), (9, 12)),   # the same place, at the front (channels 9-11)
    ((10, 14), (1, 4), (4, 7)),    # bottom left, in the middle
])
def test_a_bright_block_is_drawn_where_it_is(gl, rows, cols, zs):
    """One bright block in a dark 12×16×20 stack, seen straight down z: its picture sits at the
    block's (column, row) inside the outline, between where the back face and the front face put
    it, and nearer to the face of its own depth."""
    stack = np.zeros((12, 16, 20))
    stack[zs[0]:zs[1], rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    image = R.render_image(stack, window_size=(400, 400), azimuth=0.0, elevation=0.0)
    back, front = _box_faces(image)
    inside = np.zeros(image.shape[:2], bool)
    inside[int(front[1]):int(front[3]), int(front[0]):int(front[2])] = True  # not the colour bar below
    ys, xs = np.nonzero(_yellow(image) & inside)
    assert ys.size > 300
    centre_col, centre_row = (cols[0] + cols[1] - 1) / 2 / 19, (rows[0] + rows[1] - 1) / 2 / 15
    at = [(face[0] + centre_col * (face[2] - face[0]), face[1] + centre_row * (face[3] - face[1]))
          for face in (back, front)]
    for axis, seen in ((0, xs.mean()), (1, ys.mean())):
        lo, hi = sorted((at[0][axis], at[1][axis]))
        assert lo - 2 <= seen <= hi + 2, (axis, seen, at)
    depth = (zs[0] + zs[1] - 1) / 2 / 11  # 0 at the back face, 1 at the front
    nearer_front = np.hypot(xs.mean() - at[1][0], ys.mean() - at[1][1]) < np.hypot(xs.mean() - at[0][0],
                                                                                    ys.mean() - at[0][1])
    if depth != 0.5:
        assert nearer_front == (depth > 0.5)


def test_png_and_orbit_gif_files(gl, tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    stack = _blob_stack()
    R.render_png(stack, tmp_path / "volume.png", window_size=SMALL, title="conv1")
    with Image.open(tmp_path / "volume.png") as img:
        assert img.size == SMALL
        # the file is the rendering (whose content the tests above check), pixel for pixel
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")),
                                      R.render_image(stack, window_size=SMALL, title="conv1"))
    R.render_orbit_gif(stack, tmp_path / "orbit.gif", frames=4, fps=8, window_size=(96, 96),
                       mode="isosurface", threshold=0.4)
    frames = iio.imread(tmp_path / "orbit.gif", index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (96, 96)
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).mean() > 1.0  # camera moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbit.gif", "volume.png"]


@pytest.mark.parametrize("cin, rows", [(2, slice(0, 3)), (0, slice(2, 5))])
def test_four_d_tiles_put_input_channel_cin_at_x_cin_times_kw(gl, cin, rows):
    """Weights 4×3×5×5 as tiles: filter n is slice z = n, input channel cin its columns
    cin·5 .. cin·5+4. One bright 3×3 patch in filter 2, seen straight down z, is drawn in the
    right third (cin 2, top rows) or the left third (cin 0, bottom rows) of the volume."""
    weights = np.zeros((4, 3, 5, 5))
    weights[2, cin, rows, 1:4] = 1.0
    image = R.render_image(weights, layout="tiles", mode="stack", window_size=(400, 400), azimuth=0.0,
                           elevation=0.0)
    empty = R.render_image(np.zeros((4, 3, 5, 5)), layout="tiles", mode="stack", window_size=(400, 400),
                           azimuth=0.0, elevation=0.0)
    drawn = np.ptp(image.astype(int), axis=2) > np.ptp(empty.astype(int), axis=2) + 40
    ys, xs = np.nonzero(drawn)
    volume = np.argwhere(empty[:300].max(axis=2) < 250)  # the outline and the faint planes (above the colour bar)
    (top, left), (bottom, right) = volume.min(axis=0), volume.max(axis=0)
    fx, fy = (xs.mean() - left) / (right - left), (ys.mean() - top) / (bottom - top)
    if cin == 2:
        assert fx > 0.7 and fy < 0.45, (fx, fy)
    else:
        assert fx < 0.3 and fy > 0.55, (fx, fy)


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
