"""3-D pictures of a C×H×W stack with pyvista: PNG, orbit GIF, or an interactive window.

Modes (:data:`RENDER_MODES`): ``volume`` (volume rendering of the normalised values, transparent
below ``threshold``), ``isosurface`` (the surface ``normalized == threshold``, coloured by z, i.e.
by channel order), ``threshold`` (the cells at or above ``threshold``), ``slices`` (three
orthogonal slices through the centre) and ``stack`` (every channel as its own plane, planes
``gap`` times further apart than the z spacing; by default ``1.5·max(width, height) / C`` clipped
to 1..4, so that a few maps are spread out and a deep stack keeps a compact shape).

The volume follows the axis convention of :mod:`cnnvis.export.volumes` (x = column, y up with image
row 0 at the top, z = channel order). The camera starts looking down -z with y up (channel 0 at the
back) and is then turned by ``azimuth`` and ``elevation`` degrees.

Off-screen rendering without a display uses EGL (``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``,
set before the first render window). VTK crashes the whole process instead of raising when the
OpenGL libraries are missing, so :func:`check_gl` looks for them first and names what to install.
"""
from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import numpy as np

from .. import limits
from ..errors import CnnvisError
from ..manifest import atomic_path
from . import RENDER_MODES

INSTALL_HINT = "apt-get install libegl1 libgl1-mesa-dri"
_DRI_DIRS = ("/usr/lib/x86_64-linux-gnu/dri", "/usr/lib/aarch64-linux-gnu/dri", "/usr/lib64/dri",
             "/usr/lib/dri", "/usr/local/lib/dri")


def _loadable(*names) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _dri_driver_present() -> bool:
    dirs = [d for d in os.environ.get("LIBGL_DRIVERS_PATH", "").split(":") if d] + list(_DRI_DIRS)
    for d in dirs:
        if glob.glob(os.path.join(d, "*swrast_dri.so")) or glob.glob(os.path.join(d, "*_dri.so")):
            return True
    # Newer Mesa puts the drivers into libgallium-<version>.so beside libGL.
    return bool(glob.glob("/usr/lib/*/libgallium*.so") + glob.glob("/usr/lib64/libgallium*.so"))


def _x_display_usable() -> bool:
    if not os.environ.get("DISPLAY"):
        return False
    try:
        xlib = ctypes.CDLL("libX11.so.6")
    except OSError:
        return False
    xlib.XOpenDisplay.restype = ctypes.c_void_p
    xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
    handle = xlib.XOpenDisplay(None)
    if not handle:
        return False
    xlib.XCloseDisplay.argtypes = [ctypes.c_void_p]
    xlib.XCloseDisplay(handle)
    return True


def gl_problem(show: bool = False) -> str | None:
    """Why rendering cannot work here (one line), or None. Decides the VTK window type too:
    EGL for off-screen rendering without a usable X display."""
    dri = _dri_driver_present()
    if show:
        if not _x_display_usable():
            return ("show=True needs a display (DISPLAY is unset or its X server does not answer); "
                    "write a PNG or GIF instead")
        if not _loadable("libGL.so.1") or not dri:
            return f"OpenGL libraries for a window are missing; install them: {INSTALL_HINT}"
        return None
    if os.environ.get("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow") != "vtkEGLRenderWindow":
        return None  # the user chose another window type (e.g. OSMesa); trust them
    if _x_display_usable() and "VTK_DEFAULT_OPENGL_WINDOW" not in os.environ:
        if _loadable("libGL.so.1") and dri:
            return None
    missing = []
    if not _loadable("libEGL.so.1"):
        missing.append("libEGL.so.1")
    elif not _loadable("libEGL_mesa.so.0", "libEGL_nvidia.so.0"):
        missing.append("an EGL vendor library (libEGL_mesa.so.0)")
    if not dri:
        missing.append("a Mesa DRI driver (swrast_dri.so)")
    if missing:
        return (f"off-screen 3D rendering needs {', '.join(missing)}, which VTK would crash "
                f"without; install them: {INSTALL_HINT}")
    return None


