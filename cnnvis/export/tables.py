"""CSV text for the tables commands write beside their JSON (floats exact, missing values empty)."""
from __future__ import annotations

import csv
import io
import math


def csv_text(header, rows) -> str:
    """``header`` then one line per row; floats as ``repr`` (they read back exactly), NaN/inf and
    None as empty cells."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return buf.getvalue()


def _cell(v):
    if isinstance(v, float) or type(v).__name__.startswith("float"):  # numpy floats too, without numpy
        return "" if not math.isfinite(v) else repr(float(v))
    if v is None:
        return ""
    return v
