"""Receptive fields: a hand-computed AlexNet chain, and the support of single-unit projections."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis.receptive import receptive_field
from cnnvis.autodiff.engine import GradientEngine
from cnnvis.errors import CnnvisError
from cnnvis.model import Model
from cnnvis.nets import NetBuilder
from cnnvis.onnxgraph import make_model


@pytest.fixture(scope="module")
def thin_alexnet():
    """AlexNet's geometry (kernels, strides, pads) with 4 maps per layer, so that it builds fast."""
    b = NetBuilder(input_shape=(3, 227, 227), seed=0)
    b.conv("conv1", 4, 11, stride=4); b.relu("relu1"); b.lrn("norm1"); b.max_pool("pool1", 3, 2)
    b.conv("conv2", 4, 5, pad=2, group=2); b.relu("relu2"); b.lrn("norm2"); b.max_pool("pool2", 3, 2)
    b.conv("conv3", 4, 3, pad=1); b.relu("relu3")
    b.conv("conv4", 4, 3, pad=1, group=2); b.relu("relu4")
    b.conv("conv5", 4, 3, pad=1, group=2); b.relu("relu5"); b.max_pool("pool5", 3, 2)
    b.fc("fc6", 8); b.relu("relu6"); b.fc("fc8", 3); b.softmax()
    return Model(b.build("thin_alexnet"), name="thin_alexnet")


def test_alexnet_chain_matches_hand_computation(thin_alexnet):
    # size_l = size_{l-1} + (k-1)*stride_{l-1}; stride_l = s*stride_{l-1}; offset_l = offset_{l-1} - p*stride_{l-1}
    expected = {
        "conv1": (11, 4, 0), "relu1": (11, 4, 0), "norm1": (11, 4, 0),
        "pool1": (11 + 2 * 4, 8, 0),                     # 19
        "conv2": (19 + 4 * 8, 8, -2 * 8),                # 51, offset -16
        "pool2": (51 + 2 * 8, 16, -16),                  # 67
        "conv3": (67 + 2 * 16, 16, -16 - 16),            # 99, -32
        "conv4": (99 + 2 * 16, 16, -48),                 # 131
        "conv5": (131 + 2 * 16, 16, -64),                # 163
        "pool5": (163 + 2 * 16, 32, -64),                # 195
    }
    for layer, (size, stride, offset) in expected.items():
        rf = receptive_field(thin_alexnet, layer)
        assert (rf.size, rf.stride, rf.offset) == ((size,) * 2, (stride,) * 2, (offset,) * 2), layer
        assert not rf.is_global
    fc6 = receptive_field(thin_alexnet, "fc6")
    assert fc6.is_global and fc6.box(0, 0) == (0, 0, 227, 227)
    assert receptive_field(thin_alexnet, "input").size == (1, 1)
    # the last pool5 unit (5, 5) ends inside the image: -64 + 5*32 + 195 = 291 > 227, clipped
    assert receptive_field(thin_alexnet, "pool5").clipped_box(5, 5) == (96, 96, 227, 227)


