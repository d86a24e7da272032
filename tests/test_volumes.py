"""Volume files: every format written and read back exactly, in the documented axis order."""
import json
import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from cnnvis.errors import CnnvisError
from cnnvis.export import volumes as V

C, H, W = 4, 5, 6
SPACING = (1.0, 2.0, 3.0)
ORIGIN = (0.5, -1.0, 2.0)


@pytest.fixture
def stack():
    # Every value distinct and every axis a different length: any transpose or flip changes it.
    z, r, x = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
    return (100 * z + 10 * r + x).astype(np.float32)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _expected_normalized(stack):
    s = stack.astype(np.float64)
    return (s - s.min()) / (s.max() - s.min())


@pytest.mark.parametrize("suffix", [".hdf", ".vti", ".npy"])
def test_roundtrip_exact_values_and_axes(tmp_path, stack, suffix):
    path = tmp_path / f"vol{suffix}"
    V.write_volume(path, stack, spacing=SPACING, origin=ORIGIN, metadata={"layer": "conv1"})
    vol = V.read_volume(path)
    assert vol.values.shape == (C, H, W)
    assert vol.values.dtype == np.float32
    np.testing.assert_array_equal(vol.values, stack)  # exact, [z, row, col]
    assert vol.values[2, 1, 5] == 215.0
    if suffix != ".npy":
        assert vol.spacing == SPACING and vol.origin == ORIGIN
        assert list(vol.arrays) == ["value", "normalized", "mask", "channel"]
        np.testing.assert_allclose(vol.arrays["normalized"], _expected_normalized(stack),
                                   rtol=0, atol=1e-7)
        np.testing.assert_array_equal(vol.arrays["mask"], _expected_normalized(stack) > 0.5)
        np.testing.assert_array_equal(vol.arrays["channel"][:, 0, 0], np.arange(C))
        assert vol.metadata["layer"] == "conv1"
        assert vol.metadata["permutation"] == list(range(C))
        assert vol.metadata["normalization"]["mode"] == "global"


def test_hdf_layout_follows_vtkhdf_rules(tmp_path, stack):
    path = tmp_path / "vol.hdf"
    written = V.write_volume(path, stack, spacing=SPACING, origin=ORIGIN,
                             metadata={"model": "tiny", "image": "cat.jpg"})
    assert [p.name for p in written] == ["vol.hdf", "vol_paraview.py"]
    with h5py.File(path, "r") as f:
        root = f["VTKHDF"]
        assert list(root.attrs["Version"]) == [1, 0]
        type_id = root.attrs.get_id("Type").get_type()
        assert isinstance(type_id, h5py.h5t.TypeStringID)
        assert not type_id.is_variable_str() and type_id.get_size() == 9
        assert root.attrs["Type"] == b"ImageData"
        assert list(root.attrs["WholeExtent"]) == [0, W - 1, 0, H - 1, 0, C - 1]
        assert list(root.attrs["Spacing"]) == list(SPACING)
        assert list(root.attrs["Origin"]) == list(ORIGIN)
        assert list(root.attrs["Direction"]) == [1, 0, 0, 0, 1, 0, 0, 0, 1]
        stored = root["PointData/value"][()]
        assert stored.shape == (C, H, W)  # (nz, ny, nx)
        # VTK's y points up: stored row j is image row H-1-j.
        assert stored[1, 0, 2] == stack[1, H - 1, 2] == 142.0
        np.testing.assert_array_equal(stored, stack[:, ::-1, :])
        meta = f["cnnvis"].attrs
        assert meta["model"] == "tiny" and meta["image"] == "cat.jpg"
        assert list(meta["permutation"]) == [0, 1, 2, 3]
        assert json.loads(meta["json"])["model"] == "tiny"


@pytest.mark.parametrize("suffix", [".hdf", ".vti"])
def test_vtk_reader_sees_dimensions_origin_spacing_and_values(tmp_path, stack, suffix):
    import pyvista as pv

    path = tmp_path / f"vol{suffix}"
    V.write_volume(path, stack, spacing=SPACING, origin=ORIGIN)
    grid = pv.read(path)  # VTK's own reader (vtkHDFReader / vtkXMLImageDataReader)
    assert tuple(grid.dimensions) == (W, H, C)
    assert tuple(grid.spacing) == SPACING and tuple(grid.origin) == ORIGIN
    assert {"value", "normalized", "mask", "channel"} <= set(grid.point_data.keys())
    # Image row 0 is at the top: world y = origin_y + (H-1-row) * spacing_y.
    for z, row, col in [(0, 0, 0), (2, 1, 5), (3, 4, 1), (1, 0, 5)]:
        world = (ORIGIN[0] + col * SPACING[0], ORIGIN[1] + (H - 1 - row) * SPACING[1],
                 ORIGIN[2] + z * SPACING[2])
        index = grid.find_closest_point(world)
        np.testing.assert_allclose(grid.points[index], world)
        assert grid.point_data["value"][index] == stack[z, row, col] == 100 * z + 10 * row + col


