"""Image files as the networks see them.

- The one decoder: any Pillow-readable file → an upright RGB picture, with the reason when it cannot be. Training,
  extraction, ``tlearn check``, the report and the predictor all decode here, so what ``check`` says is done to a
  file is what training does to it.
- timm's evaluation preprocessing done in one resampling, and the named views (centre, mirror, corners).

Only Pillow and NumPy, so that the predictor can use it without importing torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from tlearn.fileio import NotRegularFile, require_regular

if TYPE_CHECKING:
    import torch

# Pillow's threshold for a decompression bomb (about 89 megapixels); larger images are refused from the header.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16- and 32-bit integer pixels
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa")
Note = Callable[[str, str], None]  # (kind, detail): told each thing decoding does to a file


class ImageDecodeError(Exception):
    """An image file that cannot be turned into an RGB picture; the message is the reason shown to the user."""


def load_image(path: Path | str | BinaryIO) -> Image.Image:
    """Decode any Pillow-readable image (a file, or bytes in a file object such as an upload) to RGB: EXIF
    orientation applied, first frame of an animation, transparency composited on white, 16-bit and float pixels
    scaled to 8-bit."""
    try:
        with open_image(path) as im:
            return decode(im)
    except Exception as e:
        raise ImageDecodeError(reason(e)) from e


def open_image(path: Path | str | BinaryIO) -> Image.Image:
    """Open a file (or a file object) and read its header; refuse a decompression bomb before a pixel is decoded,
    and anything but a regular file (a FIFO, a device) before it is opened."""
    if isinstance(path, str | Path):
        require_regular(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, with a reason
        im = Image.open(path)
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels, over the {MAX_PIXELS:,} limit")
    return im


def decode(im: Image.Image, note: Note | None = None) -> Image.Image:
    """An opened image → upright RGB. ``note(kind, detail)`` is told each conversion as it is made, which is how
    ``tlearn check`` reports them."""
    note = note or (lambda kind, detail: None)
    if getattr(im, "n_frames", 1) > 1:
        note("animated", f"{im.n_frames} frames; the first one is used")
        im.seek(0)
    im.load()
    orientation = im.getexif().get(0x0112, 1)
    if orientation not in (0, 1):
        note("exif-rotated", f"EXIF orientation {orientation}; the image is rotated upright when read")
        im = ImageOps.exif_transpose(im)
    return to_rgb(im, note)


def to_rgb(im: Image.Image, note: Note | None = None) -> Image.Image:
    """Pixels of any mode → 8-bit RGB, saying what was done."""
    note = note or (lambda kind, detail: None)
    mode = im.mode
    if mode in INTEGER_MODES or mode == "F":
        im = _to_8bit(im)
        note("high-bit-depth", f"mode {mode}; {'floats' if mode == 'F' else 'integers'} scaled to 8-bit RGB")
    elif mode in ("L", "1"):
        note("grayscale", f"mode {mode}; converted to RGB")
    elif mode == "CMYK":
        note("cmyk", "CMYK; converted to RGB")
    if mode in TRANSPARENT_MODES or (mode == "P" and "transparency" in im.info):
        note("transparency", f"mode {mode} with transparency; composited on white")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float pixels → 8-bit grayscale. Floats with no value above 1 are taken as [0, 1];
    anything whose brightest pixel is above 255 is scaled so that it becomes 255; negatives and NaN become 0."""
    a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(a.max()) if a.size else 0.0
    scale = 255.0 if im.mode == "F" and top <= 1.0 else 255.0 / top if top > 255 else 1.0
    return Image.fromarray(np.rint(a * scale).clip(0, 255).astype(np.uint8), "L")


def reason(e: Exception) -> str:
    """What went wrong while decoding, in a line a user can act on."""
    text = str(e).split("\n")[0][:200]
    if isinstance(e, Image.UnidentifiedImageError):
        return "not a readable image (Pillow cannot identify it)"
    if isinstance(e, NotRegularFile):
        return text
    if isinstance(e, Image.DecompressionBombError):
        return f"refused: too many pixels ({text})"
    if "truncated" in text.lower():
        return f"truncated image file ({text})"
    return f"cannot decode: {type(e).__name__}: {text}"


def thumbnail(path: Path, size: int = 256) -> np.ndarray:
    """An image for a figure: decoded as for training, shrunk to ``size`` pixels at most, (H, W, 3) uint8."""
    image = load_image(path)
    image.thumbnail((size, size))
    return np.asarray(image)

# Named views of an image: the centre crop, its mirror image, and the four corner crops of the resized image, as
# (crop position, mirrored). "flip" features are cached as training augmentation; all six are test-time views.
VIEWS: dict[str, tuple[tuple[float, float], bool]] = {
    "center": ((0.5, 0.5), False), "flip": ((0.5, 0.5), True), "top-left": ((0.0, 0.0), False),
    "top-right": ((1.0, 0.0), False), "bottom-left": ((0.0, 1.0), False), "bottom-right": ((1.0, 1.0), False)}


RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


