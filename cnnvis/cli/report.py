"""`cnnvis report`: one self-contained HTML page for everything written into an output folder."""
from __future__ import annotations

ORDER = 90  # after the commands whose outputs it shows


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="write OUT_DIR/index.html showing every run recorded in its manifests",
        description="Scan OUT_DIR/manifest.json and OUT_DIR/**/manifest.json and write OUT_DIR/index.html: "
                    "the model card, then one section per run (parameters, inputs, wall time, images, "
                    "sortable tables, links to every file). Static HTML: open it from disk, no server.")
    p.add_argument("out_dir", nargs="?", default="out", metavar="OUT_DIR",
                   help="the output folder of one or more cnnvis commands (default: out)")
    p.add_argument("--title", default=None, help="page title (default: 'cnnvis report: <folder name>')")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from pathlib import Path

    from ..export.report import collect, write_report
    from ..manifest import recover_tree

    if Path(args.out_dir).is_dir():
        recover_tree(args.out_dir)  # a commit a killed run left half done is mended first
    data = collect(args.out_dir)
    path = write_report(data, title=args.title)
    missing = len(data.missing_files)
    note = f"; {missing} file(s) listed in manifests are missing" if missing else ""
    print(f"cnnvis report: {len(data.sections)} run(s){note} -> {path}")
    return 0
