"""Augmentation parameters behave as their Keras names say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tlearn.augment import KerasAffine, train_transform
from tlearn.config import AUGMENT_PARAMS, AugmentConfig, TlearnError, validate

PLAIN = {"input_size": [3, 64, 64], "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3,
         "crop_pct": 1.0}


def gradient_image() -> Image.Image:
    """Left dark, right bright: a horizontal flip is easy to see."""
    x = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    return Image.fromarray(np.stack([x, x, x], -1))


def test_presets_and_overrides() -> None:
    assert AugmentConfig().resolved() == AUGMENT_PARAMS["default"]
    assert AUGMENT_PARAMS["default"]["rotation_range"] == 40 and AUGMENT_PARAMS["default"]["zoom_range"] == 0.2
    params = AugmentConfig(augment="light", rotation_range=5, fill_mode="wrap").resolved()
    assert params["rotation_range"] == 5 and params["fill_mode"] == "wrap" and params["zoom_range"] == 0.1


def test_flip_only_flips() -> None:
    torch.manual_seed(0)
    transform = train_transform(PLAIN, AugmentConfig(augment="none", horizontal_flip=True))
    original = train_transform(PLAIN, AugmentConfig(augment="none"))(gradient_image())
    outputs = [transform(gradient_image()) for _ in range(40)]
    flipped = [torch.allclose(o, original.flip(-1), atol=1e-6) for o in outputs]
    same = [torch.allclose(o, original, atol=1e-6) for o in outputs]
    assert all(f or s for f, s in zip(flipped, same, strict=True)), "only flips, nothing else"
    assert 10 <= sum(flipped) <= 30, "about half are flipped"


def bar_angle(img: torch.Tensor) -> float:
    """Angle in degrees of the bright bar, from the principal axis of its pixels."""
    ys, xs = np.nonzero(img[0].numpy() > 0.5)
    cov = np.cov(np.stack([xs - xs.mean(), ys - ys.mean()]))
    vx, vy = np.linalg.eigh(cov)[1][:, -1]
    angle = np.degrees(np.arctan2(vy, vx))
    return (angle + 90) % 180 - 90


@pytest.mark.parametrize("limit", [10.0, 30.0])
def test_rotation_stays_within_range(limit: float) -> None:
    torch.manual_seed(1)
    bar = torch.zeros(3, 64, 64)
    bar[:, 30:34, 8:56] = 1.0
    rotate = KerasAffine(limit, 0, 0, 0, 0, "constant")
    angles = [abs(bar_angle(rotate(bar))) for _ in range(60)]
    assert max(angles) <= limit + 2
    assert max(angles) >= limit * 0.6, "the range is used, not just small angles"


def test_fill_modes() -> None:
    torch.manual_seed(2)
    white = torch.ones(3, 64, 64)
    constant = KerasAffine(45, 0, 0, 0, 0, "constant")(white)
    nearest = KerasAffine(45, 0, 0, 0, 0, "nearest")(white)
    assert constant[:, 0, 0].max() < 0.1, "corners filled with 0"
    assert nearest.min() > 0.99, "corners filled from the nearest edge pixels"
    stripes = torch.zeros(3, 64, 64)
    stripes[:, :, ::8] = 1
    torch.manual_seed(3)  # the same random shift for both
    wrapped = KerasAffine(0, 0.25, 0, 0, 0, "wrap")(stripes)
    torch.manual_seed(3)
    cut = KerasAffine(0, 0.25, 0, 0, 0, "constant")(stripes)
    assert wrapped.sum().item() == pytest.approx(stripes.sum().item(), rel=0.03), "wrap brings the stripes round"
    assert cut.sum().item() < 0.95 * stripes.sum().item(), "constant fill loses the shifted-out stripes"


def test_augmentation_is_random_and_keeps_the_input_size() -> None:
    transform = train_transform({**PLAIN, "crop_pct": 0.875}, AugmentConfig(augment="strong"))
    a, b = transform(gradient_image()), transform(gradient_image())
    assert a.shape == b.shape == (3, 64, 64)
    assert not torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1


def test_bad_augmentation_arguments_are_named() -> None:
    with pytest.raises(TlearnError) as err:
        validate(AugmentConfig(augment="wild", fill_mode="mirror", zoom_range=1.5, brightness_range="1.2"))
    text = str(err.value)
    assert "--augment must be one of none, light, default, strong" in text
    assert "--fill-mode must be one of nearest, reflect, constant, wrap" in text
    assert "--zoom-range must be below 1" in text and "--brightness-range must be two factors" in text
