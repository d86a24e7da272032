"""Gradients of a class neuron with respect to a convolution layer's filters, and how they differ
between groups of images.

The class neuron is the logit before the softmax (in Caffe: fc8's diff set to 1 and back-propagated).
For each image the gradient with respect to every weight of the layer (conv1 of AlexNet: 96×3×11×11)
is one per-sample result of the gradient engine (one engine call per batch). A filter's
*importance* is the L2 norm of its gradient block (Cin×kh×kw).

    cg = ClassGradients(model, layer="conv1")
    res = cg.compute(x, target="Shirt")       # or an index, one per image, or None = predicted
    res.gradients                             # N × O × Cin × kh × kw
    res.importance                            # N × O

    cmp = ClassComparison(model, neuron="Shirt").fit({"reference": chunks_a, "similar": chunks_b})
    cmp.summary_                              # means/stds, cosine summary, permutation tests, top filters

:class:`ClassComparison` streams every group through in batches: means and standard deviations
are running sums (bounded memory whatever the group size); the cosine-similarity matrix and the
gradient permutation test need the vectors themselves, so the first ``max_vectors_per_group``
images of each group (input order) are kept in a float32 memmap in a temporary folder, removed
when ``fit`` returns. The per-filter importances (O numbers per image) of every image are kept in
memory for the importance tests.
"""
from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CnnvisError
from ..manifest import load_npy
from ..model import softmax
from . import stats

#: names of labels files looked up in the folder of a model's sample images
LABEL_FILES = ("labels.csv", "labels.tsv", "labels.txt", "labels.json")
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
        raise CnnvisError(f"--layer {name}: is a {layer.op_type}; class gradients need a convolution "
                          "layer with weights (e.g. conv1)")
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


class ClassGradients:
    """Per-image gradients of a class logit with respect to one convolution layer's weights.

    Parameters
    ----------
    model : cnnvis.model.Model
    layer : convolution layer name (default: the first convolution, conv1 in Caffe nets).
    batch_size : images per onnxruntime call.
    """

    def __init__(self, model, layer=None, batch_size: int = 32):
        self.model = model
        self.layer = layer
        self.batch_size = batch_size
        self.layer_ = conv_layer(model, layer)
        self.weight_name_ = self.layer_.weight
        self.logits_layer_ = model.logits_layer

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

    def compute(self, x, target=None) -> ClassGradientBatch:
        """Gradients of each image's target logit with respect to the layer's weights."""
        x = self.model.check_batch(x)
        t = self.targets(x, target)
        res = self.engine_.run(x, index=t)
        grads = res[self.weight_name_]
        logits = np.asarray(res.outputs[self.logits_layer_.tensor], dtype=np.float64).reshape(len(x), -1)
        return ClassGradientBatch(grads, filter_importance(grads), t, logits, softmax(logits))

    def iter_compute(self, chunks, target=None):
        """``(names, ClassGradientBatch)`` for each ``(names, batch)`` chunk."""
        for names, x in chunks:
            yield names, self.compute(x, target)

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


def sample_classes(model) -> dict:
    """Class index → sample image paths of ``model`` (its sidecar's ``samples``).

    The class of each sample comes from a labels file in the samples' folder (one of
    :data:`LABEL_FILES`): CSV/TSV/whitespace lines ``file,label`` (a header line is allowed; the
    label is a class index or name; the file is relative to that folder or a bare file name), or
    JSON ``{"file": label}`` / ``[{"file": ..., "label": ...}]``. Without a labels file, a
    sample's parent folder named after a class gives its class.
    """
    samples = [Path(s) for s in (model.sidecar.get("samples") or [])]
    if not samples:
        return {}
    folders = {p.parent for p in samples}
    root = Path(_common_parent(samples))
    labels_path = next((root / n for n in LABEL_FILES if (root / n).is_file()), None)
    by_class: dict = {}
    if labels_path is not None:
        table = _read_labels(labels_path)
        for p in samples:
            key = _relative_key(p, root)
            label = table.get(key, table.get(p.name))
            if label is None:
                continue
            try:
                idx = model.class_index(label, "label")
            except CnnvisError as exc:
                raise CnnvisError(f"{labels_path}: sample {p.name}: {exc}") from None
            by_class.setdefault(idx, []).append(p)
        return by_class
    names = model.class_names
    for p in samples:
        if len(folders) > 1 and p.parent.name in names:
            by_class.setdefault(names.index(p.parent.name), []).append(p)
    return by_class


