#!/usr/bin/env python3
"""Deconvnet projections of a layer's maps beside the input patch under each unit (the same as `cnnvis deconv`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["deconv", *sys.argv[1:]]))
