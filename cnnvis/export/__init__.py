"""Exports: volumes, figures, plots of analysis results, 3D rendering, tables, the HTML report."""

#: what :mod:`cnnvis.export.render` draws; here so that the CLI lists the modes without importing
#: numpy or VTK
RENDER_MODES = ("volume", "isosurface", "threshold", "slices", "stack")
