"""Images as the networks see them: timm's evaluation preprocessing done in one resampling, and the named views
(centre, mirror, corners). Only Pillow and NumPy, so that the predictor can use it without importing torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

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


def crop_resize_fits(preprocessing: dict[str, Any]) -> bool:
    """Whether ``CropResize`` reproduces timm's evaluation transform for this preprocessing: a square centre crop
    with a known filter."""
    square = preprocessing["input_size"][1] == preprocessing["input_size"][2]
    return preprocessing.get("crop_mode", "center") == "center" and square and bool(preprocessing.get("crop_pct")) \
        and preprocessing["interpolation"] in RESAMPLE
