#!/usr/bin/env python3
"""How one class neuron's conv1 filter gradients differ between reference, similar and dissimilar images (the same as `cnnvis compare-classes`; run with --help for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnnvis.cli import main  # noqa: E402

sys.exit(main(["compare-classes", *sys.argv[1:]]))
