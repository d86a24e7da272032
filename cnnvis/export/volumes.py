"""Stacks of feature maps as 3-D volumes: VTKHDF ``.hdf``, ``.vti``, CNN-VIS ``.vox``/``.hd``, ``.npy``.

Axis convention (the same for every format cnnvis writes and reads)
-------------------------------------------------------------------
A volume is a stack of 2-D maps, held in numpy as ``stack[z, row, col]`` (C×H×W):

* **x = width**: column ``col`` of each map, growing to the right;
* **y = height, image row 0 at the top**, as in the 2-D grids. VTK's y axis points *up*, so the
  VTK formats (``.hdf``, ``.vti``) store the rows flipped: world ``y = origin_y + (H-1-row)·spacing_y``.
  Their Direction matrix stays the identity, because ParaView versions differ in how they honour a
  flipped Direction in volume rendering;
* **z = the stack's channel order** (after any reordering): slice ``z`` lies at
  ``origin_z + z·spacing_z``; the point array ``channel`` holds the index each slice had before it
  was reordered.

Spacing is given per axis in (x, y, z) order. The array formats (``.npy`` and ``.vox``) hold the
stack as is, C-order [z][row][col] (channel-major, column fastest), so each reader gives back the
same ``stack[z, row, col]`` whatever the format.

Four-dimensional arrays N×Cin×kh×kw (e.g. conv1 weight gradients, 96×3×11×11) become volumes by
``layout``:

* ``"stack"`` (default): (N·Cin)×kh×kw, slice ``z = n·Cin + cin`` (each filter's input channels are
  neighbouring slices; a batch-of-one activation 1×C×H×W becomes its C×H×W stack);
* ``"tiles"``: N×kh×(Cin·kw), the Cin maps of filter ``n`` side by side along x:
  ``x = cin·kw + col``.

Both layouts add the point arrays ``filter`` (n) and ``input_channel`` (cin).

Point arrays of every VTK volume: ``value`` (the raw values; float32, or float64 when given
float64), ``normalized`` (0..1, see :data:`NORMALIZATIONS`), ``mask`` (uint8, ``normalized >
threshold``: the "binary output of each filter") and ``channel`` (int32). The ``.vox`` file holds
``round(255·normalized)`` as uint8; ``.npy`` holds the raw values.

Metadata (model, layer, image, permutation, normalisation, layout, ...) is stored as HDF5
attributes of a ``/cnnvis`` group beside ``/VTKHDF`` (``json`` holds all of it as one JSON text),
and in the ``.vti`` as the field-data string ``cnnvis_metadata``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import limits
from ..errors import CnnvisError
from ..manifest import atomic_path, hdf5_file, save_npy, to_jsonable, write_bytes, write_text

#: How the ``normalized`` array is made: ``global`` min–max over the whole volume, ``per-channel``
#: min–max of each slice, ``symmetric`` ``0.5 + x / (2·max|x|)`` (zero stays at 0.5; for signed
#: values such as gradients). A constant volume (or slice) normalises to 0 (0.5 for symmetric).
NORMALIZATIONS = ("global", "per-channel", "symmetric")
LAYOUTS = ("stack", "tiles")
#: Names of the point arrays, in the order they are written.
ARRAY_NAMES = ("value", "normalized", "mask", "channel", "filter", "input_channel")
AXES_NOTE = ("x = width (column); y = height with image row 0 at the top (VTK rows stored "
             "flipped); z = channel order of the stack")


@dataclass
class VolumeData:
    """A volume read back from a file, in the axis convention of this module.

    ``values`` is the primary array as ``[z, row, col]``; ``arrays`` every stored point array in the
    same order; ``spacing`` and ``origin`` are in (x, y, z) order.
    """

    values: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    arrays: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    format: str = ""

    @property
    def shape(self):
        return self.values.shape


# --------------------------------------------------------------------------------------------
# validation and array preparation


def format_of(path) -> str:
    """The format name of ``path`` from its suffix; one-line error for an unknown suffix."""
    suffix = Path(path).suffix.lower()
    for fmt in FORMATS.values():
        if fmt.suffix == suffix:
            return fmt.name
    raise CnnvisError(f"{path}: unknown volume format {suffix or '(no suffix)'!r}; "
                      f"expected one of {', '.join(f.suffix for f in FORMATS.values())}")


def volume_format(name: str) -> "VolumeFormat":
    """The registry entry of format ``name``; one-line error for an unknown name."""
    if name not in FORMATS:
        raise CnnvisError(f"volume format {name!r}: expected one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def companion_paths(path) -> list:
    """Files written beside ``path`` (the ``.hd`` header of a ``.vox``, the ParaView script of a
    ``.hdf``), so that callers can register them as outputs too."""
    path = Path(path)
    return [path.with_name(path.stem + tail) for tail, _ in FORMATS[format_of(path)].companions]


def check_finite(array: np.ndarray, name: str = "array") -> None:
    import numpy as np

    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise CnnvisError(f"{name}: expected a real numeric array, got dtype {array.dtype}")
    if array.size == 0:
        raise CnnvisError(f"{name}: empty array of shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise CnnvisError(f"{name}: {bad} NaN or inf values; expected finite values")


def as_stack(array, name: str = "array") -> np.ndarray:
    """Check a C×H×W stack (finite real numbers) and return it as a numpy array."""
    import numpy as np

    array = np.asarray(array)
    if array.ndim != 3:
        raise CnnvisError(f"{name}: expected a C×H×W stack (3-D), got shape {tuple(array.shape)}")
    check_finite(array, name)
    return array


def stack_from_array(array, layout: str = "stack", name: str = "array"):
    """Turn a 3-D stack or a 4-D N×Cin×kh×kw array into a C×H×W stack (see the module docstring).

    Returns ``(stack, extra)`` where ``extra`` maps point-array names (``filter``,
    ``input_channel``; empty for 3-D input) to int32 arrays of the stack's shape.
    """
    import numpy as np

    array = np.asarray(array)
    if layout not in LAYOUTS:
        raise CnnvisError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if array.ndim == 3:
        check_finite(array, name)
        return array, {}
    if array.ndim != 4:
        raise CnnvisError(f"{name}: expected a C×H×W stack or an N×C×H×W array, "
                          f"got shape {tuple(array.shape)}")
    check_finite(array, name)
    n, cin, kh, kw = array.shape
    filt = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None, None, None], array.shape)
    inch = np.broadcast_to(np.arange(cin, dtype=np.int32)[None, :, None, None], array.shape)
    if layout == "stack":
        def shape(a):
            return np.ascontiguousarray(a).reshape(n * cin, kh, kw)
    else:
        def shape(a):
            # (n, cin, kh, kw) -> (n, kh, cin, kw) -> (n, kh, cin*kw): x = cin*kw + col
            return np.ascontiguousarray(np.transpose(a, (0, 2, 1, 3))).reshape(n, kh, cin * kw)
    return shape(array), {"filter": shape(filt), "input_channel": shape(inch)}


def check_permutation(permutation, n: int, name: str = "permutation") -> np.ndarray:
    import numpy as np

    perm = np.asarray(permutation)
    if perm.ndim != 1 or perm.size != n or not np.issubdtype(perm.dtype, np.integer) \
            or not np.array_equal(np.sort(perm, kind="stable"), np.arange(n)):
        raise CnnvisError(f"{name}: expected a permutation of 0..{n - 1} ({n} integers), "
                          f"got {perm.size} values")
    return perm.astype(np.int64)


def _triple(value, name: str, positive: bool) -> tuple:
    import numpy as np

    try:
        vals = tuple(float(v) for v in (value if np.ndim(value) else (value,) * 3))
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(np.isfinite(vals)) or (positive and min(vals) <= 0):
        kind = "positive " if positive else ""
        raise CnnvisError(f"{name} {value!r}: expected 3 finite {kind}numbers (x, y, z)")
    return vals


def normalize(stack: np.ndarray, mode: str = "global"):
    """``stack`` scaled to 0..1 by ``mode`` (see :data:`NORMALIZATIONS`), as float64.

    Returns ``(normalized, info)``; ``info`` records the range that was used.
    """
    if mode not in NORMALIZATIONS:
        raise CnnvisError(f"normalization {mode!r}: expected one of {', '.join(NORMALIZATIONS)}")
    import numpy as np

    from . import figures

    x = np.asarray(stack, dtype=np.float64)
    if mode == "global":
        return figures.normalize(x), {"mode": mode, "min": float(x.min()), "max": float(x.max())}
    if mode == "per-channel":
        return figures.normalize(x, axis=(1, 2)), {"mode": mode, "min": x.min(axis=(1, 2)).tolist(),
                                                    "max": x.max(axis=(1, 2)).tolist()}
    return figures.symmetric(x), {"mode": mode, "max_abs": float(np.abs(x).max())}


@dataclass
class _Prepared:
    values: np.ndarray
    normalized: np.ndarray
    arrays: dict
    spacing: tuple
    origin: tuple
    metadata: dict


def prepare_volume(array, *, layout="stack", permutation=None, normalization="global",
                   threshold=0.5, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                   metadata=None, name="array") -> _Prepared:
    """Validate everything and compute every point array, before any file is touched."""
    import numpy as np

    stack, extra = stack_from_array(array, layout=layout, name=name)
    spacing = _triple(spacing, "spacing", positive=True)
    origin = _triple(origin, "origin", positive=False)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0.0 <= threshold <= 1.0:
        raise CnnvisError(f"threshold {threshold}: expected a number in [0, 1] "
                          "(it applies to the normalised values)")
    c = stack.shape[0]
    perm = np.arange(c) if permutation is None else check_permutation(permutation, c)
    stack = stack[perm]
    extra = {k: v[perm] for k, v in extra.items()}
    values = stack.astype(np.float64 if stack.dtype == np.float64 else np.float32)
    norm, norm_info = normalize(stack, normalization)
    channel = np.broadcast_to(perm.astype(np.int32)[:, None, None], stack.shape)
    arrays = {
        "value": values,
        "normalized": norm.astype(np.float32),
        "mask": (norm > threshold).astype(np.uint8),
        "channel": channel,
    }
    arrays.update(extra)
    meta = {
        "axes": AXES_NOTE,
        "shape_zyx": list(stack.shape),
        "source_shape": list(np.shape(array)),
        "layout": layout if np.ndim(array) == 4 else "stack",
        "permutation": perm.tolist(),
        "normalization": norm_info,
        "threshold": threshold,
    }
    from .. import __version__

    meta["cnnvis_version"] = __version__
    user = to_jsonable(dict(metadata or {}))
    clash = sorted(set(user) & set(meta))
    if clash:
        raise CnnvisError(f"metadata: keys {', '.join(clash)} are reserved for the volume writer")
    meta.update(user)
    return _Prepared(values, norm, arrays, spacing, origin, meta)


# --------------------------------------------------------------------------------------------
# writers


def write_volume(path, array, *, layout="stack", permutation=None, normalization="global",
                 threshold=0.5, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), metadata=None,
                 name="array") -> list:
    """Write ``array`` (C×H×W, or N×Cin×kh×kw by ``layout``) as the volume format of ``path``'s suffix.

    ``permutation`` reorders the slices (slice ``z`` of the file is slice ``permutation[z]`` of the
    input). Each file is written atomically; every argument is checked before the first write.
    Returns the paths written: ``path`` and its :func:`companion_paths`.
    """
    path = Path(path)
    fmt = format_of(path)
    prep = prepare_volume(array, layout=layout, permutation=permutation,
                          normalization=normalization, threshold=threshold, spacing=spacing,
                          origin=origin, metadata=metadata, name=name)
    return FORMATS[fmt].writer(path, prep)


def write_volumes(base, array, formats=None, **kwargs) -> list:
    """Write the same volume in several formats (default: every one of :data:`FORMATS`):
    ``base`` + ``.hdf``, ``.vti``, ... (see :func:`write_volume` for the keyword arguments).
    Returns every path written."""
    return write_prepared(base, prepare_volume(array, **kwargs), formats)


def write_prepared(base, prep, formats=None) -> list:
    """Write a :func:`prepare_volume` result in ``formats`` (names; default: all) beside ``base``
    (suffixes added)."""
    base = Path(base)
    chosen = [volume_format(name) for name in (FORMATS if formats is None else formats)]
    written = []
    for fmt in chosen:
        written += fmt.writer(base.with_name(base.name + fmt.suffix), prep)
    return written


def _vtk_order(stack: np.ndarray) -> np.ndarray:
    """[z][row][col] -> [z][j][i] with j = H-1-row (VTK y points up)."""
    import numpy as np

    return np.ascontiguousarray(stack[:, ::-1, :])


def _write_hdf(path: Path, prep: _Prepared) -> list:
    import numpy as np

    nz, ny, nx = prep.values.shape
    with atomic_path(path) as tmp:
        with hdf5_file(tmp, shown=path) as f:
            root = f.create_group("VTKHDF")
            root.attrs["Version"] = np.array([1, 0], dtype=np.int64)
            # ParaView 5.11 accepts only a fixed-length ASCII string here (not h5py's default str).
            root.attrs["Type"] = np.bytes_("ImageData")
            root.attrs["WholeExtent"] = np.array([0, nx - 1, 0, ny - 1, 0, nz - 1], dtype=np.int64)
            root.attrs["Origin"] = np.array(prep.origin, dtype=np.float64)
            root.attrs["Spacing"] = np.array(prep.spacing, dtype=np.float64)
            root.attrs["Direction"] = np.eye(3, dtype=np.float64).ravel()
            point_data = root.create_group("PointData", track_order=True)
            for array_name, arr in prep.arrays.items():
                point_data.create_dataset(array_name, data=_vtk_order(arr))  # stored (nz, ny, nx)
            meta = f.create_group("cnnvis", track_order=True)
            meta.attrs["json"] = json.dumps(prep.metadata, sort_keys=True)
            for key, value in prep.metadata.items():
                simple = _h5_simple(value)
                if simple is not None:
                    meta.attrs[key] = simple
    script = companion_paths(path)[0]
    with atomic_path(script) as tmp:
        tmp.write_text(paraview_script(path.name, prep.metadata.get("threshold", 0.5)),
                       encoding="utf-8")
    return [path, script]


def _h5_simple(value):
    """An HDF5-attribute form of a simple metadata value (for h5dump readers), or None."""
    import numpy as np

    if isinstance(value, bool):
        return np.int8(value)
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return np.asarray(value)
    return None


def _pyvista_grid(prep: _Prepared):
    import pyvista as pv

    nz, ny, nx = prep.values.shape
    grid = pv.ImageData(dimensions=(nx, ny, nz), spacing=prep.spacing, origin=prep.origin)
    for array_name, arr in prep.arrays.items():
        grid.point_data[array_name] = _vtk_order(arr).ravel(order="C")
    grid.point_data.active_scalars_name = "normalized"
    return grid


def _write_vti(path: Path, prep: _Prepared) -> list:
    from vtkmodules.vtkCommonCore import vtkStringArray
    from vtkmodules.vtkIOXML import vtkXMLImageDataWriter

    grid = _pyvista_grid(prep)
    text = vtkStringArray()
    text.SetName("cnnvis_metadata")
    text.InsertNextValue(json.dumps(prep.metadata, sort_keys=True))
    grid.GetFieldData().AddArray(text)
    with atomic_path(path) as tmp:
        # The VTK writer directly: pyvista's save() picks the writer from the suffix, and the
        # temporary file's suffix is ".part".
        writer = vtkXMLImageDataWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputData(grid)
        writer.SetDataModeToAppended()
        if writer.Write() != 1:
            raise CnnvisError(f"{path}: VTK could not write the .vti file")
    return [path]


def vox_bytes(normalized: np.ndarray) -> np.ndarray:
    """The ``.vox`` payload: ``round(255·normalized)`` as uint8, shape [z][row][col]."""
    import numpy as np

    return np.clip(np.rint(np.asarray(normalized, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _write_vox(path: Path, prep: _Prepared) -> list:
    import numpy as np

    nz, ny, nx = prep.values.shape
    data = vox_bytes(prep.normalized)
    header = companion_paths(path)[0]
    sx, sy, sz = prep.spacing
    write_bytes(path, np.ascontiguousarray(data).tobytes(order="C"))
    write_text(header, f"Size {nx}x{ny}x{nz} unsigned byte\nSpacing {sx!r}x{sy!r}x{sz!r}\n")
    return [path, header]


def _write_npy(path: Path, prep: _Prepared) -> list:
    save_npy(path, prep.values)
    return [path]


def paraview_script(hdf_name: str, threshold: float = 0.5) -> str:
    """A pvpython script that opens ``hdf_name`` (next to the script) as a volume rendering of
    ``normalized`` with a colour map and an opacity ramp starting at ``threshold``."""
    t = float(threshold)
    t = min(max(t, 0.0), 0.99)
    return f'''"""Open {hdf_name} in ParaView as a volume rendering (written by cnnvis).

    paraview --script={Path(hdf_name).stem}_paraview.py                GUI, everything set up
    pvpython {Path(hdf_name).stem}_paraview.py --interact              a render window
    xvfb-run -a pvbatch {Path(hdf_name).stem}_paraview.py --screenshot out.png

