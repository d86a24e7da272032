#!/usr/bin/env python3
"""Reorder a layer's maps by k-means clusters of one row of every map, as CNN-VIS did (the same as `cnnvis order --method kmeans-rows`; a later --method overrides it; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["order", "--method", "kmeans-rows", *sys.argv[1:]]))