def _common_parent(paths) -> str:
    import os

    parents = [str(Path(p).resolve().parent) for p in paths]
    return os.path.commonpath(parents)


def _relative_key(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def _read_labels(path: Path) -> dict:
    """file (posix, relative to the labels folder) → label text."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CnnvisError(f"{path}: cannot read labels file ({exc.strerror or exc})") from None
    table = {}
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CnnvisError(f"{path}: labels file is not valid JSON ({exc})") from None
        if isinstance(data, dict):
            items = data.items()
        elif isinstance(data, list) and all(isinstance(d, dict) and {"file", "label"} <= set(d) for d in data):
            items = [(d["file"], d["label"]) for d in data]
        else:
            raise CnnvisError(f"{path}: expected {{\"file\": label}} or a list of {{\"file\", \"label\"}} objects")
        return {Path(str(f)).as_posix(): str(lab) for f, lab in items}
    first_row = True
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line or "\t" in line:
            row = next(csv.reader([line], delimiter="\t" if "\t" in line else ","))
        else:
            row = line.split(None, 1)
        if len(row) < 2:
            raise CnnvisError(f"{path}:{line_no}: expected 'file,label', got {line!r}")
        file, label = row[0].strip(), row[1].strip()
        header = first_row and file.lower() in ("file", "filename", "path", "image")
        first_row = False
        if header:
            continue
        table[Path(file).as_posix()] = label
    return table


def resolve_group(model, items, what: str = "group") -> list:
    """Image files (or ``.npy`` arrays) for one group: each item is an image file, a folder, a
    preprocessed ``N×C×H×W`` ``.npy``, or a class name/index of the model's sample images."""
    from .. import preprocess

    files = []
    by_class = None
    for item in items:
        p = Path(str(item))
        if p.suffix.lower() == ".npy" and p.is_file():
            files.append(p)
        elif p.exists():
            files.extend(preprocess.list_images([p]))
        else:
            if by_class is None:
                by_class = sample_classes(model)
            try:
                idx = model.class_index(str(item), what)
            except CnnvisError:
                idx = None
            if idx is None or idx not in by_class:
                known = ", ".join(model.class_names[i] for i in sorted(by_class)) or "none"
                raise CnnvisError(f"{what} {item!r}: not an image file, folder or .npy, nor a class of "
                                  f"model {model.name}'s sample images (classes with samples: {known})")
            files.extend(by_class[idx])
    if not files:
        raise CnnvisError(f"{what}: no images")
    return files


def iter_group_chunks(model, files, preprocessing, batch_size: int):
    """``(names, batch)`` chunks of at most ``batch_size`` images of a group (lazy decoding);
    ``.npy`` items are split the same way."""
    from .. import preprocess

    images = [f for f in files if Path(f).suffix.lower() != ".npy"]
    names = dict(zip(images, preprocess.display_names(images))) if images else {}
    pending = []
    for f in files:
        if Path(f).suffix.lower() == ".npy":
            if pending:
                yield from _image_chunks(pending, names, preprocessing, batch_size)
                pending = []
            arr = preprocess.load_input_array(f, expected_shape=model.input_shape)
            stem = Path(f).stem
            for start in range(0, len(arr), batch_size):
                part = arr[start:start + batch_size]
                yield [f"{stem}[{start + i}]" for i in range(len(part))], part
        else:
            pending.append(f)
    if pending:
        yield from _image_chunks(pending, names, preprocessing, batch_size)


def _image_chunks(files, names, preprocessing, batch_size):
    from .. import preprocess

    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        yield [names[f] for f in chunk], preprocess.load_batch(chunk, preprocessing)


def group_size(model, files) -> int:
    """Number of images in a resolved group (``.npy`` arrays counted by their first axis)."""
    total = 0
    for f in files:
        if Path(f).suffix.lower() == ".npy":
            array = load_npy(f, "image group file", "an N×C×H×W array", mmap=True)
            if array.ndim == 0:
                raise CnnvisError(f"image group file {f}: a single value; expected an N×C×H×W array")
            total += int(array.shape[0])
        else:
            total += 1
    return total


def compare_defaults(model) -> dict:
    """The model's sidecar ``compare_classes`` entry: ``{"neuron": ..., "reference": [...],
    "similar": [...], "dissimilar": [...], "per_item": false}`` (lists of class names, files or
    folders; ``per_item``: each item of similar/dissimilar its own group); {} if none."""
    entry = model.sidecar.get("compare_classes") or {}
    if not isinstance(entry, dict):
        raise CnnvisError(f"model {model.name}: sidecar 'compare_classes' must be an object")
    out = {}
    for key, value in entry.items():
        if key == "neuron":
            out[key] = value
        elif key == "per_item":
            if not isinstance(value, bool):
                raise CnnvisError(f"model {model.name}: sidecar compare_classes.per_item must be true or false")
            out[key] = value
        elif key in ("reference", "similar", "dissimilar"):
            out[key] = [value] if isinstance(value, (str, int)) else list(value)
        else:
            raise CnnvisError(f"model {model.name}: sidecar 'compare_classes' has unknown key {key!r} "
                              "(known: neuron, reference, similar, dissimilar, per_item)")
    return out


# ----------------------------------------------------------------------------- group comparison


class ClassComparison:
    """How the gradients of one class neuron differ between groups of images.

    Parameters
    ----------
    model : cnnvis.model.Model
    neuron : class index or name whose logit is differentiated (for every image of every group).
    layer : convolution layer (default: the first).
    batch_size : images per engine call.
    n_permutations, seed : of every permutation test.
    max_vectors_per_group : images per group kept for the cosine matrix and the gradient
        permutation test (the first ones in input order); means, stds and importance tests use all.
    top_k : filters listed per comparison.
    ddof : of the reported standard deviations (1 = sample standard deviation).
    progress : show a tqdm progress bar (stderr).
    tmp_dir : where the float32 memmap of kept vectors lives while ``fit`` runs (default: the
        system temporary folder).
    check_numerical : if > 0, that many random weights of the first reference image's gradient
        are checked against float64 central differences (``gradcheck_``).

    ``fit(groups)`` takes an ordered mapping group name → iterable of ``(names, batch)`` chunks; the
    first group is the reference. Results (attributes ending in ``_``): ``group_names_``,
    ``counts_``, ``importance_mean_``/``importance_std_`` and ``normalized_mean_``/
    ``normalized_std_`` (group → O), ``mean_gradient_`` and ``difference_`` (reference − group)
    volumes, ``cosine_`` (kept images, ordered by group) with ``cosine_groups_``/``cosine_names_``
    and ``cosine_summary_``, ``gradient_tests_``, ``importance_tests_``, ``filter_tests_``,
    ``top_filters_``, ``images_`` (one record per image) and ``summary_`` (all of it, JSON-ready).
    """

    def __init__(self, model, neuron, layer=None, batch_size: int = 32, n_permutations: int = 999,
                 seed: int = 0, max_vectors_per_group: int = 1000, top_k: int = 8, ddof: int = DEFAULT_DDOF,
                 progress: bool = False, tmp_dir=None, check_numerical: int = 0):
        self.model = model
        self.neuron = neuron
        self.layer = layer
        self.batch_size = batch_size
        self.n_permutations = n_permutations
        self.seed = seed
        self.max_vectors_per_group = max_vectors_per_group
        self.top_k = top_k
        self.ddof = ddof
        self.progress = progress
        self.tmp_dir = tmp_dir
        self.check_numerical = check_numerical

    def fit(self, groups, totals=None) -> "ClassComparison":
        from tqdm import tqdm

        groups = dict(groups)
        if len(groups) < 2:
            raise CnnvisError(f"compare: need a reference group and at least one other, got {len(groups)}")
        if int(self.max_vectors_per_group) < 1:
            raise CnnvisError(f"max_vectors_per_group {self.max_vectors_per_group}: expected a positive integer")
        if int(self.top_k) < 1:
            raise CnnvisError(f"top_k {self.top_k}: expected a positive integer")
        self.neuron_ = self.model.class_index(self.neuron, "--neuron")
        cg = ClassGradients(self.model, self.layer, self.batch_size)
        self.layer_ = cg.layer_.name
        self.weights_ = cg.weights_
        shape = tuple(self.weights_.shape)
        dim = int(np.prod(shape))
        cap = int(self.max_vectors_per_group)
        names = list(groups)
        self.group_names_ = names
        total = sum(totals.values()) if totals else None
        moments = {g: (stats.RunningMoments(), stats.RunningMoments(), stats.RunningMoments()) for g in names}
        importance_rows, group_of_row, self.images_ = [], [], []
        self.gradcheck_ = None
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
                    for chunk_names, x in groups[g]:
                        batch = cg.compute(x, target=self.neuron_)
                        bar.set_postfix_str(g)
                        if self.check_numerical and self.gradcheck_ is None:
                            self.gradcheck_ = cg.check_numerical(x[:1], self.neuron_, self.check_numerical,
                                                                 self.seed, analytic=batch.gradients[0])
                            self.gradcheck_image_ = chunk_names[0]
                        imp_m.update(batch.importance)
                        norm_m.update(stats.minmax_rows(batch.importance))
                        grad_m.update(batch.gradients)
                        importance_rows.append(batch.importance)
                        group_of_row += [gi] * len(batch)
                        take = max(0, min(len(batch), cap - kept_in_group))
                        if take:
                            vectors[n_kept:n_kept + take] = batch.gradients[:take].reshape(take, dim)
                            n_kept += take
                            kept_in_group += take
                            kept_groups += [gi] * take
                            kept_names += list(chunk_names[:take])
                        pred = batch.predicted
                        for i, name in enumerate(chunk_names):
                            self.images_.append({
                                "group": g, "image": name, "kept_for_cosine": i < take,
                                "predicted": int(pred[i]), "predicted_name": class_names[pred[i]],
                                "predicted_probability": float(batch.probabilities[i, pred[i]]),
                                "neuron_logit": float(batch.target_logits[i]),
                                "neuron_probability": float(batch.target_probabilities[i]),
                                "gradient_norm": float(np.sqrt(np.sum(batch.importance[i] ** 2))),
                            })
                        bar.update(len(batch))
                    if imp_m.count == 0:
                        raise CnnvisError(f"group {g}: no images")
            gram = stats.gram_matrix(vectors[:n_kept])
            del vectors
        self.counts_ = {g: moments[g][0].count for g in names}
        self.importance_mean_ = {g: moments[g][0].mean for g in names}
        self.importance_std_ = {g: moments[g][0].std(self.ddof) for g in names}
        self.normalized_mean_ = {g: moments[g][1].mean for g in names}
        self.normalized_std_ = {g: moments[g][1].std(self.ddof) for g in names}
        self.mean_gradient_ = {g: moments[g][2].mean.astype(np.float32) for g in names}
        ref = names[0]
        self.difference_ = {g: (moments[ref][2].mean - moments[g][2].mean).astype(np.float32) for g in names[1:]}
        self.cosine_ = stats.cosine_from_gram(gram)
        self.cosine_groups_ = np.asarray(kept_groups, dtype=np.int64)
        self.cosine_names_ = kept_names
        self.cosine_summary_ = stats.block_means(self.cosine_, self.cosine_groups_, names)
        importance = np.concatenate(importance_rows)
        group_of_row = np.asarray(group_of_row)
        self.importance_ = importance
        self.importance_groups_ = group_of_row
        self.gradient_tests_, self.importance_tests_, self.filter_tests_, self.top_filters_ = {}, {}, {}, {}
        for gi, g in enumerate(names[1:], start=1):
            keep = np.flatnonzero((self.cosine_groups_ == 0) | (self.cosine_groups_ == gi))
            self.gradient_tests_[g] = stats.mean_distance_test(
                gram[np.ix_(keep, keep)], self.cosine_groups_[keep] == 0, self.n_permutations, self.seed,
                statistic="distance between group mean gradient vectors")
            rows = np.flatnonzero((group_of_row == 0) | (group_of_row == gi))
            in_ref = group_of_row[rows] == 0
            self.importance_tests_[g] = stats.mean_distance_test(
                None, in_ref, self.n_permutations, self.seed, features=importance[rows],
                statistic="distance between group mean filter-importance vectors")
            self.filter_tests_[g] = stats.feature_difference_test(importance[rows], in_ref, self.n_permutations, self.seed)
            self.top_filters_[g] = self._top_filters(ref, g, self.filter_tests_[g])
        self.summary_ = self._summary()
        return self

    def _top_filters(self, ref, other, test) -> list:
        diff = test.difference
        order = np.argsort(-np.abs(diff), kind="stable")[:min(int(self.top_k), len(diff))]
        out = []
        n_a, n_b = self.counts_[ref], self.counts_[other]
        for f in order:
            sa, sb = self.importance_std_[ref][f], self.importance_std_[other][f]
            pooled = np.nan
            if self.ddof == 1 and n_a + n_b > 2:
                pooled = np.sqrt(((n_a - 1) * sa ** 2 + (n_b - 1) * sb ** 2) / (n_a + n_b - 2))
            out.append({
                "filter": int(f), "difference": float(diff[f]),
                "reference_mean": float(self.importance_mean_[ref][f]), "other_mean": float(self.importance_mean_[other][f]),
                "reference_std": _num(sa), "other_std": _num(sb),
                "effect_size": _num(diff[f] / pooled) if np.isfinite(pooled) and pooled > 0 else None,
                "p_value": float(test.p_values[f]), "p_adjusted": float(test.p_adjusted[f]),
            })
        return out

    def _summary(self) -> dict:
        names = self.group_names_
        return {
            "neuron": self.neuron_, "neuron_name": self.model.class_names[self.neuron_],
            "layer": self.layer_, "weight_shape": list(self.weights_.shape),
            "groups": names, "reference": names[0], "counts": self.counts_,
            "std_ddof": self.ddof,
            "normalized_importance": "each image's filter importances min-max scaled to [0, 1] over the "
                                     "filters, then averaged over the group",
            "importance": "L2 norm of each filter's gradient (over its input channels and kernel)",
            "cosine": {
                "kept_per_group": {g: int(np.sum(self.cosine_groups_ == i)) for i, g in enumerate(names)},
                "max_vectors_per_group": int(self.max_vectors_per_group),
                "policy": "the first max_vectors_per_group images of each group, in input order",
                **self.cosine_summary_,
            },
            "gradient_tests": {g: t.as_dict() for g, t in self.gradient_tests_.items()},
            "importance_tests": {g: t.as_dict() for g, t in self.importance_tests_.items()},
            "top_filters": self.top_filters_,
            "gradcheck": gradcheck_dict(self.gradcheck_, getattr(self, "gradcheck_image_", None)),
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