Axes: {AXES_NOTE}.
"""
import os
import sys

from paraview.simple import (ColorBy, GetActiveViewOrCreate, GetColorTransferFunction,
                             GetOpacityTransferFunction, Interact, OpenDataFile, Outline, Render,
                             SaveScreenshot, Show)

try:
    HERE = os.path.dirname(os.path.abspath(__file__))
except NameError:  # run from a shell that defines no __file__
    HERE = os.getcwd()

source = OpenDataFile(os.path.join(HERE, {hdf_name!r}))
view = GetActiveViewOrCreate("RenderView")
display = Show(source, view)
ColorBy(display, ("POINTS", "normalized"))
display.SetRepresentationType("Volume")
colors = GetColorTransferFunction("normalized")
colors.ApplyPreset("Viridis (matplotlib)", True)
colors.RescaleTransferFunction(0.0, 1.0)
opacity = GetOpacityTransferFunction("normalized")
opacity.RescaleTransferFunction(0.0, 1.0)
# (value, opacity, midpoint, sharpness): transparent below the mask threshold, then a ramp.
opacity.Points = [0.0, 0.0, 0.5, 0.0, {t!r}, 0.0, 0.5, 0.0, 1.0, 0.9, 0.5, 0.0]
frame = Show(Outline(Input=source), view)
frame.AmbientColor = frame.DiffuseColor = [0.7, 0.7, 0.7]
view.OrientationAxesVisibility = 1
# Look along -z with y up: slice z = 0 (the first channel) is at the back.
view.CameraPosition = [0.0, 0.0, 1.0]
view.CameraFocalPoint = [0.0, 0.0, 0.0]
view.CameraViewUp = [0.0, 1.0, 0.0]
view.ResetCamera()
view.CameraParallelProjection = 0
camera = view.GetActiveCamera()
camera.Azimuth(35.0)
camera.Elevation(25.0)
view.ResetCamera()
Render(view)

if "--screenshot" in sys.argv[1:]:
    target = sys.argv[sys.argv.index("--screenshot") + 1]
    SaveScreenshot(target, view, ImageResolution=[800, 800])
elif "--interact" in sys.argv[1:]:
    Interact(view)
'''


# --------------------------------------------------------------------------------------------
# readers


def read_volume(path, array: str | None = None) -> VolumeData:
    """Read a volume written by :func:`write_volume` (or any VTKHDF/.vti image, .npy stack, or
    ``.vox`` with its ``.hd``) back into the ``[z, row, col]`` convention of this module.

    ``array`` picks the primary point array of ``.hdf``/``.vti`` files (default ``value``, else
    the first one).
    """
    path = Path(path)
    fmt = format_of(path)
    if not path.is_file():
        raise CnnvisError(f"{path}: no such volume file")
    try:
        vol = FORMATS[fmt].reader(path)
    except CnnvisError:
        raise
    except (OSError, EOFError, KeyError, ValueError, TypeError) as exc:  # damaged or foreign files
        raise CnnvisError(f"{path}: not a readable .{fmt} volume ({type(exc).__name__}: {exc})") from None
    vol.format = fmt
    if vol.arrays:
        if array is None:
            array = "value" if "value" in vol.arrays else next(iter(vol.arrays))
        if array not in vol.arrays:
            from ..errors import unknown_name_error

            raise unknown_name_error(f"point array in {path}", array, vol.arrays)
        vol.values = vol.arrays[array]
    elif array is not None:
        raise CnnvisError(f"{path}: a .{fmt} file has no named arrays (got array={array!r})")
    return vol


def read_stack(path) -> np.ndarray:
    """The primary C×H×W array of a volume file, checked to be finite."""
    return as_stack(read_volume(path).values, name=str(path))


def _read_hdf(path: Path) -> VolumeData:
    import h5py
    import numpy as np

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CnnvisError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        if "VTKHDF" not in f:
            raise CnnvisError(f"{path}: no /VTKHDF group; expected a VTKHDF ImageData file")
        root = f["VTKHDF"]
        kind = root.attrs.get("Type", b"")
        kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else str(kind)
        if kind != "ImageData":
            raise CnnvisError(f"{path}: VTKHDF Type {kind!r}; expected 'ImageData'")
        ext = np.asarray(root.attrs["WholeExtent"], dtype=np.int64)
        dims = (ext[1::2] - ext[0::2] + 1).tolist()  # nx, ny, nz
        direction = np.asarray(root.attrs.get("Direction", np.eye(3).ravel()), dtype=np.float64)
        if not np.allclose(direction, np.eye(3).ravel()):
            raise CnnvisError(f"{path}: Direction {direction.tolist()} is not the identity; "
                              "only axis-aligned volumes are supported")
        arrays = {}
        for name, dset in root.get("PointData", {}).items():
            # a compressed dataset may claim far more than the file holds: the budget first
            limits.check(int(np.prod(dset.shape, dtype=object)) * dset.dtype.itemsize,
                         f"{path}: point array {name!r} of shape {tuple(dset.shape)}")
            data = np.asarray(dset)
            if data.shape != (dims[2], dims[1], dims[0]):
                raise CnnvisError(f"{path}: point array {name!r} has shape {data.shape}; "
                                  f"expected (nz, ny, nx) = {(dims[2], dims[1], dims[0])}")
            arrays[name] = _vtk_order(data)  # the flip is its own inverse
        if not arrays:
            raise CnnvisError(f"{path}: no point arrays under /VTKHDF/PointData")
        metadata = {}
        if "cnnvis" in f and "json" in f["cnnvis"].attrs:
            text = f["cnnvis"].attrs["json"]
            metadata = json.loads(text.decode() if isinstance(text, bytes) else text)
        return VolumeData(values=next(iter(arrays.values())),
                          spacing=tuple(float(v) for v in root.attrs["Spacing"]),
                          origin=tuple(float(v) for v in root.attrs["Origin"]),
                          arrays=arrays, metadata=metadata)


def _read_vti(path: Path) -> VolumeData:
    import numpy as np
    import pyvista as pv

    _check_vti_extent(path)
    try:
        grid = pv.read(path)
    except Exception as exc:  # VTK readers raise various types
        raise CnnvisError(f"{path}: not a readable .vti file ({exc})") from None
    if not isinstance(grid, pv.ImageData):
        raise CnnvisError(f"{path}: expected VTK ImageData, got {type(grid).__name__}")
    nx, ny, nz = grid.dimensions
    direction = np.asarray(grid.direction_matrix, dtype=np.float64)
    if not np.allclose(direction, np.eye(3)):
        raise CnnvisError(f"{path}: Direction is not the identity; only axis-aligned volumes "
                          "are supported")
    arrays = {}
    for name in grid.point_data.keys():
        data = np.asarray(grid.point_data[name])
        if data.ndim != 1:
            continue  # vectors are not volume slices
        arrays[name] = _vtk_order(data.reshape(nz, ny, nx))
    if not arrays:
        raise CnnvisError(f"{path}: no scalar point arrays")
    metadata = {}
    if "cnnvis_metadata" in grid.field_data.keys():
        metadata = json.loads(str(np.asarray(grid.field_data["cnnvis_metadata"]).ravel()[0]))
    return VolumeData(values=next(iter(arrays.values())),
                      spacing=tuple(float(v) for v in grid.spacing),
                      origin=tuple(float(v) for v in grid.origin),
                      arrays=arrays, metadata=metadata)


def _check_vti_extent(path: Path) -> None:
    """The points a .vti's ``WholeExtent`` claims (one float32 each at least) against the memory
    budget, before VTK allocates them (compressed data may claim far more than the file holds)."""
    import re

    with open(path, "rb") as f:
        head = f.read(4096).decode("ascii", "replace")
    m = re.search(r'WholeExtent\s*=\s*"([^"]*)"', head)
    if not m:
        return  # VTK says what is wrong
    try:
        ext = [int(v) for v in m.group(1).split()]
    except ValueError:
        raise CnnvisError(f"{path}: WholeExtent {m.group(1)!r} is not six integers") from None
    if len(ext) != 6:
        raise CnnvisError(f"{path}: WholeExtent {m.group(1)!r} is not six integers")
    points = 1
    for lo, hi in zip(ext[0::2], ext[1::2]):
        points *= max(hi - lo + 1, 0)
    limits.check(4 * points, f"{path}: WholeExtent {m.group(1)} ({points:,} points)")


def read_vox_header(path) -> tuple:
    """``((nx, ny, nz), (sx, sy, sz))`` from a CNN-VIS ``.hd`` header."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="ascii").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise CnnvisError(f"{path}: cannot read the .vox header ({exc})") from None
    size = spacing = None
    for line in lines:
        parts = line.split()
        try:
            if parts[:1] == ["Size"] and parts[2:] == ["unsigned", "byte"]:
                size = tuple(int(v) for v in parts[1].split("x"))
            elif parts[:1] == ["Spacing"] and len(parts) == 2:
                spacing = tuple(float(v) for v in parts[1].split("x"))
        except ValueError:
            size = spacing = None
            break
    if size is None or len(size) != 3 or min(size) < 1 or spacing is None or len(spacing) != 3:
        raise CnnvisError(f"{path}: expected the lines 'Size WxHxC unsigned byte' and "
                          "'Spacing SXxSYxSZ'")
    return size, spacing


