"""Gradients of a class neuron with respect to a convolution layer's filters, and how they differ
between groups of images.

The class neuron is the logit before the softmax (in Caffe: fc8's diff set to 1 and back-propagated).
For each image the gradient with respect to every weight of the layer (conv1 of AlexNet: 96×3×11×11)
is one per-sample result of the gradient engine (one engine call per batch). A filter's
*importance* is the L2 norm of its gradient block (Cin×kh×kw).

    cg = ClassGradients(model, layer="conv1")
    res = cg.run(x, target="Shirt")           # or an index, one per image, or None = predicted
    res.gradients                             # N × O × Cin × kh × kw
    res.importance                            # N × O

    cmp = ClassComparison(model).run({"reference": chunks_a, "similar": chunks_b}, target="Shirt")
    cmp.summary                               # means/stds, cosine summary, permutation tests, top filters

:class:`ClassComparison` streams every group through in batches: means and standard deviations
are running sums (bounded memory whatever the group size); the cosine-similarity matrix and the
gradient permutation test need the vectors themselves, so the first ``max_vectors_per_group``
images of each group (input order) are kept in a float32 memmap in a temporary folder, removed
when ``run`` returns. The per-filter importances (O numbers per image) of every image are kept in
memory for the importance tests.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CnnvisError
from ..model import softmax
from . import stats
from .base import Analysis

#: standard deviations are population (ddof=0) or sample (ddof=1) values; comparisons use sample
DEFAULT_DDOF = 1


# ----------------------------------------------------------------------------- names and layers


def conv_layer(model, name=None):
    """The convolution layer ``name`` (default: the model's first convolution with weights)."""
    if name is None:
        for layer in model.conv_layers():
            if layer.weight is not None:
                return layer
        raise CnnvisError(f"model {model.name}: no convolution layer with weights")
    layer = model.layer(name)
    if layer.op_type != "Conv" or layer.weight is None:
        raise CnnvisError(f"layer={name!r}: is a {layer.op_type}; class gradients need a convolution "
                          "layer with weights (e.g. conv1)", params="layer")
    return layer


def filter_importance(gradients) -> np.ndarray:
    """Per-filter L2 norm of per-image weight gradients ``N × O × ...`` → ``N × O`` (float64)."""
    g = np.asarray(gradients)
    if g.ndim < 2:
        raise ValueError(f"filter_importance: expected N × O × ..., got shape {g.shape}")
    flat = g.reshape(g.shape[0], g.shape[1], -1).astype(np.float64)
    return np.sqrt(np.einsum("nok,nok->no", flat, flat))


# ----------------------------------------------------------------------------- per-image gradients


@dataclass
class ClassGradientBatch:
    """Class-neuron gradients of one batch of images."""

    gradients: np.ndarray  # N × O × Cin × kh × kw, float32
    importance: np.ndarray  # N × O, float64
    targets: np.ndarray  # N class indices whose logit was differentiated
    logits: np.ndarray  # N × classes
    probabilities: np.ndarray  # N × classes (softmax of the logits)

    def __len__(self):
        return len(self.targets)

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.logits, axis=1)

    @property
    def target_logits(self) -> np.ndarray:
        return self.logits[np.arange(len(self)), self.targets]

    @property
    def target_probabilities(self) -> np.ndarray:
        return self.probabilities[np.arange(len(self)), self.targets]


@dataclass
class ChunkSummary:
    """What :class:`ClassComparison` keeps of one chunk of a group: the partial results a Dask
    worker sends back instead of the per-image gradients (see :func:`summarize_chunk`)."""

    names: list
    importance: np.ndarray  # n × O, float64
    gradient_moments: tuple  # (n, mean, sum of squared deviations) of the gradients, float64
    kept: np.ndarray  # the first images' gradient vectors (take × d, float32): the group's first cap
    predicted: np.ndarray  # n predicted classes
    predicted_probability: np.ndarray  # n
    neuron_logit: np.ndarray  # n
    neuron_probability: np.ndarray  # n

    def __len__(self):
        return len(self.names)

    def arrays(self) -> dict:
        """Plain arrays (for a shard result file); :meth:`from_arrays` reverses it."""
        n, mean, m2 = self.gradient_moments
        return {"importance": self.importance, "moment_count": np.asarray(n, np.int64), "moment_mean": mean,
                "moment_m2": m2, "kept": self.kept, "predicted": self.predicted,
                "predicted_probability": self.predicted_probability, "neuron_logit": self.neuron_logit,
                "neuron_probability": self.neuron_probability}

    @classmethod
    def from_arrays(cls, names, arrays: dict) -> "ChunkSummary":
        return cls(list(names), arrays["importance"],
                   (int(arrays["moment_count"]), arrays["moment_mean"], arrays["moment_m2"]), arrays["kept"],
                   arrays["predicted"], arrays["predicted_probability"], arrays["neuron_logit"],
                   arrays["neuron_probability"])


