"""The HTML report: built from a real output folder (real `activations` and `filters` runs on a tiny
ONNX model) plus a synthetic run with tables, an untrained model, a missing and a damaged file.
Structure and error handling are checked by parsing the HTML; a headless Chromium (Debian's
chromium + chromium-driver) checks that the page really works from file://."""
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from cnnvis.cli import main
from cnnvis.errors import CnnvisError
from cnnvis.export import report
from cnnvis.manifest import RunOutput, write_json
from cnnvis.nets import NetBuilder

LAYERS = ["conv1", "relu1", "pool1", "fc1", "prob"]  # network order of the tiny model
GRADIENT_ROWS = [("class", "name", "grad_norm", "score"), (0, "zero", 0.5, -1.25), (1, "one", 12.0, 3.5),
                 (2, "two", 2.25, 0.0), (3, "three", 100.0, -7.0), (4, "four", 7.5, 1e-3)]
UNTRAINED_LAYERS = [{"name": "conv1", "op_type": "Conv", "output_shape": [4, 16, 16], "params": 112},
                    {"name": "fc1", "op_type": "Gemm", "output_shape": [5], "params": 1285}]


# ------------------------------------------------------------------------------ a tiny HTML tree
class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, dict(attrs), parent, [], []

    def text(self) -> str:
        return "".join(self.texts + [c.text() for c in self.children]).strip()

    def iter(self, tag=None, cls=None):
        for c in self.children:
            if (tag is None or c.tag == tag) and (cls is None or cls in c.attrs.get("class", "").split()):
                yield c
            yield from c.iter(tag, cls)

    def ancestor(self, tag):
        node = self.parent
        while node is not None and node.tag != tag:
            node = node.parent
        return node


class TreeBuilder(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.node = self.root
        self.errors = []

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in self.VOID:
            self.node = node

    def handle_endtag(self, tag):
        if self.node.tag != tag:  # every element is closed explicitly and in order
            self.errors.append(f"</{tag}> closes <{self.node.tag}>")
            return
        self.node = self.node.parent

    def handle_data(self, data):
        self.node.texts.append(data)


def parse(text: str) -> Node:
    builder = TreeBuilder()
    builder.feed(text)
    builder.close()
    assert builder.errors == [] and builder.node is builder.root, builder.errors[:5]
    return builder.root


def sections(root: Node) -> dict:
    return {s.attrs["data-command"]: s for s in root.iter("section", "run")}


# ------------------------------------------------------------------------------ the output folder
def _tiny_onnx(path: Path) -> Path:
    b = NetBuilder((3, 16, 16), seed=0)
    b.conv("conv1", 4, 3, pad=1)
    b.relu("relu1")
    b.max_pool("pool1", 2, 2)
    b.fc("fc1", 5)
    b.softmax("prob")
    path.write_bytes(b.build("tiny").SerializeToString())
    return path


def _synthetic_gradients_run(out: Path) -> None:
    """What an analysis with tables writes, with an untrained model carrying a layer table."""
    model = {"name": "random-net", "sha256": "ab" * 32, "source": "builder:random", "trained": False,
             "input_shape": [3, 16, 16], "layers": UNTRAINED_LAYERS}
    with RunOutput(out, "gradients", params={"classes": [0, 1, 2, 3, 4], "layer": "conv1"},
                   inputs=["cat.jpg", "dog.jpg"], model=model) as run:
        with open(run.path("class_gradients.csv", kind="table"), "w", newline="") as fh:
            csv.writer(fh).writerows(GRADIENT_ROWS)
        records = [{"class": c, "rank": r} for c, r in ((3, 1), (1, 2), (4, 3))]
        run.path("top_classes.json", kind="table").write_text(json.dumps(records))
        order = {"method": "smooth", "permutation": list(range(40))[::-1], "smoothness": 12.5,
                 "ratio": 0.5, "candidate_smoothness": {"pc1": 13.0, "leaf-order": 12.5}}
        run.path("order.json", kind="order").write_text(json.dumps(order))
        Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (30, 1))).save(
            run.path("gradient_norms.png", kind="plot"))
        Image.fromarray(np.full((40, 300), 128, np.uint8)).save(run.path("strip.png", kind="plot"))
        run.path("gradient.hdf", kind="volume", layer="conv1", shape=[4, 3, 3, 3]).write_bytes(b"\0" * 64)
        run.path("ghost.npy", kind="gradient", layer="conv1").write_bytes(b"x")
        run.path("broken.json", kind="table").write_text("{not json")
        run.path("damaged.png", kind="plot").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        run.extra = {"objective": "fc1[3]", "summary": {"cat.jpg": {"norm": 2.5}, "dog.jpg": {"norm": 0.25}}}
    (out / "ghost.npy").unlink()  # listed in the manifest, gone from the folder


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "out"
    model = _tiny_onnx(tmp / "tiny.onnx")
    x = tmp / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNVIS_HOME", str(tmp / "home"))
        assert main(["activations", "--model", str(model), "--input-array", str(x),
                     "--out", str(out / "activations")]) == 0
        assert main(["filters", "--model", str(model), "--out", str(out / "filters")]) == 0
    _synthetic_gradients_run(out / "gradients")
    # a run in progress (hidden staging folder) is not part of the report
    write_json(out / ".cnnvis-stage-x" / "manifest.json", {"runs": {"volumes": {"command": "volumes"}}})
    return out


