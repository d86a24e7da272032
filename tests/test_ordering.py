"""Orderings on stacks whose right answer is known."""
import itertools

import numpy as np
import pytest

from cnnvis.analysis import ordering as O
from cnnvis.errors import CnnvisError


@pytest.fixture(scope="module")
def continuum():
    """30 maps along a 1-D continuum (A → B) in shuffled order; returns (stack, position t)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 9, 7))
    t = rng.permutation(np.linspace(0.0, 1.0, 30))
    stack = (1 - t)[:, None, None] * a + t[:, None, None] * b
    return stack + 1e-3 * rng.normal(size=stack.shape), t


def _runs(values):
    return 1 + int(np.count_nonzero(np.diff(values)))


def _monotonic(values):
    d = np.diff(values)
    return bool(np.all(d > 0) or np.all(d < 0))


def test_smoothness_hand_computed():
    stack = np.array([[[0.0, 0.0]], [[3.0, 4.0]], [[6.0, 8.0]]])  # 3×1×2
    assert O.smoothness(stack) == 10.0                 # 5 + 5
    assert O.smoothness(stack, [0, 2, 1]) == 15.0      # 10 + 5
    result = O.order_stack(stack[[0, 2, 1]], "pca-maps")
    assert result["smoothness_unordered"] == 15.0
    assert result["smoothness"] == 10.0
    assert result["ratio"] == pytest.approx(10.0 / 15.0, abs=1e-15)
    assert result["permutation"] == [0, 2, 1]


def test_first_component_matches_reference_and_fixes_sign(continuum):
    from sklearn.decomposition import PCA

    stack, _ = continuum
    x = stack.reshape(len(stack), -1)
    loading, proj, evr = O.first_component(x)
    ref = PCA(n_components=1, svd_solver="full").fit(x)
    sign = np.sign(loading @ ref.components_[0])
    np.testing.assert_allclose(loading, sign * ref.components_[0], atol=1e-10)
    np.testing.assert_allclose(proj, sign * ref.transform(x)[:, 0], atol=1e-9)
    assert evr == pytest.approx(ref.explained_variance_ratio_[0], abs=1e-12)
    assert loading[np.argmax(np.abs(loading))] > 0
    # The sign does not depend on the sign of the data's variation.
    flipped, _, _ = O.first_component(-x)
    np.testing.assert_allclose(flipped, loading, atol=1e-10)


@pytest.mark.parametrize("method, params", [
    ("kmeans-maps", {"n_clusters": 3}),
    ("kmeans-rows", {"n_clusters": 3, "row": 3}),
])
def test_kmeans_groups_noisy_copies_of_templates(templates, method, params):
    stack, ids = templates
    est = O.make_ordering(method, **params).fit(stack)
    r = est.result_
    order = ids[est.permutation_]
    assert _runs(order) == 3                           # each template's copies contiguous
    assert r["cluster_sizes"] == [8, 8, 8] and r["boundaries"] == [8, 16]
    assert r["labels"] == [0] * 8 + [1] * 8 + [2] * 8
    np.testing.assert_array_equal(est.labels_[est.permutation_], r["labels"])
    assert r["ratio"] < 0.5
    # Inside a cluster: increasing distance to the cluster mean (k-means centre at convergence).
    feats = stack[:, 3, :] if method == "kmeans-rows" else stack.reshape(24, -1)
    centres = []
    for k in range(3):
        members = est.permutation_[8 * k:8 * (k + 1)]
        centre = feats[members].mean(axis=0)
        centres.append(centre)
        dist = np.linalg.norm(feats[members] - centre, axis=1)
        assert np.all(np.diff(dist) >= -1e-9)
    # Between clusters: increasing PC1 projection of the centres (PC1 sign fixed).
    loading, _, _ = O.first_component(feats)
    proj = (np.array(centres) - feats.mean(axis=0)) @ loading
    assert np.all(np.diff(proj) > 0)


@pytest.mark.parametrize("method, params", [
    ("pca-maps", {}), ("pca-rows", {"row": 2}), ("smooth", {}),
])
def test_continuum_is_recovered_up_to_reversal(continuum, method, params):
    stack, t = continuum
    r = O.order_stack(stack, method, **params)
    assert _monotonic(t[r["permutation"]])
    assert r["ratio"] < 0.2
    if method != "smooth":
        assert np.all(np.diff(r["projection"]) >= 0)


def test_smooth_never_scores_worse_than_pca_maps(templates, continuum):
    rng = np.random.default_rng(5)
    stacks = [templates[0], continuum[0]] + [rng.normal(size=(20, 6, 6)) for _ in range(4)]
    stacks.append(np.cumsum(rng.normal(size=(25, 5, 5)), axis=0)[rng.permutation(25)])
    for stack in stacks:
        smooth = O.order_stack(stack, "smooth")
        pca = O.order_stack(stack, "pca-maps")
        assert smooth["smoothness"] <= pca["smoothness"] + 1e-9
        assert smooth["ratio"] <= 1.0 + 1e-12 or smooth["smoothness_unordered"] == 0


def test_smooth_on_a_tiny_stack_is_optimal():
    # 7 slices: compare with the best of all 5040 orders (brute force).
    rng = np.random.default_rng(7)
    stack = rng.normal(size=(7, 3, 3))
    best = min(O.smoothness(stack, p) for p in itertools.permutations(range(7)))
    r = O.order_stack(stack, "smooth")
    assert r["smoothness"] == pytest.approx(best, rel=1e-12)


def test_exact_shortest_path_matches_brute_force():
    rng = np.random.default_rng(11)
    pts = rng.normal(size=(8, 5))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    best = min(d[list(p[:-1]), list(p[1:])].sum() for p in itertools.permutations(range(8)))
    path = O.shortest_path_exact(d)
    assert sorted(path.tolist()) == list(range(8))
    assert d[path[:-1], path[1:]].sum() == pytest.approx(best, rel=1e-12)


def test_or_opt_never_lengthens_and_returns_a_permutation():
    rng = np.random.default_rng(4)
    pts = rng.normal(size=(50, 3))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    start = O.two_opt(d, rng.permutation(50))
    moved = O.or_opt(d, start)
    assert sorted(moved.tolist()) == list(range(50))
    assert d[moved[:-1], moved[1:]].sum() <= d[start[:-1], start[1:]].sum() + 1e-12


def test_two_opt_never_lengthens_and_returns_a_permutation():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(40, 4))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    start = rng.permutation(40)
    better = O.two_opt(d, start)
    assert sorted(better.tolist()) == list(range(40))
    assert d[better[:-1], better[1:]].sum() <= d[start[:-1], start[1:]].sum()
    line = np.arange(12, dtype=float)[rng.permutation(12)][:, None]
    dl = np.abs(line - line.T)
    fixed = O.two_opt(dl, np.arange(12))
    assert _monotonic(line[fixed, 0])


def test_results_are_deterministic_and_transform_reorders(templates):
    stack, _ = templates
    for method, params in [("kmeans-maps", {"n_clusters": 4}), ("smooth", {}),
                           ("kmeans-rows", {"n_clusters": 2, "row": 0}), ("pca-rows", {"row": 7})]:
        first = O.order_stack(stack, method, **params)
        second = O.order_stack(stack.copy(), method, **params)
        assert first == second
        est = O.make_ordering(method, **params)
        np.testing.assert_array_equal(est.fit_transform(stack), stack[first["permutation"]])
        assert {"method", "permutation", "smoothness", "smoothness_unordered", "ratio",
                "params", "shape"} <= set(first)
        assert first["smoothness_unordered"] == pytest.approx(O.smoothness(stack), rel=1e-12)
        assert first["smoothness"] == pytest.approx(O.smoothness(stack, first["permutation"]),
                                                    rel=1e-12)


def test_row_methods_report_row_smoothness(templates):
    stack, _ = templates
    r = O.order_stack(stack, "pca-rows", row=4)
    assert r["row"] == 4 and r["params"] == {"row": 4}
    assert r["smoothness_row"] == pytest.approx(O.path_length(stack[:, 4, :], r["permutation"]))
    assert r["ratio_row"] == pytest.approx(r["smoothness_row"] / r["smoothness_row_unordered"])


def test_ties_keep_input_order():
    stack = np.zeros((5, 2, 2))  # all maps equal: nothing to order
    for method, params in [("pca-maps", {}), ("pca-rows", {"row": 1}), ("smooth", {}),
                           ("kmeans-maps", {"n_clusters": 2})]:
        r = O.order_stack(stack, method, **params)
        assert r["permutation"] == [0, 1, 2, 3, 4]
        assert r["smoothness"] == 0.0 and r["ratio"] == 1.0


@pytest.mark.parametrize("stack, method, params, message", [
    (np.zeros((4, 4)), "pca-maps", {}, "expected a C×H×W stack"),
    (np.full((3, 2, 2), np.nan), "smooth", {}, "NaN or inf"),
    (np.array([[[1.0, np.inf]]] * 3), "pca-maps", {}, "NaN or inf"),
    (np.zeros((4, 3, 3)), "kmeans-maps", {"n_clusters": 5}, r"n_clusters 5: expected an integer in 1..4"),
    (np.zeros((4, 3, 3)), "kmeans-rows", {"n_clusters": 0, "row": 0}, "n_clusters 0"),
    (np.zeros((4, 3, 3)), "pca-rows", {"row": 3}, r"row 3: expected an integer in 0..2"),
    (np.zeros((4, 3, 3)), "kmeans-rows", {"row": -1, "n_clusters": 2}, "row -1"),
    (np.zeros((4, 3, 3)), "pca-rows", {"row": 1.5}, "row 1.5"),
])
def test_bad_input_raises_one_clear_error(stack, method, params, message):
    with pytest.raises(CnnvisError, match=message) as err:
        O.order_stack(stack, method, **params)
    assert "\n" not in str(err.value)


def test_unknown_method_and_parameter():
    with pytest.raises(CnnvisError, match="unknown ordering method 'kmeans'.*closest: kmeans-"):
        O.make_ordering("kmeans")
    with pytest.raises(CnnvisError, match=r"unknown parameter\(s\) k \(accepted: n_clusters"):
        O.make_ordering("kmeans-maps", k=3)
    with pytest.raises(CnnvisError, match="call fit"):
        O.make_ordering("pca-maps").transform(np.zeros((2, 2, 2)))


