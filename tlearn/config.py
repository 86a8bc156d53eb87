"""Typed configuration shared by the CLI, the Python API and the saved run's ``config.json``.

Each field carries its help text in ``metadata["help"]``; the CLI builds its flags from these fields, so a
flag, an API keyword and a ``config.json`` key always have the same name and the same default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class TlearnError(Exception):
    """A problem the user can fix: the message names the argument, file or folder, and says what to do."""


def _f(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - "help" reads best at the call sites
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DataConfig:
    """Where the images are and how they are split into train, validation and test."""

    path: str = _f("", "image folder: one sub-folder per class, or train/ + validation/ (or val/) [+ test/]",
                   positional=True)
    val: float = _f(0.15, "fraction of each class held out for validation when the folder is not split")
    test: float = _f(0.15, "fraction of each class held out for testing when the folder is not split (0 for none)")
    seed: int = _f(0, "seed of the stratified split (for `tlearn train`, also of initialisation and shuffling)")
    split_manifest: str | None = _f(None, "reuse the split in this CSV manifest (path,class,split) from an earlier run")

    def problems(self) -> list[str]:
        out = []
        if not self.path:
            out.append("DATA is required: the folder that holds one sub-folder per class")
        if not 0 < self.val < 1:
            out.append(f"--val must be between 0 and 1. Received: val={self.val}")
        if not 0 <= self.test < 1:
            out.append(f"--test must be between 0 (no test split) and 1. Received: test={self.test}")
        if self.val + self.test >= 1:
            out.append(f"--val and --test must add up to less than 1, leaving images to train on. "
                       f"Received: val={self.val}, test={self.test} (sum {self.val + self.test:g})")
        return out


@dataclass
class BackboneConfig:
    """Which pretrained convolutional base to use and where its weights come from."""

    backbone: str = _f("efficientnet_lite0", "registered backbone (see `tlearn backbones`) or any timm model name")
    weights: str | None = _f(None, "local weights file (.safetensors, .pth or .bin) for the backbone's architecture")
    pretrained: bool = _f(True, "start from pretrained weights; --no-pretrained uses random weights on purpose")

    def problems(self) -> list[str]:
        out = []
        if not self.backbone:
            out.append("--backbone must name a backbone; `tlearn backbones` lists them")
        if self.weights and not self.pretrained:
            out.append("--weights and --no-pretrained contradict each other: drop one")
        return out


HEADS = ("dense", "logreg")
MODES = ("features",)


@dataclass
class TrainConfig:
    """How the classifier head is trained."""

    mode: str = _f("features", "training mode: 'features' trains a head on cached features of the frozen base")
    head: str = _f("dense", "'dense' (Dropout + Linear, optional hidden layer) or 'logreg' "
                   "(scikit-learn, C=1 on standardised features)")
    hidden: int = _f(0, "width of an optional hidden ReLU layer in the dense head (0 for none, e.g. 256)")
    dropout: float = _f(0.2, "dropout before each Linear layer of the dense head")
    epochs: int = _f(100, "maximum number of epochs")
    batch_size: int = _f(64, "mini-batch size for the head")
    lr: float = _f(1e-3, "learning rate (AdamW)")
    weight_decay: float = _f(1e-4, "AdamW weight decay of the dense head")
    patience: int = _f(10, "stop after this many epochs without a better validation loss; the best epoch is kept")
    seed: int = _f(0, "seed of weight initialisation and shuffling")

    def problems(self) -> list[str]:
        out = []
        if self.mode not in MODES:
            out.append(f"--mode must be one of {', '.join(MODES)}. Received: mode={self.mode!r}")
        if self.head not in HEADS:
            out.append(f"--head must be one of {', '.join(HEADS)}. Received: head={self.head!r}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be at least 1. Received: {name}={getattr(self, name)}")
        if self.hidden < 0:
            out.append(f"--hidden must be 0 or more. Received: hidden={self.hidden}")
        if not 0 <= self.dropout < 1:
            out.append(f"--dropout must be in [0, 1). Received: dropout={self.dropout}")
        if self.lr <= 0:
            out.append(f"--lr must be positive. Received: lr={self.lr}")
        if self.weight_decay < 0:
            out.append(f"--weight-decay must be 0 or more. Received: weight_decay={self.weight_decay}")
        return out


@dataclass
class RuntimeConfig:
    """Where the feature cache lives and how extraction runs. Not part of a model's identity."""

    cache_dir: str | None = _f(None, "feature cache folder (default: $TLEARN_CACHE_DIR or ~/.cache/tlearn)")
    extract_batch_size: int = _f(32, "images per forward pass of the frozen base")
    workers: int | None = _f(None, "image-decoding worker processes (default: one per CPU core, 0 for none)")

    def problems(self) -> list[str]:
        out = []
        if self.extract_batch_size < 1:
            out.append(f"--extract-batch-size must be at least 1. Received: {self.extract_batch_size}")
        if self.workers is not None and self.workers < 0:
            out.append(f"--workers must be 0 or more. Received: workers={self.workers}")
        return out


def validate(*configs: Any) -> None:
    """Raise one TlearnError that lists every problem in the given configs at once."""
    problems = [p for c in configs for p in c.problems()]
    if problems:
        raise TlearnError("invalid arguments:\n  - " + "\n  - ".join(problems))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build config ``cls`` from a dict read from ``where``; unknown keys are an error, missing ones default."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TlearnError(f"{where}: unknown {cls.__name__} keys {unknown}; was it written by a newer tlearn?")
    return cls(**values)
