#!/usr/bin/env python3
"""Train the embedded Fashion-MNIST demo model with cnnvis's own gradients (the same as `cnnvis train-demo`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["train-demo", *sys.argv[1:]]))
