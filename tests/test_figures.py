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
    img = np.asarray(Image.open(a))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 10


def test_filters_rgb_stack_swaps_bgr():
    w = np.zeros((2, 3, 4, 4))
    w[:, 0] = 1.0  # first input channel = blue for a BGR model
    tiles = figures.filters_rgb_stack(w, channel_order="BGR")
    assert tiles.shape == (2, 4, 4, 3) and (tiles[..., 2] == 1).all() and (tiles[..., 0] == 0).all()
    with pytest.raises(CnnvisError):
        figures.filters_rgb_stack(np.zeros((2, 3)))
