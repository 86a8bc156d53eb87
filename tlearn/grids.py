"""The report's image grids: training samples as the model sees them (plain and augmented), and photos beside their
Grad-CAM heatmaps (the top losses, the correct predictions). Each grid is drawn once per images, captions and
model, and reused from the cache folder after that (``plots.reuse``).
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlearn import plots
from tlearn.config import AugmentConfig, TlearnError
from tlearn.fileio import file_sha256
from tlearn.images import ImageDecodeError, load_image, thumbnail

if TYPE_CHECKING:
    from torch import nn

    from tlearn.explain import Explainer

    Explaining = Callable[[], Explainer]  # the run's explainer, built on first call


def sample_grid(chosen: dict[str, list[Path]], pp: dict[str, Any], augment: AugmentConfig,
                run_dir: Path, per_class: int) -> Path | None:
    """``per_class`` images of each class as the model sees them (resized and cropped), then augmented."""
    import torch

    from tlearn.augment import train_transform

    plain = train_transform(pp, AugmentConfig(augment="none"), normalize=False)
    augmented = train_transform(pp, augment, normalize=False)
    tiles = []
    with torch.random.fork_rng(devices=[]):  # the same augmentations every time, without moving the caller's RNG
        torch.manual_seed(0)
        for name, paths in chosen.items():
            images = []
            for p in paths:
                try:
                    images.append(load_image(p))
                except ImageDecodeError:  # moved or damaged since training: leave it out
                    continue
            tiles += [(plain(im).permute(1, 2, 0).numpy(), name) for im in images]
            tiles += [(augmented(im).permute(1, 2, 0).numpy(), f"{name} (augmented)") for im in images]
            tiles += [(np.ones((8, 8, 3)), "")] * (2 * per_class - 2 * len(images))
    if not any(caption for _, caption in tiles):
        return None
    return plots.image_grid(tiles, run_dir / "samples.png", cols=4 * per_class, tile=1.6)


def explainer(run_dir: Path, model: nn.Module | None, base: Any, cache_dir: str | Path | None) -> Explainer:
    from tlearn.explain import run_explainer  # torch and torchcam: only when a heatmap is drawn

    return run_explainer(run_dir, model, base, cache_dir)


def fingerprint(rows: list[dict[str, Any]]) -> list[Any]:
    """What the heatmaps of a split depend on besides the images: the model, seen through its predictions (to
    predictions.csv's precision, so that a report rebuilt from the files finds the figures drawn at training)."""
    return [[r["path"], f"{r['probability_uncalibrated']:.6f}"] for r in rows]


class NoHeatmaps(Exception):
    """The run's explainer cannot be built (why is the message)."""


def heat_grid(shown: list[tuple[Path, str]], path: Path, model_key: list[Any], explainer: Explaining,
               cache: Path, cols: int = 3) -> tuple[Path | None, str]:
    """A grid of the images in ``shown``, each with its caption and, beside it, its Grad-CAM heatmap; and why
    there are no heatmaps, if there are none. Drawn once per images, captions and model (see ``plots.reuse``);
    a grid without heatmaps is never kept for reuse, since what was missing (a base's weights) may come back."""
    def grid(pictures: Callable[[], list[tuple[np.ndarray, str]]]) -> Path | None:
        tiles = pictures()
        return plots.image_grid(tiles, path, cols=cols, tile=4.0, aspect=0.6) if tiles else None

    def with_heatmaps() -> list[tuple[np.ndarray, str]]:
        try:
            made = explainer()
        except TlearnError as e:
            raise NoHeatmaps(str(e)) from e
        results = made.explain([p for p, _ in shown], with_image=True)
        return [(plots.side_by_side(np.asarray(r["image"]), r["heatmap"], 256), caption)
                for (_, caption), r in zip(shown, results, strict=True)
                if "error" not in r]  # moved or damaged since training: left out

    if not shown:
        return None, ""
    try:
        key = ["heat grid", 2, [[file_sha256(p), caption] for p, caption in shown], model_key]
    except OSError:
        key = None
    try:
        return plots.reuse(path, key, lambda: grid(with_heatmaps), cache), ""
    except NoHeatmaps as e:
        return grid(lambda: thumbnails(shown)), f"<p class='muted'>No heatmaps: {html.escape(str(e))}</p>"


def thumbnails(shown: list[tuple[Path, str]]) -> list[tuple[np.ndarray, str]]:
    """Thumbnail tiles of the images in ``shown`` with their captions; images moved or damaged since training
    are left out."""
    tiles = []
    for p, caption in shown:
        with contextlib.suppress(ImageDecodeError):
            tiles.append((thumbnail(p), caption))
    return tiles
