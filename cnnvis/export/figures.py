"""2D pictures: channel grids, filter tiles, colormaps and PNG writing.

Everything here works on numpy arrays and writes PNG with Pillow (deterministic bytes for the same
array). matplotlib is imported only for its colormaps and for plots.
"""
from __future__ import annotations

import math

import numpy as np

from .. import limits
from ..errors import CnnvisError
from ..manifest import atomic_path

NORMALIZATIONS = ("channel", "global")


def normalize(x, axis=None, eps: float = 0.0) -> np.ndarray:
    """Min–max scale to [0, 1] over ``axis``; constant (or dead) parts become 0, never NaN."""
    x = np.asarray(x, dtype=np.float64)
    lo = np.nanmin(x, axis=axis, keepdims=axis is not None)
    hi = np.nanmax(x, axis=axis, keepdims=axis is not None)
    span = hi - lo
    safe = np.where(span > eps, span, 1.0)
    return np.where(span > eps, (x - lo) / safe, 0.0)


def symmetric(x) -> np.ndarray:
    """Scale to [0, 1] with 0.5 at zero and the largest magnitude at 0 or 1 (all zero: 0.5)."""
    x = np.asarray(x, dtype=np.float64)
    peak = float(np.abs(x).max()) if x.size else 0.0
    return 0.5 + x / (2.0 * peak) if peak > 0 else np.full_like(x, 0.5)


#: bytes a grid pixel may cost: the float64 grid, its 8-bit colour picture and an upscaled copy
GRID_BYTES_PER_PIXEL = 32


def grid_shape(n: int, ncols: int | None = None) -> tuple:
    """A near-square (rows, cols) layout for n tiles; cols ≥ rows."""
    if n <= 0:
        raise ValueError("grid of zero tiles")
    cols = int(ncols) if ncols else int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    return rows, cols


def tile_grid(stack, ncols: int | None = None, pad: int = 1, normalization: str = "channel",
              fill: float = np.nan) -> np.ndarray:
    """Lay out tiles (C×H×W, or C×H×W×3 for colour tiles) as one image with ``pad``-pixel separators.

    Values are normalised to [0, 1] per tile (``channel``) or over the whole stack (``global``);
    separators and empty cells are ``fill`` (NaN by default, drawn in the separator colour).
    """
    stack = np.asarray(stack, dtype=np.float64)
    if stack.ndim not in (3, 4):
        raise CnnvisError(f"expected a C×H×W stack of maps, got an array of shape {stack.shape}")
    if normalization not in NORMALIZATIONS:
        raise CnnvisError(f"normalization {normalization!r}: expected one of {', '.join(NORMALIZATIONS)}")
    axis = tuple(range(1, stack.ndim)) if normalization == "channel" else None
    tiles = normalize(stack, axis=axis)
    n, h, w = stack.shape[:3]
    rows, cols = grid_shape(n, ncols)
    extra = stack.shape[3:]
    height, width = rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad
    # the float64 grid, its colour picture and an upscaled copy
    limits.check(height * width * int(np.prod(extra, dtype=object)) * GRID_BYTES_PER_PIXEL,
                 f"ncols {cols}: a {rows} x {cols} grid of {h} x {w} tiles ({height} x {width} pixels)")
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, *extra), fill)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = tiles[i]
    return out


def colorize(image, cmap: str = "viridis", separator=(255, 255, 255)) -> np.ndarray:
    """[0,1] grey image (NaN = separator) -> H×W×3 uint8 through a matplotlib colormap.

    An H×W×3 image is taken as RGB already.
    """
    image = np.asarray(image, dtype=np.float64)
    nan = np.isnan(image) if image.ndim == 2 else np.isnan(image).any(axis=-1)
    if image.ndim == 2:
        if cmap in ("gray", "grey"):
            rgb = np.repeat(np.nan_to_num(image)[..., None], 3, axis=-1)
        else:
            from matplotlib import colormaps

            try:
                rgb = colormaps[cmap](np.nan_to_num(image))[..., :3]
            except KeyError:
                raise CnnvisError(f"cmap={cmap!r}: not a matplotlib colormap", params="cmap") from None
    else:
        rgb = np.nan_to_num(image)
    out = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    out[nan] = separator
    return out


def upscale(rgb, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so small maps stay crisp."""
    if factor <= 1:
        return rgb
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def auto_scale(height: int, width: int, target: int = 512, limit: int = 8) -> int:
    """An integer zoom that brings the larger side near ``target`` pixels (at most ``limit``)."""
    return int(max(1, min(limit, target // max(height, width, 1))))


def label_tiles(rgb, n: int, tile_hw, ncols: int | None, pad: int, scale: int, labels=None) -> np.ndarray:
    """Write each tile's label (default: its channel index) in its top-left corner."""
    from PIL import Image, ImageDraw

    rows, cols = grid_shape(n, ncols)
    h, w = tile_hw
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for i in range(n):
        r, c = divmod(i, cols)
        x = c * (w + pad) * scale + 1
        y = r * (h + pad) * scale + 1
        text = str(labels[i]) if labels is not None else str(i)
        draw.text((x + 1, y + 1), text, fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255))
    return np.asarray(img)


def save_png(path, rgb) -> None:
    """Write an H×W×3 (or H×W) uint8 array as PNG, atomically, with no timestamp metadata."""
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise TypeError(f"save_png wants uint8, got {rgb.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", optimize=False)


def save_figure(fig, path, dpi: int = 100) -> list:
    """Write a matplotlib Figure as PNG, atomically, with no software/date metadata (same bytes on
    rerun). Returns where each of ``fig.axes`` was drawn: ``(left, top, right, bottom)`` in PNG
    pixels (floats; for an image with equal aspect, the image itself)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ..manifest import write_bytes

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    write_bytes(path, buf.getvalue())
    width, height = fig.get_size_inches() * dpi
    boxes = []
    for ax in fig.axes:
        pos = ax.get_position()  # figure fractions, y up, as laid out by the drawing above
        boxes.append((pos.x0 * width, (1.0 - pos.y1) * height, pos.x1 * width, (1.0 - pos.y0) * height))
    return boxes


def grid_png(path, stack, ncols=None, pad: int = 1, normalization: str = "channel", cmap: str = "viridis",
             labels: bool | list = False, scale: int | None = None) -> dict:
    """Write the grid picture of a C×H×W stack; returns its layout (for manifests)."""
    stack = np.asarray(stack)
    grid = tile_grid(stack, ncols=ncols, pad=pad, normalization=normalization)
    rgb = colorize(grid, cmap=cmap)
    h, w = stack.shape[1:3]
    scale = scale or auto_scale(*rgb.shape[:2], target=900, limit=8)
    rgb = upscale(rgb, scale)
    if labels:
        rgb = label_tiles(rgb, len(stack), (h, w), ncols, pad, scale,
                          labels=None if labels is True else labels)
    save_png(path, rgb)
    rows, cols = grid_shape(len(stack), ncols)
    return {"rows": rows, "cols": cols, "scale": scale, "normalization": normalization, "cmap": cmap}


def filters_rgb_stack(weights, channel_order: str = "RGB") -> np.ndarray:
    """Conv weights O×I×kh×kw -> O tiles for display: kh×kw×3 (RGB) when I == 3, else kh×kw (mean over I)."""
    from ..preprocess import channels_last

    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4:
        raise CnnvisError(f"expected conv weights O×I×kh×kw, got shape {w.shape}")
    return channels_last(w, channel_order)  # one input channel: O×kh×kw; other counts: the mean