@pytest.fixture(scope="module")
def page(out_dir):
    path = report.write_report(out_dir)
    return path, path.read_text(encoding="utf-8")


def _manifest_files(out_dir: Path, sub: str) -> list:
    return json.loads((out_dir / sub / "manifest.json").read_text())["runs"][sub]["files"]


# ------------------------------------------------------------------------------ structure
def test_one_section_per_recorded_run_and_no_others(page):
    path, text = page
    assert path.name == "index.html"
    root = parse(text)
    found = sections(root)
    assert sorted(found) == ["activations", "filters", "gradients"]  # no 'volumes' (staging) section
    nav = [a.attrs["href"] for a in next(root.iter("nav")).iter("a")]
    assert nav == [f"#{s.attrs['id']}" for s in found.values()]
    for name, section in found.items():
        facts = next(section.iter("p", "facts")).text()
        assert "wall time" in facts and " s" in facts
        assert any(a.attrs.get("href") == f"{name}/manifest.json" for a in section.iter("a"))
    acts = found["activations"]
    params = {tr.children[0].text(): tr.children[1].text() for t in acts.iter("table", "kv") for tr in t.iter("tr")}
    assert params["normalization"] == "channel" and params["layers"] == json.dumps(LAYERS)
    grads = found["gradients"]
    results = next(d for d in grads.iter("details") if next(d.iter("summary")).text() == "Results")
    rows = [[c.text() for c in tr.children] for tr in results.iter("tr")]  # extra record keys, as tables
    assert rows == [["key", "value"], ["objective", "fc1[3]"], ["key", "norm"], ["cat.jpg", "2.5"],
                    ["dog.jpg", "0.25"]]
    assert [li.text() for li in grads.iter("li")] == ["cat.jpg", "dog.jpg"]


def test_every_grid_image_is_shown_lazily_with_caption_in_network_order(out_dir, page):
    _, text = page
    acts = sections(parse(text))["activations"]
    grids = [f for f in _manifest_files(out_dir, "activations") if f["kind"] == "grid"]
    assert len(grids) == 2 * len(LAYERS)
    figures_ = list(acts.iter("figure"))
    assert len(figures_) == len(grids)
    by_src = {}
    for fig in figures_:
        (img,) = list(fig.iter("img"))
        assert img.attrs["loading"] == "lazy"
        by_src[unquote(img.attrs["src"])] = (img, fig)
    for entry in grids:
        img, fig = by_src[f"activations/{entry['path']}"]
        w, h = Image.open(out_dir / "activations" / entry["path"]).size
        assert (int(img.attrs["width"]), int(img.attrs["height"])) == (w, h)
        assert fig.children[0].tag == "a" and "zoom" in fig.children[0].attrs["class"]
        assert next(fig.iter("figcaption")).text() == f"{entry['layer']} · {entry['image']}"
    for image in ("x[0]", "x[1]"):  # grouped per input image, layers in network order
        captions = [next(f.iter("figcaption")).text() for f in figures_
                    if next(f.iter("figcaption")).text().endswith(image)]
        assert captions == [f"{layer} · {image}" for layer in LAYERS]


