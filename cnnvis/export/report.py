"""A self-contained HTML page that shows everything the cnnvis commands wrote into one folder.

The page is built from the manifests alone (``OUT/manifest.json`` and ``OUT/**/manifest.json``):
one section per recorded run, images in galleries, CSV/JSON outputs as sortable tables, every
other file as a link. CSS and JavaScript (``cnnvis/data/report.css``, ``report.js``) are inlined
and every link is a relative path, so
``index.html`` works from ``file://`` with no server and no network. A file a manifest lists but
the folder lacks is shown as missing, never a crash.

    from cnnvis.export.report import write_report
    write_report("out")          # -> out/index.html
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import html
import json
import math
import os
import stat
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from ..errors import CnnvisError
from ..manifest import MANIFEST_NAME, read_manifest, write_text
from . import volumes

REPORT_NAME = "index.html"
IMAGE_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".webp", ".bmp", ".svg")
TABLE_SUFFIXES = (".csv", ".tsv", ".json")
MAX_TABLE_ROWS = 500  # rows shown per table; the whole file stays one click away
MAX_TABLE_BYTES = 8 << 20  # bigger CSV/JSON files are linked, not parsed
MAX_IMAGE_BYTES = 64 << 20  # bigger images are linked, not inspected
MAX_PAGE_TABLE_BYTES = 64 << 20  # CSV/JSON bytes read into one page, all tables together
MAX_LIST_ITEMS = 16  # long JSON lists (e.g. a 96-long permutation) are shown shortened
PIXELATED_BELOW = 256  # small images are upscaled in thumbnails: keep their pixels crisp
WIDE_ASPECT = 2.5  # wider pictures (before/after strips, plots) take a whole gallery row
FILE_NOTES = {  # what a reader needs to know to open a file the page cannot show
    **volumes.file_notes(), ".h5": "HDF5 (h5py)", ".onnx": "ONNX model", ".txt": "text", ".log": "log",
}


@dataclasses.dataclass
class OutputFile:
    """One file a manifest lists, resolved against the folder of that manifest."""

    path: str  # as written in the manifest (relative to the manifest's folder)
    rel: str  # relative to the report folder (POSIX), what the page shows
    kind: str
    meta: dict  # the manifest entry's other keys (layer, image, shape, ...)
    status: str  # "ok", "missing" or "invalid" (absolute or escaping path, a symlink leading out, not a regular file)
    size: int | None = None
    image_size: tuple | None = None  # (width, height) of a readable image
    problem: str | None = None  # why an existing file is not shown inline

    @property
    def href(self) -> str | None:
        return quote(self.rel) if self.status == "ok" else None

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix.lower()

    def caption(self) -> str:
        parts = [str(self.meta[k]) for k in ("layer", "image") if self.meta.get(k) not in (None, "")]
        return " · ".join(parts) or PurePosixPath(self.path).name


@dataclasses.dataclass
class RunSection:
    """One run (a command's entry in one manifest)."""

    command: str
    folder: str  # manifest folder relative to the report folder ("" for the top)
    manifest: str  # manifest path relative to the report folder
    record: dict
    files: list
    version: str | None = None
    model_index: int | None = None  # index into the report's model list
    anchor: str = ""

    @property
    def title(self) -> str:
        return self.command


@dataclasses.dataclass
class ReportData:
    folder: Path
    sections: list
    models: list  # distinct model dicts, in first-use order
    #: bytes of CSV/JSON the page may still read (rendering spends it, see MAX_PAGE_TABLE_BYTES)
    table_budget: list = dataclasses.field(default_factory=lambda: [MAX_PAGE_TABLE_BYTES])

    @property
    def missing_files(self) -> list:
        """Files the manifests list that are absent (or whose path points outside the folder)."""
        return [f for s in self.sections for f in s.files if f.status != "ok"]


# ---------------------------------------------------------------------------------------- scan
def find_manifests(out_dir) -> list:
    """``OUT/manifest.json`` and every ``manifest.json`` below it, in a stable order.

    Hidden folders (the staging folders of runs in progress) are skipped; symlinked folders are
    not followed, so a link loop cannot hang the scan.
    """
    out_dir = Path(out_dir)
    found = []
    for root, dirs, files in os.walk(out_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MANIFEST_NAME in files:
            found.append(Path(root) / MANIFEST_NAME)
    return sorted(found, key=lambda p: p.parent.relative_to(out_dir).parts)


def collect(out_dir) -> ReportData:
    """Read every manifest under ``out_dir`` into report sections (one per recorded run)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise CnnvisError(f"{out_dir}: not a folder (expected a cnnvis output folder with manifest.json)")
    manifests = find_manifests(out_dir)
    if not manifests:
        raise CnnvisError(f"{out_dir}: no {MANIFEST_NAME} found in it or its subfolders "
                          "(run cnnvis commands that write there first)")
    sections, models = [], []
    for manifest_path in manifests:
        data = read_manifest(manifest_path)  # one-line CnnvisError naming the file when not JSON
        folder = manifest_path.parent.relative_to(out_dir).as_posix()
        folder = "" if folder == "." else folder
        for command in sorted(data.get("runs", {})):
            record = data["runs"][command]
            if not isinstance(record, dict):
                raise CnnvisError(f"{manifest_path}: run {command!r} is not an object")
            files = [_resolve(out_dir, manifest_path.parent, entry) for entry in _file_entries(record)]
            section = RunSection(command=str(record.get("command") or command), folder=folder,
                                 manifest=_join(folder, MANIFEST_NAME), record=record, files=files,
                                 version=data.get("cnnvis_version"))
            section.model_index = _model_index(models, record.get("model"))
            section.anchor = f"run-{len(sections) + 1}"
            sections.append(section)
    if not sections:
        names = ", ".join(str(m.relative_to(out_dir)) for m in manifests)
        raise CnnvisError(f"{out_dir}: its manifests ({names}) record no runs")
    return ReportData(folder=out_dir, sections=sections, models=models)


def _file_entries(record) -> list:
    files = record.get("files") or []
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def _join(folder: str, path: str) -> str:
    return f"{folder}/{path}" if folder else path


def _resolve(out_dir: Path, manifest_dir: Path, entry: dict) -> OutputFile:
    raw = entry.get("path")
    meta = {k: v for k, v in entry.items() if k not in ("path", "kind")}
    kind = str(entry.get("kind") or "file")
    if not isinstance(raw, str) or not raw:
        return OutputFile(path=str(raw), rel=str(raw), kind=kind, meta=meta, status="invalid",
                          problem="no path")
    pure = PurePosixPath(raw)
    folder = manifest_dir.relative_to(out_dir).as_posix()
    rel = _join("" if folder == "." else folder, pure.as_posix())
    if pure.is_absolute() or ".." in pure.parts:
        return OutputFile(path=raw, rel=raw, kind=kind, meta=meta, status="invalid",
                          problem="path is not inside the output folder")
    target = manifest_dir / pure
    if not target.exists():  # (a dangling symlink too)
        return OutputFile(path=raw, rel=rel, kind=kind, meta=meta, status="missing")
    problem = _not_embeddable(out_dir, target)
    if problem:
        return OutputFile(path=raw, rel=raw, kind=kind, meta=meta, status="invalid", problem=problem)
    f = OutputFile(path=raw, rel=rel, kind=kind, meta=meta, status="ok", size=target.stat().st_size)
    if f.suffix in IMAGE_SUFFIXES:
        f.image_size, f.problem = _image_size(target)
    return f


def _not_embeddable(out_dir: Path, target: Path) -> str | None:
    """Why the page must neither read nor link ``target``: its real path (symlinks resolved) is
    outside the report folder, or it is not a regular file (a folder, FIFO, device). None if fine."""
    root = os.path.realpath(out_dir)
    real = os.path.realpath(target)
    if os.path.commonpath([root, real]) != root:
        return "links outside the output folder"
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def _image_size(path: Path):
    """``((width, height), None)`` for a readable image, ``(None, reason)`` otherwise."""
    if path.suffix.lower() == ".svg":
        return None, None  # the browser sizes SVG itself
    if path.stat().st_size > MAX_IMAGE_BYTES:
        return None, f"larger than {MAX_IMAGE_BYTES >> 20} MiB: linked, not inspected"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole stream: catches truncated files, not only bad headers
        with Image.open(path) as im:
            return (int(im.width), int(im.height)), None
    except Exception as exc:  # Pillow raises many types for damaged files
        return None, f"not a readable image ({type(exc).__name__})"


def _model_index(models: list, model) -> int | None:
    if not isinstance(model, dict):
        return None
    key = (model.get("name"), model.get("sha256"))
    for i, known in enumerate(models):
        if (known.get("name"), known.get("sha256")) == key:
            if "layers" not in known and isinstance(model.get("layers"), list):
                known["layers"] = model["layers"]
            return i
    models.append(dict(model))
    return len(models) - 1


# ---------------------------------------------------------------------------------------- tables
@dataclasses.dataclass
class Table:
    header: list
    rows: list  # lists of JSON values (CSV: strings); formatted when rendered
    title: str | None = None
    total_rows: int | None = None  # before truncation

    @property
    def is_key_value(self) -> bool:
        return self.header == ["key", "value"]


def read_table(path) -> list:
    """The tables a CSV/TSV/JSON output holds (CSV: one; JSON: one per shape found in it)."""
    path = Path(path)
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise ValueError(f"larger than {MAX_TABLE_BYTES >> 20} MiB")
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as fh:
            return json_tables(json.load(fh))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    width = max(len(header), *(len(r) for r in body)) if body else len(header)
    header = header + [f"column {i + 1}" for i in range(len(header), width)]
    body = [r + [""] * (width - len(r)) for r in body]
    return [_truncate(Table(header=header, rows=body))]


def json_tables(data, title=None) -> list:
    """Tables for a JSON value: records (list of objects), columns (object of equal-length lists),
    rows (list of lists), or a key/value listing of an object's scalars with nested objects
    flattened into dotted keys; lists of objects, and objects of flat objects, inside an object
    become tables of their own."""
    if isinstance(data, list):
        if data and all(isinstance(r, dict) for r in data):
            header = []
            for r in data:
                header += [k for k in r if k not in header]
            return [_truncate(Table(header=header, rows=[[r.get(k) for k in header] for r in data], title=title))]
        if data and all(isinstance(r, list) for r in data):
            width = max(len(r) for r in data)
            rows = [list(r) + [None] * (width - len(r)) for r in data]
            return [_truncate(Table(header=[str(i) for i in range(width)], rows=rows, title=title))]
        return [_truncate(Table(header=["index", "value"], rows=[[i, v] for i, v in enumerate(data)],
                                title=title))]
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if data and len(lists) == len(data) and len({len(v) for v in lists}) == 1 and lists[0] \
                and all(not isinstance(x, (dict, list)) for v in lists for x in v):
            header = list(data)
            rows = [[data[k][i] for k in header] for i in range(len(lists[0]))]
            return [_truncate(Table(header=header, rows=rows, title=title))]
        pairs, nested = [], []
        _flatten(data, "", pairs, nested)
        tables = [_truncate(Table(header=["key", "value"], rows=pairs, title=title))] if pairs else []
        for key, records in nested:
            tables += json_tables(records, title=key)
        return tables
    return [Table(header=["value"], rows=[[data]], title=title)]


def _is_record(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(not isinstance(v, (dict, list)) for v in value.values())


def _flatten(obj: dict, prefix: str, pairs: list, nested: list, depth: int = 0) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(_is_record(v) for v in value.values()):
            # e.g. {"cat.jpg": {"smoothness": ..}, "dog.jpg": {..}}: one row per key
            nested.append((name, [{"key": k, **v} for k, v in value.items()]))
        elif isinstance(value, dict) and value and depth < 4:
            _flatten(value, f"{name}.", pairs, nested, depth + 1)
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            nested.append((name, value))
        else:
            pairs.append([name, value])


def _truncate(table: Table) -> Table:
    table.total_rows = len(table.rows)
    table.rows = table.rows[:MAX_TABLE_ROWS]
    return table


# ---------------------------------------------------------------------------------------- render
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value):
    """``value`` as a float when it is one (also numeric text from CSV), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        x = float(str(value).strip())
    except ValueError:
        return None
    return x if str(value).strip() else None


def _cell(value, key: str) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, (list, dict)):
        return f"<td>{_e(_value_text(key, value, shorten=True))}</td>"
    x = _number(value)
    if x is not None:
        text = value if isinstance(value, str) else _format_number(value)
        sort = repr(x) if math.isfinite(x) else ("1e999" if x > 0 else "-1e999" if x < 0 else "")
        return f'<td class="num" data-sort="{_e(sort)}">{_e(text)}</td>'
    return f"<td>{_e(value)}</td>"


def _format_number(value) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != int(value):
        return f"{value:.6g}"
    return str(value)


def _table_html(table: Table, cls: str = "sortable") -> str:
    head = "".join(f'<th scope="col" tabindex="0">{_e(h)}</th>' for h in table.header)
    def keys(row):  # what a value is called: its column, or in a key/value listing its key
        return [str(row[0])] * len(row) if table.is_key_value else [str(h) for h in table.header]

    body = "".join("<tr>" + "".join(_cell(v, k) for v, k in zip(row, keys(row))) + "</tr>" for row in table.rows)
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _human_size(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def _wall_time(seconds) -> str:
    x = _number(seconds)
    if x is None:
        return "unknown"
    if x < 60:
        return f"{x:.3g} s"
    minutes, rest = divmod(x, 60)
    return f"{int(minutes)} min {rest:.0f} s"


def _value_text(key: str, value, shorten: bool = False) -> str:
    """A JSON value as text: shapes as 3×16×16, long lists (in tables) cut with their length."""
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
            and "shape" in key.lower():
        return "×".join(map(str, value))
    if isinstance(value, list) and shorten and len(value) > MAX_LIST_ITEMS:
        shown = ", ".join(json.dumps(v, sort_keys=True) for v in value[:MAX_LIST_ITEMS])
        return f"[{shown}, … ({len(value)} items)]"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return "" if value is None else str(value)


def _kv_table(items) -> str:
    rows = "".join(f'<tr><th scope="row">{_e(k)}</th><td><code>{_e(_value_text(k, v))}</code></td></tr>'
                   for k, v in items)
    return f'<div class="scroll"><table class="kv"><tbody>{rows}</tbody></table></div>'


def _trained_badge(model: dict) -> str:
    trained = model.get("trained")
    if trained is False:
        return '<span class="badge untrained" title="random weights">UNTRAINED (random weights)</span>'
    if trained is True:
        return '<span class="badge trained">trained</span>'
    return '<span class="badge unknown">training state unknown</span>'


#: layer-table columns in reading order; the hidden ones are ONNX plumbing
LAYER_COLUMNS = ("name", "op_type", "caffe_type", "output_shape", "weight_shape", "bias_shape", "params", "macs",
                 "caffe_blob")
LAYER_COLUMNS_HIDDEN = ("tensor", "node", "inputs", "weight", "bias")


def _model_card(index: int, model: dict, sections: list) -> str:
    used_by = [s for s in sections if s.model_index == index]
    shape = model.get("input_shape")
    rows = [("name", model.get("name")), ("source", model.get("source")), ("sha256", model.get("sha256")),
            ("input shape", "N×" + "×".join(map(str, shape)) if isinstance(shape, list) else shape)]
    rows += [(k, v) for k, v in model.items()
             if k not in ("name", "source", "sha256", "input_shape", "trained", "layers")]
    links = ", ".join(f'<a href="#{s.anchor}">{_e(s.title)}</a>' for s in used_by)
    parts = [f'<article class="card model{" is-untrained" if model.get("trained") is False else ""}" '
             f'id="model-{index + 1}">',
             f'<h2>Model: {_e(model.get("name") or "unnamed")} {_trained_badge(model)}</h2>']
    if model.get("trained") is False:
        parts.append('<p class="warn">This model has random weights: the pictures show the structure of '
                     "the topology, not learned features.</p>")
    parts.append(_kv_table((k, v) for k, v in rows if v not in (None, "")))
    if links:
        parts.append(f'<p class="used">Used by: {links}</p>')
    layers = model.get("layers")
    if isinstance(layers, list) and layers and all(isinstance(r, dict) for r in layers):
        # the columns a reader wants first, in this order; other keys follow as they come
        first = [k for k in LAYER_COLUMNS if any(k in r for r in layers)]
        rest = [k for r in layers for k in r if k not in first and k not in LAYER_COLUMNS_HIDDEN]
        columns = first + list(dict.fromkeys(rest))
        table = json_tables([{k: r.get(k) for k in columns} for r in layers])[0]
        parts.append(f"<details open><summary>Layers ({len(layers)})</summary>{_table_html(table)}</details>")
    parts.append("</article>")
    return "".join(parts)


PX_CLASS = ' class="px"'
WIDE_CLASS = ' class="wide"'


def _img_html(f: OutputFile) -> str:
    size = f' width="{f.image_size[0]}" height="{f.image_size[1]}"' if f.image_size else ""
    wide = bool(f.image_size) and f.image_size[0] > WIDE_ASPECT * f.image_size[1]
    small = f.image_size and max(f.image_size) <= PIXELATED_BELOW
    dims = f" ({f.image_size[0]}×{f.image_size[1]})" if f.image_size else ""
    return (f'<figure{WIDE_CLASS if wide else ""}><a class="zoom" href="{_e(f.href)}" title="{_e(f.rel)}{dims}">'
            f'<img loading="lazy" src="{_e(f.href)}" alt="{_e(f.kind)}: {_e(f.caption())}"{size}'
            f'{PX_CLASS if small else ""}></a>'
            f"<figcaption>{_e(f.caption())}</figcaption></figure>")


def _layer_rank(report: ReportData, s: RunSection) -> dict:
    """Position of each layer in network order, from the run's ``layers`` parameter or the model's
    layer table (file names sort conv1, fc1, pool1, ...: not the order a reader wants)."""
    names = []
    params = s.record.get("params")
    if isinstance(params, dict) and isinstance(params.get("layers"), list):
        names += [str(n) for n in params["layers"]]
    if s.model_index is not None:
        layers = report.models[s.model_index].get("layers")
        if isinstance(layers, list):
            names += [str(r.get("name")) for r in layers if isinstance(r, dict)]
    rank = {}
    for name in names:
        rank.setdefault(name, len(rank))
    return rank


def _gallery_html(images: list, layer_rank: dict) -> str:
    """Images grouped by kind, then by input image when a kind shows several; network order inside."""
    images = sorted(images, key=lambda f: layer_rank.get(str(f.meta.get("layer")), len(layer_rank)))
    out = []
    kinds = list(dict.fromkeys(f.kind for f in images))
    for kind in kinds:
        of_kind = [f for f in images if f.kind == kind]
        out.append(f'<h3>{_e(kind)} <span class="count">{len(of_kind)}</span></h3>')
        by_image = list(dict.fromkeys(str(f.meta.get("image", "")) for f in of_kind))
        if len(by_image) > 1:
            for name in by_image:
                group = [f for f in of_kind if str(f.meta.get("image", "")) == name]
                out.append(f"<h4>{_e(name or 'other')}</h4>")
                out.append('<div class="gallery">' + "".join(_img_html(f) for f in group) + "</div>")
        else:
            out.append('<div class="gallery">' + "".join(_img_html(f) for f in of_kind) + "</div>")
    return "".join(out)


def _tables_html(folder: Path, table_files: list, budget: list | None = None) -> tuple:
    """HTML of the tables read from CSV/JSON files, and the files that could not be read.
    ``budget`` ([bytes left]) bounds what all the page's tables read together."""
    out, unread = [], []
    for f in table_files:
        if budget is not None:
            if (f.size or 0) > budget[0]:
                f.problem = f"not shown inline: the page's tables already hold {MAX_PAGE_TABLE_BYTES >> 20} MiB"
                unread.append(f)
                continue
            budget[0] -= f.size or 0
        try:
            tables = read_table(folder / f.rel)
        except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
            f.problem = f"not readable as a table ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
            unread.append(f)
            continue
        head = (f'<h4><a href="{_e(f.href)}">{_e(f.path)}</a> <span class="count">{_e(f.kind)}</span>'
                f"</h4>")
        blocks = []
        for t in tables:
            note = ""
            if t.total_rows is not None and t.total_rows > len(t.rows):
                note = f'<p class="note">first {len(t.rows)} of {t.total_rows} rows; the file has all</p>'
            sub = f'<h5>{_e(t.title)}</h5>' if t.title else ""
            blocks.append(sub + _table_html(t) + note)
        if not tables:
            blocks.append('<p class="note">empty table</p>')
        out.append(f'<div class="table-block">{head}{"".join(blocks)}</div>')
    return "".join(out), unread


def _details_text(f: OutputFile) -> str:
    keys = sorted((k for k in f.meta if k not in ("layer", "image")), key=lambda k: (k != "shape", k))
    bits = [f"{k}: {_value_text(k, f.meta[k])}" for k in keys]
    if f.suffix in FILE_NOTES:
        bits.insert(0, FILE_NOTES[f.suffix])
    if f.problem:
        bits.insert(0, f.problem)
    return "; ".join(bits)


def _files_table(files: list) -> str:
    rows = []
    for f in files:
        if f.status == "ok":
            name = f'<a href="{_e(f.href)}">{_e(f.path)}</a>'
            status = '<td class="ok">ok</td>'
        else:
            name = f'<span class="missing-file">{_e(f.path)}</span>'
            status = f'<td class="bad">{_e(f.status)}</td>'
        size = f'<td class="num" data-sort="{f.size}">{_e(_human_size(f.size))}</td>' if f.size is not None \
            else "<td></td>"
        rows.append(f"<tr><td>{name}</td><td>{_e(f.kind)}</td><td>{_e(f.meta.get('layer', ''))}</td>"
                    f"<td>{_e(f.meta.get('image', ''))}</td>{status}{size}"
                    f"<td class=\"details\">{_e(_details_text(f))}</td></tr>")
    head = "".join(f'<th scope="col" tabindex="0">{h}</th>'
                   for h in ("file", "kind", "layer", "image", "status", "size", "details"))
    return (f'<div class="scroll"><table class="sortable files"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _section_html(report: ReportData, s: RunSection) -> str:
    r = s.record
    parts = [f'<section class="run" id="{s.anchor}" data-command="{_e(s.command)}">',
             f'<h2>{_e(s.title)}']
    if s.folder:
        parts.append(f' <span class="folder">{_e(s.folder)}/</span>')
    parts.append("</h2>")
    facts = [f"wall time {_e(_wall_time(r.get('wall_time_s')))}", f"{len(s.files)} file(s)",
             f'<a href="{_e(quote(s.manifest))}">manifest</a>']
    if s.model_index is not None:
        model = report.models[s.model_index]
        facts.insert(0, f'model <a href="#model-{s.model_index + 1}">{_e(model.get("name") or "unnamed")}</a>'
                        + (' <span class="badge untrained">UNTRAINED</span>' if model.get("trained") is False
                           else ""))
    if s.version:
        facts.append(f"cnnvis {_e(s.version)}")
    parts.append('<p class="facts">' + " · ".join(facts) + "</p>")

    missing = [f for f in s.files if f.status != "ok"]
    if missing:
        names = ", ".join(_e(f.path) for f in missing[:10]) + (" …" if len(missing) > 10 else "")
        parts.append(f'<p class="warn missing">{len(missing)} file(s) listed in the manifest are not '
                     f"in the folder: {names}</p>")

    params = r.get("params")
    if isinstance(params, dict) and params:
        parts.append(f"<details open><summary>Parameters</summary>{_kv_table(sorted(params.items()))}</details>")
    inputs = r.get("inputs")
    if isinstance(inputs, list) and inputs:
        items = "".join(f"<li><code>{_e(i)}</code></li>" for i in inputs)
        parts.append(f"<details{' open' if len(inputs) <= 8 else ''}><summary>Inputs ({len(inputs)})</summary>"
                     f'<ul class="inputs">{items}</ul></details>')
    extra = [(k, v) for k, v in sorted(r.items())
             if k not in ("command", "params", "inputs", "model", "files", "wall_time_s")]
    if extra:
        blocks = "".join((f"<h5>{_e(t.title)}</h5>" if t.title else "") + _table_html(t)
                         for t in json_tables(dict(extra)))
        parts.append(f"<details open><summary>Results</summary>{blocks}</details>")

    images = [f for f in s.files if f.status == "ok" and f.suffix in IMAGE_SUFFIXES and not f.problem]
    tables = [f for f in s.files if f.status == "ok" and f.suffix in TABLE_SUFFIXES]
    if images:
        parts.append(_gallery_html(images, _layer_rank(report, s)))
    tables_html, unread = _tables_html(report.folder, tables, report.table_budget)
    if tables_html:
        parts.append(f"<h3>Tables</h3>{tables_html}")
    unread_ids = {id(f) for f in unread}
    shown = {id(f) for f in images} | {id(f) for f in tables if id(f) not in unread_ids}
    others = [f for f in s.files if id(f) not in shown]
    if others:
        parts.append(f'<h3>Files <span class="count">{len(others)}</span></h3>{_files_table(others)}')
    parts.append("</section>")
    return "".join(parts)


def render_html(report: ReportData, title: str | None = None) -> str:
    """The page for collected report data."""
    from .. import __version__

    title = title or f"cnnvis report: {report.folder.resolve().name}"
    report.table_budget = [MAX_PAGE_TABLE_BYTES]  # every rendering starts with the whole budget
    body = [f"<header><h1>{_e(title)}</h1>",
            f'<p class="facts">{len(report.sections)} run(s) from the manifests in this folder · '
            f"cnnvis {_e(__version__)}</p>"]
    if any(m.get("trained") is False for m in report.models):
        body.append('<p class="warn banner">An UNTRAINED model (random weights) made some of these '
                    "outputs: they show the topology, not learned features.</p>")
    nav = "".join(f'<li><a href="#{s.anchor}">{_e(s.title)}'
                  f'{f" <small>{_e(s.folder)}/</small>" if s.folder else ""}</a></li>' for s in report.sections)
    body.append(f'<nav aria-label="sections"><ul>{nav}</ul></nav></header><main>')
    body += [_model_card(i, m, report.sections) for i, m in enumerate(report.models)]
    body += [_section_html(report, s) for s in report.sections]
    body.append('</main><div id="lightbox" hidden role="dialog" aria-label="image at natural size"></div>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="cnnvis {_e(__version__)}">'
            f"<title>{_e(title)}</title><style>{_asset('report.css')}</style></head><body>"
            + "".join(body) + f"<script>{_asset('report.js')}</script></body></html>\n")


@functools.lru_cache(maxsize=None)
def _asset(name: str) -> str:
    """The page's stylesheet or script, package data in ``cnnvis/data/`` (inlined into the page).
    The script sorts numerically when every non-empty cell of a column has data-sort or parses as a
    number, as text otherwise, empty cells last; Array.prototype.sort is stable, so ties keep the
    previous order. It also opens images at natural size in a lightbox."""
    return (resources.files("cnnvis") / "data" / name).read_text(encoding="utf-8")


def build_report(out_dir, title: str | None = None) -> str:
    """The HTML text of the report for ``out_dir`` (nothing written)."""
    return render_html(collect(out_dir), title=title)


def write_report(out_dir, title: str | None = None) -> Path:
    """Write ``out_dir/index.html`` atomically and return its path.

    ``out_dir`` may also be the :class:`ReportData` that :func:`collect` returned for it.
    """
    data = out_dir if isinstance(out_dir, ReportData) else collect(out_dir)
    path = data.folder / REPORT_NAME
    text = render_html(data, title=title)
    try:
        write_text(path, text)  # atomic, with the umask's permissions
    except OSError as exc:
        raise CnnvisError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return path
