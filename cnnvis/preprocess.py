"""Images → N×C×H×W float32 batches for a model.

The pipeline for one image, in order:

1. decode with Pillow (first frame), apply the EXIF orientation (``exif_transpose``);
2. convert any Pillow mode to float pixels in [0, 1] with the model's channel count: 3 (RGB;
   grey is repeated) or 1 (ITU-R 601 luma). Alpha is dropped, keeping the stored colour, as
   ``caffe.io.load_image`` does. 16-bit modes are divided by 65535;
3. geometry (``resize``): ``exact`` warps to ``resize_to`` (default: the output size) and
   centre-crops to ``size``; ``shorter`` scales the shorter side to ``resize_to`` (default:
   min(size)) and centre-crops; ``pad`` fits the whole image inside ``size`` and pads with
   ``pad_value``;
4. HWC → CHW, channel order (``RGB`` or ``BGR``), multiply by ``raw_scale``, subtract ``mean``
   (per-channel values, or a mean image from ``.npy`` / Caffe ``.binaryproto``), divide by ``std``.
   ``mean`` and ``std`` are in the model's channel order and in raw-scaled units, like Caffe's.

``interpolation="caffe"`` reproduces ``caffe.io.resize_image``: scale by the image's global
min/max to [0, 1], scikit-image ``resize(order=1, mode="constant", anti_aliasing=True)``, scale
back. The other interpolations use Pillow on float32 planes (antialiased when shrinking).

Presets (:data:`PRESETS`) are plain dictionaries of these fields; a model's JSON sidecar names one
and overrides any field, so new models need data, not code. A sidecar may also give its own
fields without a preset (or with ``"preset": "custom"``): then ``size`` and ``channels`` are
required (:data:`CUSTOM_REQUIRED`) and the rest default.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import CnnvisError
from .manifest import list_files

#: File name endings listed when a folder is given (case-insensitive).
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".sgi", ".jp2", ".j2k",
)

RESIZE_POLICIES = ("exact", "shorter", "pad")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "caffe")
CHANNEL_ORDERS = ("RGB", "BGR")

#: Caffe's ImageNet mean in BGR order (the values of ilsvrc_2012_mean.npy averaged per channel).
CAFFE_IMAGENET_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

PRESETS = {
    # caffe.io.load_image + caffe.io.resize_image + caffe.io.Transformer with the CaffeNet settings.
    "caffe": {
        "size": [227, 227], "channels": 3, "resize": "exact", "interpolation": "caffe",
        "channel_order": "BGR", "raw_scale": 255.0, "mean": list(CAFFE_IMAGENET_MEAN_BGR),
        "std": None,
    },
    # torchvision's ImageNet evaluation transform: Resize(256), CenterCrop(224), ToTensor, Normalize.
    "imagenet": {
        "size": [224, 224], "channels": 3, "resize": "shorter", "resize_to": 256,
        "interpolation": "bilinear", "channel_order": "RGB", "raw_scale": 1.0,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    },
    # Fashion-MNIST-like grey 28x28 in [0, 1]; a demo sidecar overrides mean/std if it trained with them.
    "grey28": {
        "size": [28, 28], "channels": 1, "resize": "exact", "interpolation": "bilinear",
        "channel_order": "RGB", "raw_scale": 1.0, "mean": None, "std": None,
    },
    # Plain RGB in [0, 1], no normalisation.
    "raw": {
        "size": [224, 224], "channels": 3, "resize": "exact", "interpolation": "bilinear",
        "channel_order": "RGB", "raw_scale": 1.0, "mean": None, "std": None,
    },
}


#: the fields a preprocessing without a preset (``"custom"``) must give; the others default as in
#: :class:`Preprocessing` (resize exact, bilinear, RGB, raw_scale 1, no mean/std)
CUSTOM_REQUIRED = ("size", "channels")


def _pair(value, field: str):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise CnnvisError(f"preprocessing {field}: expected [height, width] of positive integers, got {value!r}") from None
    if h <= 0 or w <= 0 or [h, w] != [float(v) for v in value]:
        raise CnnvisError(f"preprocessing {field}: expected [height, width] of positive integers, got {value!r}")
    return (h, w)


def _floats(value, field: str):
    if value is None:
        return None
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        value = [value]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise CnnvisError(f"preprocessing {field}: expected a number or a list of numbers, got {value!r}") from None
    if not out or not all(np.isfinite(out)):
        raise CnnvisError(f"preprocessing {field}: expected finite numbers, got {value!r}")
    return out


@dataclass(frozen=True)
class Preprocessing:
    """How images become model input. Fields are documented in the module docstring.

    ``mean`` is a tuple of per-channel values, a path to a mean image (``.npy`` with C×H×W, or a
    Caffe ``.binaryproto``), or None. ``resize_to`` is an int (shorter side / square warp) or
    (height, width), or None for the output size.
    """

    size: tuple = (227, 227)
    channels: int = 3
    resize: str = "exact"
    resize_to: object = None
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    raw_scale: float = 1.0
    mean: object = None
    std: object = None
    pad_value: float = 0.0
    exif_transpose: bool = True
    preset: str = "custom"

    def __post_init__(self):
        # Normalise containers to tuples so that the object is hashable and compares by value.
        set_ = functools.partial(object.__setattr__, self)
        set_("size", _pair(self.size, "size"))
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise CnnvisError(f"preprocessing channels: expected 1 or 3, got {self.channels!r}")
        set_("channels", int(self.channels))
        if self.resize not in RESIZE_POLICIES:
            raise CnnvisError(f"preprocessing resize: expected one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")
        if self.resize_to is not None:
            if self.resize == "pad":
                raise CnnvisError("preprocessing resize_to: not used with resize 'pad' (the image is fitted into size)")
            if self.resize == "shorter":
                if isinstance(self.resize_to, bool) or not isinstance(self.resize_to, (int, np.integer)) or self.resize_to <= 0:
                    raise CnnvisError(f"preprocessing resize_to: resize 'shorter' expects one positive integer, got {self.resize_to!r}")
                set_("resize_to", int(self.resize_to))
            else:
                set_("resize_to", _pair(self.resize_to, "resize_to"))
            target = self.resize_to if isinstance(self.resize_to, tuple) else (self.resize_to,) * 2
            if self.resize == "exact" and (target[0] < self.size[0] or target[1] < self.size[1]):
                raise CnnvisError(f"preprocessing resize_to: {list(target)} is smaller than size {list(self.size)}")
            if self.resize == "shorter" and self.resize_to < min(self.size):
                raise CnnvisError(f"preprocessing resize_to: {self.resize_to} is smaller than size {list(self.size)}")
        if self.interpolation not in INTERPOLATIONS:
            raise CnnvisError(f"preprocessing interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        order = str(self.channel_order).upper()
        if order not in CHANNEL_ORDERS:
            raise CnnvisError(f"preprocessing channel_order: expected RGB or BGR, got {self.channel_order!r}")
        set_("channel_order", order)
        try:
            set_("raw_scale", float(self.raw_scale))
            set_("pad_value", float(self.pad_value))
        except (TypeError, ValueError):
            raise CnnvisError("preprocessing raw_scale/pad_value: expected numbers") from None
        if not np.isfinite(self.raw_scale) or self.raw_scale == 0:
            raise CnnvisError(f"preprocessing raw_scale: expected a finite non-zero number, got {self.raw_scale!r}")
        if isinstance(self.mean, (str, os.PathLike)):
            path = Path(self.mean)
            if path.suffix.lower() not in (".npy", ".binaryproto"):
                raise CnnvisError(f"preprocessing mean {path}: expected a .npy or .binaryproto mean image, or per-channel values")
            set_("mean", str(path))
        else:
            mean = _floats(self.mean, "mean")
            if mean is not None and len(mean) not in (1, self.channels):
                raise CnnvisError(f"preprocessing mean: expected 1 or {self.channels} values, got {len(mean)}")
            set_("mean", mean)
        std = _floats(self.std, "std")
        if std is not None:
            if len(std) not in (1, self.channels):
                raise CnnvisError(f"preprocessing std: expected 1 or {self.channels} values, got {len(std)}")
            if min(std) <= 0:
                raise CnnvisError(f"preprocessing std: expected positive values, got {list(std)}")
        set_("std", std)
        set_("exif_transpose", bool(self.exif_transpose))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Preprocessing":
        if name not in PRESETS:
            from .errors import unknown_name_error

            raise unknown_name_error("preprocessing preset", name, PRESETS)
        fields = dict(PRESETS[name], preset=name)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_dict(cls, data: dict, base_dir=None, source: str = "preprocessing") -> "Preprocessing":
        """From a sidecar's ``preprocessing`` object: ``{"preset": "caffe", "size": [224, 224], ...}``.

        A relative mean-image path is taken relative to ``base_dir`` (the sidecar's folder).
        Errors name ``source`` (e.g. the sidecar file).
        """
        if not isinstance(data, dict):
            raise CnnvisError(f"{source}: 'preprocessing' must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CnnvisError(f"{source}: unknown preprocessing field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        fields = dict(data)
        mean = fields.get("mean")
        if isinstance(mean, str) and base_dir is not None and not os.path.isabs(mean):
            fields["mean"] = str(Path(base_dir) / mean)
        try:
            preset = fields.pop("preset", None)
            if preset is not None and preset != "custom":
                return cls.from_preset(preset, **fields)
            pre = cls(**fields)  # (a bad value is named before a missing key)
        except CnnvisError as exc:
            raise CnnvisError(f"{source}: {exc}") from None
        missing = [key for key in CUSTOM_REQUIRED if key not in fields]
        if missing:
            raise CnnvisError(f"{source}: custom preprocessing (no preset) misses {', '.join(missing)} "
                              f"(give {', '.join(CUSTOM_REQUIRED)}, or a preset: {', '.join(PRESETS)})")
        return pre

    def to_dict(self) -> dict:
        """JSON-ready fields; ``from_dict(to_dict())`` gives an equal object."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes) -> "Preprocessing":
        """A copy with some fields changed (validated like the constructor)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise CnnvisError(f"unknown preprocessing field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [f"{self.preset}", f"{self.channels}x{self.size[0]}x{self.size[1]}", self.resize]
        if self.resize_to is not None:
            parts.append(f"from {self.resize_to}")
        parts += [self.interpolation, self.channel_order, f"x{self.raw_scale:g}"]
        if self.mean is not None:
            parts.append(f"mean {self.mean if isinstance(self.mean, str) else [round(m, 4) for m in self.mean]}")
        if self.std is not None:
            parts.append(f"std {[round(s, 4) for s in self.std]}")
        return ", ".join(parts)

    def with_input_shape(self, input_shape) -> "Preprocessing":
        """A copy for a model input of (C, H, W) or (H, W); ``resize_to`` scales with the size."""
        shape = tuple(int(d) for d in input_shape)
        channels, size = (shape[0], shape[1:]) if len(shape) == 3 else (self.channels, shape)
        if len(size) != 2:
            raise CnnvisError(f"model input shape {list(input_shape)}: expected C x H x W")
        if (channels, size) == (self.channels, self.size):
            return self
        resize_to = self.resize_to
        if resize_to is not None:
            ratio = (size[0] / self.size[0], size[1] / self.size[1])
            if isinstance(resize_to, tuple):
                resize_to = (int(round(resize_to[0] * ratio[0])), int(round(resize_to[1] * ratio[1])))
            else:
                resize_to = int(round(resize_to * min(ratio)))
        mean, std = self.mean, self.std
        if channels != self.channels:
            # Per-channel statistics of the other channel count do not carry over.
            mean = None if isinstance(mean, tuple) and len(mean) != 1 else mean
            std = None if std is not None and len(std) != 1 else std
        return dataclasses.replace(self, size=size, channels=channels, resize_to=resize_to, mean=mean, std=std)

    # ------------------------------------------------------------------ applying

    @property
    def input_shape(self) -> tuple:
        return (self.channels, *self.size)

    @property
    def largest_side(self) -> int:
        """The largest side an image is resized to on its way to ``size``."""
        sides = list(self.size)
        if self.resize_to is not None:
            sides += list(self.resize_to) if isinstance(self.resize_to, tuple) else [self.resize_to]
        return max(sides)

    def __call__(self, image) -> np.ndarray:
        """A PIL image, or a path, → C×H×W float32 (an image file that cannot be read, decoded or
        converted to pixels: :class:`UnreadableImage`)."""
        if isinstance(image, (str, os.PathLike)):
            path = image
            image = read_image(path, exif_transpose=self.exif_transpose, reduce_to=self.largest_side)
            try:
                pixels = image_to_array(image, self.channels)
            except (OSError, ValueError, TypeError) as exc:  # a pixel mode Pillow cannot convert
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UnreadableImage(f"{path}: not a readable image (mode {image.mode}: {reason})") from None
        else:
            pixels = image_to_array(image, self.channels)
        return self.from_pixels(pixels)

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """H×W×C float pixels in [0, 1] (C = ``channels``) → C×H×W float32 model input."""
        pixels = np.asarray(pixels, dtype=np.float64)
        if pixels.ndim != 3 or pixels.shape[2] != self.channels:
            raise ValueError(f"expected H x W x {self.channels} pixels, got shape {pixels.shape}")
        return self.normalize(self._geometry(pixels).transpose(2, 0, 1))

    def normalize(self, planes) -> np.ndarray:
        """Pixels in [0, 1] as …×C×H×W planes at the model's size, RGB → model input, float32: the
        value steps of :meth:`from_pixels` (channel order, raw scale, mean, std), without geometry."""
        x = np.asarray(planes, dtype=np.float64)
        if self.channels == 3 and self.channel_order == "BGR":
            x = x[..., ::-1, :, :]
        x = x * self.raw_scale
        if self.mean is not None:
            x = x - self.mean_array()
        if self.std is not None:
            x = x / np.asarray(self.std, dtype=np.float64)[:, None, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_pixels(self, x) -> np.ndarray:
        """Model input (…×C×H×W) back to pixels in [0, 1], still C×H×W in the model's channel order:
        undoes std, mean and raw scale (not the geometry). NaN stays NaN."""
        x = np.asarray(x, dtype=np.float64)
        if self.std is not None:
            x = x * np.asarray(self.std, dtype=np.float64)[:, None, None]
        if self.mean is not None:
            x = x + self.mean_array()
        return np.clip(x / self.raw_scale, 0.0, 1.0)

    def to_display(self, x) -> np.ndarray:
        """Model input (…×C×H×W) → a picture in [0, 1]: …×H×W×3 RGB (BGR swapped back) or …×H×W grey."""
        return channels_last(self.to_pixels(x), self.channel_order)

    def _geometry(self, pixels: np.ndarray) -> np.ndarray:
        h, w = pixels.shape[:2]
        out_h, out_w = self.size
        if self.resize == "pad":
            scale = min(out_h / h, out_w / w)
            new_h = min(out_h, max(1, int(round(h * scale))))
            new_w = min(out_w, max(1, int(round(w * scale))))
            fitted = resize_pixels(pixels, (new_h, new_w), self.interpolation)
            canvas = np.full((out_h, out_w, pixels.shape[2]), self.pad_value, dtype=np.float64)
            top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
            canvas[top:top + new_h, left:left + new_w] = fitted
            return canvas
        if self.resize == "shorter":
            short = self.resize_to if self.resize_to is not None else min(out_h, out_w)
            if h <= w:
                target = (short, max(short, int(short * w / h)))
            else:
                target = (max(short, int(short * h / w)), short)
            # The shorter side must still cover the crop in the other direction.
            if target[0] < out_h or target[1] < out_w:
                factor = max(out_h / target[0], out_w / target[1])
                target = (max(out_h, int(np.ceil(target[0] * factor))), max(out_w, int(np.ceil(target[1] * factor))))
        else:
            target = self.resize_to if self.resize_to is not None else (out_h, out_w)
        resized = resize_pixels(pixels, target, self.interpolation)
        return center_crop(resized, (out_h, out_w))

    def mean_array(self) -> np.ndarray:
        """The mean to subtract, C×1×1 (per-channel values) or C×H×W (a mean image)."""
        if isinstance(self.mean, str):
            return _mean_image(self.mean, self.channels, self.size)
        return np.asarray(self.mean, dtype=np.float64)[:, None, None]


def channels_last(x, channel_order: str = "RGB") -> np.ndarray:
    """…×C×H×W → …×H×W×3 in RGB order (C = 3), …×H×W (C = 1; the channel mean for other C)."""
    x = np.asarray(x)
    c = x.shape[-3]
    if c == 3:
        rgb = np.moveaxis(x, -3, -1)
        return rgb[..., ::-1] if str(channel_order).upper() == "BGR" else rgb
    if c == 1:
        return x[..., 0, :, :]
    return x.mean(axis=-3)


class InputSpace:
    """Where a model's input values live: the affine map pixel ↔ input of its preprocessing.

    ``low_`` / ``high_`` are the input values of black and white pixels (C×H×W), ``grey_`` the
    neutral grey (the preprocessing mean, which is 0 after mean subtraction; mid-grey when there is
    no mean). Used for occluders, clipping optimised images and showing inputs as pictures.
    """

    def __init__(self, preprocessing: "Preprocessing", input_shape):
        self.preprocessing = preprocessing
        self.input_shape = tuple(int(d) for d in input_shape)
        c, h, w = self.input_shape
        if tuple(preprocessing.input_shape) != self.input_shape:
            raise CnnvisError(f"preprocessing gives {'×'.join(map(str, preprocessing.input_shape))} inputs; "
                              f"the model expects {'×'.join(map(str, self.input_shape))}")
        self.low_ = preprocessing.from_pixels(np.zeros((h, w, c))).astype(np.float64)
        self.high_ = preprocessing.from_pixels(np.ones((h, w, c))).astype(np.float64)
        if preprocessing.mean is not None:
            self.grey_ = np.zeros((c, 1, 1))  # the mean pixel minus the mean, whatever scale and std
        else:
            self.grey_ = (0.5 * (self.low_ + self.high_))[:, :1, :1]  # the input value of pixel 0.5

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def to_display(self, x) -> np.ndarray:
        """Input-space C×H×W → an H×W×3 RGB picture in [0, 1] (grey repeated; BGR swapped back)."""
        p = self.preprocessing.to_display(x)
        return np.ascontiguousarray(np.repeat(p[..., None], 3, axis=-1) if p.ndim == 2 else p)

    def clip(self, x) -> np.ndarray:
        """Clip a batch (N×C×H×W) or image to the valid pixel range."""
        return np.clip(x, np.minimum(self.low_, self.high_), np.maximum(self.low_, self.high_))

    @property
    def pixel_span(self) -> np.ndarray:
        """Per-channel size of the [0, 1] pixel range in input units (C,)."""
        return np.abs(self.high_ - self.low_).reshape(self.channels, -1).mean(axis=1)


def input_space(model, preprocessing=None) -> InputSpace:
    """The :class:`InputSpace` of a model (its own preprocessing unless one is given)."""
    return InputSpace(preprocessing if preprocessing is not None else for_model(model), model.input_shape)


def preset(name: str, input_shape=None, **overrides) -> Preprocessing:
    """A named preset (``caffe``, ``imagenet``, ``grey28``, ``raw``) with optional field overrides,
    sized for ``input_shape`` (C, H, W) when given."""
    pre = Preprocessing.from_preset(name, **overrides)
    return pre.with_input_shape(input_shape) if input_shape is not None else pre


def default_for_shape(input_shape, caffe: bool = False) -> Preprocessing:
    """The guess for a model without preprocessing metadata: ``grey28`` for one channel,
    ``caffe`` for Caffe models, else ``imagenet`` (the torchvision convention most ONNX exports use)."""
    shape = tuple(int(d) for d in input_shape)
    name = "grey28" if shape[0] == 1 else "caffe" if caffe else "imagenet"
    return preset(name, shape)


def for_model(model) -> Preprocessing:
    """The preprocessing of a :class:`cnnvis.model.Model`: its sidecar's, sized for its input."""
    spec = (getattr(model, "sidecar", None) or {}).get("preprocessing")
    shape = model.input_shape
    if spec is None:
        return default_for_shape(shape)
    return Preprocessing.from_dict(spec, source=f"model {model.name}").with_input_shape(shape)


# ---------------------------------------------------------------------- pixels and geometry

def center_crop(pixels: np.ndarray, size) -> np.ndarray:
    """The centred size[0]×size[1] window (offsets rounded down, as Caffe's classifier does)."""
    h, w = pixels.shape[:2]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"cannot crop {th}x{tw} from {h}x{w}")
    top, left = (h - th) // 2, (w - tw) // 2
    return pixels[top:top + th, left:left + tw]


