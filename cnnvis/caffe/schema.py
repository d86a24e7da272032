"""Caffe's message schema, declared at run time (no protoc, no generated ``caffe_pb2``).

The messages below are the parts of Caffe's ``caffe.proto`` that describe networks and weights,
with Caffe's own field numbers, types and defaults, so that binary ``.caffemodel`` files and text
``.prototxt`` files written by Caffe parse exactly. They are written in a small proto-like notation
and turned into a ``FileDescriptorProto`` that a private descriptor pool compiles into message
classes.

Two variants are built from the same text:

* :func:`messages` - the faithful schema (``BlobProto.data`` is ``repeated float``), used for
  prototxt and for building small files in tests;
* :func:`raw_messages` - identical except that the packed number arrays of ``BlobProto`` are
  declared ``repeated bytes``. Packed arrays and bytes share the same wire format, so this variant
  hands the little-endian payload to ``numpy.frombuffer`` instead of materialising tens of millions
  of Python floats (the BVLC AlexNet weights are 61 M floats).
"""
from __future__ import annotations

import functools
import types

# Notation: "message Name" starts a message; an indented "enum Name A=0 B=1" declares a nested
# enum (a top-level "enum" line declares a file-level enum); fields are
# "<label> <type> <name> <number> [default]" with label o (optional), r (repeated) or
# p (repeated, packed). Types are proto scalar types or names of messages/enums.
_SCHEMA = """
enum Phase TRAIN=0 TEST=1

message BlobShape
  p int64 dim 1

message BlobProto
  o BlobShape shape 7
  p float data 5
  p float diff 6
  p double double_data 8
  p double double_diff 9
  o int32 num 1 0
  o int32 channels 2 0
  o int32 height 3 0
  o int32 width 4 0

message BlobProtoVector
  r BlobProto blobs 1

message FillerParameter
  enum VarianceNorm FAN_IN=0 FAN_OUT=1 AVERAGE=2
  o string type 1 constant
  o float value 2 0
  o float min 3 0
  o float max 4 1
  o float mean 5 0
  o float std 6 1
  o int32 sparse 7 -1
  o VarianceNorm variance_norm 8 FAN_IN

message NetParameter
  o string name 1
  r string input 3
  r BlobShape input_shape 8
  r int32 input_dim 4
  o bool force_backward 5 false
  o NetState state 6
  o bool debug_info 7 false
  r LayerParameter layer 100
  r V1LayerParameter layers 2

message NetState
  o Phase phase 1 TEST
  o int32 level 2 0
  r string stage 3

message NetStateRule
  o Phase phase 1
  o int32 min_level 2
  o int32 max_level 3
  r string stage 4
  r string not_stage 5

message ParamSpec
  enum DimCheckMode STRICT=0 PERMISSIVE=1
  o string name 1
  o DimCheckMode share_mode 2
  o float lr_mult 3 1
  o float decay_mult 4 1

message LayerParameter
  o string name 1
  o string type 2
  r string bottom 3
  r string top 4
  o Phase phase 10
  r float loss_weight 5
  r ParamSpec param 6
  r BlobProto blobs 7
  r bool propagate_down 11
  r NetStateRule include 8
  r NetStateRule exclude 9
  o TransformationParameter transform_param 100
  o LossParameter loss_param 101
  o AccuracyParameter accuracy_param 102
  o ArgMaxParameter argmax_param 103
  o BatchNormParameter batch_norm_param 139
  o BiasParameter bias_param 141
  o ClipParameter clip_param 148
  o ConcatParameter concat_param 104
  o ContrastiveLossParameter contrastive_loss_param 105
  o ConvolutionParameter convolution_param 106
  o CropParameter crop_param 144
  o DataParameter data_param 107
  o DropoutParameter dropout_param 108
  o DummyDataParameter dummy_data_param 109
  o EltwiseParameter eltwise_param 110
  o ELUParameter elu_param 140
  o EmbedParameter embed_param 137
  o ExpParameter exp_param 111
  o FlattenParameter flatten_param 135
  o HDF5DataParameter hdf5_data_param 112
  o HDF5OutputParameter hdf5_output_param 113
  o HingeLossParameter hinge_loss_param 114
  o ImageDataParameter image_data_param 115
  o InfogainLossParameter infogain_loss_param 116
  o InnerProductParameter inner_product_param 117
  o InputParameter input_param 143
  o LogParameter log_param 134
  o LRNParameter lrn_param 118
  o MemoryDataParameter memory_data_param 119
  o MVNParameter mvn_param 120
  o ParameterParameter parameter_param 145
  o PoolingParameter pooling_param 121
  o PowerParameter power_param 122
  o PReLUParameter prelu_param 131
  o PythonParameter python_param 130
  o RecurrentParameter recurrent_param 146
  o ReductionParameter reduction_param 136
  o ReLUParameter relu_param 123
  o ReshapeParameter reshape_param 133
  o ScaleParameter scale_param 142
  o SigmoidParameter sigmoid_param 124
  o SoftmaxParameter softmax_param 125
  o SPPParameter spp_param 132
  o SliceParameter slice_param 126
  o SwishParameter swish_param 147
  o TanHParameter tanh_param 127
  o ThresholdParameter threshold_param 128
  o TileParameter tile_param 138
  o WindowDataParameter window_data_param 129

message TransformationParameter
  o float scale 1 1
  o bool mirror 2 false
  o uint32 crop_size 3 0
  o string mean_file 4
  r float mean_value 5
  o bool force_color 6 false
  o bool force_gray 7 false

message LossParameter
  enum NormalizationMode FULL=0 VALID=1 BATCH_SIZE=2 NONE=3
  o int32 ignore_label 1
  o NormalizationMode normalization 3 VALID
  o bool normalize 2

message AccuracyParameter
  o uint32 top_k 1 1
  o int32 axis 2 1
  o int32 ignore_label 3

message ArgMaxParameter
  o bool out_max_val 1 false
  o uint32 top_k 2 1
  o int32 axis 3

message ClipParameter
  o float min 1
  o float max 2

message ConcatParameter
  o int32 axis 2 1
  o uint32 concat_dim 1 1

message BatchNormParameter
  o bool use_global_stats 1
  o float moving_average_fraction 2 0.999
  o float eps 3 1e-5

message BiasParameter
  o int32 axis 1 1
  o int32 num_axes 2 1
  o FillerParameter filler 3

message ContrastiveLossParameter
  o float margin 1 1
  o bool legacy_version 2 false

message ConvolutionParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  o uint32 num_output 1
  o bool bias_term 2 true
  r uint32 pad 3
  r uint32 kernel_size 4
  r uint32 stride 6
  r uint32 dilation 18
  o uint32 pad_h 9 0
  o uint32 pad_w 10 0
  o uint32 kernel_h 11
  o uint32 kernel_w 12
  o uint32 stride_h 13
  o uint32 stride_w 14
  o uint32 group 5 1
  o FillerParameter weight_filler 7
  o FillerParameter bias_filler 8
  o Engine engine 15 DEFAULT
  o int32 axis 16 1
  o bool force_nd_im2col 17 false

message CropParameter
  o int32 axis 1 2
  r uint32 offset 2

message DataParameter
  enum DB LEVELDB=0 LMDB=1
  o string source 1
  o uint32 batch_size 4
  o uint32 rand_skip 7 0
  o DB backend 8 LEVELDB
  o float scale 2 1
  o string mean_file 3
  o uint32 crop_size 5 0
  o bool mirror 6 false
  o bool force_encoded_color 9 false
  o uint32 prefetch 10 4

message DropoutParameter
  o float dropout_ratio 1 0.5

message DummyDataParameter
  r FillerParameter data_filler 1
  r BlobShape shape 6
  r uint32 num 2
  r uint32 channels 3
  r uint32 height 4
  r uint32 width 5

message EltwiseParameter
  enum EltwiseOp PROD=0 SUM=1 MAX=2
  o EltwiseOp operation 1 SUM
  r float coeff 2
  o bool stable_prod_grad 3 true

message ELUParameter
  o float alpha 1 1

message EmbedParameter
  o uint32 num_output 1
  o uint32 input_dim 2
  o bool bias_term 3 true
  o FillerParameter weight_filler 4
  o FillerParameter bias_filler 5

message ExpParameter
  o float base 1 -1
  o float scale 2 1
  o float shift 3 0

message FlattenParameter
  o int32 axis 1 1
  o int32 end_axis 2 -1

message HDF5DataParameter
  o string source 1
  o uint32 batch_size 2
  o bool shuffle 3 false

message HDF5OutputParameter
  o string file_name 1

message HingeLossParameter
  enum Norm L1=1 L2=2
  o Norm norm 1 L1

message ImageDataParameter
  o string source 1
  o uint32 batch_size 4 1
  o uint32 rand_skip 7 0
  o bool shuffle 8 false
  o uint32 new_height 9 0
  o uint32 new_width 10 0
  o bool is_color 11 true
  o float scale 2 1
  o string mean_file 3
  o uint32 crop_size 5 0
  o bool mirror 6 false
  o string root_folder 12

message InfogainLossParameter
  o string source 1
  o int32 axis 2 1

message InnerProductParameter
  o uint32 num_output 1
  o bool bias_term 2 true
  o FillerParameter weight_filler 3
  o FillerParameter bias_filler 4
  o int32 axis 5 1
  o bool transpose 6 false

message InputParameter
  r BlobShape shape 1

message LogParameter
  o float base 1 -1
  o float scale 2 1
  o float shift 3 0

message LRNParameter
  enum NormRegion ACROSS_CHANNELS=0 WITHIN_CHANNEL=1
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  o uint32 local_size 1 5
  o float alpha 2 1
  o float beta 3 0.75
  o NormRegion norm_region 4 ACROSS_CHANNELS
  o float k 5 1
  o Engine engine 6 DEFAULT

message MemoryDataParameter
  o uint32 batch_size 1
  o uint32 channels 2
  o uint32 height 3
  o uint32 width 4

message MVNParameter
  o bool normalize_variance 1 true
  o bool across_channels 2 false
  o float eps 3 1e-9

message ParameterParameter
  o BlobShape shape 1

message PoolingParameter
  enum PoolMethod MAX=0 AVE=1 STOCHASTIC=2
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  enum RoundMode CEIL=0 FLOOR=1
  o PoolMethod pool 1 MAX
  o uint32 pad 4 0
  o uint32 pad_h 9 0
  o uint32 pad_w 10 0
  o uint32 kernel_size 2
  o uint32 kernel_h 5
  o uint32 kernel_w 6
  o uint32 stride 3 1
  o uint32 stride_h 7
  o uint32 stride_w 8
  o Engine engine 11 DEFAULT
  o bool global_pooling 12 false
  o RoundMode round_mode 13 CEIL

message PowerParameter
  o float power 1 1
  o float scale 2 1
  o float shift 3 0

message PReLUParameter
  o FillerParameter filler 1
  o bool channel_shared 2 false

message PythonParameter
  o string module 1
  o string layer 2
  o string param_str 3
  o bool share_in_parallel 4 false

message RecurrentParameter
  o uint32 num_output 1 0
  o FillerParameter weight_filler 2
  o FillerParameter bias_filler 3
  o bool debug_info 4 false
  o bool expose_hidden 5 false

message ReductionParameter
  enum ReductionOp SUM=1 ASUM=2 SUMSQ=3 MEAN=4
  o ReductionOp operation 1 SUM
  o int32 axis 2 0
  o float coeff 3 1

message ReLUParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  o float negative_slope 1 0
  o Engine engine 2 DEFAULT

message ReshapeParameter
  o BlobShape shape 1
  o int32 axis 2 0
  o int32 num_axes 3 -1

message ScaleParameter
  o int32 axis 1 1
  o int32 num_axes 2 1
  o FillerParameter filler 3
  o bool bias_term 4 false
  o FillerParameter bias_filler 5

message SigmoidParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  o Engine engine 1 DEFAULT

message SliceParameter
  o int32 axis 3 1
  r uint32 slice_point 2
  o uint32 slice_dim 1 1

message SoftmaxParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  o Engine engine 1 DEFAULT
  o int32 axis 2 1

message SPPParameter
  enum PoolMethod MAX=0 AVE=1 STOCHASTIC=2
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  o uint32 pyramid_height 1
  o PoolMethod pool 2 MAX
  o Engine engine 6 DEFAULT

message SwishParameter
  o float beta 1 1

message TanHParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  o Engine engine 1 DEFAULT

message ThresholdParameter
  o float threshold 1 0

message TileParameter
  o int32 axis 1 1
  o int32 tiles 2

message WindowDataParameter
  o string source 1
  o float scale 2 1
  o string mean_file 3
  o uint32 batch_size 4
  o uint32 crop_size 5 0
  o bool mirror 6 false
  o float fg_threshold 7 0.5
  o float bg_threshold 8 0.5
  o float fg_fraction 9 0.25
  o uint32 context_pad 10 0
  o string crop_mode 11 warp
  o bool cache_images 12 false
  o string root_folder 13

message V1LayerParameter
  enum LayerType NONE=0 ABSVAL=35 ACCURACY=1 ARGMAX=30 BNLL=2 CONCAT=3 CONTRASTIVE_LOSS=37 CONVOLUTION=4 DATA=5 DECONVOLUTION=39 DROPOUT=6 DUMMY_DATA=32 EUCLIDEAN_LOSS=7 ELTWISE=25 EXP=38 FLATTEN=8 HDF5_DATA=9 HDF5_OUTPUT=10 HINGE_LOSS=28 IM2COL=11 IMAGE_DATA=12 INFOGAIN_LOSS=13 INNER_PRODUCT=14 LRN=15 MEMORY_DATA=29 MULTINOMIAL_LOGISTIC_LOSS=16 MVN=34 POOLING=17 POWER=26 RELU=18 SIGMOID=19 SIGMOID_CROSS_ENTROPY_LOSS=27 SILENCE=36 SOFTMAX=20 SOFTMAX_LOSS=21 SPLIT=22 SLICE=33 TANH=23 WINDOW_DATA=24 THRESHOLD=31
  enum DimCheckMode STRICT=0 PERMISSIVE=1
  r string bottom 2
  r string top 3
  o string name 4
  r NetStateRule include 32
  r NetStateRule exclude 33
  o LayerType type 5
  r BlobProto blobs 6
  r string param 1001
  r DimCheckMode blob_share_mode 1002
  r float blobs_lr 7
  r float weight_decay 8
  r float loss_weight 35
  o AccuracyParameter accuracy_param 27
  o ArgMaxParameter argmax_param 23
  o ConcatParameter concat_param 9
  o ContrastiveLossParameter contrastive_loss_param 40
  o ConvolutionParameter convolution_param 10
  o DataParameter data_param 11
  o DropoutParameter dropout_param 12
  o DummyDataParameter dummy_data_param 26
  o EltwiseParameter eltwise_param 24
  o ExpParameter exp_param 41
  o HDF5DataParameter hdf5_data_param 13
  o HDF5OutputParameter hdf5_output_param 14
  o HingeLossParameter hinge_loss_param 29
  o ImageDataParameter image_data_param 15
  o InfogainLossParameter infogain_loss_param 16
  o InnerProductParameter inner_product_param 17
  o LRNParameter lrn_param 18
  o MemoryDataParameter memory_data_param 22
  o MVNParameter mvn_param 34
  o PoolingParameter pooling_param 19
  o PowerParameter power_param 21
  o ReLUParameter relu_param 30
  o SigmoidParameter sigmoid_param 38
  o SoftmaxParameter softmax_param 39
  o SliceParameter slice_param 31
  o TanHParameter tanh_param 37
  o ThresholdParameter threshold_param 25
  o WindowDataParameter window_data_param 20
  o TransformationParameter transform_param 36
  o LossParameter loss_param 42
"""

