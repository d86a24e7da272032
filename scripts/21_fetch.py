#!/usr/bin/env python3
"""Download a known model into the cache, verified (the same as `cnnvis fetch`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["fetch", *sys.argv[1:]]))
