#!/usr/bin/env python3
"""A layer's maps as 3-D volumes: .hdf for ParaView, .vti, CNN-VIS .vox/.hd, .npy (the same as `cnnvis volume`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["volume", *sys.argv[1:]]))