def test_every_local_reference_resolves_and_nothing_is_fetched(out_dir, page):
    _, text = page
    root = parse(text)
    assert "http://" not in text and "https://" not in text
    assert not list(root.iter("link")) and all("src" not in s.attrs for s in root.iter("script"))
    ids = {n.attrs["id"] for n in root.iter() if "id" in n.attrs}
    refs = [n.attrs["href"] for n in root.iter("a")] + [n.attrs["src"] for n in root.iter("img")]
    assert len(refs) > 30
    for ref in refs:
        if ref.startswith("#"):
            assert ref[1:] in ids
            continue
        parsed = urlparse(ref)
        assert not parsed.scheme and not parsed.netloc and not ref.startswith("/"), ref
        assert (out_dir / unquote(parsed.path)).is_file(), ref
    listed = {f"{sub}/{f['path']}" for sub in ("activations", "filters", "gradients")
              for f in _manifest_files(out_dir, sub)}
    linked = {unquote(r) for r in refs if not r.startswith("#")}
    assert listed - linked == {"gradients/ghost.npy"}  # every present output is reachable


def test_missing_and_damaged_files_are_flagged_not_fatal(out_dir, page):
    _, text = page
    grads = sections(parse(text))["gradients"]
    warn = next(grads.iter("p", "missing")).text()
    assert warn.startswith("1 file(s) listed in the manifest are not in the folder") and "ghost.npy" in warn
    rows = {tr.children[0].text(): tr for t in grads.iter("table", "files") for tr in t.iter("tr")}
    ghost = rows["ghost.npy"]
    assert ghost.children[4].text() == "missing" and not list(ghost.iter("a"))
    for name in ("broken.json", "damaged.png", "gradient.hdf"):  # linked, with why it is not shown inline
        assert rows[name].children[4].text() == "ok" and list(rows[name].iter("a"))
    assert "not readable as a table" in rows["broken.json"].children[6].text()
    assert "not a readable image" in rows["damaged.png"].children[6].text()
    assert rows["gradient.hdf"].children[6].text() == "VTKHDF volume: open in ParaView; shape: 4×3×3×3"
    figs = {next(f.iter("img")).attrs["src"]: f.attrs.get("class") for f in grads.iter("figure")}
    assert figs == {"gradients/gradient_norms.png": None, "gradients/strip.png": "wide"}  # 300×40 spans a row


def test_tables_from_csv_and_json(page):
    _, text = page
    grads = sections(parse(text))["gradients"]
    blocks = {next(b.iter("h4")).children[0].text(): b for b in grads.iter("div", "table-block")}
    assert sorted(blocks) == ["class_gradients.csv", "order.json", "top_classes.json"]
    (table,) = list(blocks["class_gradients.csv"].iter("table", "sortable"))
    header = [th.text() for th in table.iter("th")]
    assert header == list(GRADIENT_ROWS[0])
    body = [[td.text() for td in tr.iter("td")] for tr in next(table.iter("tbody")).iter("tr")]
    assert body == [[str(v) for v in row] for row in GRADIENT_ROWS[1:]]
    first = next(next(table.iter("tbody")).iter("tr"))
    assert [td.attrs.get("data-sort") for td in first.iter("td")] == ["0.0", None, "0.5", "-1.25"]
    (records,) = list(blocks["top_classes.json"].iter("table"))
    assert [[td.text() for td in tr.iter("td")] for tr in records.iter("tr") if list(tr.iter("td"))] == \
        [["3", "1"], ["1", "2"], ["4", "3"]]
    kv = {tr.children[0].text(): tr.children[1].text() for tr in blocks["order.json"].iter("tr")
          if list(tr.iter("td"))}
    assert kv["smoothness"] == "12.5" and kv["candidate_smoothness.pc1"] == "13.0"
    assert kv["permutation"].startswith("[39, 38,") and kv["permutation"].endswith("… (40 items)]")


