"""Orderings of the slices of a C×H×W stack, so that similar feature maps sit next to each other.

Every ordering is a small scikit-learn-like estimator with the same call shape::

    est = make_ordering("pca-maps").fit(stack)      # stack: C×H×W, finite
    est.permutation_                                 # slice z of the result is slice permutation_[z]
    est.transform(stack)                             # == stack[est.permutation_]
    est.result_                                      # the dict saved as order.json

or in one call ``order_stack(stack, "kmeans-maps", n_clusters=4)``. Methods:

* ``kmeans-rows``: row ``row`` of every map (a C×W matrix) clustered by k-means; channels grouped
  by cluster (see ``kmeans-maps`` for the order inside and between clusters);
* ``pca-rows``: the same C×W rows ordered by their projection on the first principal component;
* ``pca-maps``: whole maps (C × H·W) ordered by their projection on the first principal component;
* ``kmeans-maps``: whole maps clustered by k-means; clusters contiguous, in increasing order of
  their centroid's projection on the maps' PC1, and inside a cluster by increasing distance to the
  centroid;
* ``smooth``: a short path through the maps. Candidates: the input order, the PC1 order and the
  leaf order of average-linkage clustering with optimal leaf ordering, each improved by 2-opt
  (segment reversal) and or-opt (moving runs of 1–3 slices); for at most :data:`EXACT_MAX` slices
  also the exact shortest path. The shortest candidate wins (the earlier one on equal scores), so
  ``smooth`` never scores worse than ``pca-maps``.

Scores: ``smoothness`` is the sum of Euclidean distances between neighbouring slices (whole maps)
in the new order, ``smoothness_unordered`` the same for the input order and ``ratio`` their quotient
(lower is smoother). Row methods also report ``smoothness_row``/``ratio_row`` of the C×W slice.

Determinism: PC1's sign makes its largest-magnitude loading positive (the first one on ties);
k-means uses a fixed seed and ``n_init``; every sort is stable, so ties keep the input order;
``smooth`` paths are oriented so that the first slice's PC1 projection is not above the last's.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import CnnvisError

METHODS = ("kmeans-rows", "pca-rows", "pca-maps", "kmeans-maps", "smooth")


# --------------------------------------------------------------------------------------------
# helpers


def check_stack(stack, name: str = "stack") -> np.ndarray:
    """A finite real C×H×W array as float64 (one-line error otherwise)."""
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise CnnvisError(f"{name}: expected a C×H×W stack (3-D), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise CnnvisError(f"{name}: empty stack of shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise CnnvisError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise CnnvisError(f"{name}: {bad} NaN or inf values; expected finite values")
    return arr


def path_length(features, permutation=None) -> float:
    """Sum of Euclidean distances between neighbouring rows of ``features`` (C×D) in the order
    ``permutation`` (default: as given)."""
    f = np.asarray(features, dtype=np.float64)
    f = f.reshape(f.shape[0], -1)
    if permutation is not None:
        f = f[np.asarray(permutation)]
    if f.shape[0] < 2:
        return 0.0
    return float(np.sqrt(((f[1:] - f[:-1]) ** 2).sum(axis=1)).sum())


def smoothness(stack, permutation=None) -> float:
    """Sum of Euclidean distances between adjacent slices of a C×H×W stack (in ``permutation``'s
    order)."""
    return path_length(np.asarray(stack).reshape(np.shape(stack)[0], -1), permutation)


def first_component(features):
    """First principal component of the rows of ``features`` (C×D), computed in float64.

    Returns ``(loading, projection, explained_variance_ratio)``; the loading's sign makes its
    largest-magnitude entry positive (the first such entry on ties). A constant input has no
    direction: the loading is zero and every projection 0.
    """
    x = np.asarray(features, dtype=np.float64).reshape(np.shape(features)[0], -1)
    centred = x - x.mean(axis=0, keepdims=True)
    if x.shape[0] < 2 or not np.any(centred):
        return np.zeros(x.shape[1]), np.zeros(x.shape[0]), 0.0
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    loading = vt[0]
    if loading[int(np.argmax(np.abs(loading)))] < 0:
        loading = -loading
    total = float((sing ** 2).sum())
    return loading, centred @ loading, float(sing[0] ** 2 / total) if total > 0 else 0.0


def _kmeans(features, n_clusters: int, seed: int, n_init: int):
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        # Fewer distinct points than clusters is legal here: the empty clusters are dropped.
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(features)
    return km.labels_.astype(np.int64), km.cluster_centers_


def _cluster_order(features, labels, centres):
    """Permutation grouping rows by cluster; clusters by their centre's PC1 projection, rows in a
    cluster by distance to the centre. Returns ``(permutation, new_labels_in_order, sizes)``."""
    used = np.unique(labels)
    loading, _, _ = first_component(features)
    mean = features.mean(axis=0)
    centre_proj = (centres[used] - mean) @ loading
    cluster_rank = used[np.argsort(centre_proj, kind="stable")]
    dist = np.sqrt(((features - centres[labels]) ** 2).sum(axis=1))
    perm, new_labels, sizes = [], [], []
    for new_id, cl in enumerate(cluster_rank):
        members = np.flatnonzero(labels == cl)
        members = members[np.argsort(dist[members], kind="stable")]
        perm.extend(members.tolist())
        new_labels.extend([new_id] * len(members))
        sizes.append(len(members))
    return np.asarray(perm, dtype=np.int64), np.asarray(new_labels, dtype=np.int64), sizes


def _pairwise(features) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(features, features, metric="euclidean")


def two_opt(distances, order, max_sweeps: int | None = None):
    """Improve an open path by reversing segments (2-opt) until no reversal shortens it.

    ``distances`` is a C×C matrix; returns the improved order (a new array). Each step applies the
    best reversal (ties: the first in row-major (i, j) order), so the result is deterministic.
    """
    d = np.asarray(distances, dtype=np.float64)
    p = np.array(order, dtype=np.int64)
    n = p.size
    if n < 3:
        return p
    # A virtual end point at index n with distance 0 to everyone turns the open path's missing
    # end edges into zero-cost edges, so one formula covers every segment.
    ext = np.zeros((n + 1, n + 1))
    ext[:n, :n] = d
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    tol = 1e-12 * max(1.0, float(d.max()))
    for _ in range(max_sweeps or 50 * n):
        prev = np.concatenate(([n], p[:-1]))
        nxt = np.concatenate((p[1:], [n]))
        gain = (ext[prev[:, None], p[None, :]] + ext[p[:, None], nxt[None, :]]
                - ext[prev, p][:, None] - ext[p, nxt][None, :])
        gain = np.where(upper, gain, np.inf)
        flat = int(np.argmin(gain))
        if gain.flat[flat] >= -tol:
            break
        i, j = divmod(flat, n)
        p[i:j + 1] = p[i:j + 1][::-1].copy()
    return p


def or_opt(distances, order, max_segment: int = 3, max_sweeps: int | None = None):
    """Improve an open path by moving segments of 1..``max_segment`` slices (forwards or reversed)
    to the best other place, scanning positions in order, until a sweep finds no gain."""
    d = np.asarray(distances, dtype=np.float64)
    p = [int(v) for v in order]
    n = len(p)
    if n < 3:
        return np.asarray(p, dtype=np.int64)
    virtual = n  # zero-distance end point, as in two_opt
    ext = np.zeros((n + 1, n + 1))
    ext[:n, :n] = d
    tol = 1e-12 * max(1.0, float(d.max()))
    for _ in range(max_sweeps or 10 * n):
        improved = False
        for length in range(1, min(max_segment, n - 1) + 1):
            i = 0
            while i + length <= n:
                seg = p[i:i + length]
                prev = p[i - 1] if i > 0 else virtual
                nxt = p[i + length] if i + length < n else virtual
                rest = p[:i] + p[i + length:]
                removed = ext[prev, seg[0]] + ext[seg[-1], nxt] - ext[prev, nxt]
                a = np.array([virtual] + rest)
                b = np.array(rest + [virtual])
                base = ext[a, b]
                forward = ext[a, seg[0]] + ext[seg[-1], b] - base
                backward = ext[a, seg[-1]] + ext[seg[0], b] - base
                k_f, k_b = int(np.argmin(forward)), int(np.argmin(backward))
                if backward[k_b] < forward[k_f] - tol:
                    k, cost, seg = k_b, backward[k_b], seg[::-1]
                else:
                    k, cost = k_f, forward[k_f]
                if removed - cost > tol:
                    p = rest[:k] + seg + rest[k:]
                    improved = True
                i += 1
        if not improved:
            break
    return np.asarray(p, dtype=np.int64)


def local_search(distances, order):
    """2-opt and or-opt in turn until neither shortens the path."""
    d = np.asarray(distances, dtype=np.float64)
    p = np.asarray(order, dtype=np.int64)
    length = d[p[:-1], p[1:]].sum()
    while True:
        p = or_opt(d, two_opt(d, p))
        new = d[p[:-1], p[1:]].sum()
        if new >= length - 1e-12 * max(1.0, length):
            return p
        length = new


#: Up to this many slices, ``smooth`` finds the shortest path exactly (Held–Karp, 2^C·C² steps).
EXACT_MAX = 12


def shortest_path_exact(distances) -> np.ndarray:
    """The shortest open path through every node (dynamic programming over subsets).

    Ties go to the lowest end node and the lowest predecessor, so the answer is deterministic.
    """
    d = np.asarray(distances, dtype=np.float64)
    n = d.shape[0]
    if n > 20:
        raise ValueError(f"exact shortest path of {n} nodes is too expensive")
    if n < 2:
        return np.arange(n, dtype=np.int64)
    full = (1 << n) - 1
    cost = np.full((1 << n, n), np.inf)
    parent = np.full((1 << n, n), -1, dtype=np.int64)
    for j in range(n):
        cost[1 << j, j] = 0.0
    bits = 1 << np.arange(n)
    for mask in range(1, full):
        row = cost[mask]
        if not np.isfinite(row).any():
            continue
        via = row[:, None] + d           # via[j, k]: path ending at j, extended to k
        best_j = np.argmin(via, axis=0)  # first j on ties
        best = via[best_j, np.arange(n)]
        for k in np.flatnonzero((mask & bits) == 0):
            nm = mask | (1 << k)
            if best[k] < cost[nm, k]:
                cost[nm, k] = best[k]
                parent[nm, k] = best_j[k]
    end = int(np.argmin(cost[full]))
    path, mask = [end], full
    while parent[mask, path[-1]] >= 0:
        j = int(parent[mask, path[-1]])
        mask &= ~(1 << path[-1])
        path.append(j)
    return np.asarray(path[::-1], dtype=np.int64)


def _leaf_order(features, distances) -> np.ndarray:
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    if features.shape[0] < 3:
        return np.arange(features.shape[0])
    condensed = squareform(distances, checks=False)
    tree = optimal_leaf_ordering(linkage(condensed, method="average"), condensed)
    return leaves_list(tree).astype(np.int64)


# --------------------------------------------------------------------------------------------
# estimators


class _Ordering:
    """Shared fit/transform/result logic. Subclasses implement ``_order(stack) -> permutation``."""

    method = ""
    uses_rows = False

    def get_params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    def _features(self, stack):
        if self.uses_rows:
            return stack[:, self.row, :]
        return stack.reshape(stack.shape[0], -1)

    def _check(self, stack):
        stack = check_stack(stack)
        if self.uses_rows:
            h = stack.shape[1]
            if not isinstance(self.row, (int, np.integer)) or isinstance(self.row, bool) \
                    or not 0 <= self.row < h:
                raise CnnvisError(f"row {self.row!r}: expected an integer in 0..{h - 1} "
                                  f"(the maps have {h} rows)")
        k = getattr(self, "n_clusters", None)
        if k is not None:
            c = stack.shape[0]
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= c:
                raise CnnvisError(f"n_clusters {k!r}: expected an integer in 1..{c} "
                                  f"(the stack has {c} channels)")
        return stack

    def fit(self, stack, y=None):
        stack = self._check(stack)
        self.extra_ = {}
        perm = np.asarray(self._order(stack), dtype=np.int64)
        c = stack.shape[0]
        assert np.array_equal(np.sort(perm), np.arange(c)), "ordering must be a permutation"
        self.permutation_ = perm
        self.smoothness_ = smoothness(stack, perm)
        self.smoothness_unordered_ = smoothness(stack)
        self.ratio_ = _ratio(self.smoothness_, self.smoothness_unordered_)
        result = {
            "method": self.method,
            "params": self.get_params(),
            "shape": list(stack.shape),
            "permutation": perm.tolist(),
            "smoothness": self.smoothness_,
            "smoothness_unordered": self.smoothness_unordered_,
            "ratio": self.ratio_,
        }
        if self.uses_rows:
            rows = stack[:, self.row, :]
            ordered, unordered = path_length(rows, perm), path_length(rows)
            result.update({"row": int(self.row), "smoothness_row": ordered,
                           "smoothness_row_unordered": unordered,
                           "ratio_row": _ratio(ordered, unordered)})
        result.update(self.extra_)
        self.result_ = result
        return self

    def transform(self, stack):
        if not hasattr(self, "permutation_"):
            raise CnnvisError(f"{self.method}: call fit() before transform()")
        stack = np.asarray(stack)
        if stack.ndim != 3 or stack.shape[0] != self.permutation_.size:
            raise CnnvisError(f"{self.method}: expected a stack of {self.permutation_.size} "
                              f"channels, got shape {tuple(stack.shape)}")
        return stack[self.permutation_]

    def fit_transform(self, stack, y=None):
        return self.fit(stack).transform(stack)


def _ratio(ordered: float, unordered: float) -> float:
    return float(ordered / unordered) if unordered > 0 else 1.0


class _PCAOrder(_Ordering):
    def _order(self, stack):
        features = self._features(stack)
        loading, proj, evr = first_component(features)
        perm = np.argsort(proj, kind="stable")
        self.extra_ = {"projection": proj[perm].tolist(), "explained_variance_ratio": evr}
        return perm


class _KMeansOrder(_Ordering):
    def _order(self, stack):
        features = self._features(stack)
        labels, centres = _kmeans(features, self.n_clusters, self.seed, self.n_init)
        perm, new_labels, sizes = _cluster_order(features, labels, centres)
        self.labels_ = np.empty_like(new_labels)
        self.labels_[perm] = new_labels  # cluster id of each input channel
        self.extra_ = {"labels": new_labels.tolist(), "cluster_sizes": sizes,
                       "boundaries": np.cumsum(sizes)[:-1].tolist()}
        return perm


class PCARows(_PCAOrder):
    """Order channels by the PC1 projection of their row ``row`` (the C×W slice)."""

    method = "pca-rows"
    uses_rows = True

    def __init__(self, row: int = 0):
        self.row = row


class PCAMaps(_PCAOrder):
    """Order channels by the PC1 projection of their whole map (C × H·W)."""

    method = "pca-maps"

    def __init__(self):
        pass


class KMeansRows(_KMeansOrder):
    """Group channels by k-means clusters of their row ``row`` (the C×W slice)."""

    method = "kmeans-rows"
    uses_rows = True

    def __init__(self, row: int = 0, n_clusters: int = 8, seed: int = 0, n_init: int = 10):
        self.row = row
        self.n_clusters = n_clusters
        self.seed = seed
        self.n_init = n_init


class KMeansMaps(_KMeansOrder):
    """Group channels by k-means clusters of their whole maps."""

    method = "kmeans-maps"

    def __init__(self, n_clusters: int = 8, seed: int = 0, n_init: int = 10):
        self.n_clusters = n_clusters
        self.seed = seed
        self.n_init = n_init


class SmoothOrder(_Ordering):
    """A short path through the maps (see the module docstring); ``refine=False`` keeps the raw
    candidates (no local search, no exact search)."""

    method = "smooth"

    def __init__(self, refine: bool = True):
        self.refine = refine

    def _order(self, stack):
        features = self._features(stack)
        dist = _pairwise(features)
        _, proj, _ = first_component(features)
        c = features.shape[0]
        # Candidates in order of preference on equal scores (the input order first: "stable").
        candidates = {"input": np.arange(c), "pc1": np.argsort(proj, kind="stable"),
                      "leaf-order": _leaf_order(features, dist)}
        if self.refine:
            candidates = {k: local_search(dist, v) for k, v in candidates.items()}
            if c <= EXACT_MAX:
                candidates["exact"] = shortest_path_exact(dist)
        scores = {k: float(dist[v[:-1], v[1:]].sum()) for k, v in candidates.items()}
        lowest = min(scores.values())
        tol = 1e-12 * max(1.0, lowest)
        best = next(k for k in candidates if scores[k] <= lowest + tol)
        perm = candidates[best]
        first, last = perm[0], perm[-1]
        if (proj[first], first) > (proj[last], last):
            perm = perm[::-1].copy()
        self.extra_ = {"chosen": best, "candidate_smoothness": scores}
        return perm


_CLASSES = {"kmeans-rows": KMeansRows, "pca-rows": PCARows, "pca-maps": PCAMaps,
            "kmeans-maps": KMeansMaps, "smooth": SmoothOrder}


def make_ordering(method: str, **params) -> _Ordering:
    """The estimator of ``method`` (one of :data:`METHODS`) with its parameters."""
    if method not in _CLASSES:
        from ..errors import unknown_name_error

        raise unknown_name_error("ordering method", method, METHODS)
    cls = _CLASSES[method]
    import inspect

    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise CnnvisError(f"ordering {method}: unknown parameter(s) {', '.join(unknown)} "
                          f"(accepted: {', '.join(allowed) or 'none'})")
    return cls(**params)


def order_stack(stack, method: str = "pca-maps", **params) -> dict:
    """Fit ``method`` on ``stack`` and return its result dict (the content of ``order.json``)."""
    return make_ordering(method, **params).fit(stack).result_


__all__ = ["METHODS", "PCARows", "PCAMaps", "KMeansRows", "KMeansMaps", "SmoothOrder",
           "make_ordering", "order_stack", "smoothness", "path_length", "first_component",
           "two_opt", "or_opt", "local_search", "shortest_path_exact", "check_stack"]
