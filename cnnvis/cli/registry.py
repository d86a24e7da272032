"""`cnnvis models` (what is known, present, and where) and `cnnvis fetch NAME` (verified download:
http(s) only, always checked against a checksum; see cnnvis.download)."""
from __future__ import annotations

import json
import sys

from . import common

ORDER = 5


def register(sub) -> None:
    p = sub.add_parser("models", help="list known models: kind, trained or not, present or not, where")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("fetch", help="download a known model into $CNNVIS_HOME (resumable, checksum-verified)")
    p.add_argument("name", help="registry name (see `cnnvis models`)")
    p.add_argument("--url", default=None, help="download from this http(s) URL instead of the sidecar's (a mirror: "
                                               "its file must match the registry's size and checksum)")
    p.add_argument("--sha256", default=None, help="expected sha256 of the file (needed when the sidecar has no checksum; "
                                                  "must equal the sidecar's when it has one)")
    p.add_argument("--sha1", default=None, help="expected sha1 of the file at --url")
    p.add_argument("--force", action="store_true", help="download again even if the file is present")
    p.add_argument("--retries", type=common.nonnegative_int, default=3,
                   help="retries per URL without progress (default 3)")
    p.add_argument("--timeout", type=common.positive_float, default=30.0,
                   help="seconds without data before a retry (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=cmd_fetch)


def format_models_table(rows) -> str:
    table = [("name", "kind", "trained", "present", "size", "path / url")]
    for r in rows:
        size = f"{r['size'] / 1e6:.1f} MB" if r.get("size") else "-"
        if r["kind"] == "builder":
            where = r["path"] if r["present"] else "built on first use"
        else:
            where = r["path"] if r["present"] else (r.get("url") or r["path"] or "-")
        name = r["name"] + (" (default)" if r.get("default") else "")
        table.append((name, r["kind"], "yes" if r["trained"] else "NO", "yes" if r["present"] else "no", size, where))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    from ..registry import cnnvis_home

    lines.append(f"cache: {cnnvis_home() / 'models'} ($CNNVIS_HOME); `cnnvis fetch NAME` downloads")
    return "\n".join(lines)


def cmd_models(args) -> int:
    from .. import registry

    rows = registry.status()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_models_table(rows))
    return 0


def cmd_fetch(args) -> int:
    from .. import registry

    path = registry.fetch(args.name, progress=not args.no_progress, url=args.url, sha256=args.sha256,
                          sha1=args.sha1, force=args.force, retries=max(0, args.retries), timeout=args.timeout)
    side = registry.known_models()[args.name]
    warning = registry.ModelEntry(args.name, side["kind"], path, side).warning
    print(f"{args.name}: {path}")
    if warning:
        print(f"cnnvis: note: {warning}", file=sys.stderr)
    return 0
