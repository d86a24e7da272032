#!/usr/bin/env python3
"""Run every analysis on the default model's samples and write the HTML report (the same as `cnnvis run-all`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["run-all", *sys.argv[1:]]))
