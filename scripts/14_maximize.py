#!/usr/bin/env python3
"""Activation maximisation patterns of a layer's channels (the same as `cnnvis maximize`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["maximize", *sys.argv[1:]]))
