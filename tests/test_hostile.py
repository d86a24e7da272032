"""Hostile inputs against every command: a corpus generated here (tiny models, hostile ONNX and
prototxt files, .npy headers, image bombs, bad arguments).

Every refused case must end with exit code 2, exactly one line on stderr naming the file or the
argument, no traceback, and no file left in ``--out``. Cases that could spend memory (declared
sizes, headers, pixel counts, grids, windows) and cases about which files are read run in a
subprocess (``python -m cnnvis`` through a wrapper) under ``RLIMIT_AS``; the wrapper's audit hook
records every file opened inside folders the command has no business reading (a decoy beside the
current folder, a folder outside the model's), and the test asserts that list is empty. Cases that
only parse arguments or read small files run in-process (``cli.main``) to keep the module fast.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cnnvis import nets, onnxgraph
from cnnvis.cli import main
from conftest import write_pickled_npy

ROOT = Path(__file__).resolve().parents[1]
#: the address-space cap of each subprocess: onnxruntime and numpy reserve virtual memory, so this
#: is well above what a normal run touches (a normal run passes under it: see the positive cases)
AS_LIMIT = 4 << 30
TIMEOUT = 120

WRAPPER = r'''
import os, sys, runpy
forbidden = [os.path.realpath(p) for p in os.environ["HOSTILE_FORBIDDEN"].split(os.pathsep) if p]
log = os.open(os.environ["HOSTILE_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

def hook(event, args):
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    try:
        path = os.path.realpath(os.fsdecode(args[0]))
    except (TypeError, ValueError):
        return
    if any(path == f or path.startswith(f + os.sep) for f in forbidden):
        os.write(log, (path + "\n").encode())

sys.addaudithook(hook)
sys.argv = ["cnnvis", *sys.argv[1:]]
runpy.run_module("cnnvis", run_name="__main__", alter_sys=True)
'''


# ---------------------------------------------------------------------------------- the corpus

def _tiny_model(seed: int = 5) -> onnx.ModelProto:
    b = nets.NetBuilder((1, 12, 12), seed=seed)
    b.conv("conv1", 4, 3, pad=1)
    b.relu("relu1")
    b.max_pool("pool1", 2, 2)
    b.fc("fc1", 3)
    b.softmax("prob")
    return b.build("tiny")


def _conv_graph(nodes, inputs, outputs, inits, opsets=(("", 17),)) -> onnx.ModelProto:
    model = onnxgraph.make_model(helper.make_graph(nodes, "hostile", inputs, outputs, inits))
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets)
    return model


def _conv_model(weight_channels: int = 1, domain: str = "", input_hw=(12, 12)) -> onnx.ModelProto:
    """Input 1×1×H×W → Conv(3 maps) → global pool → flatten: the smallest classifier-shaped graph."""
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 1, *input_hw])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 3])
    w = numpy_helper.from_array(np.full((3, weight_channels, 3, 3), 0.1, np.float32), "conv1_w")
    nodes = [helper.make_node("Conv", ["data", "conv1_w"], ["c"], name="conv1", domain=domain),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="pool1"),
             helper.make_node("Flatten", ["g"], ["prob"], name="flat")]
    opsets = (("", 17),) + (((domain, 1),) if domain else ())
    return _conv_graph(nodes, [x], [y], [w], opsets)


def _external(model: onnx.ModelProto, name: str, location: str, offset: int = 0, length=None):
    """``model`` with initializer ``name`` stored as external data at ``location`` (no bytes written)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    init = next(i for i in model.graph.initializer if i.name == name)
    size = len(numpy_helper.to_array(init).tobytes())
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(size if length is None else length)}
    for k, v in entries.items():
        e = init.external_data.add()
        e.key, e.value = k, v
    return model, size


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width×height grey pixels and whose data is a few bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _npy_header_only(path: Path, shape, body: int = 1000) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
        f.write(b"\0" * body)


