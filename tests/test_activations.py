"""Activations of a batch: a 1×1 convolution and a ReLU against numpy, layer resolution, the
protocol's stored parameters."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis import activations
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.onnxgraph import make_model

W = np.array([[1.0, -2.0], [0.5, 0.25], [-1.0, 0.0]], np.float32)  # 3 output channels from 2 inputs
B = np.array([0.1, -0.2, 0.3], np.float32)


def tiny():
    nodes = [helper.make_node("Conv", ["data", "w", "b"], ["conv"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("Flatten", ["relu"], ["flat"], name="flat", axis=1),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["fc"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(W.reshape(3, 2, 1, 1), "w"), numpy_helper.from_array(B, "b"),
             numpy_helper.from_array(np.ones((2, 3 * 4 * 4), np.float32), "fw"),
             numpy_helper.from_array(np.zeros(2, np.float32), "fb")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("fc", TensorProto.FLOAT, ["N", 2])], inits)
    return Model(make_model(graph), name="tiny")


def test_activations_of_a_batch_equal_numpy():
    model = tiny()
    x = np.random.default_rng(0).standard_normal((5, 2, 4, 4)).astype(np.float32)
    res = activations.Activations(model, ["conv", "relu"], batch_size=2).run(x)  # three chunks
    conv = np.einsum("oc,nchw->nohw", W.astype(np.float64), x.astype(np.float64)) + B[None, :, None, None]
    assert res.layers == ["conv", "relu"]
    np.testing.assert_allclose(res["conv"], conv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["relu"], np.maximum(conv, 0), rtol=1e-5, atol=1e-6)


def test_default_layers_parameters_and_errors():
    model = tiny()
    a = activations.Activations(model, layers=["nope"], batch_size=3)  # the constructor only stores
    assert a.get_params() == {"layers": ["nope"], "batch_size": 3}
    x = np.zeros((1, 2, 4, 4), np.float32)
    with pytest.raises(CnnvisError, match="nope"):
        a.run(x)
    assert activations.Activations(model).run(x).layers == activations.default_layers(model) == ["conv", "relu", "fc"]
    assert activations.Activations(model, ["all", "relu"]).run(x).layers == ["conv", "relu", "fc"]
