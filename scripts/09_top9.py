#!/usr/bin/env python3
"""The 9 strongest activations of every map over a folder of images, with projections (paper Figure 2) (the same as `cnnvis topk`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["topk", *sys.argv[1:]]))
