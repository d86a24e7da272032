#!/usr/bin/env python3
"""Translation/scale/rotation invariance curves (the same as `cnnvis invariance`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["invariance", *sys.argv[1:]]))