def check_gl(show: bool = False) -> None:
    """Raise one CnnvisError line if rendering would crash; set up EGL for off-screen use."""
    problem = gl_problem(show)
    if problem:
        raise CnnvisError(problem, params=("show",) if show else ())
    if not show and not _x_display_usable():
        # Must happen before VTK creates its first render window.
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def _check_mode(mode: str):
    if mode not in RENDER_MODES:
        from ..errors import unknown_name_error

        raise unknown_name_error("render mode", mode, RENDER_MODES)


def _opacity_ramp(threshold: float, peak: float = 0.9, n: int = 101) -> np.ndarray:
    # Not 256 points: pyvista 0.4x takes a table of exactly n_colors values unscaled (0..255),
    # other lengths are interpolated from the documented 0..1 scale.
    x = np.linspace(0.0, 1.0, n)
    t = min(max(threshold, 0.0), 0.999)
    return np.where(x <= t, 0.0, peak * (x - t) / (1.0 - t))


def _build_scene(plotter, grid, mode: str, threshold: float, cmap: str, gap, title):
    import pyvista as pv

    clim = (0.0, 1.0)
    outlined = grid
    bar = {"title": "normalized", "color": "black", "n_labels": 3, "fmt": "%.2f"}
    if mode == "volume":
        plotter.add_volume(grid, scalars="normalized", cmap=cmap, clim=clim,
                           opacity=_opacity_ramp(threshold), scalar_bar_args=bar)
    elif mode == "isosurface":
        surface = grid.contour([threshold], scalars="normalized")
        if surface.n_points == 0:
            raise CnnvisError(f"threshold {threshold}: the isosurface is empty (normalised values "
                              "never cross it); pick a value inside the data's range")
        surface.point_data["z (channel order)"] = surface.points[:, 2]
        plotter.add_mesh(surface, scalars="z (channel order)", cmap=cmap, smooth_shading=True,
                         scalar_bar_args={**bar, "title": "z (channel order)"})
    elif mode == "threshold":
        kept = grid.threshold(value=threshold, scalars="normalized")
        if kept.n_cells == 0:
            raise CnnvisError(f"threshold {threshold}: no cells reach it; lower the threshold")
        plotter.add_mesh(kept, scalars="normalized", cmap=cmap, clim=clim, scalar_bar_args=bar)
    elif mode == "slices":
        plotter.add_mesh(grid.slice_orthogonal(), scalars="normalized", cmap=cmap, clim=clim,
                         scalar_bar_args=bar)
    else:  # stack
        nx, ny, nz = grid.dimensions
        spread = grid.copy()
        sx, sy, sz = grid.spacing
        if gap is None:
            gap = auto_gap(grid)
        spread.spacing = (sx, sy, sz * gap)
        outlined = spread
        planes = [spread.extract_subset((0, nx - 1, 0, ny - 1, k, k)) for k in range(nz)]
        merged = pv.merge(planes) if len(planes) > 1 else planes[0]
        # Per-point opacity (a named point array): faint below the threshold (fainter for deep
        # stacks, whose many faint planes would add up to a dark block), opaque at the top.
        norm = np.asarray(merged.point_data["normalized"], dtype=np.float64)
        t = min(max(threshold, 0.0), 0.999)
        floor = min(0.08, 2.0 / nz)
        ramp = np.where(norm <= t, floor, floor + (1 - floor) * (norm - t) / (1 - t))
        merged.point_data["opacity"] = np.clip(ramp, 0.0, 1.0)
        plotter.add_mesh(merged, scalars="normalized", cmap=cmap, clim=clim, opacity="opacity",
                         scalar_bar_args=bar)
    # The outline of the whole grid (not the bounding box of what is drawn, which for a threshold
    # or isosurface would be smaller and would make the camera zoom onto the part).
    plotter.add_mesh(outlined.outline(), color="grey")
    plotter.show_axes()
    if title:
        plotter.add_text(str(title), font_size=10, color="black")


def auto_gap(grid) -> float:
    """Default distance of the planes in ``stack`` mode, in z spacings."""
    nx, ny, nz = grid.dimensions
    sx, sy, sz = grid.spacing
    return float(np.clip(1.5 * max(nx * sx, ny * sy) / (nz * sz), 1.0, 4.0))