def test_vox_bytes_header_and_readback(tmp_path, stack):
    path = tmp_path / "vol.vox"
    written = V.write_volume(path, stack, spacing=SPACING)
    assert [p.name for p in written] == ["vol.vox", "vol.hd"]
    assert (tmp_path / "vol.hd").read_text() == "Size 6x5x4 unsigned byte\nSpacing 1.0x2.0x3.0\n"
    raw = np.fromfile(path, dtype=np.uint8)
    expected = np.rint(_expected_normalized(stack) * 255).astype(np.uint8)
    assert raw.size == C * H * W
    # Channel-major, column fastest: byte z*H*W + row*W + col.
    assert raw[2 * H * W + 1 * W + 5] == expected[2, 1, 5]
    np.testing.assert_array_equal(raw, expected.ravel())
    assert raw.min() == 0 and raw.max() == 255
    vol = V.read_volume(path)
    np.testing.assert_array_equal(vol.values, expected)
    assert vol.spacing == SPACING


def test_permutation_reorders_slices_and_records_channels(tmp_path, stack):
    perm = [2, 0, 3, 1]
    V.write_volume(tmp_path / "p.hdf", stack, permutation=perm)
    vol = V.read_volume(tmp_path / "p.hdf")
    np.testing.assert_array_equal(vol.values, stack[perm])
    np.testing.assert_array_equal(vol.arrays["channel"],
                                  np.broadcast_to(np.array(perm)[:, None, None], (C, H, W)))
    assert vol.metadata["permutation"] == perm


def test_normalizations_and_mask_threshold(stack):
    per, info = V.normalize(stack, "per-channel")
    np.testing.assert_allclose(per.min(axis=(1, 2)), 0.0)
    np.testing.assert_allclose(per.max(axis=(1, 2)), 1.0)
    assert info["min"] == [0.0, 100.0, 200.0, 300.0]
    signed = np.array([[[-2.0, 0.0], [1.0, 4.0]]])
    sym, info = V.normalize(signed, "symmetric")
    np.testing.assert_allclose(sym, [[[0.25, 0.5], [0.625, 1.0]]])
    assert info["max_abs"] == 4.0
    flat, _ = V.normalize(np.full((2, 3, 3), 7.0), "global")
    assert np.all(flat == 0.0)
    prep = V.prepare_volume(stack, threshold=0.8)
    np.testing.assert_array_equal(prep.arrays["mask"], _expected_normalized(stack) > 0.8)


def test_four_d_layouts(tmp_path):
    weights = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # N, Cin, kh, kw
    stacked, extra = V.stack_from_array(weights, layout="stack")
    assert stacked.shape == (6, 4, 5)
    np.testing.assert_array_equal(stacked[1 * 3 + 2], weights[1, 2])  # z = n*Cin + cin
    assert extra["filter"][4, 0, 0] == 1 and extra["input_channel"][4, 0, 0] == 1
    tiles, extra = V.stack_from_array(weights, layout="tiles")
    assert tiles.shape == (2, 4, 15)
    np.testing.assert_array_equal(tiles[1, :, 2 * 5:3 * 5], weights[1, 2])  # x = cin*kw + col
    assert extra["input_channel"][1, 3, 11] == 2 and extra["filter"][1, 3, 11] == 1
    V.write_volume(tmp_path / "w.hdf", weights, layout="tiles", normalization="symmetric")
    vol = V.read_volume(tmp_path / "w.hdf")
    np.testing.assert_array_equal(vol.values, tiles)
    np.testing.assert_array_equal(vol.arrays["input_channel"], extra["input_channel"])
    assert vol.metadata["layout"] == "tiles" and vol.metadata["source_shape"] == [2, 3, 4, 5]
    batch_of_one = weights[:1]  # 1×C×H×W activations of one image
    np.testing.assert_array_equal(V.stack_from_array(batch_of_one)[0], weights[0])


def test_write_volumes_all_formats(tmp_path, stack):
    written = V.write_volumes(tmp_path / "all", stack, spacing=SPACING)
    assert _files(tmp_path) == ["all.hd", "all.hdf", "all.npy", "all.vox", "all.vti",
                                "all_paraview.py"]
    assert len(written) == 6
    for suffix in (".hdf", ".vti", ".npy"):
        np.testing.assert_array_equal(V.read_stack(tmp_path / f"all{suffix}"), stack)


