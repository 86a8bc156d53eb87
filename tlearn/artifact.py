"""The saved model: ``model.safetensors`` (tensors) + ``config.json`` (everything else). Nothing here unpickles.

``config.json`` holds the model spec (classes, backbone and its weights identity, preprocessing, head shape)
next to the data, backbone and training configs that produced it, so a run can be read, reloaded and repeated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tlearn import __version__
from tlearn.config import BackboneConfig, TlearnError, from_dict
from tlearn.fileio import atomic_path, atomic_write_text
from tlearn.train import make_head

FORMAT = "tlearn-model"
FORMAT_VERSION = 1
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained classifier around its tensors."""

    classes: list[str]
    backbone: BackboneConfig
    arch: str
    weights_id: str
    preprocessing: dict[str, Any]
    num_features: int
    hidden: int
    dropout: float

    def build_head(self) -> nn.Sequential:
        return make_head(self.num_features, len(self.classes), self.hidden, self.dropout)


def save_model(run_dir: Path, spec: ModelSpec, head: nn.Module, extra: dict[str, Any]) -> None:
    """Write the tensors and the config atomically; ``extra`` adds sections (data, train, ...) to config.json."""
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "versions": {"tlearn": __version__, "torch": torch.__version__, "timm": timm.__version__},
              "model": dataclasses.asdict(spec), **extra}
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise TlearnError(f"{run_dir} is not a tlearn model folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TlearnError(f"{path} is damaged (not valid JSON: {e}); retrain or restore the run") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise TlearnError(f"{path} is not a tlearn model config (no \"format\": \"{FORMAT}\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise TlearnError(f"{path} was written by a newer tlearn (format {config['format_version']}); upgrade tlearn")
    return config


def load_model(run_dir: Path) -> tuple[ModelSpec, nn.Sequential, dict[str, Any]]:
    """Read a saved model back, checking every tensor name and shape against its config."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    try:
        m = dict(config["model"])
        m["backbone"] = from_dict(BackboneConfig, m["backbone"], str(run_dir / CONFIG_FILE))
        spec = ModelSpec(**m)
    except (KeyError, TypeError) as e:
        raise TlearnError(f"{run_dir / CONFIG_FILE} has an incomplete \"model\" section ({e}); retrain") from e
    if len(spec.classes) < 2 or len(set(spec.classes)) != len(spec.classes):
        raise TlearnError(f"{run_dir / CONFIG_FILE}: \"classes\" must list at least two distinct names")
    path = run_dir / MODEL_FILE
    if not path.is_file():
        raise TlearnError(f"{path} is missing; the run did not finish saving, so retrain it")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise TlearnError(f"{path} is damaged ({e}); retrain or restore the run") from e
    head = spec.build_head()
    expected = {f"head.{k}": v.shape for k, v in head.state_dict().items()}
    got = {k: v.shape for k, v in tensors.items() if k.startswith("head.")}
    if set(expected) != set(got):
        raise TlearnError(f"{path} does not match {CONFIG_FILE}: missing {sorted(set(expected) - set(got))}, "
                          f"unexpected {sorted(set(got) - set(expected))}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise TlearnError(f"{path}: tensor {k} has shape {tuple(got[k])} but {CONFIG_FILE} "
                              f"({len(spec.classes)} classes, {spec.num_features} features) needs {tuple(shape)}")
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
    return spec, head.eval(), config