DECOY = b"DECOY-BYTES-" * 9  # 108 bytes: the size of conv1_w (3×1×3×3 float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    c = {"dir": d}
    # the shared tiny model and images
    tiny = d / "tiny" / "tiny.onnx"
    tiny.parent.mkdir()
    tiny.write_bytes(_tiny_model().SerializeToString())
    (d / "tiny" / "tiny.onnx.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    c["model"] = str(tiny)
    imgs = d / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (14, 16), dtype=np.uint8)).save(imgs / f"im{i}.png")
    c["image"] = str(imgs / "im0.png")
    c["imgs"] = str(imgs)
    # images with hostile names and contents
    (imgs / "..png").write_bytes((imgs / "im1.png").read_bytes())  # a valid file named '..png'
    c["dotdot_png"] = str(imgs / "..png")
    bad = d / "badimg"
    bad.mkdir()
    (bad / "text.png").write_text("not an image")
    (bad / "empty.png").write_bytes(b"")
    (bad / "trunc.png").write_bytes((imgs / "im2.png").read_bytes()[:60])
    _png_header_only(bad / "huge.png", 60000, 60000)
    for k in ("text", "empty", "trunc", "huge"):
        c[f"{k}_png"] = str(bad / f"{k}.png")
    # a 12000×12000 palette PNG of ~100 kB (a decompression bomb for small budgets)
    stripes = np.zeros((12000, 12000), np.uint8)
    stripes[::7] = 1  # white every 7th row
    im = Image.frombytes("P", (12000, 12000), stripes.tobytes())
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.save(bad / "palette_bomb.png", compress_level=9)
    c["palette_bomb"] = str(bad / "palette_bomb.png")
    # .npy files
    npy = d / "npy"
    npy.mkdir()
    _npy_header_only(npy / "bomb.npy", (10 ** 11, 1, 12, 12))
    np.save(npy / "ok.npy", rng.standard_normal((300, 1, 12, 12)).astype(np.float32))
    np.save(npy / "nan.npy", np.full((2, 1, 12, 12), np.nan, np.float32))
    np.save(npy / "shape.npy", np.zeros((2, 3, 12, 12), np.float32))
    write_pickled_npy(npy / "pickled.npy")
    np.savez(npy / "archive.npz", a=np.zeros((2, 1, 12, 12), np.float32))
    for k in ("bomb", "ok", "nan", "shape", "pickled"):
        c[f"{k}_npy"] = str(npy / f"{k}.npy")
    c["archive_npz"] = str(npy / "archive.npz")
    # volume files whose headers claim 2000³ / 100000³ points over a few kB
    import h5py

    vol = d / "vol"
    vol.mkdir()
    with h5py.File(vol / "bomb.hdf", "w") as f:
        g = f.create_group("VTKHDF")
        g.attrs["Type"] = np.bytes_("ImageData")
        g.attrs["WholeExtent"] = [0, 1999, 0, 1999, 0, 1999]
        g.attrs["Spacing"], g.attrs["Origin"], g.attrs["Direction"] = [1.0] * 3, [0.0] * 3, np.eye(3).ravel()
        g.create_group("PointData").create_dataset("value", shape=(2000, 2000, 2000), dtype="f8",
                                                   chunks=(100, 100, 100), compression="gzip")
    (vol / "bomb.vti").write_text(
        '<?xml version="1.0"?>\n<VTKFile type="ImageData" version="0.1"><ImageData WholeExtent="0 99999 0 99999 '
        '0 99999" Origin="0 0 0" Spacing="1 1 1"><Piece Extent="0 99999 0 99999 0 99999"><PointData Scalars="v">'
        '<DataArray type="Float32" Name="v" format="ascii">0</DataArray></PointData></Piece></ImageData></VTKFile>\n')
    c["bomb_hdf"], c["bomb_vti"] = str(vol / "bomb.hdf"), str(vol / "bomb.vti")
    # hostile ONNX models
    bad_models = d / "models"
    bad_models.mkdir()

    def save(name, proto, data: bytes | None = None):
        path = bad_models / name
        path.write_bytes(data if data is not None else proto.SerializeToString())
        c["onnx_" + path.stem] = str(path)

    save("huge_input.onnx", _conv_model(input_hw=(200000, 200000)))
    save("mismatch.onnx", _conv_model(weight_channels=2))
    save("domain.onnx", _conv_model(domain="com.evil"))
    save("garbage.onnx", None, b"\x08\x07garbage that is not a protobuf" * 10)
    save("empty.onnx", None, b"")
    broken = _conv_model()
    broken.graph.node[1].input[0] = "no_such_tensor"
    save("dangling.onnx", broken)
    two_inputs = _conv_model()
    two_inputs.graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, 1, 12, 12]))
    save("two_inputs.onnx", two_inputs)
    # external data: legitimate (beside the model), and five ways of reading elsewhere
    outside = d / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(DECOY)
    c["outside"] = str(outside)
    ext = d / "ext"
    ext.mkdir()
    good, size = _external(_conv_model(), "conv1_w", "w.bin")
    assert size == len(DECOY)
    (ext / "good.onnx").write_bytes(good.SerializeToString())
    (ext / "w.bin").write_bytes(np.full(9 * 3, 0.25, np.float32).tobytes())
    c["ext_good"] = str(ext / "good.onnx")
    for name, location, extra in (("bare", "cwd_only.bin", {}), ("absolute", str(outside / "w.bin"), {}),
                                  ("dotdot", "../outside/w.bin", {}), ("symlink", "link.bin", {}),
                                  ("offset", "w.bin", {"offset": 1000})):
        proto, _ = _external(_conv_model(), "conv1_w", location, **extra)
        (ext / f"{name}.onnx").write_bytes(proto.SerializeToString())
        c[f"ext_{name}"] = str(ext / f"{name}.onnx")
    os.symlink(outside / "w.bin", ext / "link.bin")
    # hostile prototxts
    proto_dir = d / "caffe"
    proto_dir.mkdir()
    layer_in = 'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {} }} }} }}\n'
    conv = 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }\n'
    (proto_dir / "huge_input.prototxt").write_text(
        'name: "h"\n' + layer_in.format("dim: 1 dim: 3 dim: 2000000000 dim: 2000000000") + conv)
    (proto_dir / "huge_fc.prototxt").write_text(
        'name: "h"\n' + layer_in.format("dim: 1 dim: 3 dim: 8 dim: 8")
        + 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2000000000 } }\n')
    (proto_dir / "unknown_layer.prototxt").write_text(
        'name: "h"\n' + layer_in.format("dim: 1 dim: 3 dim: 8 dim: 8")
        + 'layer { name: "x" type: "Frobnicate" bottom: "data" top: "x" }\n')
    (proto_dir / "unparsable.prototxt").write_text('name: "h"\nlayer { name: "data" type: \n')
    (proto_dir / "slow.prototxt").write_text(
        'name: "s"\n' + layer_in.format("dim: 1 dim: 3 dim: 227 dim: 227")
        + 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }\n'
        + 'layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 300 } }\n')
    with h5py.File(proto_dir / "bomb.caffemodel.h5", "w") as f:  # conv1's blob 0 claims 1e10 floats
        f.create_group("data").create_group("conv1").create_dataset(
            "0", shape=(100000, 100000), dtype="f4", chunks=(1000, 1000), compression="gzip")
    c["bomb_h5"] = str(proto_dir / "bomb.caffemodel.h5")
    c["demo_prototxt"] = str(ROOT / "models" / "caffe" / "fashion_caffenet.prototxt")
    c["demo_caffemodel"] = str(ROOT / "models" / "caffe" / "fashion_caffenet.caffemodel")
    for k in ("huge_input", "huge_fc", "unknown_layer", "unparsable", "slow"):
        c[f"{k}_prototxt"] = str(proto_dir / f"{k}.prototxt")
    # models with sidecars: custom preprocessing, shipped checkpoints
    side = d / "side"
    side.mkdir()
    for name, pre in (("custom_ok", {"preset": "custom", "size": [12, 12], "channels": 1, "mean": [0.5],
                                     "std": [0.25]}),
                      ("custom_missing", {"size": [12, 12], "mean": [0.5]}),
                      ("not_dict", "grey28"), ("unknown_preset", {"preset": "caffee"})):
        (side / f"{name}.onnx").write_bytes(tiny.read_bytes())
        (side / f"{name}.onnx.json").write_text(json.dumps({"preprocessing": pre}))
        c[f"side_{name}"] = str(side / f"{name}.onnx")
    (side / "not_json.onnx").write_bytes(tiny.read_bytes())
    (side / "not_json.onnx.json").write_text("{ not json")
    c["side_not_json"] = str(side / "not_json.onnx")
    ship = d / "ship"
    (ship / "ckpt").mkdir(parents=True)
    (ship / "m.onnx").write_bytes(tiny.read_bytes())
    for epoch in (1, 3):
        (ship / "ckpt" / f"m_epoch{epoch}.onnx").write_bytes(_tiny_model(seed=epoch).SerializeToString())
    (ship / "m.onnx.json").write_text(json.dumps({"checkpoints": ["ckpt/m_epoch1.onnx", "ckpt/m_epoch3.onnx"]}))
    c["ship"] = str(ship / "m.onnx")
    # a file where a folder must be
    (d / "a_file").write_text("x")
    c["a_file"] = str(d / "a_file")
    (d / "wrapper.py").write_text(WRAPPER)
    c["wrapper"] = str(d / "wrapper.py")
    return c


