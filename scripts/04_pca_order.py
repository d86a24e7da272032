#!/usr/bin/env python3
"""Reorder a layer's maps by their projection on the first principal component of the whole maps (the same as `cnnvis order --method pca-maps`; --method pca-rows orders by one row instead; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["order", "--method", "pca-maps", *sys.argv[1:]]))
