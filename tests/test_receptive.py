"""Receptive fields: a hand-computed AlexNet chain, and the support of single-unit projections."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.analysis.receptive import ReceptiveField, receptive_field, support_field
from cnnvis.autodiff.rules import supported_ops
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


def test_patch_of_a_field_larger_than_the_image_is_cut_to_it():
    """Along an axis where the field (20 rows) exceeds the image (8), the patch spans the image
    (origin 0) with the rows the unit does not see filled; where it fits (3 columns) it is as before."""
    rf = ReceptiveField("l", size=(20, 3), stride=(2, 1), offset=(-15, -1), input_hw=(8, 8))
    img = np.arange(2 * 64, dtype=np.float32).reshape(2, 8, 8)
    assert rf.patch_hw == (8, 3)
    # unit (0, 0): rows -15..4 (clipped 0..4), columns -1..1 (clipped 0..1)
    assert rf.box(0, 0) == (-15, -1, 5, 2) and rf.patch_origin(0, 0) == (0, -1)
    p = rf.patch(img, 0, 0)
    assert p.shape == (2, 8, 3)
    want = np.full((2, 8, 3), np.nan, np.float32)
    want[:, 0:5, 1:3] = img[:, 0:5, 0:2]  # by hand
    np.testing.assert_array_equal(p, want)
    # unit (5, 6): rows -5..14 cover the image, columns 5..7 inside it
    np.testing.assert_array_equal(rf.patch(img, 5, 6), img[:, :, 5:8])
    # unit (11, 2): rows 7..26, only the image's last row is seen
    q = rf.patch(img, 11, 2)
    assert np.isnan(q[:, :7]).all()
    np.testing.assert_array_equal(q[:, 7], img[:, 7, 1:4])
    # the geometry stays the field's; the cut is recorded beside it
    d = rf.as_dict()
    assert d["size"] == [20, 3] and d["offset"] == [-15, -1] and d["patch_hw"] == [8, 3]
    fits = ReceptiveField("l", size=(3, 3), stride=(1, 1), offset=(-1, -1), input_hw=(8, 8))
    assert "patch_hw" not in fits.as_dict()


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

    # no field from the graph, and (without a ConvTranspose rule) none from the gradient: one line
    # naming the op for both
    nodes = [helper.make_node("ConvTranspose", ["data", "w1"], ["u"], name="up", strides=[2, 2])]
    if "ConvTranspose" not in supported_ops():
        with pytest.raises(CnnvisError, match=r"\(ConvTranspose\): op is not known.*\(ConvTranspose\): no backward"):
            receptive_field(_net(nodes, inits), "up")


# ---------------------------------------------------------------- branches, layouts, gradient support

def _consts(**arrays):
    return {k: np.asarray(v) for k, v in arrays.items()}


def test_field_from_gradient_support_where_the_graph_gives_none():
    """A Slice cropping the spatial axes has no graph rule: the field comes from the gradient's
    support and equals the hand computation. c1: size 3, stride 2, offset -1; the crop starting at
    (1, 2) moves the offset by (1, 2) * 2; c2 (3×3): size 3 + 2 * 2 = 7, stride 2."""
    rng = np.random.default_rng(1)
    inits = _consts(w1=rng.uniform(0.1, 1, (3, 2, 3, 3)).astype(np.float32),
                    w2=rng.uniform(0.1, 1, (2, 3, 3, 3)).astype(np.float32),
                    starts=np.array([1, 2], np.int64), ends=np.array([100, 100], np.int64),
                    axes=np.array([2, 3], np.int64))
    nodes = [helper.make_node("Conv", ["data", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Tanh", ["c1"], ["t1"], name="t1"),
             helper.make_node("Slice", ["t1", "starts", "ends", "axes"], ["crop"], name="crop"),
             helper.make_node("Conv", ["crop", "w2"], ["c2"], name="c2")]
    model = _net(nodes, inits, shape=(2, 33, 35))
    rf = receptive_field(model, "c2")
    assert rf.source == "gradient support" and rf.as_dict()["source"] == "gradient support"
    assert rf.size == (7, 7) and rf.stride == (2, 2) and rf.offset == (-1 + 2, -1 + 4)
    assert receptive_field(model, "c1").source == "graph" and "source" not in receptive_field(model, "c1").as_dict()


def _stem(rng, c=4):
    """Conv 3×3 pad 1 stride 2 + Tanh: field 3 / 2 / -1 (stride 2 so that later windows are wide)."""
    return ([helper.make_node("Conv", ["data", "w0"], ["c0"], name="c0", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Tanh", ["c0"], ["t0"], name="t0")],
            {"w0": rng.uniform(0.1, 1, (c, 2, 3, 3)).astype(np.float32)})


def test_squeeze_excitation_gate_keeps_the_spatial_field():
    """x * sigmoid(W2 relu(W1 mean(x))) : the gate is per channel (1×1), so the product keeps x's field;
    the pooled gate itself is global."""
    rng = np.random.default_rng(2)
    nodes, inits = _stem(rng)
    inits.update(w1=rng.normal(size=(2, 4, 1, 1)).astype(np.float32), w2=rng.normal(size=(4, 2, 1, 1)).astype(np.float32),
                 w3=rng.uniform(0.1, 1, (3, 4, 3, 3)).astype(np.float32))
    nodes += [helper.make_node("GlobalAveragePool", ["t0"], ["m"], name="m"),
              helper.make_node("Conv", ["m", "w1"], ["s1"], name="s1"),
              helper.make_node("Relu", ["s1"], ["r1"], name="r1"),
              helper.make_node("Conv", ["r1", "w2"], ["s2"], name="s2"),
              helper.make_node("Sigmoid", ["s2"], ["gate"], name="gate"),
              helper.make_node("Mul", ["t0", "gate"], ["se"], name="se"),
              helper.make_node("Conv", ["se", "w3"], ["c3"], name="c3", pads=[1, 1, 1, 1])]
    model = _net(nodes, inits, shape=(2, 15, 15))
    assert receptive_field(model, "gate").is_global
    se = receptive_field(model, "se")
    assert (se.size, se.stride, se.offset) == ((3, 3), (2, 2), (-1, -1)) and se.source == "graph"
    c3 = receptive_field(model, "c3")
    assert (c3.size, c3.stride, c3.offset) == ((7, 7), (2, 2), (-3, -3))


def test_reduce_mean_over_space_is_global_over_channels_is_not():
    rng = np.random.default_rng(3)
    nodes, inits = _stem(rng)
    inits.update(hw=np.array([2, 3], np.int64), ch=np.array([1], np.int64))
    nodes += [helper.make_node("ReduceMean", ["t0", "ch"], ["mc"], name="mc", keepdims=1),
              helper.make_node("ReduceMean", ["t0", "hw"], ["ms"], name="ms", keepdims=1),
              helper.make_node("Mul", ["mc", "ms"], ["prod"], name="prod"),
              helper.make_node("Squeeze", ["mc"], ["sq"], name="sq"),  # no axes: the channel axis of size 1
              helper.make_node("Unsqueeze", ["sq", "ch"], ["unsq"], name="unsq")]
    model = _net(nodes, inits)
    assert receptive_field(model, "mc").size == (3, 3) and receptive_field(model, "ms").is_global
    for layer in ("sq", "unsq"):
        rf = receptive_field(model, layer)
        assert (rf.size, rf.stride, rf.offset, rf.source) == ((3, 3), (2, 2), (-1, -1), "graph"), layer
    assert receptive_field(model, "prod").size == (3, 3)  # ms is broadcast over space: a per-channel factor


def test_nhwc_transposes_layernorm_and_matmul_keep_the_field():
    """ConvNeXt's block: Transpose to NHWC, LayerNormalization and MatMul over channels (the last
    axis), Transpose back; the spatial axes are followed through both transposes."""
    rng = np.random.default_rng(4)
    nodes, inits = _stem(rng)
    inits.update(scale=np.ones(4, np.float32), bias=np.zeros(4, np.float32),
                 fc=rng.normal(size=(4, 4)).astype(np.float32), w3=rng.uniform(0.1, 1, (2, 4, 3, 3)).astype(np.float32))
    nodes += [helper.make_node("Transpose", ["t0"], ["nhwc"], name="nhwc", perm=[0, 2, 3, 1]),
              helper.make_node("LayerNormalization", ["nhwc", "scale", "bias"], ["ln"], name="ln", axis=-1),
              helper.make_node("MatMul", ["ln", "fc"], ["mm"], name="mm"),
              helper.make_node("Transpose", ["mm"], ["nchw"], name="nchw", perm=[0, 3, 1, 2]),
              helper.make_node("Add", ["nchw", "t0"], ["res"], name="res"),
              helper.make_node("Conv", ["res", "w3"], ["c3"], name="c3")]
    model = _net(nodes, inits)
    for layer in ("ln", "mm", "nchw", "res"):
        rf = receptive_field(model, layer)
        assert (rf.size, rf.stride, rf.offset, rf.is_global) == ((3, 3), (2, 2), (-1, -1), False), layer
    assert receptive_field(model, "c3").size == (7, 7)
    # LayerNormalization over C, H, W of an NCHW tensor mixes space
    nodes2, inits2 = _stem(rng)
    inits2.update(scale=np.ones((4, 7, 6), np.float32))
    nodes2.append(helper.make_node("LayerNormalization", ["t0", "scale"], ["ln"], name="ln", axis=1))
    assert receptive_field(_net(nodes2, inits2), "ln").is_global


def test_channel_shuffle_split_and_concat_keep_the_field():
    """ShuffleNet: Split over channels, a branch, Concat over channels, Reshape (N, 2, C/2, H, W) ->
    Transpose(0, 2, 1, 3, 4) -> Reshape (N, C, H, W) with its shape computed at run time."""
    rng = np.random.default_rng(5)
    nodes, inits = _stem(rng)
    inits.update(wb=rng.uniform(0.1, 1, (2, 2, 3, 3)).astype(np.float32), split=np.array([2, 2], np.int64),
                 five=np.array([0, 2, 2, 7, 6], np.int64), zero=np.array(0, np.int64),
                 axes0=np.array([0], np.int64), rest=np.array([4, 7, 6], np.int64))
    nodes += [helper.make_node("Split", ["t0", "split"], ["a", "b"], name="split", axis=1),
              helper.make_node("Conv", ["b", "wb"], ["bc"], name="bc", pads=[1, 1, 1, 1]),
              helper.make_node("Concat", ["a", "bc"], ["cat"], name="cat", axis=1),
              helper.make_node("Reshape", ["cat", "five"], ["r5"], name="r5"),
              helper.make_node("Transpose", ["r5"], ["sh"], name="sh", perm=[0, 2, 1, 3, 4]),
              helper.make_node("Shape", ["sh"], ["shp"], name="shp"),
              helper.make_node("Gather", ["shp", "zero"], ["n"], name="n", axis=0),
              helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="n1"),
              helper.make_node("Concat", ["n1", "rest"], ["target"], name="target", axis=0),
              helper.make_node("Reshape", ["sh", "target"], ["shuffled"], name="shuffled")]
    model = _net(nodes, inits)
    assert receptive_field(model, "a").size == (3, 3) and receptive_field(model, "bc").size == (7, 7)
    for layer in ("cat", "r5", "sh", "shuffled"):
        rf = receptive_field(model, layer)
        assert (rf.size, rf.stride, rf.offset, rf.source) == ((7, 7), (2, 2), (-3, -3), "graph"), layer


def test_static_field_equals_gradient_support_through_branches():
    """The graph's field and the gradient's support (two independent derivations) agree for an
    interior unit of an Inception-like block (1×1, 3×3 and 5×5 branches and an average pool,
    concatenated over channels) followed by a strided conv."""
    rng = np.random.default_rng(6)
    nodes, inits = _stem(rng)
    inits.update(b1=rng.uniform(0.1, 1, (2, 4, 1, 1)).astype(np.float32),
                 b3=rng.uniform(0.1, 1, (2, 4, 3, 3)).astype(np.float32),
                 b5=rng.uniform(0.1, 1, (2, 4, 5, 5)).astype(np.float32),
                 w=rng.uniform(0.1, 1, (3, 10, 3, 3)).astype(np.float32))
    nodes += [helper.make_node("Conv", ["t0", "b1"], ["x1"], name="x1"),
              helper.make_node("Conv", ["t0", "b3"], ["x3"], name="x3", pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["t0", "b5"], ["x5"], name="x5", pads=[2, 2, 2, 2]),
              helper.make_node("AveragePool", ["t0"], ["xp"], name="xp", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                               count_include_pad=1),
              helper.make_node("Concat", ["x1", "x3", "x5", "xp"], ["inc"], name="inc", axis=1),
              helper.make_node("Tanh", ["inc"], ["ti"], name="ti"),
              helper.make_node("Conv", ["ti", "w"], ["out"], name="out", strides=[2, 2], pads=[1, 1, 1, 1])]
    model = _net(nodes, inits, shape=(2, 47, 45))
    for layer in ("inc", "out"):
        graph, support = receptive_field(model, layer), support_field(model, layer)
        assert support.source == "gradient support"
        assert (graph.size, graph.stride, graph.offset) == (support.size, support.stride, support.offset), layer
    # inc: 3 + (5 - 1) * 2 = 11, offset -1 - 2 * 2 = -5; out: 11 + 2 * 2 = 15, stride 4, offset -5 - 2
    assert receptive_field(model, "out").size == (15, 15) and receptive_field(model, "out").offset == (-7, -7)