def resize_pixels(pixels: np.ndarray, size, interpolation: str = "bilinear") -> np.ndarray:
    """Resize H×W×C float pixels to size=(height, width)."""
    size = (int(size[0]), int(size[1]))
    if pixels.shape[:2] == size:
        return pixels
    if interpolation == "caffe":
        return _resize_caffe(pixels, size)
    from PIL import Image

    resample = {
        "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
    }[interpolation]
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c], dtype=np.float32)).resize(
            (size[1], size[0]), resample=resample), dtype=np.float64)
        for c in range(pixels.shape[2])
    ]
    return np.stack(planes, axis=2)


def _resize_caffe(pixels: np.ndarray, size) -> np.ndarray:
    # caffe.io.resize_image: skimage wants [0, 1], so scale by the global min/max and back.
    from skimage.transform import resize

    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.full((size[0], size[1], pixels.shape[2]), lo, dtype=np.float64)
    unit = (pixels - lo) / (hi - lo)
    out = resize(unit, size, order=1, mode="constant", anti_aliasing=True)
    return out * (hi - lo) + lo


_LUMA = np.array([0.299, 0.587, 0.114])


def image_to_array(image, channels: int = 3) -> np.ndarray:
    """A PIL image of any mode → H×W×channels float64 in [0, 1] (see module docstring)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.asarray(image).astype(np.float64) / 65535.0
        return _grey_to(grey, channels)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        # Pillow opens 16-bit PNGs as "I"; other 32-bit data is stretched by its own range.
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _grey_to(values / 65535.0, channels)
        return _grey_to(_stretch(values), channels)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.all(np.isfinite(values)):
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and (values.min() < 0 or values.max() > 1):
            values = _stretch(values)
        return _grey_to(values, channels)
    if mode == "1":
        image = image.convert("L")
    elif mode in ("LA", "La"):
        image = image.getchannel("L")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode == "L":
        grey = np.asarray(image, dtype=np.uint8).astype(np.float64) / 255.0
        return _grey_to(grey, channels)
    if image.mode in ("RGBA", "RGBX", "RGBa"):
        rgb = np.asarray(image.convert("RGBA") if image.mode == "RGBa" else image)[:, :, :3]
    elif image.mode == "RGB":
        rgb = np.asarray(image)
    else:  # CMYK, YCbCr, LAB, HSV, ...: Pillow knows how to reach RGB
        rgb = np.asarray(image.convert("RGB"))
    rgb = rgb.astype(np.float64) / 255.0
    if channels == 3:
        return rgb
    return (rgb @ _LUMA)[:, :, None]


def _stretch(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)


def _grey_to(grey: np.ndarray, channels: int) -> np.ndarray:
    grey = grey[:, :, None]
    return np.repeat(grey, 3, axis=2) if channels == 3 else grey


@functools.lru_cache(maxsize=8)
def _mean_image_cached(path: str, mtime: float, channels: int, size: tuple) -> np.ndarray:
    p = Path(path)
    if p.suffix.lower() == ".binaryproto":
        from .caffe import read_mean_binaryproto  # the Caffe reader lives there

        mean = np.asarray(read_mean_binaryproto(p), dtype=np.float64)
    else:
        from .manifest import load_npy

        mean = load_npy(p, "mean image", "a C x H x W numeric array")
        if not np.issubdtype(mean.dtype, np.number):
            raise CnnvisError(f"mean image {p}: expected a numeric array")
        mean = mean.astype(np.float64)
    while mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim == 2 and channels == 1:
        mean = mean[None]
    if mean.ndim != 3 or mean.shape[0] != channels:
        raise CnnvisError(f"mean image {p}: expected shape {channels} x H x W, got {tuple(mean.shape)}")
    if not np.all(np.isfinite(mean)):
        raise CnnvisError(f"mean image {p}: contains NaN or infinite values")
    if mean.shape[1] < size[0] or mean.shape[2] < size[1]:
        raise CnnvisError(f"mean image {p}: {mean.shape[1]}x{mean.shape[2]} is smaller than the input {size[0]}x{size[1]}")
    # A larger mean (Caffe's 256x256 for 227 crops) is centre-cropped like the image.
    return np.ascontiguousarray(center_crop(mean.transpose(1, 2, 0), size).transpose(2, 0, 1))


def _mean_image(path: str, channels: int, size: tuple) -> np.ndarray:
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        raise CnnvisError(f"mean image {path}: no such file") from None
    return _mean_image_cached(str(path), mtime, channels, tuple(size))


# ---------------------------------------------------------------------- files

#: images with more pixels than this are decoded reduced (JPEG draft, then an integer box
#: reduction) to no less than twice the largest side the preprocessing resizes to
REDUCE_ABOVE_PIXELS = 1 << 22
#: bytes per pixel while decoding (8-bit RGBA and one converted copy)
DECODE_BYTES_PER_PIXEL = 8


class UnreadableImage(CnnvisError):
    """An image file that cannot be read: missing, not decodable by Pillow (zero bytes,
    truncated, not an image, a mode or colour type Pillow does not know), or over the memory
    budget (:mod:`cnnvis.limits`). Dataset runs skip such files (:func:`read_chunk`); any other
    error (a bad mean image, a bug) is not this and stops the run."""


def read_image(path, exif_transpose: bool = True, reduce_to: int | None = None):
    """Open and fully decode one image (first frame); any failure → one-line
    :class:`UnreadableImage` naming it.

    The memory budget (:mod:`cnnvis.limits`) bounds the pixel count before anything is decoded:
    a decompression bomb (a small file claiming a huge image) is refused, naming its size and the
    limit. With ``reduce_to`` (the largest side the caller resizes to), an image of more than
    :data:`REDUCE_ABOVE_PIXELS` is decoded reduced — JPEG at a lower DCT scale (``draft``), others
    with an integer box reduction (``reduce``) — keeping its shorter side >= 2 × ``reduce_to``.
    """
    import warnings

    from PIL import Image, ImageOps

    from . import limits

    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(f"{path}: no such image file")
    budget_pixels = max(1, limits.memory_limit() // DECODE_BYTES_PER_PIXEL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_unchecked(path) as im:
                w, h = im.size
                if reduce_to and w * h > REDUCE_ABOVE_PIXELS and im.format == "JPEG":
                    side = 2 * int(reduce_to)
                    im.draft(None, (side, side))
                    w, h = im.size
                _check_pixels(path, w, h, budget_pixels)
                im.load()
                im = _reduced(im, reduce_to) if reduce_to and w * h > REDUCE_ABOVE_PIXELS else im
                try:
                    limits.check(im.size[0] * im.size[1] * limits.BYTES_PER_IMAGE_PIXEL,
                                 f"{path}: a {im.size[0]}x{im.size[1]} image as float pixels")
                except CnnvisError as exc:
                    raise UnreadableImage(str(exc), params=exc.params) from None
                if exif_transpose:
                    im = ImageOps.exif_transpose(im)
                else:
                    im = im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"{path}: image too large to decode safely ({str(exc).split(',')[0]}; memory budget "
                          f"{limits.format_bytes(limits.memory_limit())}: set memory_limit=SIZE or {limits.ENV_VAR}; "
                          "a decompression bomb?)", params="memory_limit") from None
    except MemoryError:
        raise UnreadableImage(f"{path}: out of memory decoding this image (set a lower memory_limit=SIZE "
                          "to have such images refused before decoding)", params="memory_limit") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImage(f"{path}: not a readable image ({reason})") from None
    return im


_PIL_OPEN_LOCK = threading.Lock()


def _open_unchecked(path):
    """``Image.open`` (reads the header only) without Pillow's decompression-bomb check, which
    :func:`read_image` replaces by its own against the memory budget (naming the size and the
    limit, and letting a large image be decoded reduced); Pillow's global is switched under a lock
    and restored at once, so its check still guards frames it seeks to later and other callers."""
    from PIL import Image

    with _PIL_OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(path, w: int, h: int, budget_pixels: int) -> None:
    from . import limits

    if w * h > budget_pixels:
        raise UnreadableImage(f"{path}: a {w}x{h} image ({w * h:,} pixels) is over the {budget_pixels:,}-pixel "
                          f"limit of the memory budget {limits.format_bytes(limits.memory_limit())} "
                          f"(set memory_limit=SIZE or {limits.ENV_VAR}; a decompression bomb?)", params="memory_limit")


def _reduced(im, reduce_to: int):
    """``im`` shrunk by the largest integer factor keeping its shorter side >= 2 × ``reduce_to``
    (box filter; palette and 1-bit images are converted first, as :func:`image_to_array` would)."""
    factor = min(im.size) // (2 * int(reduce_to))
    if factor < 2:
        return im
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode.startswith("I;16"):
        im = im.convert("I")
    return im.reduce(factor)


def list_images(inputs) -> list:
    """Image files from files and folders, in the given order; a folder gives its image files
    (extensions in :data:`IMAGE_EXTENSIONS`, not recursive) sorted by name.

    A missing path or a folder without images is a CnnvisError. Files named explicitly are kept
    whatever their extension (decoding checks them).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = list_files(inputs, IMAGE_EXTENSIONS, f"image files ({', '.join(IMAGE_EXTENSIONS[:6])}, ...)")
    if not paths:
        raise CnnvisError("no input images given")
    return paths


