import numpy as np
import pytest
from PIL import Image

from cnnvis.errors import CnnvisError
from cnnvis.export import figures


def test_normalize_constant_and_dead_maps_give_zero_not_nan():
    stack = np.stack([np.zeros((4, 4)), np.full((4, 4), 7.0), np.arange(16.0).reshape(4, 4)])
    out = figures.normalize(stack, axis=(1, 2))
    assert np.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1] == 0).all()
    assert out[2].min() == 0 and out[2].max() == 1


def test_tile_grid_layout_and_separators():
    stack = np.arange(5 * 2 * 3, dtype=float).reshape(5, 2, 3)
    grid = figures.tile_grid(stack, pad=1)
    assert figures.grid_shape(5) == (2, 3)
    assert grid.shape == (2 * 2 + 1, 3 * 3 + 2)
    assert np.isnan(grid[2]).all() and np.isnan(grid[:, 3]).all()  # separators
    assert np.isnan(grid[3:, 8:]).all()  # the empty sixth cell
    np.testing.assert_allclose(grid[0:2, 4:7], figures.normalize(stack[1]))  # tile 1, per-channel scaling
    g = figures.tile_grid(stack, normalization="global")
    assert g[0, 0] == 0 and np.nanmax(g) == 1


def test_grid_png_is_deterministic(tmp_path):
    stack = np.random.default_rng(0).standard_normal((6, 8, 8))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    figures.grid_png(a, stack, labels=True)
    figures.grid_png(b, stack, labels=True)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("labels", [False, True])
def test_grid_png_tile_k_shows_channel_k(tmp_path, labels):
    """Channel k is dark with one bright pixel at a place of its own; the picture's tile k (row
    k // cols, column k % cols of the layout) has its brightest pixel exactly there."""
    from matplotlib import colormaps

    n, h, w = 7, 9, 10
    stack = np.zeros((n, h, w))
    spots = [(3 + k % 5, 2 + k) for k in range(n)]  # away from the label in the top-left corner
    for k, (y, x) in enumerate(spots):
        stack[k, y, x] = 1.0 + k  # per-tile scaling: every spot is the top of the colour map
        stack[k, 0, w - 1] = -0.5  # ... and a dark corner sets the bottom
    layout = figures.grid_png(tmp_path / "g.png", stack, pad=1, labels=labels)
    rows, cols, scale = layout["rows"], layout["cols"], layout["scale"]
    assert (rows, cols) == (3, 3)
    img = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    assert img.shape == ((rows * h + rows - 1) * scale, (cols * w + cols - 1) * scale, 3)
    viridis = np.rint(np.asarray(colormaps["viridis"]([0.0, 1.0]))[:, :3] * 255)
    for k, (y, x) in enumerate(spots):
        r, c = divmod(k, cols)
        tile = img[r * (h + 1) * scale:(r * (h + 1) + h) * scale:scale,
                   c * (w + 1) * scale:(c * (w + 1) + w) * scale:scale]
        bright = np.argwhere((tile == viridis[1]).all(axis=-1))
        assert bright.tolist() == [[y, x]], k
        assert (tile[0, w - 1] == viridis[0]).all()
        zero = 0.5 / (1.5 + k)  # where 0 lands on the tile's own min-max scale
        expected = np.rint(np.asarray(colormaps["viridis"](zero))[:3] * 255)
        assert (tile[h - 1, 0] == expected).all(), k
    # the two empty cells of the 3×3 grid stay the white separator colour
    assert (img[2 * (h + 1) * scale:, 1 * (w + 1) * scale:] == 255).all()


def test_filters_rgb_stack_swaps_bgr():
    w = np.zeros((2, 3, 4, 4))
    w[:, 0] = 1.0  # first input channel = blue for a BGR model
    tiles = figures.filters_rgb_stack(w, channel_order="BGR")
    assert tiles.shape == (2, 4, 4, 3) and (tiles[..., 2] == 1).all() and (tiles[..., 0] == 0).all()
    with pytest.raises(CnnvisError):
        figures.filters_rgb_stack(np.zeros((2, 3)))