class CropResize:
    """timm's evaluation preprocessing (resize the shorter side to size / crop_pct, centre-crop, normalise) done as
    one resampling of the crop box straight to the input size.

    The filter and the pixel-centre mapping are the same as resizing the whole image and then cropping, so the
    result matches ``timm.data.create_transform`` to within 2/255 at a few pixels; but the pixels the crop throws
    away are never computed, which makes it about 1.8x faster.
    """

    def __init__(self, preprocessing: dict[str, Any], position: tuple[float, float] = (0.5, 0.5), flip: bool = False):
        _, self.height, self.width = preprocessing["input_size"]
        self.position, self.flip = position, flip  # where the crop sits (0: left/top, 1: right/bottom); mirror it
        self.scale = math.floor(self.height / preprocessing["crop_pct"])  # timm's scale_size (square case)
        self.resample = RESAMPLE[preprocessing["interpolation"]]
        std = np.array(preprocessing["std"], dtype=np.float32)
        self.gain = (1 / (255 * std)).reshape(3, 1, 1)  # ToTensor's /255, then Normalize
        self.offset = (np.array(preprocessing["mean"], dtype=np.float32) / std).reshape(3, 1, 1)

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The crop, in source pixels, of torchvision's Resize(scale) (shorter side) + CenterCrop."""
        short, long = min(width, height), max(width, height)
        new_long = int(self.scale * long / short)
        new_w, new_h = (self.scale, new_long) if width <= height else (new_long, self.scale)
        left, top = round((new_w - self.width) * self.position[0]), round((new_h - self.height) * self.position[1])
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, (left + self.width) * sx, (top + self.height) * sy

    def array(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32, normalised: the same as calling it, without torch."""
        image = image.resize((self.width, self.height), self.resample, box=self.box(*image.size))
        if self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
        return pixels * self.gain - self.offset

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch  # only the training and extraction paths want tensors; the predictor uses array()

        return torch.from_numpy(self.array(image))


def crop_box(preprocessing: dict[str, Any], width: int, height: int,
             position: tuple[float, float] = (0.5, 0.5)) -> tuple[float, float, float, float]:
    """The region of a ``width`` x ``height`` image that the evaluation preprocessing turns into the model's input,
    as (left, top, right, bottom) in source pixels: ``CropResize``'s box, or that of timm's squash and border
    crops (which may reach past the image, where the border crop pads)."""
    if crop_resize_fits(preprocessing):
        return CropResize(preprocessing, position).box(width, height)
    _, h, w = preprocessing["input_size"]
    pct = preprocessing.get("crop_pct") or 0.875
    scale_h, scale_w = math.floor(h / pct), math.floor(w / pct)
    if preprocessing.get("crop_mode", "center") == "squash":
        new_w, new_h = scale_w, scale_h
    else:  # the aspect ratio kept: the shorter side fits the scale (centre crop), or the longer one (border)
        ratio = (max if preprocessing.get("crop_mode") == "border" else min)(height / scale_h, width / scale_w)
        new_w, new_h = round(width / ratio), round(height / ratio)
    left, top = round((new_w - w) * position[0]), round((new_h - h) * position[1])
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + w) * sx, (top + h) * sy


def crop_resize_fits(preprocessing: dict[str, Any]) -> bool:
    """Whether ``CropResize`` reproduces timm's evaluation transform for this preprocessing: a square centre crop
    with a known filter."""
    square = preprocessing["input_size"][1] == preprocessing["input_size"][2]
    return preprocessing.get("crop_mode", "center") == "center" and square and bool(preprocessing.get("crop_pct")) \
        and preprocessing["interpolation"] in RESAMPLE


def eval_transform(preprocessing: dict[str, Any], view: str = "center", *, array: bool = False
                   ) -> Callable[[Image.Image], Any]:
    """The one evaluation preprocessing, as timm's ``create_transform(is_training=False)`` does it from the model's
    pretrained cfg (e.g. 256 -> centre 224, bicubic): a picture → the normalised (3, H, W) input, a tensor, or a
    float32 array with ``array`` (no torch), in one of ``VIEWS``. ``CropResize`` covers the usual square centre crop
    and all six views; other crop modes use timm's transform itself, and have the centre and mirror views only.

    Extraction, training's validation batches, the predictor, export and the heatmaps all preprocess here."""
    if crop_resize_fits(preprocessing):
        crop = CropResize(preprocessing, *VIEWS[view])
        return crop.array if array else crop
    if view not in ("center", "flip"):
        raise ValueError(f"view {view!r} needs a square centre-crop preprocessing")
    import timm.data  # imports torch: only for the crop modes CropResize does not cover

    plain = timm.data.create_transform(**preprocessing, is_training=False)
    tensor = plain if view == "center" else lambda image: plain(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return (lambda image: tensor(image).numpy()) if array else tensor


def tta_views(preprocessing: dict[str, Any]) -> list[str]:
    """Test-time augmentation: the centre crop, its mirror image and, where the preprocessing allows, the four
    corner crops of the resized image."""
    return list(VIEWS) if crop_resize_fits(preprocessing) else ["center", "flip"]