def named_positions(items, files) -> list:
    """Positions in ``files`` (listed from ``items``, e.g. by :func:`list_images`) of the files
    the user named one by one: items that are files, not folders. Such a file that cannot be read
    is the user's argument error, never skipped (:func:`read_chunk`)."""
    named = {str(Path(item)) for item in items if Path(str(item)).is_file()}
    return [i for i, f in enumerate(files) if str(Path(f)) in named]


def read_chunk(paths, preprocessing: "Preprocessing", start: int = 0, skipped: list | None = None,
               named=()) -> tuple:
    """The one decision "unreadable → skip and record" of dataset runs, in one process and on
    Dask workers alike: ``(positions, batch)`` of the images of ``paths`` — inputs ``start``,
    ``start + 1``, … of the input list — that can be read; ``batch`` is N×C×H×W float32, or None
    when none can. A file that cannot be read (:class:`UnreadableImage`: missing, zero bytes,
    truncated, not an image, unknown mode, over the memory budget) is appended to ``skipped`` as
    ``[position, absolute path, reason]`` and left out — unless ``skipped`` is None (every file
    must be read) or its position is in ``named`` (a file named explicitly): then its one-line
    error is raised. Skipped files are read by absolute path, so that the reason recorded is the
    same wherever the file is read from."""
    named = set(named)
    arrays, positions = [], []
    for j, path in enumerate(paths):
        position = int(start) + j
        strict = skipped is None or position in named
        try:
            arrays.append(preprocessing(path if strict else os.path.abspath(path)))
        except UnreadableImage as exc:
            if strict:
                raise
            skipped.append([position, os.path.abspath(path), str(exc)])
            continue
        positions.append(position)
    return positions, (np.stack(arrays) if arrays else None)


