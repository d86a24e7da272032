"""The runtime Caffe schema: Caffe's field numbers, both variants, nothing left unknown."""
import numpy as np
import pytest

from cnnvis.caffe import schema

# (message, field, number) facts from Caffe's caffe.proto.
FIELD_NUMBERS = [
    ("NetParameter", "name", 1), ("NetParameter", "layers", 2), ("NetParameter", "input", 3),
    ("NetParameter", "input_dim", 4), ("NetParameter", "input_shape", 8), ("NetParameter", "layer", 100),
    ("LayerParameter", "name", 1), ("LayerParameter", "type", 2), ("LayerParameter", "bottom", 3),
    ("LayerParameter", "top", 4), ("LayerParameter", "blobs", 7), ("LayerParameter", "include", 8),
    ("LayerParameter", "convolution_param", 106), ("LayerParameter", "inner_product_param", 117),
    ("LayerParameter", "pooling_param", 121), ("LayerParameter", "lrn_param", 118),
    ("LayerParameter", "batch_norm_param", 139), ("LayerParameter", "scale_param", 142),
    ("LayerParameter", "input_param", 143),
    ("V1LayerParameter", "type", 5), ("V1LayerParameter", "blobs", 6), ("V1LayerParameter", "name", 4),
    ("V1LayerParameter", "convolution_param", 10),
    ("BlobProto", "num", 1), ("BlobProto", "channels", 2), ("BlobProto", "height", 3), ("BlobProto", "width", 4),
    ("BlobProto", "data", 5), ("BlobProto", "shape", 7), ("BlobProto", "double_data", 8), ("BlobShape", "dim", 1),
    ("ConvolutionParameter", "num_output", 1), ("ConvolutionParameter", "kernel_size", 4),
    ("ConvolutionParameter", "stride", 6), ("ConvolutionParameter", "dilation", 18),
    ("PoolingParameter", "pool", 1), ("PoolingParameter", "global_pooling", 12),
]


@pytest.mark.parametrize("message, field, number", FIELD_NUMBERS)
def test_caffe_field_numbers(message, field, number):
    descriptor = getattr(schema.messages(), message).DESCRIPTOR
    assert descriptor.fields_by_name[field].number == number


def test_defaults_and_enums_follow_caffe():
    m = schema.messages()
    conv, pool, lrn = m.ConvolutionParameter(), m.PoolingParameter(), m.LRNParameter()
    assert conv.bias_term and conv.group == 1
    assert pool.pool == m.PoolingParameter.MAX and pool.stride == 1 and pool.round_mode == m.PoolingParameter.CEIL
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (5, 1.0, 0.75, 1.0)
    assert m.DropoutParameter().dropout_ratio == pytest.approx(0.5)
    assert m.BatchNormParameter().eps == pytest.approx(1e-5)
    assert m.V1LayerParameter.CONVOLUTION == 4 and m.V1LayerParameter.SLICE == 33
    assert m.EltwiseParameter().operation == m.EltwiseParameter.SUM
    assert m.NetState().phase == 1  # TEST


def test_raw_variant_reads_the_same_bytes_as_bytes():
    m, raw = schema.messages(), schema.raw_messages()
    values = np.linspace(-1, 1, 7, dtype=np.float32)
    blob = m.BlobProto()
    blob.shape.dim.extend([7])
    blob.data.extend(values.tolist())
    fast = raw.BlobProto.FromString(blob.SerializeToString())
    np.testing.assert_array_equal(np.frombuffer(b"".join(fast.data), "<f4"), values)
    assert raw.BlobProto.DESCRIPTOR.fields_by_name["data"].number == 5


def test_unknown_fields_are_found():
    layer = schema.messages().LayerParameter.FromString(b"\x0a\x01a" + b"\xb8\x3e\x01")  # field 999, varint
    assert schema.find_unknown_fields(layer) == ["LayerParameter"]
    assert schema.has_unknown_field(layer, 999) and not schema.has_unknown_field(layer, 1)


def test_real_caffemodel_has_no_unknown_fields(shared_dir):
    data = (shared_dir / "caffe/cifar10_quick/cifar10_quick_iter_4000.caffemodel").read_bytes()
    for variant in (schema.messages(), schema.raw_messages()):
        net = variant.NetParameter.FromString(data)
        assert schema.find_unknown_fields(net) == []
        assert [layer.type for layer in net.layer][:2] == ["Data", "Convolution"]