def files_under(path) -> list:
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink()) \
        if path.exists() else []


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------------- subprocess cases
# name: (argv with {placeholders} from the corpus and {out}, words the one error line must contain,
#        extra environment, expected exit code)

SUBPROCESS_CASES = {
    # declared sizes: the model's input, prototxt shapes, generated weights
    "onnx-input-200000x200000-layers": (["layers", "--model", "{onnx_huge_input}"],
                                        ["huge_input.onnx", "memory limit", "1x200000x200000"], {}, 2),
    "onnx-input-200000x200000-activations": (["activations", "{image}", "--model", "{onnx_huge_input}", "--out", "{out}"],
                                             ["huge_input.onnx", "memory limit"], {}, 2),
    "prototxt-input-2e9-layers": (["layers", "--model", "{huge_input_prototxt}"],
                                  ["huge_input.prototxt", "2000000000", "memory limit"], {}, 2),
    "prototxt-input-2e9-convert": (["convert-caffe", "{huge_input_prototxt}", "-o", "{out}/x.onnx"],
                                   ["huge_input.prototxt", "memory limit"], {}, 2),
    "prototxt-fc-2e9-convert": (["convert-caffe", "{huge_fc_prototxt}", "-o", "{out}/x.onnx"],
                                ["huge_fc.prototxt", "layer 'fc'", "memory limit"], {}, 2),
    # headers and pixel counts
    "npy-header-1e11-images": (["activations", "--input-array", "{bomb_npy}", "--model", "{model}", "--out", "{out}"],
                               ["bomb.npy", "100000000000"], {}, 2),
    "npy-over-memory-limit": (["activations", "--input-array", "{ok_npy}", "--model", "{model}", "--out", "{out}",
                               "--memory-limit", "100K"], ["ok.npy", "memory limit 100.0 KiB"], {}, 2),
    "png-header-60000x60000": (["activations", "{huge_png}", "--model", "{model}", "--out", "{out}"],
                               ["huge.png", "60000x60000", "memory budget"], {}, 2),
    "palette-bomb-over-budget": (["activations", "{palette_bomb}", "--model", "{model}", "--out", "{out}"],
                                 ["palette_bomb.png", "12000x12000", "512.0 MiB"], {"CNNVIS_MEMORY_LIMIT": "512M"}, 2),
    "palette-bomb-over-memory-limit-option": (["occlusion", "{palette_bomb}", "--model", "{model}", "--out", "{out}",
                                               "--memory-limit", "256M"], ["palette_bomb.png", "256.0 MiB"], {}, 2),
    "volume-hdf-claims-2000-cubed": (["volume", "--volume", "{bomb_hdf}", "--out", "{out}"],
                                     ["bomb.hdf", "(2000, 2000, 2000)", "memory limit"], {}, 2),
    "render-vti-claims-100000-cubed": (["render", "--volume", "{bomb_vti}", "--out", "{out}"],
                                       ["bomb.vti", "WholeExtent", "memory limit"], {}, 2),
    "caffe-hdf5-weights-claim-1e10-floats": (["convert-caffe", "{demo_prototxt}", "{bomb_h5}", "-o", "{out}/x.onnx"],
                                             ["bomb.caffemodel.h5", "conv1", "memory limit"], {}, 2),
    # grids and windows
    "maximize-ncols-1e8": (["maximize", "--model", "{model}", "--layer", "conv1", "--channels", "1", "--steps", "1",
                            "--ncols", "100000000", "--out", "{out}"], ["ncols 100000000", "memory limit"], {}, 2),
    "render-window-16000": (["render", "{image}", "--model", "{model}", "--layer", "conv1",
                             "--window-size", "16000", "16000", "--out", "{out}"],
                            ["window size 16000 x 16000", "memory limit"], {}, 2),
    # positive controls under the same cap: legitimate external data, a large image decoded reduced
    "palette-bomb-decoded-reduced": (["activations", "{palette_bomb}", "--model", "{model}", "--layer", "conv1",
                                      "--out", "{out}"], [], {"CNNVIS_MEMORY_LIMIT": "3G"}, 0),
}


def _format(argv, corpus, out):
    return [a.format(out=out, **{k: v for k, v in corpus.items() if isinstance(v, str)}) for a in argv]


