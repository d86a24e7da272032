#!/usr/bin/env python3
"""Accuracy of a model on the Fashion-MNIST test set (the same as `cnnvis evaluate`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["evaluate", *sys.argv[1:]]))