def test_model_cards_flag_untrained_and_show_layer_table(out_dir, page):
    _, text = page
    root = parse(text)
    cards = {next(c.iter("h2")).text(): c for c in root.iter("article", "model")}
    assert len(cards) == 2  # tiny.onnx (used by two runs) and the untrained random-net
    # whatever the model loader decided for a bare .onnx file, the card says what the manifest says
    trained = json.loads((out_dir / "filters" / "manifest.json").read_text())["runs"]["filters"]["model"]["trained"]
    badge = {True: "trained", False: "UNTRAINED (random weights)", None: "training state unknown"}[trained]
    tiny = cards[f"Model: tiny.onnx {badge}"]
    rows = {tr.children[0].text(): tr.children[1].text() for tr in tiny.iter("tr")}
    assert rows["input shape"] == "N×3×16×16" and len(rows["sha256"]) == 64 and rows["source"].endswith("tiny.onnx")
    assert [a.text() for a in next(tiny.iter("p", "used")).iter("a")] == ["activations", "filters"]
    # `activations` records the layer table in its model card: the report shows it
    tiny_layers = next(tiny.iter("table", "sortable"))
    assert [tr.iter("td").__next__().text() for tr in next(tiny_layers.iter("tbody")).iter("tr")][:2] == \
        ["conv1", "relu1"]
    untrained = cards["Model: random-net UNTRAINED (random weights)"]
    assert "is-untrained" in untrained.attrs["class"]
    layer_table = next(untrained.iter("table", "sortable"))
    assert [th.text() for th in layer_table.iter("th")] == ["name", "op_type", "output_shape", "params"]
    assert [[td.text() for td in tr.iter("td")] for tr in next(layer_table.iter("tbody")).iter("tr")] == \
        [["conv1", "Conv", "4×16×16", "112"], ["fc1", "Gemm", "5", "1285"]]
    assert "UNTRAINED" in next(root.iter("p", "banner")).text()
    assert len(list(root.iter("p", "banner"))) == 1
    grads_facts = next(sections(root)["gradients"].iter("p", "facts"))
    assert "UNTRAINED" in grads_facts.text()


def test_report_is_deterministic_atomic_and_not_recorded(out_dir, page):
    path, text = page
    manifests = {p: p.read_bytes() for p in out_dir.rglob("manifest.json")}
    again = report.write_report(out_dir)
    assert again.read_text(encoding="utf-8") == text
    assert {p: p.read_bytes() for p in out_dir.rglob("manifest.json")} == manifests
    assert not list(out_dir.glob(".index.html.*"))
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, unlike the private temp file


def test_cli_report_and_script(out_dir, tmp_path, capsys):
    out_dir = Path(shutil.copytree(out_dir, tmp_path / "copy"))  # the shared page stays as it is
    assert main(["report", str(out_dir), "--title", "My <run>"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"cnnvis report: 3 run(s); 1 file(s) listed in manifests are missing -> "
                           f"{out_dir / 'index.html'}")
    text = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "<title>My &lt;run&gt;</title>" in text
    script = Path(__file__).resolve().parents[1] / "scripts" / "11_report.py"
    assert 'main(["report", *sys.argv[1:]])' in script.read_text()


# ------------------------------------------------------------------------------ bad input
def test_folder_without_manifests_is_one_line_error(tmp_path, capsys):
    (tmp_path / "some.png").write_bytes(b"")
    with pytest.raises(CnnvisError, match="no manifest.json found"):
        report.write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "index.html").exists()