def _run_capped(corpus, name, argv, env_extra, signal_after=None):
    case = Path(corpus["dir"]) / "cases" / name
    cwd = case / "cwd"
    cwd.mkdir(parents=True)
    (cwd / "cwd_only.bin").write_bytes(DECOY)  # what a bare external-data name must never read
    out = case / "out"
    log = case / "opened_forbidden.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(case), CNNVIS_HOME=str(case / "home"),
               MPLCONFIGDIR=str(case / "mpl"), OMP_NUM_THREADS="1", HOSTILE_LOG=str(log),
               HOSTILE_FORBIDDEN=os.pathsep.join([str(cwd / "cwd_only.bin"), corpus["outside"]]))
    env.pop("CNNVIS_MEMORY_LIMIT", None)
    env.update(env_extra)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # (a background shell may have ignored it)

    cmd = [sys.executable, corpus["wrapper"], *_format(argv, corpus, out)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=cap, text=True)
    waited = None
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        waited = time.monotonic() - t0
    else:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    opened = log.read_text().split() if log.exists() else []
    return {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "out": out, "opened": opened,
            "waited": waited}


@pytest.fixture(scope="module")
def subprocess_results(corpus):
    """Every subprocess case, run two at a time (each in its own folders)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_capped, corpus, name, argv, env)
                   for name, (argv, _, env, _) in SUBPROCESS_CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_subprocess_case(name, subprocess_results):
    _, words, _, code = SUBPROCESS_CASES[name]
    r = subprocess_results[name]
    assert "Traceback" not in r["stderr"], r["stderr"]
    assert r["opened"] == [], f"read outside the allowed folders: {r['opened']}"
    assert r["code"] == code, r["stderr"]
    if code == 2:
        lines = error_lines(r["stderr"])
        assert len(lines) == 1, r["stderr"]
        assert lines[0].startswith("cnnvis ") and ": error: " in lines[0]
        for word in words:
            assert word in lines[0], (word, lines[0])
        assert files_under(r["out"]) == []
    else:
        assert files_under(r["out"]), "a successful run writes its outputs"
        assert (r["out"] / "manifest.json").is_file()


def test_subprocess_large_image_decoded_reduced(subprocess_results, corpus):
    """The 12000×12000 palette image (white every 7th row) went through under the cap, decoded
    reduced by a box filter: each 500-row block averages 71 or 72 white rows, 8-bit rounded to 36 or
    37 (of 255), so the model input is in [36/255, 37/255] everywhere (subsampling would give 0 or
    1), and conv1's interior outputs lie within the interval bounds of such inputs — computed here
    from the weights with numpy."""
    r = subprocess_results["palette-bomb-decoded-reduced"]
    conv = np.load(next(Path(r["out"]).rglob("conv1.npy"))).astype(np.float64).reshape(4, 12, 12)
    proto = onnx.load(corpus["model"])
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    w = inits["conv1.weight"]
    b = inits["conv1.bias"]
    lo, hi = np.floor(71 / 500 * 255) / 255, np.ceil(72 / 500 * 255) / 255
    # each 3×3 window of inputs in [lo, hi]: the output lies between these interval bounds
    low = np.minimum(w * lo, w * hi).sum(axis=(1, 2, 3)) + b
    high = np.maximum(w * lo, w * hi).sum(axis=(1, 2, 3)) + b
    interior = conv[:, 1:-1, 1:-1].reshape(4, -1)
    tol = 1e-5
    assert np.all(interior >= low[:, None] - tol) and np.all(interior <= high[:, None] + tol)
    # and not what an all-black (0) or all-white (1) subsampled picture gives
    for value in (0.0, 1.0):
        assert not np.allclose(interior, value * w.sum(axis=(1, 2, 3))[:, None] + b[:, None], atol=1e-3)


def test_sigint_interrupts_caffe_conversion(corpus):
    """Ctrl-C during a conversion that generates 87M weights: exit 130 within seconds, no output."""
    r = _run_capped(corpus, "sigint-convert", ["convert-caffe", "{slow_prototxt}", "-o", "{out}/slow.onnx"], {},
                    signal_after=2.5)
    assert r["code"] == 130, r["stderr"]
    assert error_lines(r["stderr"]) == ["cnnvis convert-caffe: interrupted"]
    assert r["waited"] < 10.0
    assert files_under(r["out"]) == []


# --------------------------------------------------------------------------- in-process cases
# argument values refused by the one numeric check (cli/common.py), files refused in one line

IN_PROCESS_CASES = {
    # numbers: finite, positive where it matters, ranges
    "maximize-lr-nan": (["maximize", "--lr", "nan"], ["--lr", "'nan'"]),
    "maximize-lr-zero": (["maximize", "--lr", "0"], ["--lr", "> 0"]),
    "maximize-lr-negative": (["maximize", "--lr", "-1"], ["--lr"]),
    "maximize-init-scale-inf": (["maximize", "--init-scale", "inf"], ["--init-scale", "'inf'"]),
    "maximize-blur-sigma-negative": (["maximize", "--blur-sigma", "-1"], ["--blur-sigma", ">= 0"]),
    "maximize-decay-2": (["maximize", "--decay", "2"], ["--decay", "[0, 1]"]),
    "maximize-steps-0": (["maximize", "--steps", "0"], ["--steps"]),
    "maximize-jitter-negative": (["maximize", "--jitter", "-3"], ["--jitter"]),
    "maximize-norm-bound-nan": (["maximize", "--norm-bound", "nan"], ["--norm-bound"]),
    "maximize-seed-negative": (["maximize", "--seed", "-1"], ["--seed"]),
    "maximize-index-negative": (["maximize", "--index", "-2"], ["--index"]),
    "occlusion-fill-nan": (["occlusion", "--fill", "nan"], ["--fill", "'nan'"]),
    "occlusion-fill-inf": (["occlusion", "--fill", "-inf"], ["--fill"]),
    "occlusion-window-0": (["occlusion", "--window", "0"], ["--window"]),
    "occlusion-alpha-1.5": (["occlusion", "--alpha", "1.5"], ["--alpha"]),
    "saliency-alpha-nan": (["saliency", "--alpha", "nan"], ["--alpha"]),
    "invariance-scales-nan": (["invariance", "--scales", "1,nan"], ["--scales"]),
    "invariance-rotations-inf": (["invariance", "--rotations", "inf"], ["--rotations"]),
    "render-window-100000": (["render", "--window-size", "100000", "100000"], ["--window-size", "16384"]),
    "render-fps-0": (["render", "--fps", "0"], ["--fps"]),
    "render-spacing-nan": (["render", "--spacing", "1", "nan", "1"], ["--spacing"]),
    "volume-threshold-2": (["volume", "--threshold", "2"], ["--threshold"]),
    "topk-k-1e8": (["topk", "--k", "100000000"], ["--k", "1000"]),
    "topk-k-0": (["topk", "--k", "0"], ["--k"]),
    "compare-classes-permutations-1e9": (["compare-classes", "--permutations", "1000000000"], ["--permutations"]),
    "compare-classes-threshold-nan": (["compare-classes", "--threshold", "nan"], ["--threshold"]),
    "gradcheck-tolerance-nan": (["gradcheck", "--tolerance", "nan"], ["--tolerance"]),
    "train-demo-lr-inf": (["train-demo", "--lr", "inf"], ["--lr"]),
    "fetch-timeout-negative": (["fetch", "alexnet", "--timeout", "-1"], ["--timeout"]),
    "fetch-retries-negative": (["fetch", "alexnet", "--retries", "-1"], ["--retries"]),
    "activations-batch-size-0": (["activations", "--batch-size", "0"], ["--batch-size"]),
    "activations-ncols-0": (["activations", "--ncols", "0"], ["--ncols"]),
    "activations-memory-limit-word": (["activations", "--memory-limit", "lots"], ["--memory-limit", "'lots'"]),
    "activations-memory-limit-0": (["activations", "--memory-limit", "0"], ["--memory-limit"]),
    "convert-caffe-seed-negative": (["convert-caffe", "x.prototxt", "--seed", "-5"], ["--seed"]),
    "order-clusters-0": (["order", "--clusters", "0"], ["--clusters"]),
    "render-azimuth-nan": (["render", "--azimuth", "nan"], ["--azimuth"]),
    "compare-classes-max-vectors-1e11": (["compare-classes", "--max-vectors-per-group", "100000000000"],
                                         ["--max-vectors-per-group"]),
    "deconv-maps-0-999999999": (["deconv", "{image}", "--model", "{model}", "--layer", "conv1", "--maps", "0-999999999",
                                 "--out", "{out}"], ["--maps 0-999999999", "map 4 out of range"]),
    "evolution-maps-huge": (["evolution", "{image}", "--model", "{ship}", "--layer", "conv1", "--maps",
                             "2-99999999999", "--out", "{out}"], ["--maps", "out of range"]),
    "activations-threads-5000": (["activations", "--threads", "5000"], ["--threads", "4 per CPU"]),
    "train-demo-workers-1000": (["train-demo", "--workers", "1000"], ["--workers"]),
    # folders and files where the other kind must be
    "compare-classes-tmp-dir-is-file": (["compare-classes", "--tmp-dir", "{a_file}", "--out", "{out}"], ["--tmp-dir", "a_file"]),
    "compare-classes-tmp-dir-missing": (["compare-classes", "--tmp-dir", "{out}/nope", "--out", "{out}"], ["--tmp-dir"]),
    "convert-caffe-output-is-folder": (["convert-caffe", "{huge_fc_prototxt}", "-o", "{imgs}"], ["--output", "is a folder"]),
    "convert-caffe-output-under-file": (["convert-caffe", "{huge_fc_prototxt}", "-o", "{a_file}/x.onnx"], ["--output", "a_file"]),
    "out-is-a-file": (["activations", "{image}", "--model", "{model}", "--out", "{a_file}"], ["--out", "a_file"]),
    "out-under-a-file": (["filters", "--model", "{model}", "--out", "{a_file}/sub"], ["--out", "a_file"]),
    # model files: what is read (the audit hook sees no decoy opened), and what cannot run
    "external-data-bare-name-not-from-cwd": (["filters", "--model", "{ext_bare}", "--out", "{out}"],
                                             ["bare.onnx", "cwd_only.bin", "no such file beside the model"]),
    "external-data-absolute": (["filters", "--model", "{ext_absolute}", "--out", "{out}"],
                               ["absolute.onnx", "no absolute path"]),
    "external-data-dotdot": (["conv-gradients", "{image}", "--model", "{ext_dotdot}", "--out", "{out}"],
                             ["dotdot.onnx", "no absolute path, no '..'"]),
    "external-data-dotdot-layers": (["layers", "--model", "{ext_dotdot}"], ["dotdot.onnx", "'..'"]),
    "external-data-symlink-out": (["layers", "--model", "{ext_symlink}"],
                                  ["symlink.onnx", "link.bin", "outside the model's folder"]),
    "external-data-offset-past-end": (["filters", "--model", "{ext_offset}", "--out", "{out}"],
                                      ["offset.onnx", "offset 1000"]),
    "unknown-op-domain": (["layers", "--model", "{onnx_domain}"], ["domain.onnx", "com.evil"]),
    "conv-channels-mismatch-filters": (["filters", "--model", "{onnx_mismatch}", "--out", "{out}"],
                                       ["mismatch.onnx", "onnxruntime cannot run", "channels"]),
    "conv-channels-mismatch-layers": (["layers", "--model", "{onnx_mismatch}"],
                                      ["mismatch.onnx", "onnxruntime cannot run"]),
    # model files refused before any work
    "onnx-garbage": (["layers", "--model", "{onnx_garbage}"], ["garbage.onnx", "not an ONNX model"]),
    "onnx-empty": (["activations", "--model", "{onnx_empty}", "--out", "{out}"], ["empty.onnx"]),
    "onnx-dangling-input": (["layers", "--model", "{onnx_dangling}"], ["dangling.onnx", "not a valid ONNX model"]),
    "onnx-two-inputs": (["filters", "--model", "{onnx_two_inputs}", "--out", "{out}"], ["two_inputs.onnx", "one image input"]),
    "prototxt-unknown-layer": (["convert-caffe", "{unknown_layer_prototxt}", "-o", "{out}/x.onnx"], ["Frobnicate"]),
    "caffemodel-over-memory-limit": (["convert-caffe", "{demo_prototxt}", "{demo_caffemodel}", "-o", "{out}/x.onnx",
                                      "--memory-limit", "1M"], ["fashion_caffenet.caffemodel", "memory limit 1.0 MiB"]),
    "prototxt-unparsable": (["layers", "--model", "{unparsable_prototxt}"], ["unparsable.prototxt"]),
    # sidecars
    "sidecar-custom-preprocessing-missing-key": (["activations", "{image}", "--model", "{side_custom_missing}", "--out", "{out}"],
                                                 ["custom_missing.onnx.json", "misses channels"]),
    "sidecar-preprocessing-not-object": (["activations", "{image}", "--model", "{side_not_dict}", "--out", "{out}"],
                                         ["not_dict.onnx.json", "preprocessing"]),
    "sidecar-unknown-preset": (["activations", "{image}", "--model", "{side_unknown_preset}", "--out", "{out}"],
                               ["unknown_preset", "caffee"]),
    "sidecar-not-json": (["layers", "--model", "{side_not_json}"], ["not_json.onnx.json", "not valid JSON"]),
    "evolution-no-shipped-checkpoints": (["evolution", "{image}", "--model", "{model}", "--out", "{out}"],
                                         ["--checkpoints", "ships no checkpoints"]),
    # images and arrays
    "image-not-an-image": (["activations", "{text_png}", "--model", "{model}", "--out", "{out}"], ["text.png", "not a readable image"]),
    "image-empty": (["occlusion", "{empty_png}", "--model", "{model}", "--out", "{out}"], ["empty.png"]),
    "image-truncated": (["saliency", "{trunc_png}", "--model", "{model}", "--out", "{out}"], ["trunc.png"]),
    "input-array-pickled": (["activations", "--input-array", "{pickled_npy}", "--model", "{model}", "--out", "{out}"], ["pickled.npy"]),
    "input-array-npz": (["activations", "--input-array", "{archive_npz}", "--model", "{model}", "--out", "{out}"], ["archive.npz"]),
    "input-array-nan": (["activations", "--input-array", "{nan_npy}", "--model", "{model}", "--out", "{out}"], ["nan.npy", "NaN"]),
    "input-array-shape": (["activations", "--input-array", "{shape_npy}", "--model", "{model}", "--out", "{out}"], ["shape.npy", "N x 1 x 12 x 12"]),
    "topk-k-over-memory-limit": (["topk", "{imgs}", "--model", "{model}", "--k", "1000", "--memory-limit", "100K", "--out", "{out}"],
                                 ["--k 1000", "memory limit"]),
    "env-memory-limit-bogus": (["layers", "--model", "{model}"], ["CNNVIS_MEMORY_LIMIT", "'plenty'"]),
}


_FORBIDDEN: list = []  # real paths no in-process case may open (set per case)
_OPENED: list = []


def _audit(event, args):
    if not _FORBIDDEN or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    try:
        path = os.path.realpath(os.fsdecode(args[0]))
    except (TypeError, ValueError):
        return
    if any(path == f or path.startswith(f + os.sep) for f in _FORBIDDEN):
        _OPENED.append(path)


sys.addaudithook(_audit)  # (inert while _FORBIDDEN is empty)


def _run_in_process(argv, capsys, forbidden=()):
    _OPENED.clear()
    _FORBIDDEN[:] = [os.path.realpath(f) for f in forbidden]
    try:
        code = main(argv)
    finally:
        _FORBIDDEN.clear()
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(IN_PROCESS_CASES))
def test_in_process_case(name, corpus, tmp_path, capsys, monkeypatch):
    argv, words = IN_PROCESS_CASES[name]
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "cwd_only.bin").write_bytes(DECOY)  # what a bare external-data name must never read
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("CNNVIS_MEMORY_LIMIT", raising=False)
    if name == "env-memory-limit-bogus":
        monkeypatch.setenv("CNNVIS_MEMORY_LIMIT", "plenty")
    code, _, err = _run_in_process(_format(argv, corpus, out), capsys,
                                   forbidden=[cwd / "cwd_only.bin", corpus["outside"]])
    assert _OPENED == [], f"read outside the allowed folders: {_OPENED}"
    assert code == 2, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("cnnvis ") and ": error: " in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert files_under(out) == []
    assert files_under(tmp_path) == ["cwd/cwd_only.bin"], "nothing written beside the current folder either"


def test_legitimate_external_data_beside_the_model(corpus, tmp_path, capsys, monkeypatch):
    """External data in the model's folder loads (today: a ValidationError traceback), from there and
    not from the current folder: `filters` writes the 0.25s beside the model, not the decoy."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "w.bin").write_bytes(DECOY)
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    code, _, err = _run_in_process(["filters", "--model", corpus["ext_good"], "--out", str(out)], capsys,
                                   forbidden=[cwd / "w.bin", corpus["outside"]])
    assert code == 0, err
    assert _OPENED == []
    arrays = [np.load(p) for p in sorted(out.rglob("*.npy"))]
    assert arrays and all(np.array_equal(a, np.full_like(a, 0.25)) for a in arrays)
    code, stdout, err = _run_in_process(["layers", "--model", corpus["ext_good"]], capsys)
    assert code == 0 and "conv1" in stdout, err