#: V1 (enum) layer types and the V2 type strings Caffe's upgrade code gives them.
V1_TYPE_NAMES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

_SCALARS = {
    "double": 1, "float": 2, "int64": 3, "uint64": 4, "int32": 5, "bool": 8, "string": 9,
    "bytes": 12, "uint32": 13,
}
_TYPE_MESSAGE, _TYPE_ENUM = 11, 14
_LABEL = {"o": 1, "r": 3, "p": 3}
_RAW_BLOB_FIELDS = {"data", "diff", "double_data", "double_diff"}


def _parse_schema(text):
    """The notation above as {'enums': {name: [(value, number)]}, 'messages': [...]} in order."""
    top_enums, messages = {}, []
    current = None
    for raw in text.splitlines():
        if not raw.strip():
            continue
        indented = raw.startswith(" ")
        words = raw.split()
        if words[0] == "message":
            current = {"name": words[1], "enums": {}, "fields": []}
            messages.append(current)
        elif words[0] == "enum":
            values = [(v.split("=")[0], int(v.split("=")[1])) for v in words[2:]]
            (current["enums"] if indented else top_enums)[words[1]] = values
        else:
            label, ftype, name, number = words[:4]
            default = words[4] if len(words) > 4 else None
            current["fields"].append((label, ftype, name, int(number), default))
    return top_enums, messages