def test_manifest_that_is_not_json_is_named(tmp_path, capsys):
    write_json(tmp_path / "manifest.json", {"runs": {}})
    bad = tmp_path / "order" / "manifest.json"
    bad.parent.mkdir()
    bad.write_text("{ this is not json")
    with pytest.raises(CnnvisError, match="order/manifest.json: not a readable cnnvis manifest"):
        report.collect(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err


def test_manifests_without_runs_are_an_error(tmp_path):
    write_json(tmp_path / "manifest.json", {"cnnvis_version": "0.1.0", "runs": {}})
    with pytest.raises(CnnvisError, match="record no runs"):
        report.collect(tmp_path)


def test_odd_entries_do_not_crash(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    runs = {"custom": {"command": "custom", "files": [
        {"path": "a.txt"},  # no kind
        {"path": "../outside.png", "kind": "grid"},
        {"path": "/etc/passwd", "kind": "weights"},
        {"kind": "grid"},  # no path
        "not an object"]}}  # no params, model, inputs or wall time
    write_json(tmp_path / "manifest.json", {"runs": runs})
    data = report.collect(tmp_path)
    statuses = [(f.path, f.status) for f in data.sections[0].files]
    assert statuses == [("a.txt", "ok"), ("../outside.png", "invalid"), ("/etc/passwd", "invalid"),
                        ("None", "invalid")]
    root = parse(report.render_html(data))
    hrefs = [a.attrs["href"] for a in root.iter("a")]
    assert "a.txt" in hrefs and not any("outside" in h or "passwd" in h for h in hrefs)
    assert "wall time unknown" in next(sections(root)["custom"].iter("p", "facts")).text()
    assert not list(root.iter("article"))  # no model recorded: no model card


# ------------------------------------------------------------------------------ tables
def test_json_tables_shapes():
    (cols,) = report.json_tables({"a": [1, 2], "b": ["x", "y"]})
    assert cols.header == ["a", "b"] and cols.rows == [[1, "x"], [2, "y"]]
    (rows,) = report.json_tables([[1, 2, 3], [4]])
    assert rows.header == ["0", "1", "2"] and rows.rows == [[1, 2, 3], [4, None, None]]
    (recs,) = report.json_tables([{"a": 1}, {"b": 2, "a": 3}])
    assert recs.header == ["a", "b"] and recs.rows == [[1, None], [3, 2]]
    kv, nested, per_image = report.json_tables({"score": 1.5, "meta": {"k": 2}, "per_class": [{"c": 0}, {"c": 1}],
                                                "summary": {"cat": {"r": 0.5}, "dog": {"r": 2, "s": 1}}})
    assert kv.rows == [["score", 1.5], ["meta.k", 2]]
    assert nested.title == "per_class" and nested.rows == [[0], [1]]
    assert per_image.title == "summary" and per_image.header == ["key", "r", "s"]
    assert per_image.rows == [["cat", 0.5, None], ["dog", 2, 1]]
    (scalar,) = report.json_tables(7)
    assert scalar.rows == [[7]]


def test_csv_table_ragged_and_truncated(tmp_path):
    path = tmp_path / "t.csv"
    n = report.MAX_TABLE_ROWS + 5
    path.write_text("a,b\n" + "".join(f"{i},{i * i},extra\n" for i in range(n)))
    (table,) = report.read_table(path)
    assert table.header == ["a", "b", "column 3"]
    assert table.total_rows == n and len(table.rows) == report.MAX_TABLE_ROWS
    assert table.rows[3] == ["3", "9", "extra"]
    html_text = report._table_html(table)
    assert html_text.count("<tr>") == report.MAX_TABLE_ROWS + 1
    tsv = tmp_path / "t.tsv"
    tsv.write_text("x\ty\n1\t2\n")
    assert report.read_table(tsv)[0].rows == [["1", "2"]]


# ------------------------------------------------------------------------------ in a real browser
def test_page_works_in_headless_chromium(out_dir, page):
    from browser import Browser, find_binaries

    chromium, driver = find_binaries()
    if not (chromium and driver):
        pytest.skip("needs Debian packages chromium and chromium-driver (chromium/chromedriver not on PATH)")
    path, _ = page
    with Browser(width=1280, height=900) as b:
        # the log check can see errors at all: a page that logs one is caught
        b.get((out_dir / "activations" / "x[0]" / "conv1.png").resolve().as_uri())
        b.execute("console.error('probe')")
        assert any("probe" in e["message"] for e in b.browser_log() if e["level"] == "SEVERE")

        b.get(path.resolve().as_uri())
        assert b.execute("return document.readyState") == "complete"
        assert b.execute("return document.title") == f"cnnvis report: {out_dir.name}"

        # every image loads once scrolled to (they are lazy)
        n_images = b.execute("return document.images.length")
        assert n_images == 2 * len(LAYERS) + 1 + 2
        for i in range(n_images):
            b.execute("document.images[arguments[0]].scrollIntoView()", i)
            b.wait_for("var im = document.images[arguments[0]]; return im.complete && im.naturalWidth > 0", i)
        widths = b.execute("return Array.from(document.images).map(function(i){return i.naturalWidth})")
        assert all(w > 0 for w in widths)

        # every link to a file points at an existing file
        hrefs = b.execute("return Array.from(document.querySelectorAll('a[href]'))"
                          ".filter(function(a){return !a.getAttribute('href').startsWith('#')})"
                          ".map(function(a){return a.href})")
        assert len(hrefs) > 30
        for url in hrefs:
            parsed = urlparse(url)
            assert parsed.scheme == "file" and Path(unquote(parsed.path)).is_file(), url

        # clicking a header sorts the table: numbers numerically, both directions
        b.execute("document.querySelector('#run-3').scrollIntoView()")
        table_css = "#run-3 .table-block table.sortable"
        column = ("var col = arguments[1]; return Array.from(document.querySelector(arguments[0]).tBodies[0].rows)"
                  ".map(function(r){return r.cells[col].textContent})")
        assert b.execute(column, table_css, 2) == ["0.5", "12.0", "2.25", "100.0", "7.5"]
        header = b.find_all(f"{table_css} thead th")[2]
        b.click(header)
        assert b.execute(column, table_css, 2) == ["0.5", "2.25", "7.5", "12.0", "100.0"]
        assert b.execute("return arguments[0].getAttribute('aria-sort')", header) == "ascending"
        b.click(header)
        assert b.execute(column, table_css, 2) == ["100.0", "12.0", "7.5", "2.25", "0.5"]
        b.click(b.find_all(f"{table_css} thead th")[1])  # text column
        assert b.execute(column, table_css, 1) == ["four", "one", "three", "two", "zero"]

        # a thumbnail opens at natural size; Escape closes it
        thumb = b.find("#run-1 a.zoom")
        b.execute("arguments[0].scrollIntoView()", thumb)
        b.click(thumb)
        size = b.wait_for("var i = document.querySelector('#lightbox img');"
                          "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.width] : null")
        assert size[0] == size[1] > 0
        assert b.execute("return document.getElementById('lightbox').hidden") is False
        b.send_keys(b.find("body"), "\ue00c")  # WebDriver's Escape key
        assert b.execute("return document.getElementById('lightbox').hidden") is True

        assert [e for e in b.browser_log() if e["level"] == "SEVERE"] == []

        # a phone-wide window: nothing wider than the screen (tables scroll inside their box)
        b.set_window_size(390, 844)
        assert b.execute("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        b.execute("window.scrollTo(0, 0)")
        shot = np.asarray(Image.open(io.BytesIO(b.screenshot_png())).convert("L"), dtype=float)
        assert shot.shape[1] > 300 and shot.std() > 20  # not a blank page


def test_browser_helper_reports_missing_binaries(monkeypatch):
    import browser

    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    assert browser.find_binaries() == (None, None)
    with pytest.raises(browser.WebDriverError, match="not both installed"):
        browser.Browser().__enter__()


def test_runs_sharing_one_folder_and_relative_out_dir(tmp_path, monkeypatch, capsys):
    for command, name in (("filters", "conv1 filters.png"), ("activations", "a#1/conv1?.png")):
        with RunOutput(tmp_path, command, params={"n": 1}) as run:
            Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(run.path(name, kind="grid", layer="conv1"),
                                                                  format="PNG")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "."]) == 0
    assert "2 run(s)" in capsys.readouterr().out
    root = parse((tmp_path / "index.html").read_text(encoding="utf-8"))
    found = sections(root)
    assert list(found) == ["activations", "filters"]  # one manifest, two runs, no folder label
    assert not list(found["filters"].iter("span", "folder"))
    srcs = [img.attrs["src"] for img in root.iter("img")]
    assert srcs == ["a%231/conv1%3F.png", "conv1%20filters.png"]  # quoted: '#' and '?' are not URL syntax
    assert all((tmp_path / unquote(s)).is_file() for s in srcs)


def test_model_without_training_flag_is_unknown_not_trained(tmp_path):
    runs = {"custom": {"command": "custom", "files": [], "model": {"name": "m", "sha256": "0" * 64}}}
    write_json(tmp_path / "manifest.json", {"runs": runs})
    root = parse(report.build_report(tmp_path))
    (card,) = list(root.iter("article", "model"))
    assert next(card.iter("h2")).text() == "Model: m training state unknown"
    assert not list(root.iter("p", "banner"))


# ------------------------------------------------------------------------------ hostile folders
def test_symlinks_leading_out_and_special_files_are_neither_read_nor_linked(tmp_path, capsys):
    import os

    secret = tmp_path / "secret.csv"
    secret.write_text("user,password\nroot,SECRET-ROW-42\n")
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "leak.csv").symlink_to(secret)  # the leak.csv -> /etc/passwd
    (out / "linkdir").symlink_to(tmp_path)  # a folder link leading out
    (out / "tables" / "inside.csv").write_text("a,b\n1,2\n")
    (out / "alias.csv").symlink_to(out / "tables" / "inside.csv")  # a link that stays inside: fine
    os.mkfifo(out / "fifo.csv")  # reading it would hang the report
    (out / "dir.csv").mkdir()
    files = [{"path": p, "kind": "table"} for p in
             ("leak.csv", "linkdir/secret.csv", "alias.csv", "fifo.csv", "dir.csv", "tables/inside.csv")]
    write_json(out / "manifest.json", {"runs": {"custom": {"command": "custom", "files": files}}})
    data = report.collect(out)
    got = {f.path: (f.status, f.problem) for f in data.sections[0].files}
    assert got == {
        "leak.csv": ("invalid", "links outside the output folder"),
        "linkdir/secret.csv": ("invalid", "links outside the output folder"),
        "alias.csv": ("ok", None),
        "fifo.csv": ("invalid", "not a regular file"),
        "dir.csv": ("invalid", "not a regular file"),
        "tables/inside.csv": ("ok", None),
    }
    assert main(["report", str(out)]) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "SECRET-ROW-42" not in text and "password" not in text
    hrefs = {a.attrs["href"] for a in parse(text).iter("a") if not a.attrs["href"].startswith("#")}
    assert hrefs == {"alias.csv", "tables/inside.csv", "manifest.json"}
    capsys.readouterr()