# --------------------------------------------------------------------- accepted hostile inputs

def test_image_named_dotdot_png_is_read_and_stays_inside_out(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run_in_process(["activations", corpus["dotdot_png"], "--model", corpus["model"],
                                    "--layer", "conv1", "--out", str(out)], capsys)
    assert code == 0, err
    files = files_under(out)
    assert files and all(not f.startswith("..") for f in files)
    assert files_under(tmp_path) == [f"out/{f}" for f in files]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"]["activations"]["inputs"] == [corpus["dotdot_png"]]


def test_sidecar_custom_preprocessing_is_used(corpus, tmp_path, capsys):
    """A custom dict (preset 'custom', size, channels, mean, std) is accepted and applied: the
    stored input equals (pixel/255 - 0.5) / 0.25 of the image, computed here with numpy."""
    out = tmp_path / "out"
    code, _, err = _run_in_process(["activations", corpus["image"], "--model", corpus["side_custom_ok"],
                                    "--layer", "conv1", "--out", str(out)], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    pre = manifest["runs"]["activations"]["model"]
    assert pre["input_shape"] == [1, 12, 12]
    from cnnvis.registry import load
    from cnnvis.preprocess import for_model

    p = for_model(load(corpus["side_custom_ok"]))
    assert (p.mean, p.std, p.channels, p.size) == ((0.5,), (0.25,), 1, (12, 12))
    pixels = np.random.default_rng(3).integers(0, 256, (12, 12)).astype(np.uint8)
    expected = (pixels / 255.0 - 0.5) / 0.25
    assert np.allclose(p.from_pixels(pixels[:, :, None] / 255.0)[0], expected, atol=1e-6)


def test_evolution_uses_shipped_checkpoints_by_default(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run_in_process(["evolution", corpus["image"], "--model", corpus["ship"], "--layer", "conv1",
                                    "--maps", "0-1", "--out", str(out)], capsys)
    assert code == 0, err
    records = json.loads((out / "conv1_evolution.json").read_text())
    shipped = Path(corpus["ship"]).parent / "ckpt"
    assert [c["checkpoint"] for c in records["checkpoints"]] == [str(shipped / "m_epoch1.onnx"),
                                                                 str(shipped / "m_epoch3.onnx")]
    assert [c["number"] for c in records["checkpoints"]] == [1, 3]


def test_file_where_an_output_folder_goes(corpus, tmp_path, capsys):
    """--out holds a file named like the per-image folder activations writes: one line naming it,
    the user's file untouched, nothing else written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "im0").write_text("mine")
    code, _, err = _run_in_process(["activations", corpus["image"], "--model", corpus["model"], "--layer", "conv1",
                                    "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and "im0" in lines[0], err
    assert files_under(out) == ["im0"] and (out / "im0").read_text() == "mine"


# ------------------------------------------------- report, manifests, downloads, names, resumes, commits
# (the long versions of these live in test_report/test_manifest/test_registry/test_topk; the corpus
#  carries one compact case each, through the command line, with the same assertions as above)

def _snapshot(folder) -> dict:
    """Every file under ``folder`` (relative path -> bytes; a symlink -> its target)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()} if folder.exists() else {}


def _refused(code, err, *words) -> str:
    """The common assertions of a refusal: exit 2, one line naming ``words``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("cnnvis ") and ": error: " in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _activations(corpus, out, *images, extra=()):
    return ["activations", *(images or [corpus["image"]]), "--model", corpus["model"], "--layer", "conv1",
            *extra, "--out", str(out)]


def test_report_does_not_embed_a_manifest_symlink_to_etc_passwd(corpus, tmp_path, capsys):
    """A manifest listing ``leak.csv -> /etc/passwd``: the report is written, /etc/passwd is never
    opened, and none of its lines is in index.html."""
    out = tmp_path / "out"
    code, _, err = _run_in_process(_activations(corpus, out), capsys)
    assert code == 0, err
    (out / "leak.csv").symlink_to("/etc/passwd")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["runs"]["activations"]["files"].append({"path": "leak.csv", "kind": "table"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run_in_process(["report", str(out)], capsys, forbidden=["/etc/passwd"])
    assert code == 0 and "Traceback" not in err, err
    assert _OPENED == [], f"read outside the report's folder: {_OPENED}"
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "root:" not in html and "/bin/" not in html
    assert 'href="leak.csv"' not in html


@pytest.mark.parametrize("kind", ["corrupt", "directory"])
@pytest.mark.parametrize("command", ["report", "activations"])
def test_a_bad_manifest_is_one_line_and_nothing_moves(corpus, tmp_path, capsys, command, kind):
    """A corrupt or a directory ``manifest.json`` under the report's folder or an analysis's --out:
    one line naming it, before anything is written; the folder is as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "im0").mkdir()
    (out / "im0" / "earlier.txt").write_text("an earlier run's file")
    if kind == "corrupt":
        (out / "manifest.json").write_text('{"runs": {"activations": ')
    else:
        (out / "manifest.json").mkdir()
        (out / "manifest.json" / "x").write_text("{}")
    before = _snapshot(out)
    argv = ["report", str(out)] if command == "report" else _activations(corpus, out)
    code, _, err = _run_in_process(argv, capsys)
    line = _refused(code, err)
    assert "manifest" in line, line
    assert _snapshot(out) == before and not (out / "index.html").exists()
    assert not any(p.name.startswith(".cnnvis") for p in out.iterdir())


def test_fetch_url_file_etc_passwd_is_refused_and_caches_nothing(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CNNVIS_HOME", str(home))
    code, _, err = _run_in_process(["fetch", "alexnet", "--no-progress", "--url", "file:///etc/passwd"], capsys,
                                   forbidden=["/etc/passwd"])
    _refused(code, err, "--url file:///etc/passwd", "http")
    assert _OPENED == []
    assert _snapshot(home) == {}


@pytest.mark.parametrize("which", ["unknown-name", "registered-without-checksum"])
def test_fetch_url_without_sha256_is_refused_before_any_download(tmp_path, capsys, monkeypatch, which):
    """--url alone for a model the registry has no checksum for (or does not know): refused before
    a connection is made (the URL points at a closed port: a download attempt would fail otherwise)."""
    home = tmp_path / "home"
    monkeypatch.setenv("CNNVIS_HOME", str(home))
    sidecars = tmp_path / "sidecars"
    sidecars.mkdir()
    (sidecars / "plain.json").write_text(json.dumps({"name": "plain", "kind": "onnx", "file": "plain.onnx",
                                                     "url": "http://127.0.0.1:9/plain.onnx"}))
    monkeypatch.setenv("CNNVIS_MODEL_PATH", str(sidecars))
    name = "no-such-model" if which == "unknown-name" else "plain"
    code, _, err = _run_in_process(["fetch", name, "--no-progress", "--retries", "0", "--url",
                                    "http://127.0.0.1:9/x.onnx"], capsys)
    line = _refused(code, err, name)
    assert ("unknown model" in line) if which == "unknown-name" else ("--sha256" in line), line
    assert _snapshot(home) == {}


HOSTILE_NAMES = ["..png", "-x.png", "new\nline.png", "ünïcødé-猫.png", "L" * 251 + ".png"]  # 255 bytes: the longest a file system takes


def test_hostile_image_names_give_safe_outputs_inside_out(corpus, tmp_path, capsys, monkeypatch):
    """Images named '..png', '-x.png', with a newline, in unicode, and 255 bytes long: each is read,
    and every output lands inside --out under a name with no newline, no leading '.' or '-', at
    most 255 bytes a component, one folder per image."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in HOSTILE_NAMES:
        (imgs / name).write_bytes(Path(corpus["image"]).read_bytes())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, _, err = _run_in_process(_activations(corpus, out, *(str(imgs / n) for n in HOSTILE_NAMES)), capsys)
    assert code == 0, err
    files = [f for f in files_under(out) if f != "manifest.json"]
    assert files
    for f in files:
        for part in Path(f).parts:
            assert "\n" not in part and part[0] not in ".-" and len(part.encode()) <= 255, repr(f)
    assert len({Path(f).parts[0] for f in files}) == len(HOSTILE_NAMES)
    assert set(files_under(tmp_path)) == {f"out/{f}" for f in files_under(out)} | {f"imgs/{n}" for n in HOSTILE_NAMES}
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["runs"]["activations"]["inputs"]) == sorted(str(imgs / n) for n in HOSTILE_NAMES)


def test_topk_resume_refuses_an_image_changed_since_the_saved_state(corpus, tmp_path, capsys):
    """A resumed top-k whose already-processed image changed: one line naming it, nothing mixed in."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"im{i}.png").write_bytes((Path(corpus["imgs"]) / f"im{i}.png").read_bytes())
    out = tmp_path / "out"
    argv = ["topk", str(imgs), "--model", corpus["model"], "--layer", "conv1", "--k", "2", "--batch-size", "1",
            "--out", str(out)]
    code, _, err = _run_in_process(argv + ["--max-chunks", "1"], capsys)
    assert code == 3, err  # images left: the state is saved
    before = _snapshot(out)
    assert before
    (imgs / "im0.png").write_bytes((Path(corpus["imgs"]) / "im2.png").read_bytes())  # the processed one
    code, _, err = _run_in_process(argv, capsys)
    _refused(code, err, str(imgs / "im0.png"), "changed", "--restart")
    assert _snapshot(out) == before


def test_two_runs_with_other_parameters_never_leave_a_lying_manifest(corpus, tmp_path, capsys):
    """Into one --out: activations of im0 and im1, then of im0 alone with another --ncols. The
    second run would overwrite only part of the first run's files: refused in one line, the
    first run byte-identical. Then a run over both images with the other parameters replaces
    the first as a whole: one record, whose every file is there and was written by it."""
    out = tmp_path / "out"
    both = [str(Path(corpus["imgs"]) / "im0.png"), str(Path(corpus["imgs"]) / "im1.png")]
    code, _, err = _run_in_process(_activations(corpus, out, *both), capsys)
    assert code == 0, err
    first = _snapshot(out)
    code, _, err = _run_in_process(_activations(corpus, out, both[0], extra=["--ncols", "3"]), capsys)
    _refused(code, err, f"--out {out}", "other parameters", "im0/activations.h5")
    assert _snapshot(out) == first
    code, _, err = _run_in_process(_activations(corpus, out, *both, extra=["--ncols", "3"]), capsys)
    assert code == 0, err
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert len(runs) == 1
    (record,) = runs.values()
    assert record["params"]["ncols"] == 3
    listed = sorted(f["path"] for f in record["files"])
    assert listed == [f for f in files_under(out) if f != "manifest.json"]


def test_stale_staging_folders_and_part_files_are_cleaned_up(corpus, tmp_path, capsys):
    """What a killed run left in --out (an unlocked ``.cnnvis-stage-*`` folder, ``.part`` files
    beside the outputs) is gone after the next run; the outputs are those of a clean run."""
    out = tmp_path / "out"
    clean = tmp_path / "clean"
    code, _, err = _run_in_process(_activations(corpus, clean), capsys)
    assert code == 0, err
    code, _, err = _run_in_process(_activations(corpus, out), capsys)
    assert code == 0, err
    (out / ".cnnvis-stage-dead" / "im0").mkdir(parents=True)
    (out / ".cnnvis-stage-dead" / "im0" / "grid.png").write_text("left by a killed run")
    (out / ".manifest.json.x1.part").write_text("half")
    (out / "im0" / ".activations.h5.x2.part").write_text("half")
    code, _, err = _run_in_process(_activations(corpus, out), capsys)
    assert code == 0, err
    assert files_under(out) == files_under(clean)
    for rel in files_under(clean):
        if rel != "manifest.json":
            assert (out / rel).read_bytes() == (clean / rel).read_bytes(), rel


@pytest.mark.parametrize("blocker", ["activations", "filters"])
def test_run_all_with_a_file_where_a_step_folder_goes(corpus, tmp_path, capsys, blocker):
    """run-all writes each step into its own folder of --out: a file named like one of them (the
    first step's or a later one's) is one line naming it before any step runs; nothing is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / blocker).write_text("mine")
    code, _, err = _run_in_process(["run-all", "--images", corpus["image"], "--model", corpus["model"],
                                    "--only", "activations", "filters", "--out", str(out)], capsys)
    _refused(code, err, str(out / blocker), "a file is where")
    assert _snapshot(out) == {blocker: b"mine"}


def test_case_count():
    """The issue asks for at least 60 hostile cases across commands."""
    commands = {argv[0] for argv, *_ in SUBPROCESS_CASES.values()} | {argv[0] for argv, _ in IN_PROCESS_CASES.values()}
    assert len(SUBPROCESS_CASES) + len(IN_PROCESS_CASES) + 5 >= 60
    assert len(commands) >= 15, sorted(commands)
