#!/usr/bin/env python3
"""A conv layer's filters as a tile grid (the classic conv1 picture) (the same as `cnnvis filters`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["filters", *sys.argv[1:]]))
