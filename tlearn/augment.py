"""Data augmentation with Keras's ImageDataGenerator parameters, built on torchvision.transforms.v2.

The training transform is timm's evaluation transform for the backbone (its resize, then its centre crop, squash
or border crop, then normalise) with random geometry and colour inserted before the crop, so the crop usually
sees real pixels rather than fill.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch import nn

from tlearn.config import AugmentConfig

_PAD_MODES = {"nearest": "replicate", "reflect": "reflect", "wrap": "circular"}


class KerasAffine(nn.Module):
    """Random rotation, shift, shear and (isotropic) zoom of a float (C, H, W) tensor, with Keras's fill modes.

    torchvision's affine fills only with a constant, so for nearest, reflect and wrap the image is first padded
    with that mode, transformed, and cropped back to its size.
    """

    def __init__(self, rotation: float, width_shift: float, height_shift: float, shear: float, zoom: float,
                 fill_mode: str):
        super().__init__()
        self.rotation, self.width_shift, self.height_shift = rotation, width_shift, height_shift
        self.shear, self.zoom, self.fill_mode = shear, zoom, fill_mode

    def _uniform(self, bound: float) -> float:
        return (torch.rand(()).item() * 2 - 1) * bound

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not any((self.rotation, self.width_shift, self.height_shift, self.shear, self.zoom)):
            return img
        h, w = img.shape[-2:]
        angle, shear = self._uniform(self.rotation), self._uniform(self.shear)
        tx, ty = self._uniform(self.width_shift) * w, self._uniform(self.height_shift) * h
        scale = 1.0 + self._uniform(self.zoom)
        pad = 0 if self.fill_mode == "constant" else min(h, w) // 2
        if pad:
            img = F.pad(img[None], (pad, pad, pad, pad), mode=_PAD_MODES[self.fill_mode])[0]
        img = TF.affine(img, angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0],
                        interpolation=T.InterpolationMode.BILINEAR, fill=0.0)
        return img[..., pad:pad + h, pad:pad + w] if pad else img

    def extra_repr(self) -> str:
        return (f"rotation={self.rotation}, shift=({self.width_shift}, {self.height_shift}), shear={self.shear}, "
                f"zoom={self.zoom}, fill_mode={self.fill_mode}")


class _Clamp(nn.Module):
    """Keep pixel values in [0, 1] after interpolation and brightness changes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 1)


def train_transform(preprocessing: dict[str, Any], config: AugmentConfig, normalize: bool = True) -> T.Compose:
    """Augmented training transform: PIL image → normalised (3, H, W) float tensor of the model's input size.

    The resize and the crop are those of timm's evaluation transform for this preprocessing (centre crop, squash
    or border), so that the image modes train on the framing they are evaluated on; the random geometry and
    colour go between the two."""
    p = config.resolved()
    resize, crop = _eval_geometry(preprocessing)
    steps: list[Any] = [*resize, T.ToImage(), T.ToDtype(torch.float32, scale=True),
                        KerasAffine(p["rotation_range"], p["width_shift_range"], p["height_shift_range"],
                                    p["shear_range"], p["zoom_range"], p["fill_mode"])]
    if p["horizontal_flip"]:
        steps.append(T.RandomHorizontalFlip())
    if p["vertical_flip"]:
        steps.append(T.RandomVerticalFlip())
    if p["brightness_range"]:
        lo, hi = (float(v) for v in str(p["brightness_range"]).split(","))
        steps.append(T.ColorJitter(brightness=(lo, hi)))
    mean, std = preprocessing["mean"], preprocessing["std"]
    # Cropped after normalising, where padding with 0 is padding with the mean colour, as timm's border mode does.
    steps += [_Clamp(), T.Normalize(mean, std), crop]
    if not normalize:
        steps.append(T.Normalize([-m / s for m, s in zip(mean, std, strict=True)], [1 / s for s in std]))
    return T.Compose(steps)


def _eval_geometry(preprocessing: dict[str, Any]) -> tuple[list[Any], Any]:
    """The steps of timm's evaluation transform before its crop (on the PIL image), and the crop itself."""
    import timm.data
    import torchvision.transforms as V1  # timm's factory builds torchvision's v1 transforms
    from timm.data.transforms import CenterCropOrPad

    steps = list(timm.data.create_transform(**preprocessing, is_training=False, normalize=False).transforms)
    *resize, crop, _to_tensor = steps
    if not isinstance(crop, V1.CenterCrop | CenterCropOrPad):
        raise TypeError(f"unexpected final step {crop!r} in timm's evaluation transform for {preprocessing}")
    if isinstance(crop, CenterCropOrPad):
        crop.fill = 0  # tensors take one number; after Normalize, 0 is the mean colour timm pads with
    return resize, crop


def preview(image: Path, preprocessing: dict[str, Any], config: AugmentConfig, n: int, out: Path,
            seed: int = 0) -> Path:
    """Save a grid of the image and ``n`` augmented versions of it, like the classic tutorial's preview."""
    from tlearn.images import load_image
    from tlearn.plots import image_grid

    picture = load_image(image)
    transform = train_transform(preprocessing, config, normalize=False)
    plain = train_transform(preprocessing, AugmentConfig(augment="none"), normalize=False)
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's random state
        torch.manual_seed(seed)
        tiles = [(plain(picture), f"{image.name}\noriginal")] + [
            (transform(picture), f"--augment {config.augment}\naugmented {i + 1}") for i in range(n)]
    return image_grid([(x.permute(1, 2, 0).numpy(), caption) for x, caption in tiles], out, cols=5, tile=2.6)
