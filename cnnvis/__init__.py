"""cnnvis: see what a convolutional network does inside.

``import cnnvis`` is light: heavy modules (onnxruntime sessions, pyvista, matplotlib) are imported
only when a command or function needs them.
"""
__version__ = "0.1.0"

from .errors import CnnvisError  # noqa: F401


def __getattr__(name):
    # Flat public API, resolved lazily so that importing the package stays cheap.
    if name == "Model":
        from .model import Model
        return Model
    if name == "load_model":  # the catalog builds Models; cnnvis.model does not know the catalog
        from .registry import load
        return load
    raise AttributeError(f"module 'cnnvis' has no attribute {name!r}")
