"""The one call shape of the analyses: the constructor only stores, run(inputs, target=None)."""
import inspect

import pytest

from cnnvis.analysis.activations import Activations
from cnnvis.analysis.base import Analysis
from cnnvis.analysis.class_gradients import ClassComparison, ClassGradients
from cnnvis.analysis.deconv import Deconvnet
from cnnvis.analysis.invariance import Invariance
from cnnvis.analysis.maximize import ActivationMaximization
from cnnvis.analysis.occlusion import Occlusion
from cnnvis.analysis.saliency import Saliency
from cnnvis.analysis.topk import TopActivations

ANALYSES = [Activations, ClassGradients, ClassComparison, Deconvnet, Invariance, ActivationMaximization,
            Occlusion, Saliency, TopActivations]


@pytest.mark.parametrize("cls", ANALYSES, ids=lambda c: c.__name__)
def test_constructor_only_stores_and_run_has_the_one_signature(cls):
    assert issubclass(cls, Analysis)
    sig = inspect.signature(cls.__init__)
    names = [p for p in sig.parameters if p not in ("self", "model")]
    # nothing is looked up in the model: a bare object stands in for it, and odd values are kept as given
    params = {n: f"<{n}>" for n in names}
    analysis = cls(object(), **params)
    assert analysis.get_params() == params
    run = list(inspect.signature(cls.run).parameters.values())
    assert [p.name for p in run[:3]] == ["self", "inputs", "target"] and run[2].default is None
    assert repr(analysis).startswith(f"{cls.__name__}(")


def test_per_image_results_index_count_and_iterate_their_records():
    import dataclasses

    from cnnvis.analysis.base import PerImage
    from cnnvis.analysis.invariance import InvarianceResult
    from cnnvis.analysis.occlusion import OcclusionResult

    @dataclasses.dataclass
    class Pairs(PerImage):
        _per_image = "pairs"
        pairs: list
        note: str = "x"

    r = Pairs(["a", "b", "c"])
    assert len(r) == 3 and r[1] == "b" and r[-1] == "c" and list(r) == ["a", "b", "c"]
    assert [f.name for f in dataclasses.fields(Pairs)] == ["pairs", "note"]  # the field name is not a field
    occ, inv = OcclusionResult(maps=[1, 2], plan=None), InvarianceResult(curves=[7])
    assert (len(occ), occ[1], list(occ)) == (2, 2, [1, 2]) and (len(inv), inv[0], list(inv)) == (1, 7, [7])