def display_names(paths) -> list:
    """Short unique names for output files: the file stem, or parent_stem where stems collide."""
    import collections

    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    counts = collections.Counter(stems)  # (not stems.count: folders of tens of thousands of images)
    names = []
    seen = {}
    for p, stem in zip(paths, stems):
        name = stem if counts[stem] == 1 else f"{p.parent.name}_{stem}" if p.parent.name else stem
        # Still colliding (same folder name twice): number them in order.
        k = seen.get(name, 0)
        seen[name] = k + 1
        names.append(name if k == 0 else f"{name}_{k}")
    return names


def iter_image_batches(inputs, preprocessing: Preprocessing, batch_size: int = 32) -> Iterator:
    """Yield (names, N×C×H×W float32) chunks of at most ``batch_size`` images, decoding lazily."""
    if int(batch_size) < 1:
        raise CnnvisError(f"batch_size={batch_size}: expected a positive integer", params="batch_size")
    paths = list_images(inputs)
    names = display_names(paths)
    for start in range(0, len(paths), int(batch_size)):
        chunk = paths[start:start + int(batch_size)]
        yield names[start:start + len(chunk)], load_batch(chunk, preprocessing)


def load_batch(paths, preprocessing: Preprocessing) -> np.ndarray:
    """N×C×H×W float32 for a list of image files (already listed; see :func:`list_images`)."""
    paths = list(paths)
    if not paths:
        raise CnnvisError("no input images given")
    return np.stack([preprocessing(p) for p in paths])


