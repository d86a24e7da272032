"""Analyses: one module per analysis, each taking arrays or a Model and returning results."""
