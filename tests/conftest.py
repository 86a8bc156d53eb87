"""Shared fixtures: tiny generated image folders and a tiny random-weight backbone for fast tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HYMENOPTERA = SHARED / "hymenoptera"
OXFORD17 = SHARED / "oxford17_flowers"

# Every training loop in the tests runs with the device check armed: a model, batch, label or class weight that
# did not go through the loop's device owner fails here on the CPU as it would fail on a GPU (train.Precision).
os.environ["TLEARN_CHECK_DEVICES"] = "1"
# In the tests, a bug in tlearn raises with its traceback instead of the CLI's one-line "internal error".
os.environ["TLEARN_DEBUG"] = "1"

# A tiny timm model with random weights: fast features that still separate colours.
TINY = {"backbone": "test_efficientnet", "pretrained": False}

COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "red": (210, 40, 40)}


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A noisy image of one colour, different for every seed."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, per_class: int = 10, classes: tuple[str, ...] = ("blue", "red"), seed: int = 0,
                ext: str = ".png") -> Path:
    """``root/<class>/<class>_<i><ext>`` with ``per_class`` generated images per class."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{name}_{i:03d}{ext}", COLOURS[name], seed * 10_000 + c * 1000 + i)
    return root


def tiny_run(tmp: Path, per_class: int = 10) -> tuple[Path, Path]:
    """A tiny head on features, trained on a generated folder under ``tmp``: (the run, the folder)."""
    from tlearn import ImageClassifier

    data = make_folder(tmp / "photos", per_class=per_class)
    ImageClassifier(**TINY, verbose=False, workers=0, mode="features", head="dense",
                    cache_dir=str(tmp / "cache")).fit(data, out=tmp / "run")
    return tmp / "run", data


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "photos", per_class=12)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own feature cache unless it sets one."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(cache))
    return cache


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip when a real dataset is absent, except in CI (TLEARN_REQUIRE_DATASETS=1), where absence fails."""
    required = os.environ.get("TLEARN_REQUIRE_DATASETS") == "1"
    return pytest.mark.skipif(not path.is_dir() and not required, reason=f"real dataset {path} is not available")


@pytest.fixture
def tlearn_log(caplog: pytest.LogCaptureFixture):
    """tlearn's log records, each once, wherever the CLI sends its lines: the "tlearn" logger stops propagation
    once the CLI has set up its own output, so the capture handler is attached to it directly (and propagation is
    off meanwhile, so that no record reaches the capture twice)."""
    logger = logging.getLogger("tlearn")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate
