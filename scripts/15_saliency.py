#!/usr/bin/env python3
"""Saliency heat maps: gradient, guided backprop, Grad-CAM (the same as `cnnvis saliency`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["saliency", *sys.argv[1:]]))
