#!/usr/bin/env python3
"""Check the gradient engine against float64 finite differences (the same as `cnnvis gradcheck`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["gradcheck", *sys.argv[1:]]))
