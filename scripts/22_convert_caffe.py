#!/usr/bin/env python3
"""Convert a Caffe deploy.prototxt + .caffemodel to ONNX (the same as `cnnvis convert-caffe`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["convert-caffe", *sys.argv[1:]]))
