#!/usr/bin/env python3
"""Known models, which are present and where (the same as `cnnvis models`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["models", *sys.argv[1:]]))