def summarize_chunk(batch: "ClassGradientBatch", names, first, cap: int) -> ChunkSummary:
    """The summary of one computed chunk: the gradient vectors are kept for the images among the
    group's first ``cap`` inputs. ``first``: the index in its group of the chunk's first image (the
    others follow it), or the indices of all its images, ascending (where unreadable files were
    left out: they count as inputs, so that a Dask worker decides alone which vectors to keep)."""
    if np.ndim(first) == 0:
        take = max(0, min(len(batch), int(cap) - int(first)))
    else:
        take = int(np.searchsorted(np.asarray(first, np.int64), int(cap)))  # indices < cap
    pred = batch.predicted
    rows = np.arange(len(batch))
    return ChunkSummary(list(names), batch.importance, stats.batch_moments(batch.gradients),
                        np.ascontiguousarray(batch.gradients[:take].reshape(take, int(np.prod(batch.gradients.shape[1:])))), pred.astype(np.int64),
                        np.asarray(batch.probabilities[rows, pred], np.float64),
                        np.asarray(batch.target_logits, np.float64), np.asarray(batch.target_probabilities, np.float64))


class ClassGradients(Analysis):
    """Per-image gradients of a class logit with respect to one convolution layer's weights:
    ``ClassGradients(model, layer).run(x, target)`` → :class:`ClassGradientBatch`.

    Parameters
    ----------
    model : cnnvis.model.Model
    layer : convolution layer name (default: the first convolution, conv1 in Caffe nets).
    batch_size : images per onnxruntime call.
    """

    def __init__(self, model, layer=None, batch_size: int = 32):
        super().__init__(model, layer=layer, batch_size=batch_size)

    @property
    def layer_(self):
        """The convolution layer (its table entry); raises for a layer that is not one."""
        return conv_layer(self.model, self.layer)

    @property
    def weight_name_(self) -> str:
        return self.layer_.weight

    @property
    def logits_layer_(self):
        return self.model.logits_layer

    @property
    def weights_(self) -> np.ndarray:
        return self.model.param(self.weight_name_)

    @property
    def engine_(self):
        # one graph serves every class (the index is a graph input), shared per model
        return self.model.gradient_engine([self.weight_name_], objective="logit", target=self.logits_layer_.tensor,
                                          per_sample=True, outputs=(self.logits_layer_.tensor,),
                                          batch_size=self.batch_size)

    def targets(self, x, target) -> np.ndarray:
        """Class index per image: ``None`` = the predicted class, an index or name for all images,
        or a sequence with one index or name per image."""
        n = len(x)
        if target is None:
            logits = self.model.run(x, [self.logits_layer_.tensor], batch_size=self.batch_size)
            return np.argmax(logits[self.logits_layer_.tensor], axis=1).astype(np.int64)
        if isinstance(target, (list, tuple, np.ndarray)):
            if len(target) != n:
                raise CnnvisError(f"target: {len(target)} classes given for {n} images")
            return np.array([self.model.class_index(t, "target") for t in target], dtype=np.int64)
        return np.full(n, self.model.class_index(target, "target"), dtype=np.int64)

    def run(self, inputs, target=None) -> ClassGradientBatch:
        """Gradients of each image's target logit with respect to the layer's weights, for the
        batch ``inputs`` (N×C×H×W); ``target``: see :meth:`targets`."""
        x = self.model.check_batch(inputs)
        t = self.targets(x, target)
        res = self.engine_.run(x, index=t)
        grads = res[self.weight_name_]
        logits = np.asarray(res.outputs[self.logits_layer_.tensor], dtype=np.float64).reshape(len(x), -1)
        return ClassGradientBatch(grads, filter_importance(grads), t, logits, softmax(logits))

    def check_numerical(self, x, target, n_entries: int = 20, seed: int = 0, analytic=None):
        """Float64 central differences of the first image's target logit on ``n_entries`` random
        weights of the layer, against the engine's gradient (``analytic``: that image's
        O×Cin×kh×kw gradient, recomputed when None). Returns a GradcheckReport."""
        from ..autodiff import gradcheck

        x = self.model.check_batch(x)[:1]
        t = self.targets(x, target)[:1]
        if analytic is None:
            analytic = self.engine_.run(x, index=t)[self.weight_name_][0]
        reports = gradcheck(self.model.proto, x, self.weight_name_, objective="logit",
                            target=self.logits_layer_.tensor, index=t, samples=int(n_entries),
                            rng_seed=int(seed), analytic={self.weight_name_: np.asarray(analytic)})
        return reports[self.weight_name_]


