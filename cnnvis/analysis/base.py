"""The one call shape of cnnvis's model analyses.

``X(model, **params)`` only stores its parameters (nothing is checked, loaded or built there);
``X.run(inputs, target=None)`` checks them, works on a batch (N×C×H×W; a few analyses take what
their inputs are instead: ``ClassComparison`` two groups of such batches, ``TopActivations`` an
iterable of batches) and returns a small dataclass holding the arrays and what the pictures need.
``target`` is what the analysis is about — a class (one for all or one per image), units, … —
with None meaning the analysis' natural default (usually each image's predicted class).

Orderings of a stack (:mod:`cnnvis.analysis.ordering`) are not model analyses: they see a stack
of maps, not a model, and keep scikit-learn's ``fit``/``transform``.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod


class Analysis(ABC):
    """Base of the model analyses: ``__init__`` stores ``model`` and the keyword parameters
    (subclasses list them in their signature), ``get_params`` returns them, ``run`` computes."""

    def __init__(self, model, **params):
        self.model = model
        for name, value in params.items():
            setattr(self, name, value)

    @classmethod
    def _param_names(cls) -> list:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p not in ("self", "model")]

    def get_params(self) -> dict:
        """The stored parameters (the constructor's keywords) by name."""
        return {name: getattr(self, name) for name in self._param_names()}

    @abstractmethod
    def run(self, inputs, target=None):
        """Work on ``inputs`` (a batch) for ``target``; return the analysis's result object."""

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


class PerImage:
    """Mixin of a result holding one record per image in the list field named by ``_per_image``:
    ``len``, indexing and iteration go to that list."""

    _per_image = ""

    def __len__(self):
        return len(getattr(self, self._per_image))

    def __getitem__(self, i):
        return getattr(self, self._per_image)[i]

    def __iter__(self):
        return iter(getattr(self, self._per_image))