def _read_vox(path: Path) -> VolumeData:
    import numpy as np

    header = companion_paths(path)[0]
    if not header.is_file():
        raise CnnvisError(f"{path}: header {header.name} not found beside it")
    (nx, ny, nz), spacing = read_vox_header(header)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != nx * ny * nz:
        raise CnnvisError(f"{path}: {raw.size} bytes; the header says {nx}x{ny}x{nz} = "
                          f"{nx * ny * nz}")
    return VolumeData(values=raw.reshape(nz, ny, nx), spacing=spacing)


def _read_npy(path: Path) -> VolumeData:
    from ..manifest import load_npy

    return VolumeData(values=load_npy(path, "volume", "a C x H x W stack"))


# --------------------------------------------------------------------------------------------
# the format registry: adding a format is one entry here plus its writer and reader


@dataclass(frozen=True)
class VolumeFormat:
    """One volume file format.

    ``writer(path, prepared)`` writes a :func:`prepare_volume` result to ``path`` (atomically) and
    returns every path it wrote; ``reader(path)`` returns a :class:`VolumeData` in this module's
    axis convention (raising :class:`CnnvisError` for files it cannot read); ``description`` tells
    a reader of the HTML report how to open the file; ``companions`` are the files written beside
    ``path`` as ``(tail, description)``: the companion of ``a.vox`` is ``a`` + ``.hd``.
    """

    name: str
    suffix: str
    writer: object
    reader: object
    description: str
    companions: tuple = ()


