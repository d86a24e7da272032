"""cnnvis.export.plots: pictures of analysis results — exact pixels where they are defined by hand,
the same bytes on rerun, nothing written on bad input."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cnnvis.analysis import ordering
from cnnvis.analysis.occlusion import OcclusionMaps
from cnnvis.errors import CnnvisError
from cnnvis.export import plots


def _png(path) -> np.ndarray:
    with Image.open(path) as pic:
        return np.asarray(pic.convert("RGB"))


# ------------------------------------------------------------------------------------ pictures

def test_zoom_and_enlarge_reach_the_minimum_side():
    assert plots.zoom_for((28, 28)) == 8 and plots.zoom_for((227, 227)) == 1 and plots.zoom_for((10, 50), 100) == 2
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = plots.enlarge(rgb, min_side=9)
    assert big.shape == (6, 9, 3) and (big[::3, ::3] == rgb).all() and (big[1, 4] == rgb[0, 1]).all()
    np.testing.assert_array_equal(plots.picture(np.full((2, 2, 3), 0.5), min_side=2), np.full((2, 2, 3), 128))


def test_heat_picture_scales_the_finite_values_and_draws_missing_ones_black():
    values = np.array([[0.0, 2.0], [np.nan, 1.0]])
    out = plots.heat_picture(values, "gray", min_side=2)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [0, 128]])
    assert (out[1, 0] == 0).all()
    assert (plots.heat_picture(np.full((2, 2), np.nan), "gray", min_side=2) == 0).all()


def test_class_colours_are_fixed_by_class_order_and_paint_the_category_map():
    from matplotlib import colormaps

    colours = plots.class_colours([7, 3, 7])
    tab20 = colormaps["tab20"]
    assert list(colours) == [3, 7]
    assert colours[3] == tuple(int(round(255 * c)) for c in tab20(0)[:3])
    assert colours[7] == tuple(int(round(255 * c)) for c in tab20(1)[:3])
    pic = plots.category_picture(np.array([[3, 7], [7, 3]]), colours, min_side=2)
    assert tuple(pic[0, 0]) == colours[3] and tuple(pic[0, 1]) == colours[7]


def test_overlay_keeps_the_picture_where_there_is_no_heat():
    rgb = np.full((4, 4, 3), 0.25)
    heat = np.array([[0.0, 1.0, np.nan, 0.5]] * 4)
    out = plots.overlay_heatmap(rgb, heat, alpha=0.5, cmap="gray")
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert (out[:, 2] == 64).all()  # 0.25 * 255 rounded: untouched
    assert (out[:, 1] == np.rint(255 * (0.5 * 0.25 + 0.5 * 1.0))).all()
    assert (out[:, 0] == np.rint(255 * 0.125)).all()
    with pytest.raises(ValueError, match="differ in size"):
        plots.overlay_heatmap(rgb, heat[:3], alpha=0.5)


def test_gradient_picture_is_symmetric_about_grey_and_in_display_order():
    g = np.zeros((3, 2, 2))
    g[0, 0, 0], g[2, 1, 1] = 2.0, -1.0
    pic = plots.gradient_picture(g, "BGR")
    assert pic.shape == (2, 2, 3)
    assert pic[0, 0, 2] == 1.0 and pic[1, 1, 0] == 0.25 and pic[0, 1, 1] == 0.5  # BGR → RGB
    grey = plots.gradient_picture(np.array([[[1.0, -1.0]]]))
    assert grey.shape == (1, 2, 3) and (grey[0, 0] == 1.0).all() and (grey[0, 1] == 0.0).all()


# ------------------------------------------------------------------------------------ figures

def _occlusion_maps(activation: bool) -> OcclusionMaps:
    rng = np.random.default_rng(0)
    return OcclusionMaps(target=1, window=(3, 3), stride=(2, 2), ys=np.array([0, 2, 4]), xs=np.array([0, 2, 4]),
                         probability=rng.uniform(size=(3, 3)), top_class=np.array([[1, 1, 0], [1, 2, 2], [0, 0, 1]]),
                         top_probability=rng.uniform(size=(3, 3)), base_probability=0.9, base_top_class=1,
                         layer="conv1" if activation else None, channel=4 if activation else None,
                         activation=rng.uniform(size=(3, 3)) if activation else None, image_hw=(7, 7))


OBJECT = (slice(2, 5), slice(7, 10))  # rows 2..4, columns 7..9 of a 12×12 picture


def _object_model():
    """1×12×12 → relu(1×1 conv) → flatten → logits z0 = Σ of the object's pixels, z1 = 5: class 0
    wins while the object is visible (9) and loses when the grey window covers all of it (4.5)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cnnvis.model import Model
    from cnnvis.onnxgraph import make_model
    from cnnvis.preprocess import preset

    mask = np.zeros((12, 12), np.float32)
    mask[OBJECT] = 1.0
    inits = {"c.w": np.ones((1, 1, 1, 1)), "c.b": np.zeros(1), "fc.w": np.stack([mask.ravel(), np.zeros(144)]),
             "fc.b": np.array([0.0, 5.0])}
    nodes = [helper.make_node("Conv", ["data", "c.w", "c.b"], ["conv"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc"], name="fc", transB=1),
             helper.make_node("Softmax", ["fc"], ["prob"], name="prob", axis=1)]
    graph = helper.make_graph(nodes, "object", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 1, 12, 12])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    proto = make_model(graph)
    onnx.checker.check_model(proto)
    return Model(proto, name="object", sidecar={"preprocessing": preset("grey28", (1, 12, 12)).to_dict()})


def _sample_panel(png, box, hw):
    """The PNG's colour at the centre of each of the ``hw`` cells of an image panel at ``box``."""
    left, top, right, bottom = box
    h, w = hw
    ys = np.floor(top + (np.arange(h) + 0.5) * (bottom - top) / h).astype(int)
    xs = np.floor(left + (np.arange(w) + 0.5) * (right - left) / w).astype(int)
    return png[ys[:, None], xs[None, :]].astype(int)


def test_occlusion_figure_probability_panel_is_darkest_where_the_object_was_covered(tmp_path):
    from cnnvis.analysis.occlusion import Occlusion

    image = np.zeros((1, 12, 12), np.float32)
    image[0][OBJECT] = 1.0
    res = Occlusion(_object_model(), window=3, stride=1, layer="relu").run(image[None], target=0)[0]
    rgb = np.repeat(image[0][..., None], 3, axis=-1)
    boxes = plots.occlusion_figure(tmp_path / "f.png", res, rgb, plots.class_colours([0, 1]),
                                   lambda k: f"class {k}", "gray")
    assert list(boxes) == ["input", "activation", "probability", "classes"]
    png = _png(tmp_path / "f.png")
    # the input panel shows the picture: the object white, the rest black
    np.testing.assert_array_equal(_sample_panel(png, boxes["input"], (12, 12))[..., 0], 255 * image[0])
    prob = _sample_panel(png, boxes["probability"], (12, 12))
    assert (prob[..., 0] == prob[..., 1]).all() and (prob[..., 1] == prob[..., 2]).all()  # grey colour map
    grey = prob[..., 0]
    darkest = np.argwhere(grey == grey.min())
    assert ((darkest[:, 0] >= 2) & (darkest[:, 0] <= 4) & (darkest[:, 1] >= 7) & (darkest[:, 1] <= 9)).all()
    assert grey[3, 8] == grey.min() and grey.max() == 255 and grey[10, 1] == 255  # far from the object: untouched
    # every cell: the mean probability of the windows covering it, min-max scaled (own loop)
    total, count = np.zeros((12, 12)), np.zeros((12, 12))
    for i, y in enumerate(res.ys):
        for j, x in enumerate(res.xs):
            total[y:y + 3, x:x + 3] += res.probability[i, j]
            count[y:y + 3, x:x + 3] += 1
    mean = total / count
    np.testing.assert_allclose(grey, 255 * (mean - mean.min()) / (mean.max() - mean.min()), atol=1.5)
    # most probable class: class 1 (second colour) exactly where every covering window lost class 0
    classes = _sample_panel(png, boxes["classes"], (12, 12))
    colours = plots.class_colours([0, 1])
    is_one = (np.abs(classes - np.asarray(colours[1])) <= 1).all(axis=-1)
    assert is_one[3, 8] and not is_one[10, 1]
    np.testing.assert_array_equal(is_one, res.nearest_window_classes() == 1)


@pytest.mark.parametrize("activation", [True, False])
def test_occlusion_figure_is_the_same_file_on_rerun(tmp_path, activation):
    res = _occlusion_maps(activation)
    rgb = np.random.default_rng(1).uniform(size=(7, 7, 3))
    colours = plots.class_colours(np.unique(res.top_class).tolist())
    for name in ("a.png", "b.png"):
        plots.occlusion_figure(tmp_path / name, res, rgb, colours, lambda k: f"class {k}", "jet")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # one panel per map: input, [activation,] probability, most probable class — wider with activation
    assert _png(tmp_path / "a.png").shape[1] == int(100 * 3.3 * (4 if activation else 3))


def test_invariance_figure_has_a_row_per_transform_and_is_the_same_file_on_rerun(tmp_path):
    sweeps = {"translation": np.array([-2.0, 0.0, 2.0]), "rotation": np.array([0.0, 90.0])}
    res = SimpleNamespace(amounts=sweeps,
                          distance={k: {"conv1": np.linspace(0, 1, len(v)), "fc7": np.linspace(0, 2, len(v))}
                                    for k, v in sweeps.items()},
                          probability={k: np.linspace(1, 0.5, len(v)) for k, v in sweeps.items()})
    for name in ("a.png", "b.png"):
        plots.invariance_figure(tmp_path / name, [("cat.png", res)], sweeps, ["conv1", "fc7"])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert _png(tmp_path / "a.png").shape[:2] == (int(100 * 2.6 * 2), int(100 * 3.2 * 3))


def test_invariance_figure_plots_each_curve_in_its_panel(tmp_path):
    """Two images (matplotlib's first two colours): every measured point is drawn at its
    (amount, value) in the panel of its transform and layer; the probability axis is 0..1."""
    sweeps = {"translation": np.array([-4.0, -2.0, 0.0, 2.0, 4.0]), "rotation": np.array([0.0, 45.0, 90.0])}
    rng = np.random.default_rng(3)
    results = [SimpleNamespace(amounts=sweeps,
                               distance={k: {"conv1": rng.uniform(size=len(v)), "fc7": rng.uniform(size=len(v))}
                                         for k, v in sweeps.items()},
                               probability={k: rng.uniform(size=len(v)) for k, v in sweeps.items()})
               for _ in range(2)]
    drawn = plots.invariance_figure(tmp_path / "inv.png", [("a", results[0]), ("b", results[1])], sweeps,
                                    ["conv1", "fc7"])
    png = _png(tmp_path / "inv.png").astype(int)
    colours = [(31, 119, 180), (255, 127, 14)]
    for (kind, col), (left, top, right, bottom) in drawn["boxes"].items():
        xmin, xmax, ymin, ymax = drawn["limits"][(kind, col)]
        if col == "probability":
            assert (ymin, ymax) == (-0.02, 1.02)
        for res, colour in zip(results, colours):
            values = res.probability[kind] if col == "probability" else res.distance[kind][col]
            for amount, value in zip(sweeps[kind], values):
                x = left + (amount - xmin) / (xmax - xmin) * (right - left)
                y = top + (ymax - value) / (ymax - ymin) * (bottom - top)
                near = png[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3]
                assert (np.abs(near - colour) <= 40).all(axis=-1).any(), (kind, col, amount)


def _bars(png):
    """``[(height in pixels, colour name)]`` of the tab:blue / tab:orange bars of a bar chart, left
    to right (a bar: a run of columns holding bar colour; its height: the coloured pixels of its
    middle column)."""
    rgb = png.astype(int)
    colours = {"blue": (31, 119, 180), "orange": (255, 127, 14)}
    masks = {k: (np.abs(rgb - c) <= 2).all(axis=-1) for k, c in colours.items()}
    any_bar = masks["blue"] | masks["orange"]
    cols = np.flatnonzero(any_bar.sum(axis=0) >= 2)
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    bars = []
    for run in runs:
        mid = run[len(run) // 2]
        name = max(masks, key=lambda k: masks[k][:, mid].sum())
        bars.append((int(masks[name][:, mid].sum()), name))
    return bars


@pytest.mark.parametrize("sort", [True, False])
def test_importance_chart_draws_the_bars_in_the_order_it_returns(tmp_path, sort):
    imp = np.array([3.0, 9.0, 1.0, 6.0, 4.5, 8.0, 2.0, 7.0])  # distinct, every bar visible
    order = plots.plot_importance(tmp_path / "bars.png", imp, "t", sort=sort, highlight=[1, 2])
    assert order == ([1, 5, 7, 3, 4, 0, 6, 2] if sort else list(range(8)))
    bars = _bars(_png(tmp_path / "bars.png"))
    assert len(bars) == 8
    heights = np.array([h for h, _ in bars], dtype=float)
    # heights in pixels are the importance values on one scale (the bars stand on y = 0)
    np.testing.assert_allclose(heights / heights.max(), imp[order] / imp.max(), atol=2.0 / heights.max())
    assert [c for _, c in bars] == ["orange" if f in (1, 2) else "blue" for f in order]
    if sort:
        assert (np.diff(heights) < 0).all()  # largest first


def test_cosine_matrix_cells_are_their_values_in_rdbu(tmp_path):
    from matplotlib import colormaps

    c = np.array([[1.0, 0.5, -0.5], [0.5, 1.0, 0.0], [-0.5, 0.0, 1.0]])
    box = plots.plot_cosine_matrix(tmp_path / "c.png", c, [0, 0, 1], ["r", "s"])
    cells = _sample_panel(_png(tmp_path / "c.png"), box, (3, 3))
    expected = np.rint(colormaps["RdBu_r"]((c + 1) / 2)[..., :3] * 255)
    # the group border (between images 1 and 2) is drawn over the cells' edges, not their centres
    np.testing.assert_allclose(cells, expected, atol=2)


def test_class_gradient_plots_are_deterministic(tmp_path):
    imp = np.abs(np.random.default_rng(0).standard_normal(20))
    order = plots.plot_importance(tmp_path / "a.png", imp, "t", sort=True, highlight=[1, 2])
    plots.plot_importance(tmp_path / "b.png", imp, "t", sort=True, highlight=[1, 2])
    assert order == list(np.argsort(-imp, kind="stable"))
    assert plots.plot_importance(tmp_path / "e.png", imp) == list(range(20))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert b"Software" not in (tmp_path / "a.png").read_bytes()
    c = np.corrcoef(np.random.default_rng(1).standard_normal((6, 10)))
    plots.plot_cosine_matrix(tmp_path / "c.png", c, [0, 0, 1, 1, 1, 2], ["r", "s", "d"])
    plots.plot_cosine_matrix(tmp_path / "d.png", c, [0, 0, 1, 1, 1, 2], ["r", "s", "d"])
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "d.png").read_bytes()


def test_filters_beside_puts_one_filter_per_row(tmp_path):
    w = np.random.default_rng(0).normal(size=(5, 3, 4, 4))
    layout = plots.save_filters_beside(tmp_path / "f.png", [w, 2 * w, -w], [4, 0])
    assert layout["rows"] == 2 and layout["cols"] == 3 and layout["scale"] == 16
    pic = _png(tmp_path / "f.png")
    assert pic.shape == (2 * 4 * 16 + 16, 3 * 4 * 16 + 2 * 16, 3)
    # columns 0 and 1 differ by a positive factor: each tile min-max scaled, so the same pixels
    # (the label in the first tile's corner aside)
    np.testing.assert_array_equal(pic[40:64, 40:64], pic[40:64, 80 + 40:80 + 64])


# ------------------------------------------------------------------------------------ ordered volumes

@pytest.fixture(scope="module")
def ordered(templates):
    stack, _ = templates
    return stack, ordering.order_stack(stack, "kmeans-rows", n_clusters=3, row=3)


def test_slice_image_is_the_colormap_of_the_reordered_slice_with_separators(ordered):
    from matplotlib import colormaps

    stack, r = ordered
    img = plots.slice_image(stack, 3, r["permutation"], r["boundaries"], scale=2, separator=3)
    assert img.shape == (24 * 2 + 2 * 3, 8 * 2, 3) and img.dtype == np.uint8
    assert list(r["boundaries"]) == [8, 16]
    assert np.all(img[16:19] == 255) and np.all(img[35:38] == 255)  # white separator rows
    sl = stack[np.asarray(r["permutation"]), 3, :]
    expected = np.rint(colormaps["viridis"]((sl - sl.min()) / (sl.max() - sl.min()))[..., :3] * 255)
    np.testing.assert_array_equal(img[:16:2, ::2], expected[:8])
    np.testing.assert_array_equal(img[19:35:2, ::2], expected[8:16])


def test_slice_pictures_write_files_and_reject_a_bad_row(tmp_path, ordered, templates):
    from matplotlib import colormaps

    stack, r = ordered
    ids = templates[1]
    plots.save_slice_png(tmp_path / "slice.png", stack, r)
    plots.save_before_after(tmp_path / "before_after.png", stack, r)
    arr = _png(tmp_path / "before_after.png").astype(int)
    sl = stack[:, 3, :]  # the row the ordering used, 24 channels × 8 columns, one colour scale
    colours = np.rint(colormaps["viridis"]((sl - sl.min()) / (sl.max() - sl.min()))[..., :3] * 255)
    scale, caption, width = 8, 28, 8 * 8  # 384 // 24 pixels per value (at most 8), a 28-pixel caption
    before = arr[caption:caption + 24 * scale, :width]
    np.testing.assert_array_equal(before[::scale, ::scale], colours)  # input order, channel z in row z
    after = arr[caption:, width + 12:width + 12 + width]
    rows = [z for z in range(after.shape[0]) if not (after[z] == 255).all()]  # all but the white separators
    assert len(rows) == 24 * scale
    drawn = rows[::scale]
    # which channel each drawn row shows (matched by its colours), and the planted templates of each cluster
    shown = [int(np.flatnonzero((colours == after[z, ::scale]).all(axis=(1, 2)))[0]) for z in drawn]
    assert shown == [int(p) for p in r["permutation"]]
    gaps = np.split(np.array(drawn), np.flatnonzero(np.diff(drawn) > scale) + 1)
    assert [len(g) for g in gaps] == [8, 8, 8]  # three clusters between the white separator rows
    clusters = np.split(ids[np.array(shown)], [8, 16])
    assert all(len(set(c.tolist())) == 1 for c in clusters)  # each cluster: one template
    with pytest.raises(CnnvisError, match="row 8"):
        plots.save_before_after(tmp_path / "bad.png", stack, r, row=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before_after.png", "slice.png"]


# ------------------------------------------------------------------------------------ deconvnet

def test_blocks_keep_values_through_the_outer_grid(tmp_path):
    left = np.random.default_rng(0).normal(size=(2, 4, 3, 3))
    right = np.random.default_rng(1).uniform(0.2, 0.8, size=(2, 4, 3, 3))
    blocks = plots.side_by_side(left, right, ncols=2, pad=1, gap=2)
    assert blocks.shape == (2, 7, 7 + 2 + 7)
    assert np.nanmin(blocks[0]) == 0 and np.nanmax(blocks[0]) == 1
    # right half: the patches scaled together (global min-max over the block's patches)
    lo, hi = right[0].min(), right[0].max()
    np.testing.assert_allclose(blocks[0][:3, 9:12], (right[0, 0] - lo) / (hi - lo))
    layout = plots.save_blocks(tmp_path / "blocks.png", blocks, labels=["a", "b"], ncols=1, scale=2)
    assert layout["rows"] == 2 and layout["cols"] == 1
    pic = _png(tmp_path / "blocks.png").astype(int)
    assert pic.shape == ((2 * 7 + 4) * 2, 16 * 2, 3)
    # block b sits 7 + 4 rows below block b - 1; each value drawn as its grey level, the
    # separators (NaN) white; the label's corner (text of the default font) aside
    for b in range(2):
        shown = pic[b * 11 * 2:(b * 11 + 7) * 2:2, ::2, 0]
        expected = np.where(np.isnan(blocks[b]), 255, np.rint(255 * np.nan_to_num(blocks[b])))
        keep = np.ones(expected.shape, bool)
        keep[:6, :5] = False
        np.testing.assert_array_equal(shown[keep], expected[keep])


def test_analyses_compute_and_only_export_draws():
    """The one-way flow: no module of cnnvis.analysis imports cnnvis.export (or matplotlib/Pillow)."""
    import ast
    from pathlib import Path

    import cnnvis.analysis

    found = []
    for path in sorted(Path(cnnvis.analysis.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names
                      if n.startswith(("..export", "cnnvis.export", "matplotlib", "PIL"))]
    assert found == []