def test_paraview_script_is_valid_python_naming_the_file(tmp_path, stack):
    V.write_volume(tmp_path / "conv1.hdf", stack, threshold=0.3)
    text = (tmp_path / "conv1_paraview.py").read_text()
    compile(text, "conv1_paraview.py", "exec")
    assert "'conv1.hdf'" in text and '"normalized"' in text
    assert 'SetRepresentationType("Volume")' in text and "0.3," in text


@pytest.mark.skipif(shutil.which("pvpython") is None, reason="ParaView's pvpython is not installed")
def test_paraview_opens_the_hdf(tmp_path, stack):
    V.write_volume(tmp_path / "conv1.hdf", stack, spacing=SPACING, origin=ORIGIN)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from paraview.simple import OpenDataFile\n"
        "from paraview import servermanager as sm\n"
        f"src = OpenDataFile({str(tmp_path / 'conv1.hdf')!r})\n"
        "data = sm.Fetch(src)\n"
        "print('DIMS', *data.GetDimensions())\n"
        "print('SPACING', *data.GetSpacing())\n"
        "print('VALUE', data.GetPointData().GetArray('value').GetValue(2 + 6 * (5 * 1 + 0)))\n")
    out = subprocess.run(["pvpython", str(probe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line[:1].isupper())
    assert lines["DIMS"].split() == ["6", "5", "4"]
    assert [float(v) for v in lines["SPACING"].split()] == list(SPACING)
    # Point (x=2, j=0, z=1): j = 0 is image row H-1 = 4.
    assert float(lines["VALUE"]) == stack[1, 4, 2]


@pytest.mark.skipif(shutil.which("pvbatch") is None, reason="ParaView's pvbatch is not installed")
def test_paraview_script_renders_the_volume_row_zero_on_top(tmp_path, x_display):
    from PIL import Image

    block = np.zeros((6, 20, 30), dtype=np.float32)
    block[:, :5, :7] = 1.0  # top-left corner of every map
    V.write_volume(tmp_path / "block.hdf", block, threshold=0.3)
    shot = tmp_path / "shot.png"
    env = {k: v for k, v in os.environ.items() if k != "VTK_DEFAULT_OPENGL_WINDOW"}
    out = subprocess.run(["pvbatch", str(tmp_path / "block_paraview.py"), "--screenshot", str(shot)],
                         capture_output=True, text=True, timeout=300, env={**env, "DISPLAY": x_display})
    # pvbatch's first error lines say why (its stack trace follows them)
    assert out.returncode == 0, out.stderr[:1500]
    with Image.open(shot) as img:
        rgb = np.asarray(img.convert("RGB")).astype(int)
    yellow = (rgb[..., 0] > 180) & (rgb[..., 1] > 180) & (rgb[..., 2] < 120)  # viridis top end
    assert yellow.sum() > 500
    rows, cols = np.nonzero(yellow)
    assert rows.mean() < rgb.shape[0] / 2 and cols.mean() < rgb.shape[1] / 2


@pytest.mark.parametrize("bad, message", [
    (np.zeros((5, 6)), "expected a C×H×W stack or an N×C×H×W array"),
    (np.zeros((1, 2, 3, 4, 5)), "expected a C×H×W stack or an N×C×H×W array"),
    (np.array([[[1.0, np.nan]]]), "NaN or inf"),
    (np.array([[[1.0, np.inf]]]), "NaN or inf"),
    (np.zeros((0, 3, 3)), "empty"),
])
@pytest.mark.parametrize("suffix", [".hdf", ".vti", ".vox", ".npy"])
def test_bad_arrays_raise_one_line_and_write_nothing(tmp_path, bad, message, suffix):
    with pytest.raises(CnnvisError, match=message) as err:
        V.write_volume(tmp_path / f"bad{suffix}", bad)
    assert "\n" not in str(err.value)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(permutation=[0, 0, 1, 2]), "permutation"),
    (dict(permutation=[0, 1]), "permutation"),
    (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
    (dict(spacing=(1.0, 2.0)), "spacing"),
    (dict(threshold=1.5), "threshold"),
    (dict(normalization="zscore"), "normalization"),
    (dict(layout="mosaic"), "layout"),
    (dict(metadata={"permutation": [1]}), "reserved"),
])
def test_bad_arguments_raise_and_write_nothing(tmp_path, stack, kwargs, message):
    with pytest.raises(CnnvisError, match=message):
        V.write_volume(tmp_path / "bad.hdf", stack, **kwargs)
    assert _files(tmp_path) == []