@pytest.mark.parametrize("kind", ["folder", "symlink", "list-runs", "huge"])
def test_a_corrupt_manifest_is_one_line(tmp_path, capsys, kind, monkeypatch):
    target = tmp_path / "manifest.json"
    if kind == "folder":
        target.mkdir()
        (target / "x").write_text("{}")
    elif kind == "symlink":
        (tmp_path / "elsewhere.json").write_text('{"runs": {}}')
        target.symlink_to(tmp_path / "elsewhere.json")
    elif kind == "list-runs":
        target.write_text('{"runs": {"a": [1, 2]}}')
    else:
        from cnnvis import manifest

        monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 100)
        target.write_text(json.dumps({"runs": {"a": {"files": [{"path": "x" * 200}]}}}))
    if kind != "folder":  # a folder named manifest.json is not found as a manifest: no runs at all
        with pytest.raises(CnnvisError, match=r"manifest\.json: not a cnnvis manifest"):
            report.collect(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "index.html").exists()


def test_big_images_are_linked_not_inspected(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_IMAGE_BYTES", 10)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    write_json(tmp_path / "manifest.json", {"runs": {"c": {"command": "c", "files": [{"path": "a.png", "kind": "plot"}]}}})
    (f,) = report.collect(tmp_path).sections[0].files
    assert f.status == "ok" and f.image_size is None and f.problem == "larger than 0 MiB: linked, not inspected"


def test_page_assets_are_package_data_inlined_verbatim(page):
    from importlib import resources

    _, text = page
    css = (resources.files("cnnvis") / "data" / "report.css").read_text(encoding="utf-8")
    js = (resources.files("cnnvis") / "data" / "report.js").read_text(encoding="utf-8")
    assert f"<style>{css}</style>" in text and f"<script>{js}</script>" in text
    assert "prefers-color-scheme" in css and "aria-sort" in js


def test_report_mends_a_half_done_commit_before_reading(tmp_path, capsys):
    """A run killed between two moves of its commit: `cnnvis report` first rolls it back (the same
    recovery as the next command's start), so the page shows the previous run, whole."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    with RunOutput(out, "writer") as run:
        for i in range(4):
            run.path(f"t{i}.csv", kind="table").write_text(f"v\nold{i}\n")
    mark = tmp_path / "mark"
    script = ("import sys\nfrom cnnvis.manifest import RunOutput\n"
              "with RunOutput(sys.argv[1], 'writer') as run:\n"
              "    for i in range(4):\n"
              "        run.path(f't{i}.csv', kind='table').write_text(f'v\\nnew{i}\\n')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               CNNVIS_TEST_COMMIT_PAUSE="30@6", CNNVIS_TEST_COMMIT_MARK=str(mark))
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], env=env)
    t0 = time.time()
    while not (mark.exists() and len(mark.read_text().splitlines()) >= 6):  # 4 aside, 2 moved in
        assert proc.poll() is None and time.time() - t0 < 60
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (out / "t0.csv").read_text() == "v\nnew0\n"  # half done
    assert main(["report", str(out)]) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    assert all(f"old{i}" in text and f"new{i}" not in text for i in range(4))
    assert not [p for p in os.listdir(out) if p.startswith(".cnnvis")]
    capsys.readouterr()


def test_the_tables_of_one_page_share_a_size_budget(tmp_path, monkeypatch):
    rows = "a,b\n" + "".join(f"{i},{i * i}\n" for i in range(40))  # 40 rows: a few hundred bytes
    files = []
    for name in ("t1.csv", "t2.csv", "t3.csv"):
        (tmp_path / name).write_text(rows)
        files.append({"path": name, "kind": "table"})
    write_json(tmp_path / "manifest.json", {"runs": {"c": {"command": "c", "files": files}}})
    size = len(rows.encode())
    monkeypatch.setattr(report, "MAX_PAGE_TABLE_BYTES", 2 * size + 1)  # room for two of the three
    data = report.collect(tmp_path)
    text = report.render_html(data)
    assert report.render_html(data) == text  # rendering again gives the same page
    shown = [t for t in parse(text).iter("div", "table-block")]
    assert len(shown) == 2
    third = next(f for f in data.sections[0].files if f.path == "t3.csv")
    assert third.problem.startswith("not shown inline: the page's tables already hold")
