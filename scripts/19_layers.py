#!/usr/bin/env python3
"""The layer table of a model (the same as `cnnvis layers`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["layers", *sys.argv[1:]]))
