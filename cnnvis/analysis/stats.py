"""Statistics for comparing groups of gradient vectors: streaming moments, Gram and cosine
matrices, within/between-group means, and permutation tests.

Everything is numpy, float64 for accumulations, deterministic for a given seed.

Permutation tests here follow one recipe: a statistic of two labelled groups, recomputed for
``n_permutations`` random relabellings (``numpy.random.default_rng(seed)``, one
``rng.permutation`` per relabelling, in order); the p-value is ``(1 + #{null >= observed}) /
(1 + n_permutations)`` (the +1 counts the observed labelling itself, so p is never 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CnnvisError

#: relative slack when comparing a null statistic with the observed one: a relabelling that is
#: the observed split up to floating-point rounding must count as ">=".
TIE_RTOL = 1e-9


class RunningMoments:
    """Mean and variance of a stream of same-shaped arrays, updated one batch at a time.

    Uses the pairwise (Chan et al.) update of count, mean and sum of squared deviations, in
    float64, so batches of any size give the same result as one pass over all samples (up to
    rounding) and memory stays at two arrays of the sample shape.
    """

    def __init__(self, shape=None):
        self.shape = None if shape is None else tuple(shape)
        self.count = 0
        self._mean = None
        self._m2 = None

    def update(self, batch) -> "RunningMoments":
        """Add a batch ``n × *shape`` of samples."""
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim < 1:
            raise ValueError("RunningMoments.update: expected a batch with a leading sample axis")
        if self.shape is None:
            self.shape = tuple(batch.shape[1:])
        if tuple(batch.shape[1:]) != self.shape:
            raise ValueError(f"RunningMoments.update: samples of shape {batch.shape[1:]}, expected {self.shape}")
        if batch.shape[0] == 0:
            return self
        return self.merge(*batch_moments(batch))

    def merge(self, n: int, b_mean, b_m2) -> "RunningMoments":
        """Add the moments of ``n`` more samples (count, mean and sum of squared deviations, as
        :func:`batch_moments` gives them): the parallel update, so partial results computed
        elsewhere (a Dask worker's chunks) merge into exactly what :meth:`update` would have
        given for the same chunks in the same order."""
        n = int(n)
        if n == 0:
            return self
        b_mean = np.asarray(b_mean, dtype=np.float64)
        b_m2 = np.asarray(b_m2, dtype=np.float64)
        if self.shape is None:
            self.shape = tuple(b_mean.shape)
        if tuple(b_mean.shape) != self.shape or tuple(b_m2.shape) != self.shape:
            raise ValueError(f"RunningMoments.merge: moments of shape {b_mean.shape}, expected {self.shape}")
        if self.count == 0:
            self._mean, self._m2 = b_mean, b_m2
        else:
            total = self.count + n
            delta = b_mean - self._mean
            self._mean = self._mean + delta * (n / total)
            self._m2 = self._m2 + b_m2 + delta ** 2 * (self.count * n / total)
        self.count += n
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("RunningMoments: no samples yet")
        return self._mean

    def var(self, ddof: int = 0) -> np.ndarray:
        if self.count == 0:
            raise ValueError("RunningMoments: no samples yet")
        if self.count - ddof <= 0:
            return np.full(self.shape, np.nan)
        return self._m2 / (self.count - ddof)

    def std(self, ddof: int = 0) -> np.ndarray:
        return np.sqrt(self.var(ddof))


def batch_moments(batch):
    """``(n, mean, sum of squared deviations)`` of a batch ``n × *shape`` over its first axis, in
    float64 (the partial result :meth:`RunningMoments.merge` takes)."""
    batch = np.asarray(batch, dtype=np.float64)
    b_mean = batch.mean(axis=0)
    return batch.shape[0], b_mean, ((batch - b_mean) ** 2).sum(axis=0)


def minmax_rows(x) -> np.ndarray:
    """Each row scaled to [0, 1] by its own min and max (a constant row becomes zeros)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"minmax_rows: expected a 2-D array, got shape {x.shape}")
    lo = x.min(axis=1, keepdims=True)
    span = x.max(axis=1, keepdims=True) - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)


