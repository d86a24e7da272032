#!/usr/bin/env python3
"""2D grids of every layer's activations for some images (the same as `cnnvis activations`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["activations", *sys.argv[1:]]))
