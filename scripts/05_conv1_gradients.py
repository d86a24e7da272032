#!/usr/bin/env python3
"""Per image: gradient of a class logit w.r.t. conv1's filters as a volume, per-filter importance bar charts and the top filters beside their weights (the same as `cnnvis conv-gradients`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["conv-gradients", *sys.argv[1:]]))
