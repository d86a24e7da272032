#!/usr/bin/env python3
"""3-D pictures of a layer's maps or of a volume file: PNG, orbit GIF, or a window with --show (the same as `cnnvis render`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["render", *sys.argv[1:]]))