def _file_descriptor(package: str, raw_blobs: bool):
    from google.protobuf import descriptor_pb2

    top_enums, messages = _parse_schema(_SCHEMA)
    message_names = {m["name"] for m in messages}
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
    for name, values in top_enums.items():
        enum = fdp.enum_type.add(name=name)
        for vname, number in values:
            enum.value.add(name=vname, number=number)
    for spec in messages:
        msg = fdp.message_type.add(name=spec["name"])
        for name, values in spec["enums"].items():
            enum = msg.enum_type.add(name=name)
            for vname, number in values:
                enum.value.add(name=vname, number=number)
        for label, ftype, name, number, default in spec["fields"]:
            field = msg.field.add(name=name, number=number, label=_LABEL[label])
            if raw_blobs and spec["name"] == "BlobProto" and name in _RAW_BLOB_FIELDS:
                field.type = _SCALARS["bytes"]
                continue
            if ftype in _SCALARS:
                field.type = _SCALARS[ftype]
            elif ftype in message_names:
                field.type = _TYPE_MESSAGE
                field.type_name = f".{package}.{ftype}"
            elif ftype in spec["enums"]:
                field.type = _TYPE_ENUM
                field.type_name = f".{package}.{spec['name']}.{ftype}"
            elif ftype in top_enums:
                field.type = _TYPE_ENUM
                field.type_name = f".{package}.{ftype}"
            else:  # pragma: no cover - a typo in the schema text
                raise ValueError(f"schema: unknown type {ftype} for {spec['name']}.{name}")
            if label == "p":
                field.options.packed = True
            if default is not None:
                field.default_value = default
    return fdp


