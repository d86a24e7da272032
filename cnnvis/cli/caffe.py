"""`cnnvis convert-caffe` (Caffe -> ONNX) and `cnnvis export-caffe` (ONNX -> Caffe)."""
from __future__ import annotations

import sys
from pathlib import Path

from . import common

ORDER = 80


def register(sub) -> None:
    p = sub.add_parser(
        "convert-caffe", help="convert a Caffe .prototxt (+ .caffemodel / .caffemodel.h5) to ONNX",
        description="Convert a Caffe net to an ONNX model that computes what Caffe computes (TEST "
                    "phase). Weights are matched to the prototxt by layer name, so a snapshot of the "
                    "training net works with its deploy prototxt; binary and HDF5 weights are told "
                    "apart by content. Without weights, deterministic random weights are generated. "
                    "A train/test prototxt opens as its deploy net: the data layer becomes the input "
                    "(shape from the data layer or --input-shape), losses and Accuracy are dropped.")
    p.add_argument("prototxt", help="Caffe net definition (.prototxt, V1 or V2)")
    p.add_argument("weights", nargs="?", default=None,
                   help="Caffe weights: binary .caffemodel or HDF5 .caffemodel.h5 (omit to generate)")
    p.add_argument("--output", "-o", default=None,
                   help="the .onnx file to write (default: <prototxt name>.onnx in the current folder)")
    p.add_argument("--fill", default="he", choices=("he", "xavier", "gaussian"),
                   help="generated weights when no weights file is given (default he)")
    p.add_argument("--seed", type=common.seed, default=0, help="seed of the generated weights (default 0)")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="the net's input shape (a train/test prototxt whose data layer does not say it)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=cmd_convert_caffe)

    p = sub.add_parser(
        "export-caffe", help="write a model as a Caffe deploy .prototxt and binary .caffemodel",
        description="Write an ONNX model (or a registry model) for Caffe users: a deploy prototxt "
                    "and a binary caffemodel. Only ops with an exact Caffe layer are accepted.")
    common.add_model_options(p)
    p.add_argument("--name", default=None, help="file name stem and net name (default: the model's name)")
    common.add_output_options(p, "out/caffe")
    p.set_defaults(func=cmd_export_caffe)


def cmd_convert_caffe(args) -> int:
    import onnx

    from .. import caffe
    from ..manifest import RunOutput, sha256_file

    prototxt = Path(args.prototxt)
    output = Path(args.output) if args.output else Path.cwd() / (prototxt.stem + ".onnx")
    _check_output_file(output, "--output" if args.output else "the default output")
    model = caffe.load_caffe(prototxt, args.weights, fill=args.fill, seed=args.seed, input_shape=args.input_shape)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:  # a converter gap, said in one line
        from ..errors import CnnvisError

        raise CnnvisError(f"{prototxt}: the converted ONNX graph is invalid ({str(exc).splitlines()[0]})") from None
    inputs = [str(prototxt)] + ([str(args.weights)] if args.weights else [])
    params = {"fill": args.fill, "seed": args.seed} if args.weights is None else {}
    if args.input_shape is not None:
        params["input_shape"] = list(caffe.parse_input_shape(args.input_shape))
    meta = caffe.caffe_metadata(model)
    model_info = {"name": prototxt.stem, "prototxt_sha256": meta.get(caffe.META_PROTOTXT_SHA),
                  "weights_sha256": meta.get(caffe.META_WEIGHTS_SHA)}
    with RunOutput(output.parent, "convert-caffe", params=params, inputs=inputs, model=model_info) as run:
        path = run.path(output.name, kind="onnx")
        path.write_bytes(model.SerializeToString())
    count = sum(_size(i) for names in meta.get(caffe.META_PARAMS, {}).values()
                for i in model.graph.initializer if i.name in names)
    shapes = ", ".join(f"{i.name} {_dims(i)}" for i in model.graph.input)
    outs = ", ".join(o.name for o in model.graph.output)
    source = "generated weights" if args.weights is None else Path(args.weights).name
    for note in caffe.caffe_notes(model):
        print(f"cnnvis: note: {note}", file=sys.stderr)
    print(f"wrote {output} ({len(meta.get(caffe.META_TYPES, {}))} Caffe layers, {count:,} parameters "
          f"from {source}; input {shapes}; output {outs}; sha256 {sha256_file(output)[:16]}…)")
    return 0


def cmd_export_caffe(args) -> int:
    from .. import caffe
    from ..manifest import RunOutput

    model = common.load_model(args)
    name = common.safe_name(args.name or model.name)
    net, blobs = caffe.onnx_to_caffe(model.proto, name=args.name or model.name)
    with RunOutput(args.out, "export-caffe", params={"name": name}, inputs=[args.model or model.name],
                   model=model.info()) as run:
        run.path(f"{name}.prototxt", kind="prototxt").write_text(caffe.prototxt_text(net), encoding="utf-8")
        run.path(f"{name}.caffemodel", kind="caffemodel").write_bytes(caffe.caffemodel_bytes(net, blobs))
    print(f"wrote {Path(args.out) / (name + '.prototxt')} and {name}.caffemodel ({len(net.layer)} layers)")
    return 0


def _check_output_file(output: Path, what: str) -> None:
    """The .onnx file to write: not a folder, in a folder that exists or can be made (checked
    before the conversion spends any time)."""
    from ..errors import CnnvisError

    if output.is_dir():
        raise CnnvisError(f"{what} {output}: is a folder; expected the .onnx file to write")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CnnvisError(f"{what} {output}: {parent} is a file, not a folder")
            break


def _size(init) -> int:
    size = 1
    for d in init.dims:
        size *= int(d)
    return size


def _dims(value_info) -> str:
    dims = value_info.type.tensor_type.shape.dim
    return "×".join(d.dim_param or str(d.dim_value) for d in dims)