def gram_matrix(vectors, block: int = 128) -> np.ndarray:
    """``X @ X.T`` in float64 for an ``n × d`` array (a float32 memmap is fine), ``block`` rows at a
    time so that only two blocks are in memory as float64."""
    n = len(vectors)
    gram = np.empty((n, n), dtype=np.float64)
    for i in range(0, n, block):
        xi = np.asarray(vectors[i:i + block], dtype=np.float64)
        for j in range(0, i + 1, block):
            xj = xi if j == i else np.asarray(vectors[j:j + block], dtype=np.float64)
            g = xi @ xj.T
            gram[i:i + block, j:j + block] = g
            gram[j:j + block, i:i + block] = g.T
    return gram


def cosine_from_gram(gram) -> np.ndarray:
    """Cosine similarities from a Gram matrix. A zero vector has similarity 0 with everything
    (its own diagonal entry too), never NaN."""
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    out = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    return np.clip(out, -1.0, 1.0)


def block_means(matrix, labels, names=None) -> dict:
    """Mean of a symmetric similarity matrix within each group (off-diagonal pairs) and between
    each pair of groups; also the overall within-group and between-group means (over pairs).

    ``labels`` gives the group index of each row; ``names`` the group names (default ``g0``...).
    A group of one image has no within pairs (its within mean is None).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    labels = np.asarray(labels)
    groups = list(dict.fromkeys(labels.tolist()))
    names = list(names) if names is not None else [f"g{g}" for g in groups]
    idx = {g: np.flatnonzero(labels == g) for g in groups}
    within, between = {}, {}
    w_sum = w_n = b_sum = b_n = 0.0
    for a_pos, a in enumerate(groups):
        ia = idx[a]
        block = matrix[np.ix_(ia, ia)]
        pairs = len(ia) * (len(ia) - 1)
        s = float(block.sum() - np.trace(block))
        within[names[a_pos]] = s / pairs if pairs else None
        w_sum += s
        w_n += pairs
        for b_pos in range(a_pos + 1, len(groups)):
            ib = idx[groups[b_pos]]
            cross = matrix[np.ix_(ia, ib)]
            between[f"{names[a_pos]} | {names[b_pos]}"] = float(cross.mean())
            b_sum += float(cross.sum())
            b_n += cross.size
    return {"within": within, "between": between,
            "within_mean": w_sum / w_n if w_n else None,
            "between_mean": b_sum / b_n if b_n else None}


# ----------------------------------------------------------------------------- permutation tests


@dataclass
class PermutationTest:
    """One two-group permutation test; ``null`` holds the statistic under each relabelling."""

    statistic: str
    observed: float
    p_value: float
    n_permutations: int
    seed: int
    n_a: int
    n_b: int
    n_distinct_splits: int | None  # C(n_a + n_b, n_a); None when above 10**15
    null: np.ndarray = field(repr=False)

    def as_dict(self) -> dict:
        null = np.asarray(self.null)
        return {
            "statistic": self.statistic, "observed": self.observed, "p_value": self.p_value,
            "n_permutations": self.n_permutations, "seed": self.seed, "n_a": self.n_a, "n_b": self.n_b,
            "n_distinct_splits": self.n_distinct_splits,
            "p_value_formula": "(1 + #{null >= observed}) / (1 + n_permutations)",
            "null_mean": float(null.mean()) if null.size else None,
            "null_95th_percentile": float(np.percentile(null, 95)) if null.size else None,
        }


def _check_groups(in_a, n_permutations, seed):
    in_a = np.asarray(in_a, dtype=bool)
    n_a, n = int(in_a.sum()), in_a.size
    if n_a == 0 or n_a == n:
        raise CnnvisError(f"permutation test: both groups need at least one image (got {n_a} and {n - n_a})")
    if int(n_permutations) < 1:
        raise CnnvisError(f"n_permutations {n_permutations}: expected a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise CnnvisError(f"seed {seed!r}: expected an integer")
    return in_a, n_a, n


def _relabellings(n: int, n_a: int, n_permutations: int, seed: int, chunk: int):
    """Yield boolean ``k × n`` 'in group a' matrices, ``n_permutations`` rows in all."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_permutations:
        k = min(chunk, n_permutations - done)
        rows = np.zeros((k, n), dtype=bool)
        for r in range(k):
            rows[r, rng.permutation(n)[:n_a]] = True
        done += k
        yield rows


def _splits(n: int, n_a: int):
    """Number of distinct two-group splits, or None when above 10**15 (practically unlimited)."""
    count = math.comb(n, n_a)
    return count if count <= 10 ** 15 else None


