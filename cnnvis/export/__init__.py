"""Exports: volumes, figures, 3D rendering, the HTML report."""
