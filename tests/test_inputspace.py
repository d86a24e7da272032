"""Input-space helpers the sensitivity analyses share: class names, the default feature layer, and
the preprocessing's input space (grey, pixel range, back to a picture)."""
import numpy as np
import pytest
from test_occlusion import chain_model, region_model

from cnnvis.analysis.inputspace import default_feature_layer, probabilities, resolve_class
from cnnvis.errors import CnnvisError
from cnnvis.preprocess import InputSpace, preset


def test_resolve_class_by_index_name_and_predicted():
    m = region_model()
    assert resolve_class(m, "1") == 1 and resolve_class(m, None) is None
    assert resolve_class(m, "predicted") is None and resolve_class(m, "") is None
    with pytest.raises(CnnvisError):
        resolve_class(m, "5")


def test_probabilities_of_a_softmax_output_are_the_output():
    m = chain_model()
    p = np.array([[0.1, 0.2, 0.3, 0.25, 0.15]])
    np.testing.assert_allclose(probabilities(m, p), p, rtol=1e-12)


def test_input_space_caffe_roundtrip_and_grey():
    pre = preset("caffe", (3, 8, 8))
    space = InputSpace(pre, (3, 8, 8))
    assert np.array_equal(space.grey_, np.zeros((3, 1, 1)))
    rng = np.random.default_rng(0)
    pixels = rng.random((8, 8, 3))
    x = pre.from_pixels(pixels)  # BGR, ×255, minus the mean
    np.testing.assert_allclose(space.to_display(x), pixels, atol=1e-5)
    # black and white pixels are the ends of the valid range
    np.testing.assert_allclose(space.low_[:, 0, 0], -np.array(pre.mean), atol=1e-4)
    np.testing.assert_allclose(space.high_[:, 0, 0], 255.0 - np.array(pre.mean), atol=1e-4)
    grey = InputSpace(preset("grey28", (1, 8, 8)), (1, 8, 8))
    assert grey.grey_.reshape(-1).tolist() == [0.5]
    imagenet = InputSpace(preset("imagenet", (3, 8, 8)), (3, 8, 8))
    assert np.array_equal(imagenet.grey_, np.zeros((3, 1, 1)))


def test_default_feature_layer_is_the_last_map_layer():
    assert default_feature_layer(chain_model()) == "relu2"
    assert default_feature_layer(region_model()) == "relu"
