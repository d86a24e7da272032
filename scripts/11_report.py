#!/usr/bin/env python3
"""One self-contained HTML page (OUT_DIR/index.html) for everything the other commands wrote (the same as `cnnvis report`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["report", *sys.argv[1:]]))