def _net(nodes, inits, shape=(2, 13, 11)):
    graph = helper.make_graph(nodes, "rf", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return Model(make_model(graph), name="rf")


def _support(model, layer, unit, x):
    eng = GradientEngine(model.proto, wrt=[model.input_name], objective="unit",
                         target=model.tensor_name(layer), rule="deconvnet")
    g = eng.run(x, index=unit)[model.input_name][0]
    nz = np.argwhere(np.abs(g).sum(axis=0) > 0)
    return (nz[:, 0].min(), nz[:, 1].min(), nz[:, 0].max() + 1, nz[:, 1].max() + 1), np.abs(g).sum(axis=0) > 0


def test_support_of_positive_net_equals_clipped_box():
    """With positive weights and inputs nothing is rectified away and average pooling spreads to
    its whole window, so a unit's projection covers exactly its (clipped) receptive field."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.uniform(0.1, 1, (3, 2, 3, 3)).astype(np.float32),
             "w2": rng.uniform(0.1, 1, (2, 3, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["data", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("AveragePool", ["r1"], ["p1"], name="p1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="c2", pads=[1, 2, 1, 2], strides=[2, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="r2")]
    model = _net(nodes, inits)
    rf = receptive_field(model, "r2")
    # c1: 3/1/-1; p1: 3+1=4, 2, -1; c2: size 4 + (3-1)*2 = 8, stride (4, 2), offset -1 - (1, 2)*2
    assert rf.size == (8, 8) and rf.stride == (4, 2) and rf.offset == (-3, -5)
    x = rng.uniform(0.5, 1.0, (1, 2, 13, 11)).astype(np.float32)
    oc, oh, ow = model.layer("r2").output_shape
    for y in range(oh):
        for xx in range(ow):
            box, mask = _support(model, "r2", (1, y, xx), x)
            assert box == rf.clipped_box(y, xx), (y, xx)
            assert mask.sum() == (box[2] - box[0]) * (box[3] - box[1])


def test_dilated_field_is_the_hull_of_the_support():
    """A dilated kernel sees a sparse set of pixels; the field is their hull (exact for interior units)."""
    rng = np.random.default_rng(5)
    inits = {"w1": rng.uniform(0.1, 1, (2, 2, 3, 3)).astype(np.float32),
             "w2": rng.uniform(0.1, 1, (2, 2, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["data", "w1"], ["c1"], name="c1", strides=[2, 2]),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], name="c2", dilations=[2, 3], pads=[2, 0, 2, 0])]
    model = _net(nodes, inits, shape=(2, 21, 23))
    rf = receptive_field(model, "c2")
    # c1: 3/2/0; c2: 3 + 2*(2, 3)*2 = (11, 15), stride 2, offset (0 - 2*2, 0)
    assert rf.size == (11, 15) and rf.stride == (2, 2) and rf.offset == (-4, 0)
    x = rng.uniform(0.5, 1.0, (1, 2, 21, 23)).astype(np.float32)
    box, mask = _support(model, "c2", (0, 3, 1), x)
    assert box == rf.box(3, 1) == (2, 2, 13, 17)
    assert 0 < mask.sum() < 11 * 15  # holes between the dilated taps


def test_support_with_maxpool_stays_inside_box():
    rng = np.random.default_rng(4)
    inits = {"w1": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
             "w2": rng.normal(size=(3, 4, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["data", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="p1", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="c2", pads=[1, 1, 1, 1])]
    model = _net(nodes, inits)
    rf = receptive_field(model, "c2")
    assert rf.size == (3 + 2 + 2 * 2,) * 2 and rf.stride == (2, 2) and rf.offset == (-1 - 1 - 2,) * 2
    x = rng.normal(size=(1, 2, 13, 11)).astype(np.float32)
    for unit in [(0, 0, 0), (1, 3, 2), (2, 6, 5), (0, 6, 0)]:
        box, _ = _support(model, "c2", unit, x)
        top, left, bottom, right = rf.clipped_box(*unit[1:])
        assert top <= box[0] and left <= box[1] and box[2] <= bottom and box[3] <= right, unit


def test_patch_pads_outside_with_fill():
    b = NetBuilder(input_shape=(1, 6, 6), seed=0)
    b.conv("conv1", 1, 3, pad=1)
    model = Model(b.build("p"), name="p")
    rf = receptive_field(model, "conv1")
    img = np.arange(36, dtype=np.float32).reshape(1, 6, 6)
    corner = rf.patch(img, 0, 0)
    assert corner.shape == (1, 3, 3)
    assert np.isnan(corner[0, 0]).all() and np.isnan(corner[0, :, 0]).all()
    np.testing.assert_array_equal(corner[0, 1:, 1:], img[0, :2, :2])
    np.testing.assert_array_equal(rf.patch(img, 2, 3), img[:, 1:4, 2:5])
    with pytest.raises(CnnvisError, match="expected an array ending in 6×6"):
        rf.patch(np.zeros((1, 5, 5)), 0, 0)


def test_unknown_op_and_branch_union():
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(2, 2, 3, 3)).astype(np.float32),
             "w2": rng.normal(size=(2, 2, 5, 5)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["data", "w1"], ["a"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["data", "w2"], ["b"], name="b", pads=[2, 2, 2, 2]),
             helper.make_node("Add", ["a", "b"], ["s"], name="s"),
             helper.make_node("Conv", ["s", "w1"], ["t"], name="t", kernel_shape=[3, 3])]
    model = _net(nodes, inits)
    rf = receptive_field(model, "s")
    assert rf.size == (5, 5) and rf.offset == (-2, -2)  # the union of a 3×3 and a 5×5 centred window
    assert receptive_field(model, "t").size == (7, 7)

    nodes = [helper.make_node("ConvTranspose", ["data", "w1"], ["u"], name="up", strides=[2, 2])]
    with pytest.raises(CnnvisError, match="ConvTranspose is not known"):
        receptive_field(_net(nodes, inits), "up")