def _place_camera(plotter, azimuth: float, elevation: float):
    plotter.view_xy()  # look down -z, y up, x to the right
    plotter.camera.azimuth = azimuth
    plotter.camera.elevation = elevation
    plotter.reset_camera()


#: bytes a window pixel costs in VTK's off-screen buffers (colour, depth) and the screenshot copies
WINDOW_BYTES_PER_PIXEL = 32


def _plotter(array, *, mode, show, window_size, threshold, normalization, spacing, layout,
             permutation, cmap, gap, azimuth, elevation, title):
    from .volumes import to_pyvista

    _check_mode(mode)
    if gap is not None and not (isinstance(gap, (int, float)) and gap >= 1.0):
        raise CnnvisError(f"gap {gap!r}: expected a number >= 1 (planes apart, in z spacings)")
    if len(window_size) != 2 or min(window_size) < 16:
        raise CnnvisError(f"window size {window_size!r}: expected two integers >= 16")
    limits.check(int(window_size[0]) * int(window_size[1]) * WINDOW_BYTES_PER_PIXEL,
                 f"window size {int(window_size[0])} x {int(window_size[1])}")
    grid = to_pyvista(array, layout=layout, permutation=permutation, normalization=normalization,
                      threshold=threshold, spacing=spacing)
    check_gl(show)
    import pyvista as pv

    plotter = pv.Plotter(off_screen=not show, window_size=[int(v) for v in window_size])
    try:
        plotter.set_background("white")
        _build_scene(plotter, grid, mode, float(threshold), cmap,
                     None if gap is None else float(gap), title)
        _place_camera(plotter, azimuth, elevation)
    except BaseException:
        plotter.close()
        raise
    return plotter


_DEFAULTS = dict(mode="volume", window_size=(800, 800), threshold=0.5, normalization="global",
                 spacing=(1.0, 1.0, 1.0), layout="stack", permutation=None, cmap="viridis",
                 gap=None, azimuth=35.0, elevation=25.0, title=None)


def _options(kwargs) -> dict:
    unknown = sorted(set(kwargs) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown render option(s): {', '.join(unknown)}")
    return {**_DEFAULTS, **kwargs}


def render_image(array, **options) -> np.ndarray:
    """Render ``array`` (C×H×W, or 4-D by ``layout``) off-screen; returns an H×W×3 uint8 image.

    Options: mode, window_size, threshold, normalization, spacing, layout, permutation, cmap, gap,
    azimuth, elevation, title (see the module docstring).
    """
    plotter = _plotter(array, show=False, **_options(options))
    try:
        return np.asarray(plotter.screenshot(return_img=True))[..., :3].copy()
    finally:
        plotter.close()


def render_png(array, path, **options) -> Path:
    """Render ``array`` off-screen into the PNG ``path`` (written atomically)."""
    from .figures import save_png

    save_png(path, render_image(array, **options))
    return Path(path)


def render_orbit_gif(array, path, frames: int = 36, fps: float = 12.0, **options) -> Path:
    """An orbit around the volume (``frames`` views, 360° of azimuth) as a looping GIF."""
    import imageio.v3 as iio

    if not isinstance(frames, int) or frames < 2:
        raise CnnvisError(f"frames {frames!r}: expected an integer >= 2")
    if not fps > 0:
        raise CnnvisError(f"fps {fps!r}: expected a positive number")
    opts = _options(options)
    plotter = _plotter(array, show=False, **opts)
    images = []
    try:
        step = 360.0 / frames
        for k in range(frames):
            plotter.camera.azimuth = opts["azimuth"] + k * step
            plotter.render()
            images.append(np.asarray(plotter.screenshot(return_img=True))[..., :3].copy())
    finally:
        plotter.close()
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(images), extension=".gif", loop=0,
                    duration=int(round(1000.0 / fps)))
    return Path(path)


def show_window(array, **options) -> None:
    """Open an interactive window (needs a display; one CnnvisError line otherwise)."""
    plotter = _plotter(array, show=True, **_options(options))
    try:
        plotter.show()
    finally:
        plotter.close()


__all__ = ["RENDER_MODES", "INSTALL_HINT", "gl_problem", "check_gl", "render_image", "render_png",
           "render_orbit_gif", "show_window"]
