#!/usr/bin/env python3
"""Projections of each map's strongest activation across training checkpoints (paper Figure 4) (the same as `cnnvis evolution`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["evolution", *sys.argv[1:]]))