def _build(package: str, raw_blobs: bool):
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor(package, raw_blobs))
    namespace = types.SimpleNamespace()
    for name in [m["name"] for m in _parse_schema(_SCHEMA)[1]]:
        setattr(namespace, name, _message_class(pool.FindMessageTypeByName(f"{package}.{name}")))
    namespace.pool = pool
    return namespace


def _message_class(descriptor):
    from google.protobuf import message_factory

    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)  # pragma: no cover


@functools.lru_cache(maxsize=None)
def messages():
    """Message classes of Caffe's schema: ``messages().NetParameter``, ``.BlobProto``, ..."""
    return _build("caffe", raw_blobs=False)


@functools.lru_cache(maxsize=None)
def raw_messages():
    """The same schema with ``BlobProto`` number arrays as raw bytes (fast weight loading)."""
    return _build("caffe", raw_blobs=True)


def unknown_field_count(message) -> int:
    """Number of fields of ``message`` (not its sub-messages) that the schema did not know."""
    try:
        from google.protobuf import unknown_fields

        return len(unknown_fields.UnknownFieldSet(message))
    except ImportError:  # pragma: no cover - protobuf < 4.22
        return len(message.UnknownFields())


def has_unknown_field(message, number: int) -> bool:
    """True when ``message`` carries an undeclared field with this number."""
    try:
        from google.protobuf import unknown_fields

        return any(f.field_number == number for f in unknown_fields.UnknownFieldSet(message))
    except ImportError:  # pragma: no cover - protobuf < 4.22
        return any(f[0] == number for f in message.UnknownFields())


def find_unknown_fields(message, path: str = "") -> list:
    """Paths of every (sub-)message holding fields the schema does not declare."""
    found = []
    if unknown_field_count(message):
        found.append(path or message.DESCRIPTOR.name)
    for field, value in message.ListFields():
        if field.type != _TYPE_MESSAGE:
            continue
        if _is_repeated(field):
            for i, item in enumerate(value):
                found.extend(find_unknown_fields(item, f"{path}.{field.name}[{i}]".lstrip(".")))
        else:
            found.extend(find_unknown_fields(value, f"{path}.{field.name}".lstrip(".")))
    return found


def _is_repeated(field) -> bool:
    # protobuf >= 6 removed FieldDescriptor.label in favour of is_repeated.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED  # pragma: no cover - older protobuf
