"""The k strongest activations of every feature map of a layer over a stream of images
(Zeiler & Fergus 2014, Figure 2), kept in bounded memory and resumable.

:class:`TopK` holds, per map, the k best (value, image index, position) seen so far and the names
of the images seen. The order is total: value descending, then image order, then position
(row-major), so the result does not depend on how the images were split into chunks. Its state
(:meth:`TopK.to_state` / :meth:`TopK.from_state`) is plain JSON with exact float32 values, so a run
interrupted after any chunk continues to the same result.
"""
from __future__ import annotations

import base64
import binascii

import numpy as np

from ..errors import CnnvisError
from .base import Analysis

STATE_VERSION = 2  # arrays as base64 of little-endian bytes (v1: JSON lists, 30 ms a chunk for fc6)


class TopK:
    """Running top-``k`` activations per feature map.

    Fitted attributes (after :meth:`update`): ``values_`` (C×m float32, m ≤ k, best first),
    ``images_`` and ``positions_`` (C×m int64: image index in stream order, flat y·W+x),
    ``map_shape_`` ((C, H, W); a feature vector of F values is F maps of 1×1) and ``image_names_``.
    """

    def __init__(self, k: int = 9):
        if int(k) < 1:
            raise CnnvisError(f"k={k!r}: expected a positive integer", params="k")
        self.k = int(k)
        self.values_ = None
        self.images_ = None
        self.positions_ = None
        self.map_shape_ = None
        self.image_names_: list = []

    @property
    def n_images_(self) -> int:
        return len(self.image_names_)

    def update(self, acts, names=None) -> "TopK":
        """Take one chunk: ``acts`` N×C×H×W (or N×F) for the next N images of the stream."""
        acts = np.asarray(acts)
        if acts.ndim == 2:
            acts = acts[:, :, None, None]
        if acts.ndim != 4:
            raise CnnvisError(f"top-k: expected N×C×H×W activations or N×F features, got shape {acts.shape}")
        n, c, h, w = acts.shape
        names = [f"#{self.n_images_ + i}" for i in range(n)] if names is None else list(names)
        if len(names) != n:
            raise CnnvisError(f"top-k: {len(names)} names for {n} images")
        if self.map_shape_ is None:
            self.map_shape_ = (c, h, w)
            self.values_ = np.zeros((c, 0), np.float32)
            self.images_ = np.zeros((c, 0), np.int64)
            self.positions_ = np.zeros((c, 0), np.int64)
        elif tuple(self.map_shape_) != (c, h, w):
            raise CnnvisError(f"top-k: maps of shape {(c, h, w)} after {tuple(self.map_shape_)}")
        if n == 0:
            return self
        if not (np.isfinite(acts.min()) and np.isfinite(acts.max())):  # two reductions, no mask
            i = int(np.argwhere(~np.isfinite(acts))[0][0])
            raise CnnvisError(f"image {names[i]}: the layer's activations contain NaN or infinity")
        first = self.n_images_
        acts = acts.astype(np.float32, copy=False)
        if not self._sparse_update(acts, first):
            # one row per map; column j = image (j // HW), position (j % HW): column order is the tie order
            flat = np.ascontiguousarray(acts.transpose(1, 0, 2, 3)).reshape(c, -1)
            cols = chunk_top(flat, self.k)
            vals = np.take_along_axis(flat, cols, axis=1)
            hw = h * w
            self._merge(vals, first + cols // hw, cols % hw)
        self.image_names_.extend(str(s) for s in names)
        return self

    def _sparse_update(self, acts, first) -> bool:
        """Merge a chunk by looking only at entries that can still enter a map's top k.

        Two bounds rule entries out: a map's stored k-th value (an entry must beat it strictly: an
        equal one loses the tie, its image comes later) and the k-th largest of this chunk's
        per-image peaks (k entries of the chunk reach it, so the map's final k-th value is at
        least that). One max over each map of each image finds the (image, map) pairs worth a
        look; only those are compared element by element and merged with one flat sort. Returns
        False (nothing done) when the candidates are too many for that to pay."""
        c, k = self.map_shape_[0], self.k
        n = acts.shape[0]
        by_map = acts.reshape(n, c, -1)
        peak = by_map.max(axis=2)  # n × c
        low = np.full(c, -np.inf, np.float32)
        if n >= k:
            low = -np.partition(-peak, k - 1, axis=0)[k - 1]  # reached by k entries of the chunk
        full = self.values_.shape[1] >= k
        kth = self.values_[:, k - 1] if full else np.full(c, -np.inf, np.float32)
        pairs = (peak >= low[None]) & (peak > kth[None])
        img, maps = np.nonzero(pairs)
        if len(img) > 8 * c * k:
            return False
        rows = by_map[img, maps]  # pairs × HW, a small copy
        hit = (rows >= low[maps][:, None]) & (rows > kth[maps][:, None])
        if np.count_nonzero(hit) > 16 * c * k:
            return False
        r, pos = np.nonzero(hit)
        maps_new, img_new = maps[r], img[r]
        have = self.values_.shape[1]
        all_maps = np.concatenate([np.repeat(np.arange(c), have), maps_new])
        all_vals = np.concatenate([self.values_.reshape(-1), rows[r, pos]])
        all_imgs = np.concatenate([self.images_.reshape(-1), first + img_new])
        all_pos = np.concatenate([self.positions_.reshape(-1), pos])
        order = np.lexsort((all_pos, all_imgs, -all_vals, all_maps))
        grouped = all_maps[order]
        rank = np.arange(len(order)) - np.searchsorted(grouped, grouped)  # rank within its map
        counts = np.bincount(grouped, minlength=c)
        if counts.min() < k:  # a map with fewer than k candidates in all (tiny maps): the dense path
            return False
        keep = order[rank < k]  # map by map, best first: exactly k per map
        self.values_ = all_vals[keep].reshape(c, k)
        self.images_ = all_imgs[keep].reshape(c, k)
        self.positions_ = all_pos[keep].reshape(c, k)
        return True

    def _merge(self, values, images, positions):
        v = np.concatenate([self.values_, values], axis=1)
        i = np.concatenate([self.images_, images], axis=1)
        p = np.concatenate([self.positions_, positions], axis=1)
        order = np.lexsort((p, i, -v), axis=1)[:, :self.k]
        self.values_ = np.take_along_axis(v, order, axis=1)
        self.images_ = np.take_along_axis(i, order, axis=1)
        self.positions_ = np.take_along_axis(p, order, axis=1)

    # ------------------------------------------------------------------ results
    def units(self, m: int) -> list:
        """Map ``m``'s records, best first: dicts with rank, value, image, name, y, x."""
        _, _, w = self.map_shape_
        out = []
        for r in range(self.values_.shape[1]):
            img, pos = int(self.images_[m, r]), int(self.positions_[m, r])
            out.append({"map": int(m), "rank": r, "value": float(self.values_[m, r]), "image": img,
                        "name": self.image_names_[img], "y": pos // w, "x": pos % w})
        return out

    def records(self) -> list:
        """Every map's records (map order, then rank)."""
        if self.map_shape_ is None:
            return []
        return [rec for m in range(self.map_shape_[0]) for rec in self.units(m)]

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict:
        """A JSON-ready dict; float32 values round-trip exactly through JSON's float64."""
        return {"version": STATE_VERSION, "k": self.k,
                "map_shape": list(self.map_shape_) if self.map_shape_ is not None else None,
                "images": list(self.image_names_),
                "values": _pack(self.values_, "<f4"), "image_index": _pack(self.images_, "<i8"),
                "positions": _pack(self.positions_, "<i8")}

    @classmethod
    def from_state(cls, state: dict, source: str = "state") -> "TopK":
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            top = cls(int(state["k"]))
            top.image_names_ = [str(s) for s in state["images"]]
            if state["map_shape"] is not None:
                top.map_shape_ = tuple(int(d) for d in state["map_shape"])
                c = top.map_shape_[0]
                top.values_ = _unpack(state["values"], "<f4", np.float32).reshape(c, -1)
                top.images_ = _unpack(state["image_index"], "<i8", np.int64).reshape(c, -1)
                top.positions_ = _unpack(state["positions"], "<i8", np.int64).reshape(c, -1)
                if not (top.values_.shape == top.images_.shape == top.positions_.shape) \
                        or top.values_.shape[1] > top.k:
                    raise ValueError("arrays of different shapes")
                if top.images_.size and (top.images_.min() < 0 or top.images_.max() >= len(top.image_names_)):
                    raise ValueError("image index out of range")
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise CnnvisError(f"{source}: not a valid top-k state ({exc})") from None
        return top


def _pack(array, dtype: str):
    """An array as base64 text of its little-endian bytes (exact, and fast for 10^5 entries)."""
    if array is None:
        return None
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _unpack(text, dtype: str, as_type) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=dtype).astype(as_type)


def chunk_top(flat, k: int) -> np.ndarray:
    """Column indices of each row's k largest values, best first; ties go to the smaller column.

    ``flat`` is C×M. One ``np.partition`` finds each row's k-th value; everything above it is in,
    and of the entries equal to it only the first ones (by column) fill the rest, so a dead map
    (all zeros) costs no more than a live one.
    """
    c, m = flat.shape
    kk = min(int(k), m)
    if kk == 0:
        return np.zeros((c, 0), np.int64)
    kth = np.partition(flat, m - kk, axis=1)[:, m - kk][:, None]
    greater = flat > kth
    equal = flat == kth
    need = kk - greater.sum(axis=1)
    take = greater
    surplus = equal.sum(axis=1) > need
    take[~surplus] |= equal[~surplus]
    for r in np.flatnonzero(surplus):
        take[r, np.flatnonzero(equal[r])[:need[r]]] = True
    cols = np.nonzero(take)[1].reshape(c, kk)  # ascending column within each row
    vals = np.take_along_axis(flat, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(cols, order, axis=1)


class TopActivations(Analysis):
    """The top-``k`` activations of every map of ``layer`` over a stream of images:
    ``TopActivations(model, layer, k=9).run(chunks)`` → :class:`TopK`.

    Parameters
    ----------
    model : :class:`cnnvis.model.Model`
    layer : the layer (C×H×W maps, or a feature vector: F maps of 1×1).
    k : activations kept per map.
    batch_size : images per onnxruntime call.
    on_chunk : ``on_chunk(top)`` runs after each chunk (to save state; raising from it stops the
        stream with everything so far kept).
    """

    def __init__(self, model, layer, k: int = 9, batch_size: int = 32, on_chunk=None):
        super().__init__(model, layer=layer, k=k, batch_size=batch_size, on_chunk=on_chunk)

    def run(self, inputs, target=None, resume: TopK | None = None) -> TopK:
        """Stream ``inputs`` — a batch (N×C×H×W) or an iterable of ``(names, batch)`` chunks —
        through the model and keep every map's top-k. ``target``: None (every map is kept; pick
        maps from the result with :meth:`TopK.units`). ``resume``: a TopK to continue (its images
        are taken as already seen)."""
        from .deconv import layer_shape

        if target is not None:
            raise CnnvisError(f"target={target!r}: top-k keeps every map; choose maps from the result",
                              params="target")
        layer_shape(self.model, self.layer)
        top = TopK(self.k) if resume is None else resume
        chunks = [(None, inputs)] if isinstance(inputs, np.ndarray) else inputs
        for names, batch in chunks:
            acts = self.model.run(batch, [self.layer], batch_size=self.batch_size)[self.layer]
            top.update(acts, names)
            if self.on_chunk is not None:
                self.on_chunk(top)
        return top
