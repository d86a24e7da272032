#!/usr/bin/env python3
"""Write a model as a Caffe deploy.prototxt + .caffemodel (the same as `cnnvis export-caffe`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["export-caffe", *sys.argv[1:]]))