#: Every volume format, by name, in the order commands write them by default.
FORMATS = {f.name: f for f in (
    VolumeFormat("hdf", ".hdf", _write_hdf, _read_hdf, "VTKHDF volume: open in ParaView",
                 (("_paraview.py", "Python script (ParaView: pvpython)"),)),
    VolumeFormat("vti", ".vti", _write_vti, _read_vti, "VTK image data: ParaView or VTK"),
    VolumeFormat("vox", ".vox", _write_vox, _read_vox, "CNN-VIS volume (with its .hd header)",
                 ((".hd", "CNN-VIS volume header"),)),
    VolumeFormat("npy", ".npy", _write_npy, _read_npy, "NumPy array (numpy.load)"),
)}


def file_notes() -> dict:
    """``{suffix: description}`` of every volume file and companion file (for the HTML report)."""
    notes = {}
    for fmt in FORMATS.values():
        notes[fmt.suffix] = fmt.description
        for tail, description in fmt.companions:
            notes[Path("a" + tail).suffix] = description  # "_paraview.py" -> ".py"
    return notes


def to_pyvista(array, *, layout="stack", permutation=None, normalization="global", threshold=0.5,
               spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), metadata=None, name="array"):
    """A ``pyvista.ImageData`` of a stack (arguments as :func:`write_volume`) with the point arrays
    and the axis convention of the files (used by :mod:`cnnvis.export.render`)."""
    prep = prepare_volume(array, layout=layout, permutation=permutation,
                          normalization=normalization, threshold=threshold, spacing=spacing,
                          origin=origin, metadata=metadata, name=name)
    return _pyvista_grid(prep)


def describe(vol: VolumeData) -> str:
    """One line about a volume (for logs)."""
    c, h, w = vol.values.shape
    return (f"{c}x{h}x{w} [z,row,col] {vol.values.dtype} spacing {vol.spacing} "
            f"origin {vol.origin} arrays {', '.join(vol.arrays) or '-'}")


__all__ = [
    "FORMATS", "VolumeFormat", "volume_format", "file_notes", "NORMALIZATIONS", "LAYOUTS", "ARRAY_NAMES", "AXES_NOTE", "VolumeData", "format_of",
    "companion_paths", "as_stack", "stack_from_array", "normalize", "prepare_volume",
    "write_volume", "write_volumes", "read_volume", "read_stack", "read_vox_header",
    "paraview_script", "to_pyvista", "vox_bytes", "describe", "check_finite",
    "check_permutation",
]