# ----------------------------------------------------------------------------- groups of images


# ----------------------------------------------------------------------------- group comparison


@dataclass
class ComparisonResult:
    """:meth:`ClassComparison.run`'s result. ``group_names`` (the reference first), ``counts``,
    ``importance_mean``/``importance_std`` and ``normalized_mean``/``normalized_std`` (group → O),
    ``mean_gradient`` and ``difference`` (reference − group) volumes, ``cosine`` (kept images,
    ordered by group) with ``cosine_groups``/``cosine_names`` and ``cosine_summary``,
    ``importance``/``importance_groups`` (every image), ``gradient_tests``, ``importance_tests``,
    ``filter_tests``, ``top_filters``, ``images`` (one record per image), ``gradcheck`` (and
    ``gradcheck_image``) and ``summary`` (all of it, JSON-ready)."""

    neuron: int
    layer: str
    weights: np.ndarray
    gradcheck: object = None
    gradcheck_image: str | None = None
    group_names: list = None
    counts: dict = None
    importance_mean: dict = None
    importance_std: dict = None
    normalized_mean: dict = None
    normalized_std: dict = None
    mean_gradient: dict = None
    difference: dict = None
    cosine: np.ndarray = None
    cosine_groups: np.ndarray = None
    cosine_names: list = None
    cosine_summary: dict = None
    importance: np.ndarray = None
    importance_groups: np.ndarray = None
    gradient_tests: dict = None
    importance_tests: dict = None
    filter_tests: dict = None
    top_filters: dict = None
    images: list = None
    summary: dict = None


