#!/usr/bin/env python3
"""Raw gradients of an objective w.r.t. the input, a layer or a weight (.npy + HDF5) (the same as `cnnvis gradients`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["gradients", *sys.argv[1:]]))