def load_images(inputs, preprocessing: Preprocessing):
    """All images at once (for small sets): (names, N×C×H×W float32)."""
    names, batches = [], []
    for chunk_names, batch in iter_image_batches(inputs, preprocessing, batch_size=64):
        names.extend(chunk_names)
        batches.append(batch)
    return names, np.concatenate(batches)


def load_input_array(path, expected_shape: Sequence, what: str = "input array") -> np.ndarray:
    """An already-preprocessed N×C×H×W float array from ``.npy`` (never unpickled).

    ``expected_shape`` is (C, H, W) or (N, C, H, W); None in it accepts any size there.
    Wrong ndim, shape, dtype, or NaN/inf → one-line CnnvisError naming the file and the shape
    (``what`` names the array: the CLI passes its flag).
    """
    path = Path(path)
    expected = tuple(expected_shape)
    if len(expected) == 3:
        expected = (None, *expected)
    shown = "N x " + " x ".join("?" if d is None else str(d) for d in expected[1:]) if expected[0] is None \
        else " x ".join("?" if d is None else str(d) for d in expected)
    if not path.is_file():
        raise CnnvisError(f"{what} {path}: no such file (expected a {shown} float .npy)")
    from .manifest import load_npy

    array = load_npy(path, what, f"{shown} float")
    if not np.issubdtype(array.dtype, np.floating):
        raise CnnvisError(f"{what} {path}: expected floats, got dtype {array.dtype} (shape {shown})")
    if array.ndim != 4:
        raise CnnvisError(f"{what} {path}: expected 4 dimensions {shown}, got shape {tuple(array.shape)}")
    if any(e is not None and e != a for e, a in zip(expected, array.shape)) or array.shape[0] == 0:
        raise CnnvisError(f"{what} {path}: expected shape {shown}, got {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise CnnvisError(f"{what} {path}: contains NaN or infinite values (shape {shown})")
    return np.ascontiguousarray(array, dtype=np.float32)