class ClassComparison(Analysis):
    """How the gradients of one class neuron differ between groups of images:
    ``ClassComparison(model, layer=...).run(groups, target=neuron)`` → :class:`ComparisonResult`.

    Parameters
    ----------
    model : cnnvis.model.Model
    layer : convolution layer (default: the first).
    batch_size : images per engine call.
    n_permutations, seed : of every permutation test.
    max_vectors_per_group : images per group kept for the cosine matrix and the gradient
        permutation test (those among the group's first ``max_vectors_per_group`` inputs, in input
        order; an input left out as unreadable still counts); means, stds and importance tests use all.
    top_k : filters listed per comparison.
    ddof : of the reported standard deviations (1 = sample standard deviation).
    progress : show a tqdm progress bar (stderr).
    tmp_dir : where the float32 memmap of kept vectors lives while ``run`` runs (default: the
        system temporary folder).
    check_numerical : if > 0, that many random weights of the first reference image's gradient
        are checked against float64 central differences (the result's ``gradcheck``).
    """

    def __init__(self, model, layer=None, batch_size: int = 32, n_permutations: int = 999,
                 seed: int = 0, max_vectors_per_group: int = 1000, top_k: int = 8, ddof: int = DEFAULT_DDOF,
                 progress: bool = False, tmp_dir=None, check_numerical: int = 0):
        super().__init__(model, layer=layer, batch_size=batch_size, n_permutations=n_permutations, seed=seed,
                         max_vectors_per_group=max_vectors_per_group, top_k=top_k, ddof=ddof, progress=progress,
                         tmp_dir=tmp_dir, check_numerical=check_numerical)

    def run(self, inputs, target=None, totals=None, gradcheck=None) -> ComparisonResult:
        """Compare the groups ``inputs`` (an ordered mapping group name → iterable of chunks, the
        first group the reference) on the logit of the class neuron ``target`` (an index or name).
        A chunk is ``(names, batch)`` or ``(names, batch, positions)`` (computed here; ``positions``:
        the images' indices in their group where unreadable inputs were left out, see
        :func:`summarize_chunk`) or a :class:`ChunkSummary` computed elsewhere
        (e.g. by Dask workers, in input order; then ``gradcheck`` is the ``(report, image name)`` of
        the numerical check, done by the caller). ``totals``: images per group, for the progress bar."""
        if target is None:
            raise CnnvisError("target: the class neuron to compare the groups on (an index or name)",
                              params="target")
        if int(self.max_vectors_per_group) < 1:
            raise CnnvisError(f"max_vectors_per_group {self.max_vectors_per_group}: expected a positive integer")
        if int(self.top_k) < 1:
            raise CnnvisError(f"top_k {self.top_k}: expected a positive integer")
        neuron = self.model.class_index(target, "neuron")
        cg = ClassGradients(self.model, self.layer, self.batch_size)
        r = ComparisonResult(neuron=neuron, layer=cg.layer_.name, weights=cg.weights_)
        if gradcheck is not None:
            r.gradcheck, r.gradcheck_image = gradcheck

        def summaries(chunks):
            n = 0
            for chunk in chunks:
                if isinstance(chunk, ChunkSummary):
                    yield chunk
                    continue
                chunk_names, x, *positions = chunk
                batch = cg.run(x, target=neuron)
                if self.check_numerical and r.gradcheck is None:
                    r.gradcheck = cg.check_numerical(x[:1], neuron, self.check_numerical, self.seed,
                                                     analytic=batch.gradients[0])
                    r.gradcheck_image = chunk_names[0]
                yield summarize_chunk(batch, chunk_names, positions[0] if positions else n, self.max_vectors_per_group)
                n += len(batch)

        return self._fit(r, {g: summaries(chunks) for g, chunks in dict(inputs).items()}, totals)

    def _fit(self, r, groups, totals) -> "ComparisonResult":
        from tqdm import tqdm

        if len(groups) < 2:
            raise CnnvisError(f"compare: need a reference group and at least one other, got {len(groups)}")
        shape = tuple(r.weights.shape)
        dim = int(np.prod(shape))
        cap = int(self.max_vectors_per_group)
        names = list(groups)
        r.group_names = names
        total = sum(totals.values()) if totals else None
        moments = {g: (stats.RunningMoments(), stats.RunningMoments(), stats.RunningMoments()) for g in names}
        importance_rows, group_of_row, r.images = [], [], []
        class_names = self.model.class_names
        kept_groups, kept_names = [], []
        with tempfile.TemporaryDirectory(prefix="cnnvis-classgrad-", dir=self.tmp_dir) as tmp:
            # Sparse file: only rows actually written take disk space.
            try:
                vectors = np.memmap(Path(tmp) / "vectors.f32", dtype=np.float32, mode="w+",
                                    shape=(cap * len(names), dim))
            except OSError as exc:  # a file system without sparse files of that size, or full
                raise CnnvisError(f"tmp_dir {tmp}: cannot create the {cap * len(names)} x {dim} float32 file of "
                                  f"kept gradient vectors ({exc.strerror or exc}); keep fewer vectors per group "
                                  "or choose another folder") from None
            n_kept = 0
            with tqdm(total=total, unit="img", desc="class gradients", disable=not self.progress) as bar:
                for gi, g in enumerate(names):
                    kept_in_group = 0
                    imp_m, norm_m, grad_m = moments[g]
                    for chunk in groups[g]:
                        bar.set_postfix_str(g)
                        imp_m.update(chunk.importance)
                        norm_m.update(stats.minmax_rows(chunk.importance))
                        grad_m.merge(*chunk.gradient_moments)
                        importance_rows.append(chunk.importance)
                        group_of_row += [gi] * len(chunk)
                        take = min(len(chunk.kept), cap - kept_in_group)
                        if take:
                            vectors[n_kept:n_kept + take] = chunk.kept[:take].reshape(take, dim)
                            n_kept += take
                            kept_in_group += take
                            kept_groups += [gi] * take
                            kept_names += list(chunk.names[:take])
                        pred = chunk.predicted
                        for i, name in enumerate(chunk.names):
                            r.images.append({
                                "group": g, "image": name, "kept_for_cosine": i < take,
                                "predicted": int(pred[i]), "predicted_name": class_names[pred[i]],
                                "predicted_probability": float(chunk.predicted_probability[i]),
                                "neuron_logit": float(chunk.neuron_logit[i]),
                                "neuron_probability": float(chunk.neuron_probability[i]),
                                "gradient_norm": float(np.sqrt(np.sum(chunk.importance[i] ** 2))),
                            })
                        bar.update(len(chunk))
                    if imp_m.count == 0:
                        raise CnnvisError(f"group {g}: no images")
            gram = stats.gram_matrix(vectors[:n_kept])
            del vectors
        r.counts = {g: moments[g][0].count for g in names}
        r.importance_mean = {g: moments[g][0].mean for g in names}
        r.importance_std = {g: moments[g][0].std(self.ddof) for g in names}
        r.normalized_mean = {g: moments[g][1].mean for g in names}
        r.normalized_std = {g: moments[g][1].std(self.ddof) for g in names}
        r.mean_gradient = {g: moments[g][2].mean.astype(np.float32) for g in names}
        ref = names[0]
        r.difference = {g: (moments[ref][2].mean - moments[g][2].mean).astype(np.float32) for g in names[1:]}
        r.cosine = stats.cosine_from_gram(gram)
        r.cosine_groups = np.asarray(kept_groups, dtype=np.int64)
        r.cosine_names = kept_names
        r.cosine_summary = stats.block_means(r.cosine, r.cosine_groups, names)
        importance = np.concatenate(importance_rows)
        group_of_row = np.asarray(group_of_row)
        r.importance = importance
        r.importance_groups = group_of_row
        r.gradient_tests, r.importance_tests, r.filter_tests, r.top_filters = {}, {}, {}, {}
        for gi, g in enumerate(names[1:], start=1):
            keep = np.flatnonzero((r.cosine_groups == 0) | (r.cosine_groups == gi))
            r.gradient_tests[g] = stats.mean_distance_test(
                gram[np.ix_(keep, keep)], r.cosine_groups[keep] == 0, self.n_permutations, self.seed,
                statistic="distance between group mean gradient vectors")
            rows = np.flatnonzero((group_of_row == 0) | (group_of_row == gi))
            in_ref = group_of_row[rows] == 0
            r.importance_tests[g] = stats.mean_distance_test(
                None, in_ref, self.n_permutations, self.seed, features=importance[rows],
                statistic="distance between group mean filter-importance vectors")
            r.filter_tests[g] = stats.feature_difference_test(importance[rows], in_ref, self.n_permutations, self.seed)
            r.top_filters[g] = self._top_filters(r, ref, g, r.filter_tests[g])
        r.summary = self._summary(r)
        return r

    def _top_filters(self, r, ref, other, test) -> list:
        diff = test.difference
        order = np.argsort(-np.abs(diff), kind="stable")[:min(int(self.top_k), len(diff))]
        out = []
        n_a, n_b = r.counts[ref], r.counts[other]
        for f in order:
            sa, sb = r.importance_std[ref][f], r.importance_std[other][f]
            pooled = np.nan
            if self.ddof == 1 and n_a + n_b > 2:
                pooled = np.sqrt(((n_a - 1) * sa ** 2 + (n_b - 1) * sb ** 2) / (n_a + n_b - 2))
            out.append({
                "filter": int(f), "difference": float(diff[f]),
                "reference_mean": float(r.importance_mean[ref][f]), "other_mean": float(r.importance_mean[other][f]),
                "reference_std": _num(sa), "other_std": _num(sb),
                "effect_size": _num(diff[f] / pooled) if np.isfinite(pooled) and pooled > 0 else None,
                "p_value": float(test.p_values[f]), "p_adjusted": float(test.p_adjusted[f]),
            })
        return out

    def _summary(self, r) -> dict:
        names = r.group_names
        return {
            "neuron": r.neuron, "neuron_name": self.model.class_names[r.neuron],
            "layer": r.layer, "weight_shape": list(r.weights.shape),
            "groups": names, "reference": names[0], "counts": r.counts,
            "std_ddof": self.ddof,
            "normalized_importance": "each image's filter importances min-max scaled to [0, 1] over the "
                                     "filters, then averaged over the group",
            "importance": "L2 norm of each filter's gradient (over its input channels and kernel)",
            "cosine": {
                "kept_per_group": {g: int(np.sum(r.cosine_groups == i)) for i, g in enumerate(names)},
                "max_vectors_per_group": int(self.max_vectors_per_group),
                "policy": "the first max_vectors_per_group images of each group, in input order",
                **r.cosine_summary,
            },
            "gradient_tests": {g: t.as_dict() for g, t in r.gradient_tests.items()},
            "importance_tests": {g: t.as_dict() for g, t in r.importance_tests.items()},
            "top_filters": r.top_filters,
            "gradcheck": gradcheck_dict(r.gradcheck, r.gradcheck_image),
            "top_filters_ranking": "|difference of mean importance| (reference - group), largest first; "
                                   "p_value per filter and p_adjusted (max-T over filters) by permutation",
        }


def gradcheck_dict(report, image=None):
    """A GradcheckReport as JSON-ready numbers (None stays None)."""
    if report is None:
        return None
    return {"image": image, "entries": int(len(report.entries)), "max_abs_error": report.max_abs_error,
            "max_rel_error": report.max_rel_error, "method": "float64 central differences (onnx reference "
            "evaluator) vs the engine's float32 per-image gradient; relative to the largest magnitude"}


def _num(value):
    value = float(value)
    return value if np.isfinite(value) else None
