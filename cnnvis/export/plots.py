"""Pictures of analysis results: heat maps and overlays, occlusion and invariance figures, class
gradient charts, ordered volume slices, deconvnet blocks.

Analyses compute arrays and result objects; this module draws them, through the primitives of
:mod:`cnnvis.export.figures` (PNG written atomically, the same bytes on rerun). matplotlib is
imported only inside the functions that plot.
"""
from __future__ import annotations

import numpy as np

from ..errors import CnnvisError
from . import figures

# ------------------------------------------------------------------------------------ pictures


def zoom_for(hw, min_side: int = 224) -> int:
    """The integer zoom that makes the larger side of an ``hw`` picture at least ``min_side``."""
    return max(1, -(-min_side // max(hw)))


def enlarge(rgb_uint8, min_side: int = 224) -> np.ndarray:
    """Nearest-neighbour enlargement so small inputs (28×28) stay visible."""
    return figures.upscale(rgb_uint8, zoom_for(rgb_uint8.shape[:2], min_side))


def picture(rgb01, min_side: int = 224) -> np.ndarray:
    """A [0, 1] H×W×3 picture as uint8, enlarged."""
    rgb = np.clip(np.rint(np.asarray(rgb01) * 255.0), 0, 255).astype(np.uint8)
    return enlarge(rgb, min_side)


def heat_picture(values, cmap: str, min_side: int = 224) -> np.ndarray:
    """A map of values (NaN = no value, drawn black) through ``cmap``, min–max scaled, enlarged."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    scaled = np.full(values.shape, np.nan)
    if finite.any():
        scaled[finite] = figures.normalize(values[finite])
    return enlarge(figures.colorize(scaled, cmap=cmap, separator=(0, 0, 0)), min_side)


def class_colours(classes) -> dict:
    """Fixed colours for the classes present (tab20 in class order): ``{class: (r, g, b)}``."""
    from matplotlib import colormaps

    table = colormaps["tab20"]
    return {int(k): tuple(int(round(255 * c)) for c in table(i % 20)[:3]) for i, k in enumerate(sorted(set(classes)))}


def category_picture(classes, colours: dict, min_side: int = 224) -> np.ndarray:
    """A map of class indices in the ``colours`` of :func:`class_colours`, enlarged."""
    rgb = np.zeros((*np.shape(classes), 3), np.uint8)
    for k, colour in colours.items():
        rgb[classes == k] = colour
    return enlarge(rgb, min_side)


def overlay_heatmap(rgb, heat, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map (H×W, any range; NaN = no value) over an H×W×3 [0, 1] picture → uint8.

    The heat is min–max scaled to [0, 1]; where it is NaN the picture shows through unchanged.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    heat = np.asarray(heat, dtype=np.float64)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat map {heat.shape} and picture {rgb.shape[:2]} differ in size")
    valid = np.isfinite(heat)
    scaled = np.where(valid, figures.normalize(np.where(valid, heat, np.nan)), np.nan) if valid.any() else heat
    colour = figures.colorize(np.where(valid, scaled, 0.0), cmap=cmap).astype(np.float64) / 255.0
    a = np.where(valid, float(alpha), 0.0)[..., None]
    out = (1.0 - a) * rgb + a * colour
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def gradient_picture(gradient, channel_order: str = "RGB") -> np.ndarray:
    """A gradient C×H×W as an H×W×3 picture in [0, 1]: 0.5 = zero, symmetric scaling."""
    from ..preprocess import channels_last

    pic = channels_last(figures.symmetric(gradient), channel_order)
    return np.ascontiguousarray(np.repeat(pic[..., None], 3, axis=-1) if pic.ndim == 2 else pic)


# ------------------------------------------------------------------------------------ figures


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def occlusion_figure(path, res, rgb, colours: dict, class_name, cmap: str = "jet") -> dict:
    """Input, feature-map activity, class probability and most probable class (Z&F Fig. 7) of an
    :class:`cnnvis.analysis.occlusion.OcclusionMaps`; ``class_name(k)`` labels the classes.
    Returns where each panel (``input``, ``activation``, ``probability``, ``classes``) was drawn:
    ``(left, top, right, bottom)`` PNG pixels of the image's extent."""
    from matplotlib.patches import Patch

    extent = (-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5)
    panels = 4 if res.activation is not None else 3
    fig = _figure(3.3 * panels, 3.6)
    axes = fig.subplots(1, panels)
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    k = 1
    if res.activation is not None:
        im = axes[k].imshow(res.to_pixels(res.activation), cmap=cmap, extent=extent, interpolation="nearest")
        axes[k].set_title(f"{res.layer} map {res.channel}: total activation", fontsize=9)
        fig.colorbar(im, ax=axes[k], fraction=0.046)
        k += 1
    im = axes[k].imshow(res.to_pixels(res.probability), cmap=cmap, extent=extent, interpolation="nearest")
    axes[k].set_title(f"p({class_name(res.target)})", fontsize=9)
    fig.colorbar(im, ax=axes[k], fraction=0.046)
    k += 1
    rgb_top = np.zeros((*res.image_hw, 3))
    nearest = res.nearest_window_classes()
    for cls, colour in colours.items():
        rgb_top[nearest == cls] = np.asarray(colour) / 255.0
    axes[k].imshow(rgb_top, interpolation="nearest")
    axes[k].set_title("most probable class", fontsize=9)
    handles = [Patch(color=np.asarray(c) / 255.0, label=class_name(cls)[:24]) for cls, c in colours.items()]
    axes[k].legend(handles=handles[:12], fontsize=6, loc="upper right", framealpha=0.7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    boxes = dict(zip(fig.axes, figures.save_figure(fig, path)))
    names = ["input", *(["activation"] if res.activation is not None else []), "probability", "classes"]
    return {name: boxes[ax] for name, ax in zip(names, axes)}


def invariance_figure(path, curves, sweeps: dict, layers) -> dict:
    """Rows: transforms; columns: normalised distance per layer, then the class probability
    (Z&F Fig. 5). ``curves`` are ``(image name, InvarianceResult)`` pairs. Returns where each
    panel was drawn, ``{(transform, layer or "probability"): (left, top, right, bottom)}`` in PNG
    pixels, and each panel's data limits ``{...: (xmin, xmax, ymin, ymax)}``."""
    kinds = list(sweeps)
    cols = len(layers) + 1
    fig = _figure(3.2 * cols, 2.6 * len(kinds))
    axes = fig.subplots(len(kinds), cols, squeeze=False)
    units = {"translation": "shift (pixels)", "scale": "scale factor", "rotation": "rotation (degrees)"}
    for r, kind in enumerate(kinds):
        for name, res in curves:
            amounts = res.amounts[kind]
            for c, layer in enumerate(layers):
                axes[r, c].plot(amounts, res.distance[kind][layer], marker=".", label=name[:20])
            axes[r, -1].plot(amounts, res.probability[kind], marker=".", label=name[:20])
        for c, layer in enumerate(layers):
            axes[r, c].set_title(f"{layer}: normalised distance", fontsize=8)
        axes[r, -1].set_title("p(class)", fontsize=8)
        axes[r, -1].set_ylim(-0.02, 1.02)
        for c in range(cols):
            axes[r, c].set_xlabel(units[kind], fontsize=8)
            axes[r, c].tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=6)
    boxes = dict(zip(fig.axes, figures.save_figure(fig, path)))
    names = [(kind, col) for kind in kinds for col in [*layers, "probability"]]
    flat = list(axes.ravel())
    return {"boxes": {name: boxes[ax] for name, ax in zip(names, flat)},
            "limits": {name: (*ax.get_xlim(), *ax.get_ylim()) for name, ax in zip(names, flat)}}


# ------------------------------------------------------------------------------------ class gradients


def plot_importance(path, importance, title: str = "", sort: bool = False, highlight=()) -> list:
    """Bar chart of per-filter importance, in filter order or sorted (largest first); the
    ``highlight`` filters are drawn in a second colour. Returns the filter order drawn."""
    imp = np.asarray(importance, dtype=np.float64)
    order = np.argsort(-imp, kind="stable") if sort else np.arange(len(imp))
    fig = _figure(max(6.0, min(20.0, 0.12 * len(imp) + 2)), 3.2)
    ax = fig.add_subplot()
    marked = set(int(h) for h in highlight)
    colours = ["tab:orange" if int(f) in marked else "tab:blue" for f in order]
    ax.bar(np.arange(len(imp)), imp[order], color=colours, width=0.85)
    ax.set_xlim(-0.7, len(imp) - 0.3)
    if sort:
        ax.set_xlabel("filters sorted by importance")
        step = max(1, len(imp) // 24)
        ticks = np.arange(0, len(imp), step)
        ax.set_xticks(ticks, [str(int(order[t])) for t in ticks], fontsize=7, rotation=90)
    else:
        ax.set_xlabel("filter")
    ax.set_ylabel("‖∂logit/∂W_f‖₂")
    ax.set_title(title, fontsize=10)
    figures.save_figure(fig, path)
    return [int(f) for f in order]


def plot_group_importance(path, means: dict, stds: dict, title: str = "", ylabel: str = "importance") -> None:
    """Grouped bars: each group's mean per-filter importance with ± std error bars."""
    names = list(means)
    n_filters = len(next(iter(means.values())))
    fig = _figure(max(7.0, min(24.0, 0.05 * n_filters * len(names) + 3)), 3.6)
    ax = fig.add_subplot()
    width = 0.85 / len(names)
    x = np.arange(n_filters)
    for i, g in enumerate(names):
        err = np.nan_to_num(np.asarray(stds[g], dtype=np.float64))
        ax.bar(x + (i - (len(names) - 1) / 2) * width, means[g], width=width, yerr=err, label=g,
               error_kw={"elinewidth": 0.5, "capsize": 0})
    ax.set_xlim(-0.7, n_filters - 0.3)
    ax.set_xlabel("filter")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    figures.save_figure(fig, path)


def plot_cosine_matrix(path, cosine, groups, group_names, title: str = "") -> tuple:
    """Heatmap of the cosine-similarity matrix, images ordered by group, group borders drawn.
    Returns where the matrix was drawn: ``(left, top, right, bottom)`` in PNG pixels."""
    cosine = np.asarray(cosine)
    groups = np.asarray(groups)
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    im = ax.imshow(cosine, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    edges = np.flatnonzero(np.diff(groups)) + 0.5
    for e in edges:
        ax.axhline(e, color="black", linewidth=0.8)
        ax.axvline(e, color="black", linewidth=0.8)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1])
    stops = np.concatenate([starts[1:], [len(groups)]])
    centres = (starts + stops - 1) / 2.0
    labels = [group_names[groups[s]] for s in starts]
    ax.set_xticks(centres, labels, fontsize=8, rotation=30, ha="right")
    ax.set_yticks(centres, labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    return figures.save_figure(fig, path)[0]


def save_filters_beside(path, columns, filters, channel_order: str = "RGB") -> dict:
    """A grid with one row per filter in ``filters``: the tiles of each array of ``columns``
    (O×Cin×kh×kw each: weights, gradients, ...) side by side, each tile min-max scaled on its own;
    the first tile of a row is labelled with the filter index. Returns the grid layout."""
    tiles = [figures.filters_rgb_stack(np.asarray(c), channel_order=channel_order) for c in columns]
    stack = np.stack([t[f] for f in filters for t in tiles])
    labels = [str(f) if j == 0 else "" for f in filters for j in range(len(tiles))]
    # small kernels (5×5, 11×11) need a large zoom to be seen; about 80–100 pixels per tile
    scale = int(max(2, min(16, 96 // max(stack.shape[1:3]))))
    return figures.grid_png(path, stack, ncols=len(tiles), normalization="channel", cmap="gray",
                            labels=labels, scale=scale)


# ------------------------------------------------------------------------------------ ordered volumes


def slice_image(stack, row: int, permutation=None, boundaries=(), lo=None, hi=None,
                scale: int = 1, separator: int = 0, cmap: str = "viridis") -> np.ndarray:
    """RGB uint8 picture of the C×W slice at ``row`` (one image row per channel, in
    ``permutation``'s order), with ``separator`` white pixel rows before each index in
    ``boundaries`` (cluster starts)."""
    stack = np.asarray(stack, dtype=np.float64)
    sl = stack[:, row, :]
    if permutation is not None:
        sl = sl[np.asarray(permutation)]
    lo = float(sl.min()) if lo is None else lo
    hi = float(sl.max()) if hi is None else hi
    norm = (sl - lo) / (hi - lo) if hi > lo else np.zeros_like(sl)
    rgb = figures.upscale(figures.colorize(np.clip(norm, 0, 1), cmap=cmap), scale)
    if separator > 0 and len(boundaries):
        parts, start = [], 0
        white = np.full((separator, rgb.shape[1], 3), 255, dtype=np.uint8)
        for b in boundaries:
            parts += [rgb[start * scale:b * scale], white]
            start = b
        parts.append(rgb[start * scale:])
        rgb = np.concatenate(parts, axis=0)
    return rgb


def _slice_scale(c: int, w: int) -> int:
    return max(1, min(8, 384 // max(c, w, 1)))


def _slice_row(stack, result, row):
    h = stack.shape[1]
    row = result.get("row", h // 2) if row is None else row
    if not isinstance(row, (int, np.integer)) or not 0 <= row < h:
        raise CnnvisError(f"row {row!r}: expected an integer in 0..{h - 1}")
    return int(row)


def save_slice_png(path, stack, result: dict, row: int | None = None, separator: int = 2):
    """PNG of the C×W slice at ``row`` (default: the result's row, else the middle) reordered by an
    ordering ``result`` (:func:`cnnvis.analysis.ordering.order_stack`)."""
    from ..analysis.ordering import check_stack

    stack = check_stack(stack)
    row = _slice_row(stack, result, row)
    scale = _slice_scale(stack.shape[0], stack.shape[2])
    rgb = slice_image(stack, row, result["permutation"], result.get("boundaries", ()),
                      scale=scale, separator=separator)
    figures.save_png(path, rgb)
    return path


def save_before_after(path, stack, result: dict, row: int | None = None, separator: int = 2):
    """PNG with the C×W slice at ``row`` before (left) and after (right) the ordering, on one
    colour scale, clusters separated by white rows; captions give the smoothness scores."""
    from PIL import Image, ImageDraw

    from ..analysis.ordering import check_stack

    stack = check_stack(stack)
    row = _slice_row(stack, result, row)
    sl = stack[:, row, :]
    lo, hi = float(sl.min()), float(sl.max())
    scale = _slice_scale(stack.shape[0], stack.shape[2])
    before = slice_image(stack, row, None, (), lo, hi, scale)
    after = slice_image(stack, row, result["permutation"], result.get("boundaries", ()), lo, hi,
                        scale, separator)
    caption, gap = 28, 12
    height = caption + max(before.shape[0], after.shape[0])
    width = before.shape[1] + gap + after.shape[1]
    canvas = np.full((height, max(width, 320), 3), 255, dtype=np.uint8)
    canvas[caption:caption + before.shape[0], :before.shape[1]] = before
    x0 = before.shape[1] + gap
    canvas[caption:caption + after.shape[0], x0:x0 + after.shape[1]] = after
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    draw.text((2, 2), f"row {row}: input order  {result['smoothness_unordered']:.4g}",
              fill=(0, 0, 0))
    draw.text((2, 14), f"{result['method']}: {result['smoothness']:.4g} "
              f"(ratio {result['ratio']:.3f})", fill=(0, 0, 0))
    figures.save_png(path, np.asarray(img))
    return path


# ------------------------------------------------------------------------------------ deconvnet


def side_by_side(left, right, ncols: int | None = None, pad: int = 1, gap: int = 3,
                 right_normalization: str = "global") -> np.ndarray:
    """One block per row of ``left``/``right`` (M×T×h×w[×3] tile sets): the T left tiles as a grid,
    a gap, the T right tiles as a grid. Left tiles (projections) are normalised each on its own,
    right tiles (image patches) together, so patches keep their relative brightness. Every block
    spans [0, 1] with NaN separators, so a grid of blocks (normalised per block) shows them as is.
    """
    left, right = np.asarray(left, dtype=np.float64), np.asarray(right, dtype=np.float64)
    blocks = []
    for lt, rt in zip(left, right):
        a = figures.tile_grid(lt, ncols=ncols, pad=pad, normalization="channel")
        b = figures.tile_grid(rt, ncols=ncols, pad=pad, normalization=right_normalization)
        spacer = np.full((a.shape[0], gap, *a.shape[2:]), np.nan)
        blocks.append(np.concatenate([a, spacer, b], axis=1))
    return np.stack(blocks)


def save_blocks(path, blocks, labels=None, ncols: int | None = None, cmap: str = "gray", scale=None) -> dict:
    """Write blocks from :func:`side_by_side` as one grid PNG (optionally labelled)."""
    return figures.grid_png(path, blocks, ncols=ncols, pad=4, normalization="channel", cmap=cmap,
                            labels=list(labels) if labels is not None else False, scale=scale)