def test_unknown_format_raises_and_writes_nothing(tmp_path, stack):
    with pytest.raises(CnnvisError, match=r"unknown volume format '.xyz'"):
        V.write_volume(tmp_path / "vol.xyz", stack)
    with pytest.raises(CnnvisError, match="volume format 'no-such-format'"):
        V.write_volumes(tmp_path / "vol", stack, formats=("hdf", "no-such-format"))
    assert _files(tmp_path) == []
    with pytest.raises(CnnvisError, match="unknown volume format"):
        V.read_volume(tmp_path / "vol.xyz")


def test_reader_errors(tmp_path, stack, bad_npy_files):
    with pytest.raises(CnnvisError, match="no such volume file"):
        V.read_volume(tmp_path / "missing.hdf")
    V.write_volume(tmp_path / "v.vox", stack)
    (tmp_path / "v.hd").unlink()
    with pytest.raises(CnnvisError, match="header v.hd not found"):
        V.read_volume(tmp_path / "v.vox")
    (tmp_path / "v.hd").write_text("Size 7x5x4 unsigned byte\nSpacing 1.0x1.0x1.0\n")
    with pytest.raises(CnnvisError, match="120 bytes; the header says 7x5x4 = 140"):
        V.read_volume(tmp_path / "v.vox")
    (tmp_path / "v.hd").write_text("Dimensions 6 5 4\n")
    with pytest.raises(CnnvisError, match="Size WxHxC unsigned byte"):
        V.read_volume(tmp_path / "v.vox")
    with h5py.File(tmp_path / "plain.hdf", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CnnvisError, match="no /VTKHDF group"):
        V.read_volume(tmp_path / "plain.hdf")
    (tmp_path / "text.hdf").write_text("not hdf5")
    with pytest.raises(CnnvisError, match="not a readable HDF5 file"):
        V.read_volume(tmp_path / "text.hdf")
    np.save(tmp_path / "flat.npy", np.zeros((3, 4)))
    with pytest.raises(CnnvisError, match="expected a C×H×W stack"):
        V.read_stack(tmp_path / "flat.npy")
    for name, path in bad_npy_files.items():
        with pytest.raises(CnnvisError, match=rf"volume .*{name}\.npy: (not a readable .npy|an .npz archive)"):
            V.read_volume(path)
    V.write_volume(tmp_path / "ok.hdf", stack)
    with pytest.raises(CnnvisError, match="unknown point array"):
        V.read_volume(tmp_path / "ok.hdf", array="values")
    np.testing.assert_array_equal(V.read_volume(tmp_path / "ok.hdf", array="mask").values,
                                  _expected_normalized(stack) > 0.5)


def test_companion_paths(tmp_path):
    assert V.companion_paths(tmp_path / "a.vox") == [tmp_path / "a.hd"]
    assert V.companion_paths(tmp_path / "a.hdf") == [tmp_path / "a_paraview.py"]
    assert V.companion_paths(tmp_path / "a.npy") == []


def test_damaged_volume_files_are_one_line(tmp_path):
    import h5py

    from cnnvis.errors import CnnvisError
    from cnnvis.export import volumes

    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(CnnvisError, match="empty.npy"):
        volumes.read_volume(tmp_path / "empty.npy")
    with h5py.File(tmp_path / "noattrs.hdf", "w") as f:
        g = f.create_group("VTKHDF")
        g.attrs["Type"] = np.bytes_("ImageData")
    with pytest.raises(CnnvisError, match="noattrs.hdf"):
        volumes.read_volume(tmp_path / "noattrs.hdf")


def test_every_registry_entry_writes_its_companions_and_reads_back(tmp_path, stack):
    from cnnvis.export import report

    assert list(V.FORMATS) == ["hdf", "vti", "vox", "npy"]
    for name, fmt in V.FORMATS.items():
        assert fmt.name == name and fmt.suffix == "." + name and fmt.description
        path = tmp_path / f"v{fmt.suffix}"
        written = V.write_volume(path, stack)
        assert written == [path, *V.companion_paths(path)] and all(p.is_file() for p in written)
        assert [p.name for p in V.companion_paths(path)] == [f"v{tail}" for tail, _ in fmt.companions]
        vol = fmt.reader(path)
        expected = V.vox_bytes(_expected_normalized(stack)) if name == "vox" else stack
        np.testing.assert_array_equal(vol.values, expected)
        assert report.FILE_NOTES[fmt.suffix] == fmt.description
    assert report.FILE_NOTES[".hd"] == "CNN-VIS volume header"
    assert report.FILE_NOTES[".py"] == "Python script (ParaView: pvpython)"
