import json
import struct

import numpy as np
import pytest
from PIL import Image

from cnnvis import preprocess
from cnnvis.errors import CnnvisError
from cnnvis.preprocess import Preprocessing, preset


def save(path, array, mode=None, **kw):
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path, **kw)
    return path


def bilinear_zero_pad(n_in, n_out):
    """Independent reference: linear interpolation matrix with pixel-centre alignment and zeros
    outside the image (what scikit-image order=1, mode='constant' does when enlarging)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = (i + 0.5) * n_in / n_out - 0.5
        lo = int(np.floor(c))
        frac = c - lo
        for j, wt in ((lo, 1 - frac), (lo + 1, frac)):
            if 0 <= j < n_in:
                w[i, j] += wt
    return w


# ---------------------------------------------------------------------- the caffe preset

def test_caffe_preset_matches_real_caffe_transformer(shared_dir):
    ref = np.load(shared_dir / "reference/caffe_cifar10_quick/caffenet_preprocess_cat.npz")
    expected = ref[ref.files[0]]
    got = preset("caffe")(shared_dir / "images/cat.jpg")
    assert got.shape == expected.shape == (3, 227, 227)
    assert got.dtype == np.float32
    # Brief: max abs difference <= 1e-3 (in 0-255 units); measured ~3e-5.
    assert np.abs(got - expected).max() <= 1e-3


def test_caffe_preset_hand_computed_upsampling(tmp_path):
    # 2x2 grey image in [0.2, 1]: caffe.io scales to [0, 1] by min/max, enlarges with zero padding
    # outside (mode='constant'), scales back; then x255, BGR, minus the BGR mean.
    grey = np.array([[51, 255], [255, 153]], dtype=np.uint8)
    path = save(tmp_path / "g.png", grey)
    pre = preset("caffe", size=[4, 4])
    got = pre(path)
    v = grey / 255.0
    unit = (v - 0.2) / 0.8
    w = bilinear_zero_pad(2, 4)
    expected_pixels = 0.2 + 0.8 * (w @ unit @ w.T)
    mean = np.array(preprocess.CAFFE_IMAGENET_MEAN_BGR)[:, None, None]
    expected = expected_pixels[None] * 255.0 - mean  # grey: all three channels equal
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # The zero padding is visible: the corner is the minimum, not the pixel value.
    assert abs(expected_pixels[0, 0] - 0.2) < 1e-12


def test_caffe_constant_image_stays_constant():
    pixels = np.full((5, 7, 3), 0.25)
    out = preprocess.resize_pixels(pixels, (3, 3), "caffe")
    assert out.shape == (3, 3, 3)
    assert np.all(out == 0.25)


# ---------------------------------------------------------------------- modes and channels

@pytest.mark.parametrize("mode,array,expected", [
    ("L", np.array([[0, 128, 255]], np.uint8), [0, 128 / 255, 1]),
    ("1", np.array([[0, 255, 255]], np.uint8), [0, 1, 1]),
    ("I;16", np.array([[0, 32768, 65535]], np.uint16), [0, 32768 / 65535, 1]),
    ("I", np.array([[0, 1000, 65535]], np.int32), [0, 1000 / 65535, 1]),
    ("I", np.array([[-10, 0, 10]], np.int32), [0, 0.5, 1]),  # outside 16-bit: stretched
    ("F", np.array([[0.0, 0.25, 1.0]], np.float32), [0, 0.25, 1]),
    ("F", np.array([[-2.0, 0.0, 2.0]], np.float32), [0, 0.5, 1]),
])
def test_grey_modes_to_three_equal_channels(mode, array, expected):
    if mode == "1":
        img = Image.fromarray(array).convert("1")
    elif mode == "I;16":
        img = Image.fromarray(array)
        assert img.mode == "I;16"
    else:
        img = Image.fromarray(array)
        assert img.mode == mode
    px = preprocess.image_to_array(img, 3)
    assert px.shape == (1, 3, 3)
    np.testing.assert_allclose(px[0, :, 0], expected, atol=1e-12)
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
    one = preprocess.image_to_array(img, 1)
    np.testing.assert_allclose(one[0, :, 0], expected, atol=1e-12)


def test_colour_modes():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]], np.uint8)
    img = Image.fromarray(rgb)
    np.testing.assert_allclose(preprocess.image_to_array(img, 3)[0], rgb[0] / 255.0)
    # Luma weights of ITU-R 601 (what Pillow's "L" uses), computed in float.
    luma = preprocess.image_to_array(img, 1)[0, :, 0]
    np.testing.assert_allclose(luma, (rgb[0] / 255.0) @ [0.299, 0.587, 0.114])
    # RGBA / LA: alpha dropped, the stored colour kept (as caffe.io.load_image does).
    rgba = np.concatenate([rgb, np.array([[[0], [128], [255]]], np.uint8)], axis=2)
    np.testing.assert_allclose(preprocess.image_to_array(Image.fromarray(rgba), 3)[0], rgb[0] / 255.0)
    la = Image.merge("LA", [Image.fromarray(np.array([[100, 200]], np.uint8)),
                            Image.fromarray(np.array([[0, 255]], np.uint8))])
    np.testing.assert_allclose(preprocess.image_to_array(la, 3)[0, :, 1], [100 / 255, 200 / 255])
    # P with and without transparency: palette colours.
    p = img.quantize(colors=4)
    assert p.mode == "P"
    pal = np.asarray(p.convert("RGB")) / 255.0
    np.testing.assert_allclose(preprocess.image_to_array(p, 3), pal)
    p.info["transparency"] = 0
    np.testing.assert_allclose(preprocess.image_to_array(p, 3), pal)
    # CMYK: no ink is white, full cyan is (0, 1, 1).
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0]))
    np.testing.assert_allclose(preprocess.image_to_array(cmyk, 3)[0], [[1, 1, 1], [0, 1, 1]])


def test_sixteen_bit_png_round_trip(tmp_path):
    array = np.array([[0, 1, 65535], [300, 40000, 2]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    got = preset("raw", size=[2, 3], channels=1)(path)
    np.testing.assert_allclose(got[0], array / 65535.0, atol=1e-7)


def test_exif_orientation(tmp_path):
    a = (np.arange(6, dtype=np.uint8).reshape(2, 3) * 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = tmp_path / "rot.png"
    Image.fromarray(a).save(path, exif=exif)
    pre = preset("raw", size=[3, 2], channels=1, interpolation="nearest")
    np.testing.assert_allclose(pre(path)[0] * 255, np.rot90(a, k=-1))
    plain = pre.replace(exif_transpose=False, size=[2, 3])
    np.testing.assert_allclose(plain(path)[0] * 255, a)


# ---------------------------------------------------------------------- geometry

def _stripes(h, w):
    # Distinct values per pixel, so that crops and placements are checked exactly (nearest).
    return (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)


def test_exact_resize_and_crop(tmp_path):
    a = _stripes(8, 8)
    path = save(tmp_path / "a.png", a)
    # Warp to itself (8x8) then centre-crop 3x5: offsets rounded down like Caffe's classifier
    # (256 -> 227 starts at 14): (8-3)//2=2, (8-5)//2=1.
    pre = preset("raw", size=[3, 5], channels=1, resize="exact", resize_to=[8, 8], interpolation="nearest")
    np.testing.assert_allclose(pre(path)[0] * 255, a[2:5, 1:6])
    # Nearest-neighbour halving picks one pixel of each 2x2 block.
    half = preset("raw", size=[4, 4], channels=1, interpolation="nearest")(path)[0] * 255
    assert set(np.unique(half)) <= set(np.unique(a))


def test_shorter_side_and_center_crop(tmp_path):
    a = _stripes(6, 12)
    path = save(tmp_path / "wide.png", a)
    # Shorter side 6 -> 6 (no resize), long side 12; crop 6x6 from columns 3..8.
    pre = preset("imagenet", size=[6, 6], channels=1, resize_to=6, mean=None, std=None, interpolation="nearest")
    np.testing.assert_allclose(pre(path)[0] * 255, a[:, 3:9])
    # Torchvision sizes for the cat photo shape (H=360, W=480): 256 x 341, then crop 224.
    pre = preset("imagenet")
    resized = pre._geometry(np.zeros((360, 480, 3)))
    assert resized.shape == (224, 224, 3)


def test_pad_keeps_aspect(tmp_path):
    a = np.full((10, 20), 255, np.uint8)
    path = save(tmp_path / "pad.png", a)
    pre = preset("raw", size=[8, 8], channels=1, resize="pad", pad_value=0.5, interpolation="nearest")
    out = pre(path)[0]
    # 10x20 fitted into 8x8 -> 4x8, placed at rows 2..5; rows above and below are padding.
    np.testing.assert_allclose(out[2:6], 1.0)
    np.testing.assert_allclose(out[:2], 0.5)
    np.testing.assert_allclose(out[6:], 0.5)


def test_channel_order_scale_mean_std(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 51, 102, 153  # 0.2, 0.4, 0.6
    path = save(tmp_path / "c.png", rgb)
    pre = Preprocessing(size=(4, 4), channel_order="BGR", raw_scale=255.0, mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 8.0])
    out = pre(path)
    np.testing.assert_allclose(out[:, 0, 0], [(153 - 1) / 2, (102 - 2) / 4, (51 - 3) / 8], rtol=1e-6)
    pre = preset("imagenet", size=[4, 4], resize_to=4)
    np.testing.assert_allclose(out_rgb := pre(path)[:, 1, 1],
                               (np.array([0.2, 0.4, 0.6]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-5)
    assert out_rgb.dtype == np.float32


def test_normalize_is_the_value_part_of_the_pipeline_for_a_batch(tmp_path):
    rng = np.random.default_rng(0)
    planes = rng.uniform(size=(2, 3, 4, 4))
    pre = Preprocessing(size=(4, 4), channel_order="BGR", raw_scale=255.0, mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 8.0])
    out = pre.normalize(planes)
    assert out.dtype == np.float32 and out.shape == (2, 3, 4, 4)
    expected = (planes[:, ::-1] * 255.0 - np.array([1.0, 2.0, 3.0])[:, None, None]) / np.array([2.0, 4.0, 8.0])[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # one image at the model's size: the same numbers as the whole pipeline (no resize there)
    np.testing.assert_array_equal(out[1], pre.from_pixels(planes[1].transpose(1, 2, 0)))
    np.testing.assert_allclose(pre.to_pixels(out), planes[:, ::-1], atol=1e-5)


def test_mean_image_npy_cropped_and_checked(tmp_path, bad_npy_files):
    rgb = np.full((4, 4, 3), 255, np.uint8)
    path = save(tmp_path / "w.png", rgb)
    mean = np.arange(3 * 6 * 6, dtype=np.float32).reshape(3, 6, 6)
    np.save(tmp_path / "mean.npy", mean)
    pre = Preprocessing(size=(4, 4), raw_scale=255.0, mean=str(tmp_path / "mean.npy"))
    np.testing.assert_allclose(pre(path), 255.0 - mean[:, 1:5, 1:5])
    np.save(tmp_path / "small.npy", mean[:, :3, :3])
    with pytest.raises(CnnvisError, match="smaller than the input"):
        Preprocessing(size=(4, 4), mean=str(tmp_path / "small.npy"))(path)
    np.save(tmp_path / "two.npy", mean[:2])
    with pytest.raises(CnnvisError, match=r"two\.npy.*expected shape 3 x H x W"):
        Preprocessing(size=(4, 4), mean=str(tmp_path / "two.npy"))(path)
    for name, bad in bad_npy_files.items():  # an empty file once escaped as a raw EOFError
        with pytest.raises(CnnvisError, match=rf"mean image .*{name}\.npy: (not a readable .npy|an .npz archive)"):
            Preprocessing(size=(4, 4), mean=str(bad))(path)
    with pytest.raises(CnnvisError, match="mean"):
        Preprocessing(size=(4, 4), mean=str(tmp_path / "mean.txt"))


def _blob_proto(array):
    """A Caffe BlobProto (num=1, channels=2, height=3, width=4, packed data=5), written by hand."""
    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out
    c, h, w = array.shape
    msg = b"".join(bytes([(f << 3) | 0]) + varint(v) for f, v in ((1, 1), (2, c), (3, h), (4, w)))
    data = struct.pack(f"<{array.size}f", *array.ravel())
    return msg + bytes([(5 << 3) | 2]) + varint(len(data)) + data


def test_mean_binaryproto_through_caffe_reader(tmp_path):
    mean = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    (tmp_path / "mean.binaryproto").write_bytes(_blob_proto(mean))
    path = save(tmp_path / "w.png", np.full((4, 4, 3), 255, np.uint8))
    pre = Preprocessing(size=(4, 4), raw_scale=255.0, mean=str(tmp_path / "mean.binaryproto"))
    np.testing.assert_allclose(pre(path), 255.0 - mean)


# ---------------------------------------------------------------------- presets as data

@pytest.mark.parametrize("name", sorted(preprocess.PRESETS))
def test_presets_round_trip_through_json(name):
    pre = preset(name)
    again = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again == pre
    assert again.preset == name


def test_from_dict_overrides_and_errors(tmp_path):
    pre = Preprocessing.from_dict({"preset": "grey28", "mean": [0.5], "std": [0.25]})
    assert pre.size == (28, 28) and pre.channels == 1 and pre.mean == (0.5,) and pre.std == (0.25,)
    rel = Preprocessing.from_dict({"preset": "caffe", "mean": "m.npy"}, base_dir=tmp_path)
    assert rel.mean == str(tmp_path / "m.npy")
    with pytest.raises(CnnvisError, match=r"side\.json: unknown preprocessing field\(s\) colour"):
        Preprocessing.from_dict({"preset": "caffe", "colour": 1}, source="side.json")
    with pytest.raises(CnnvisError, match="preset 'caffee'.*closest: caffe"):
        Preprocessing.from_dict({"preset": "caffee"})
    bad = [
        ({"size": [0, 3]}, "size"), ({"size": "big"}, "size"), ({"channels": 2}, "channels"),
        ({"resize": "fit"}, "resize"), ({"interpolation": "cubic"}, "interpolation"),
        ({"channel_order": "GBR"}, "channel_order"), ({"mean": [1, 2]}, "mean"), ({"std": [0, 1, 1]}, "std"),
        ({"mean": [float("nan")]}, "mean"), ({"resize": "exact", "resize_to": [10, 10], "size": [20, 20]}, "resize_to"),
        ({"resize": "shorter", "resize_to": [10, 12]}, "resize_to"), ({"raw_scale": 0}, "raw_scale"),
    ]
    for fields, word in bad:
        with pytest.raises(CnnvisError, match=word):
            Preprocessing(**fields)


def test_with_input_shape_scales_resize_to():
    pre = preset("imagenet", (3, 112, 112))
    assert pre.size == (112, 112) and pre.resize_to == 128
    grey = preset("imagenet", (1, 224, 224))
    assert grey.channels == 1 and grey.mean is None and grey.std is None
    assert preset("caffe").with_input_shape((3, 227, 227)) == preset("caffe")


def test_for_model_uses_sidecar_and_input_shape():
    class FakeModel:
        name = "m"
        input_shape = (1, 32, 32)
        sidecar = {"preprocessing": {"preset": "grey28", "mean": [0.5]}}

    pre = preprocess.for_model(FakeModel())
    assert pre.size == (32, 32) and pre.channels == 1 and pre.mean == (0.5,)
    FakeModel.sidecar = {}
    assert preprocess.for_model(FakeModel()).preset == "grey28"
    FakeModel.input_shape = (3, 64, 64)
    assert preprocess.for_model(FakeModel()).preset == "imagenet"


# ---------------------------------------------------------------------- files and batches

def _images(folder, n, size=(5, 7)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        save(folder / f"im{i}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return folder


def test_list_images_folder_sorted_filtered(tmp_path):
    d = _images(tmp_path / "d", 3)
    (d / "notes.txt").write_text("not an image")
    (d / "B.JPG").write_bytes((d / "im0.png").read_bytes())
    files = preprocess.list_images([d])
    assert [f.name for f in files] == ["B.JPG", "im0.png", "im1.png", "im2.png"]
    single = preprocess.list_images(str(d / "im1.png"))
    assert single == [d / "im1.png"]


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnnvisError, match="empty: folder has no image files"):
        preprocess.list_images([tmp_path / "empty"])
    with pytest.raises(CnnvisError, match="nope.jpg: no such file or folder"):
        preprocess.list_images([tmp_path / "nope.jpg"])
    with pytest.raises(CnnvisError, match="no input images"):
        preprocess.list_images([])


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "text", "empty"])
def test_unreadable_images_name_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    elif kind == "truncated":
        full = tmp_path / "full.jpg"
        save(full, np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("hello, I am not a picture\n")
    else:
        path.write_bytes(b"")
    with pytest.raises(CnnvisError) as info:
        preset("raw")(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_batches_are_chunked_and_lazy(tmp_path):
    d = _images(tmp_path / "d", 5)
    (d / "im3.png").write_bytes(b"broken")  # the 4th image: only its chunk may fail
    pre = preset("raw", size=[4, 4])
    chunks = preprocess.iter_image_batches([d], pre, batch_size=2)
    names, first = next(chunks)
    assert names == ["im0", "im1"] and first.shape == (2, 3, 4, 4) and first.dtype == np.float32
    with pytest.raises(CnnvisError, match="im3.png"):
        next(chunks)
    (d / "im3.png").unlink()
    sizes = [len(n) for n, _ in preprocess.iter_image_batches([d], pre, batch_size=3)]
    assert sizes == [3, 1]
    names, batch = preprocess.load_images([d], pre)
    assert names == ["im0", "im1", "im2", "im4"] and batch.shape == (4, 3, 4, 4)
    np.testing.assert_array_equal(batch[1], pre(d / "im1.png"))
    with pytest.raises(CnnvisError, match=r"^batch_size=0: expected a positive integer$"):
        next(preprocess.iter_image_batches([d], pre, batch_size=0))


def test_display_names_unique():
    from pathlib import Path

    names = preprocess.display_names([Path("a/cat.jpg"), Path("b/cat.png"), Path("a/dog.jpg")])
    assert names == ["a_cat", "b_cat", "dog"]
    assert len(set(preprocess.display_names([Path("x/a.png"), Path("x/a.jpg")]))) == 2


# ---------------------------------------------------------------------- preprocessed arrays

def test_load_input_array(tmp_path, bad_npy_files):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    got = preprocess.load_input_array(tmp_path / "x.npy", (3, 4, 5))
    assert got.dtype == np.float32 and got.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(got, x.astype(np.float32))
    assert preprocess.load_input_array(tmp_path / "x.npy", (2, 3, None, 5)).shape == (2, 3, 4, 5)

    def expect(name, array, pattern, shape=(3, 4, 5)):
        path = tmp_path / name
        if array is not None:
            np.save(path, array)
        with pytest.raises(CnnvisError, match=pattern) as info:
            preprocess.load_input_array(path, shape)
        assert str(path) in str(info.value) and "N x 3 x 4 x 5" in str(info.value)

    expect("three.npy", x[0], "4 dimensions")
    expect("shape.npy", x[:, :, :3], r"expected shape N x 3 x 4 x 5, got \(2, 3, 3, 5\)")
    expect("int.npy", x.astype(np.int32), "expected floats")
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    expect("nan.npy", bad, "NaN")
    for name in bad_npy_files:
        expect(f"bad_npy/{name}.npy", None, "not a readable|an .npz archive")
    expect("missing.npy", None, "no such file")


# ---------------------------------------------------------------------- hostile sizes and sidecars

def test_custom_preprocessing_from_a_sidecar_dict():
    fields = {"size": [12, 10], "channels": 1, "mean": [0.5], "std": [0.25], "raw_scale": 1.0}
    for data in (fields, dict(fields, preset="custom")):
        pre = Preprocessing.from_dict(data, source="side.json")
        assert (pre.size, pre.channels, pre.mean, pre.std, pre.preset) == ((12, 10), 1, (0.5,), (0.25,), "custom")
        # (pixel - mean) / std, by hand
        assert np.allclose(pre.from_pixels(np.full((12, 10, 1), 0.75)), 1.0)
    custom = Preprocessing(size=(5, 6), channels=1, mean=(0.1,))
    assert Preprocessing.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    with pytest.raises(CnnvisError, match=r"^side\.json: custom preprocessing \(no preset\) misses channels "):
        Preprocessing.from_dict({"size": [12, 12]}, source="side.json")
    with pytest.raises(CnnvisError, match=r"misses size, channels"):
        Preprocessing.from_dict({"preset": "custom", "mean": [1, 2, 3]}, source="side.json")
    with pytest.raises(CnnvisError, match="preprocessing std"):  # a bad value is named first
        Preprocessing.from_dict({"size": [12, 12], "std": [0]}, source="side.json")


def test_image_over_the_memory_budget_is_refused_before_decoding(tmp_path):
    from cnnvis import limits

    path = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(path)
    with limits.memory_limit_set(preprocess.DECODE_BYTES_PER_PIXEL * 400 * 300 - 1):
        with pytest.raises(CnnvisError, match=r"big\.png: a 400x300 image \(120,000 pixels\) is over the 119,999-pixel limit"):
            preprocess.read_image(path)
    with limits.memory_limit_set(limits.BYTES_PER_IMAGE_PIXEL * 400 * 300):
        assert preprocess.read_image(path).size == (400, 300)


def test_large_images_are_decoded_reduced_by_block_means(tmp_path, monkeypatch):
    """Above REDUCE_ABOVE_PIXELS an image is box-reduced by the largest integer factor keeping its
    shorter side >= 2 × the target: the result equals numpy block means of the pixels."""
    monkeypatch.setattr(preprocess, "REDUCE_ABOVE_PIXELS", 1000)
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (60, 90), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    im = preprocess.read_image(path, reduce_to=10)  # factor 60 // 20 = 3
    assert im.size == (30, 20)
    blocks = pixels.astype(np.float64).reshape(20, 3, 30, 3).mean(axis=(1, 3))
    # within one 8-bit level (Pillow's integer arithmetic rounds down halves and more)
    assert np.abs(np.asarray(im, dtype=np.float64) - blocks).max() < 1.0
    # a palette image is converted first; small images and small targets are left alone
    Image.fromarray(pixels).convert("P").save(tmp_path / "p.png")
    assert preprocess.read_image(tmp_path / "p.png", reduce_to=10).mode == "RGB"
    assert preprocess.read_image(path, reduce_to=16).size == (90, 60)  # factor 1: as decoded
    assert preprocess.read_image(path).size == (90, 60)


def _png_bytes(width: int, height: int, colour_type: int) -> bytes:
    """A PNG of one IHDR (8-bit, ``colour_type``) and a few bytes of data."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_read_chunk_skips_and_records_unreadable_files_but_not_named_ones(tmp_path, monkeypatch):
    """read_chunk, the one 'unreadable → skip and record' decision: zero bytes, truncated, text,
    an unknown PNG colour type and an image over the memory budget are left out and recorded with
    their input position, absolute path and reason; the readable ones come back in order and equal
    to reading them one by one; a named file, or strict reading, raises instead."""
    from cnnvis import limits

    rng = np.random.default_rng(3)
    good = []
    for i in range(3):
        good.append(tmp_path / f"good{i}.png")
        Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(good[-1])
    bad = {"zero.jpg": b"", "trunc.png": good[0].read_bytes()[:60], "text.png": b"not an image\n",
           "mode.png": _png_bytes(4, 4, 5), "huge.png": _png_bytes(3000, 3000, 0)}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)  # relative paths: recorded absolute
    paths = ["good0.png", "zero.jpg", "trunc.png", "good1.png", "text.png", "mode.png", "huge.png", "good2.png"]
    pre = preset("grey28")
    skipped = []
    with limits.memory_limit_set(preprocess.DECODE_BYTES_PER_PIXEL * 1000 * 1000):  # huge.png: 9e6 pixels
        positions, batch = preprocess.read_chunk(paths, pre, start=20, skipped=skipped)
        assert positions == [20, 23, 27]
        np.testing.assert_array_equal(batch, np.stack([pre(str(g)) for g in good]))
        assert [s[0] for s in skipped] == [21, 22, 24, 25, 26]
        assert [s[1] for s in skipped] == [str(tmp_path / p) for p in paths if p in bad]
        reasons = [s[2] for s in skipped]
        assert all(r.startswith(f"{tmp_path / p}: ") for r, p in zip(reasons, [p for p in paths if p in bad]))
        assert all("not a readable image" in r for r in reasons[:4])
        assert "over the 1,000,000-pixel limit of the memory budget" in reasons[4]
        # all unreadable: nothing, and every one recorded
        again = []
        assert preprocess.read_chunk(["zero.jpg", "text.png"], pre, 0, again) == ([], None)
        assert len(again) == 2
        # a file named explicitly (position 2 here) is the user's error, one line naming it as given
        with pytest.raises(preprocess.UnreadableImage, match=r"^trunc\.png: not a readable image"):
            preprocess.read_chunk(paths, pre, 0, [], named=[2])
        with pytest.raises(preprocess.UnreadableImage, match=r"^zero\.jpg: not a readable image"):
            preprocess.read_chunk(paths, pre, 0, None)  # strict: every file must be read
    # an error that is not the file's (a missing mean image) stops the run, never skipped
    broken = pre.replace(mean=str(tmp_path / "missing_mean.npy"))
    with pytest.raises(CnnvisError, match="missing_mean.npy") as info:
        preprocess.read_chunk(["good0.png"], broken, 0, [])
    assert not isinstance(info.value, preprocess.UnreadableImage)


def test_named_positions_are_the_files_given_one_by_one(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (4, 4)).save(folder / name)
    single = tmp_path / "c.png"
    Image.new("L", (4, 4)).save(single)
    items = [folder, single, folder / "b.png"]
    files = preprocess.list_images(items)
    assert [f.name for f in files] == ["a.png", "b.png", "c.png", "b.png"]
    # b.png is named one by one too: wherever it is in the list, it must be read
    assert preprocess.named_positions(items, files) == [1, 2, 3]
