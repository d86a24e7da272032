#!/usr/bin/env python3
"""Occlusion sensitivity maps (the same as `cnnvis occlusion`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["occlusion", *sys.argv[1:]]))