def _p_value(null, observed) -> float:
    hits = int(np.count_nonzero(null >= observed - TIE_RTOL * abs(observed)))
    return (1 + hits) / (1 + len(null))


def mean_distance_test(gram, in_a, n_permutations: int = 999, seed: int = 0,
                       statistic: str = "distance between group mean vectors", features=None) -> PermutationTest:
    """Permutation test of ``||mean(a) - mean(b)||`` (Euclidean) between two groups of vectors.

    Give either their Gram matrix ``gram`` (``gram[i, j] = x_i · x_j``; then the vectors
    themselves are not needed: for weights ``w = 1/n_a`` on a, ``-1/n_b`` on b the squared
    distance is ``w G w``) or the vectors as ``features`` (n × d; pass ``gram=None``).
    ``in_a`` marks the rows of group a; the rest are group b.
    """
    in_a, n_a, n = _check_groups(in_a, n_permutations, seed)
    if (gram is None) == (features is None):
        raise ValueError("mean_distance_test: give exactly one of gram and features")
    if gram is not None:
        gram = np.asarray(gram, dtype=np.float64)
        if gram.shape != (n, n):
            raise ValueError(f"mean_distance_test: Gram matrix {gram.shape} for {n} vectors")
    else:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] != n:
            raise ValueError(f"mean_distance_test: features {features.shape} for {n} vectors")
    n_b = n - n_a

    def distances(rows):
        w = np.where(rows, 1.0 / n_a, -1.0 / n_b)
        if gram is not None:
            sq = np.einsum("ij,ij->i", w @ gram, w)
        else:
            diff = w @ features
            sq = np.einsum("ij,ij->i", diff, diff)
        return np.sqrt(np.clip(sq, 0.0, None))

    # relabelling chunks sized so that the k × n weight matrix stays near 16 MB
    chunk = int(max(1, min(256, 2 ** 21 // max(n, 1))))
    observed = float(distances(in_a[None, :])[0])
    null = np.concatenate([distances(rows) for rows in _relabellings(n, n_a, int(n_permutations), seed, chunk)])
    return PermutationTest(statistic, observed, _p_value(null, observed), int(n_permutations), int(seed),
                           n_a, n_b, _splits(n, n_a), null)


@dataclass
class FeatureDifferenceTest:
    """Per-feature difference of group means with permutation p-values.

    ``p_values``: per feature, ``|mean_a - mean_b|`` against its own null; ``p_adjusted``: the
    same statistic against the null of the maximum over all features (single-step max-T, which
    controls the family-wise error rate over the features).
    """

    difference: np.ndarray  # mean_a - mean_b per feature
    p_values: np.ndarray
    p_adjusted: np.ndarray
    n_permutations: int
    seed: int
    n_a: int
    n_b: int


def feature_difference_test(features, in_a, n_permutations: int = 999, seed: int = 0) -> FeatureDifferenceTest:
    """Permutation test of the difference of means of every column of ``features`` (n × f)."""
    x = np.asarray(features, dtype=np.float64)
    in_a, n_a, n = _check_groups(in_a, n_permutations, seed)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"feature_difference_test: features {x.shape} for {n} samples")
    n_b = n - n_a

    def diffs(rows):
        w = np.where(rows, 1.0 / n_a, -1.0 / n_b)
        return w @ x

    observed = diffs(in_a[None, :])[0]
    obs_abs = np.abs(observed)
    slack = TIE_RTOL * obs_abs
    hits = np.zeros(x.shape[1], dtype=np.int64)
    max_hits = np.zeros(x.shape[1], dtype=np.int64)
    chunk = int(max(1, min(256, 2 ** 21 // max(n, x.shape[1], 1))))
    for rows in _relabellings(n, n_a, int(n_permutations), seed, chunk):
        null = np.abs(diffs(rows))
        hits += (null >= obs_abs - slack).sum(axis=0)
        max_hits += (null.max(axis=1)[:, None] >= obs_abs - slack).sum(axis=0)
    p = (1 + hits) / (1 + int(n_permutations))
    p_adj = (1 + max_hits) / (1 + int(n_permutations))
    return FeatureDifferenceTest(observed, p, p_adj, int(n_permutations), int(seed), n_a, n_b)
