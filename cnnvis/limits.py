"""The memory budget: sizes are checked against it before the memory is spent.

A command that would allocate an array whose size comes from a user's file or argument (a model's
declared input, a prototxt shape, an ``.npy`` header, an image's pixel count, a grid or a window, a
top-k or permutation count) asks :func:`check` first. Over the budget it stops with one line naming
the value and the limit, instead of a MemoryError traceback, a C++ ``bad_alloc`` or the kernel's
OOM killer.

The budget is, in order: :func:`set_memory_limit` (the CLI's ``--memory-limit``), the environment
variable ``CNNVIS_MEMORY_LIMIT``, else :data:`DEFAULT_FRACTION` of the physical memory — and never
more than that fraction of the process's address-space limit (``RLIMIT_AS``) when one is set.
Sizes are written as bytes or with a unit: ``512M``, ``4G``, ``1.5GiB`` (powers of 1024).
"""
from __future__ import annotations

import contextlib
import os
import re

from .errors import CnnvisError

ENV_VAR = "CNNVIS_MEMORY_LIMIT"
#: the default budget: this fraction of the physical memory (and of RLIMIT_AS when set)
DEFAULT_FRACTION = 0.5
#: bytes one decoded pixel may cost on the way to a model input (8-bit RGBA decode, float64 RGB
#: planes and the resize's float32 copies)
BYTES_PER_IMAGE_PIXEL = 64

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

_override: int | None = None


def parse_size(text) -> int:
    """``"4G"``, ``"512MiB"``, ``"1.5g"``, ``"1000000"`` → bytes (a positive integer); ValueError otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"expected a size such as 512M or 4G, got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not value >= 1 or value > 1 << 62:
        raise ValueError(f"expected a positive size such as 512M or 4G, got {text!r}")
    return int(value)


def format_bytes(n) -> str:
    """Bytes as a short human size (powers of 1024): ``2.0 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # not reached


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def address_space_limit() -> int | None:
    """The soft ``RLIMIT_AS`` of this process in bytes, or None when unlimited or unknown."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY or soft <= 0 else int(soft)


def default_limit() -> int:
    """:data:`DEFAULT_FRACTION` of the physical memory and of ``RLIMIT_AS``, whichever is smaller
    (4 GiB when neither is known)."""
    known = [v for v in (physical_memory(), address_space_limit()) if v]
    return int(DEFAULT_FRACTION * min(known)) if known else 4 << 30


def memory_limit() -> int:
    """The budget in bytes (see the module docstring for where it comes from)."""
    if _override is not None:
        return _override
    text = os.environ.get(ENV_VAR)
    if text:
        try:
            return parse_size(text)
        except ValueError as exc:
            raise CnnvisError(f"{ENV_VAR}: {exc}") from None
    return default_limit()


def set_memory_limit(nbytes) -> None:
    """Set the budget for this process (None: back to the environment / default)."""
    global _override
    _override = None if nbytes is None else int(nbytes)


@contextlib.contextmanager
def memory_limit_set(nbytes):
    """Within the block, the budget is ``nbytes`` (None: the environment / default)."""
    global _override
    before = _override
    set_memory_limit(nbytes)
    try:
        yield
    finally:
        _override = before


def check(nbytes, what: str) -> int:
    """Raise a one-line CnnvisError when ``nbytes`` is over the budget; ``what`` names the file or
    argument and the value (e.g. ``"--ncols 100000000: a 9 x 100000000 grid"``)."""
    nbytes = int(nbytes)
    limit = memory_limit()
    if nbytes > limit:
        need, have = format_bytes(nbytes), format_bytes(limit)
        if need == have:  # too close to tell apart rounded: in bytes
            need, have = f"{nbytes:,} B", f"{limit:,} B"
        raise CnnvisError(f"{what}: needs {need}, more than the memory limit {have} "
                          f"(set memory_limit=SIZE or {ENV_VAR})", params="memory_limit")
    return nbytes


def check_elements(shape, itemsize: int, what: str, copies: float = 1.0) -> int:
    """:func:`check` for ``copies`` arrays of ``shape`` with ``itemsize`` bytes per element (Python
    integers: no overflow, whatever the shape claims)."""
    count = 1
    for d in shape:
        count *= max(int(d), 0)
    return check(int(count * int(itemsize) * copies), what)


def max_image_pixels() -> int:
    """The largest image (width × height) decoded within the budget."""
    return max(1, memory_limit() // BYTES_PER_IMAGE_PIXEL)
