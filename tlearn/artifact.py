"""The saved model: ``model.safetensors`` (tensors) + ``config.json`` (everything else). Nothing here unpickles.

``config.json`` holds the model spec (classes, backbone and its weights identity, preprocessing, head shape)
next to the data, backbone and training configs that produced it, so a run can be read, reloaded and repeated.
The same config is also stored inside ``model.safetensors``'s metadata: that one file, written atomically, is
always a complete model, even if a save is killed between the two files.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlearn import __version__
from tlearn.config import BackboneConfig, TlearnError, from_dict
from tlearn.fileio import atomic_path, atomic_write_text
from tlearn.images import VIEWS

if TYPE_CHECKING:
    from torch import nn

# torch, timm and the model code are imported where a module is built or saved: reading a spec (the predictor)
# needs none of them.

log = logging.getLogger("tlearn")
FORMAT = "tlearn-model"
FORMAT_VERSION = 1
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"


KINDS = ("head", "finetuned", "scratch")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained classifier around its tensors.

    ``kind`` is 'head' (a head on the pretrained base, whose weights come from ``backbone`` and must match
    ``weights_id``), 'finetuned' (base and head both saved) or 'scratch' (``arch`` names a scratch model).
    """

    classes: list[str]
    kind: str
    arch: str
    preprocessing: dict[str, Any]
    backbone: BackboneConfig | None = None
    weights_id: str = ""
    num_features: int = 0
    hidden: int = 0
    dropout: float = 0.0
    temperature: float = 1.0  # fitted on held-out logits; predictions divide the logits by it
    views: list[str] = dataclasses.field(default_factory=lambda: ["center"])  # logits averaged over these views
    bases: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # each base's name and identity

    def build(self) -> nn.Module:
        """The untrained module whose state_dict ``model.safetensors`` holds."""
        import timm

        from tlearn.models import SCRATCH, Classifier, make_head

        if self.kind == "scratch":
            return SCRATCH[self.arch].build(len(self.classes))
        head = make_head(self.num_features, len(self.classes), self.hidden, self.dropout)
        if self.kind == "head":
            return head
        return Classifier(timm.create_model(self.arch, pretrained=False), head)


def save_model(run_dir: Path, spec: ModelSpec, model: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the tensors and the config atomically; ``extra`` adds sections (data, train, ...) to config.json.
    Returns the config as written."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "versions": {"tlearn": __version__, "torch": torch.__version__,
                           "timm": importlib.metadata.version("timm")},
              "model": dataclasses.asdict(spec), **extra}
    text = json.dumps(config, indent=2) + "\n"
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "config": text})
    atomic_write_text(run_dir / CONFIG_FILE, text)
    return json.loads(text)


def read_config(run_dir: Path, text: str | None = None) -> dict[str, Any]:
    """The run's config from ``config.json``, or from ``text`` (the copy inside model.safetensors)."""
    path = run_dir / (CONFIG_FILE if text is None else MODEL_FILE)
    if text is None and not path.is_file():
        raise TlearnError(f"{run_dir} is not a tlearn model folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TlearnError(f"{path} is damaged (its config is not valid JSON: {e}); retrain or restore the run") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise TlearnError(f"{path} is not a tlearn model config (no \"format\": \"{FORMAT}\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise TlearnError(f"{path} was written by a newer tlearn (format {config['format_version']}); upgrade tlearn")
    return config


def spec_of(config: dict[str, Any], where: Path) -> ModelSpec:
    """The validated model spec of a run's config (``where`` names the file in errors)."""
    try:
        m = dict(config["model"])
        if m.get("backbone") is not None:
            m["backbone"] = from_dict(BackboneConfig, m["backbone"], str(where))
        spec = ModelSpec(**m)
    except (KeyError, TypeError) as e:
        raise TlearnError(f"{where} has an incomplete or unknown \"model\" section ({e}); retrain") from e
    if spec.kind not in KINDS or (spec.kind == "scratch" and spec.arch not in _scratch_models()):
        raise TlearnError(f"{where}: unknown model kind {spec.kind!r} / architecture {spec.arch!r}")
    if not (isinstance(spec.temperature, int | float) and 0 < spec.temperature < float("inf")):
        raise TlearnError(f"{where}: \"temperature\" must be a positive number, not {spec.temperature!r}")
    if not spec.views or not set(spec.views) <= set(VIEWS):
        raise TlearnError(f"{where}: \"views\" must be a non-empty list of {', '.join(VIEWS)}, not {spec.views!r}")
    if len(spec.classes) < 2 or len(set(spec.classes)) != len(spec.classes):
        raise TlearnError(f"{where}: \"classes\" must list at least two distinct names")
    return spec


def _scratch_models() -> tuple[str, ...]:
    from tlearn.models import SCRATCH

    return tuple(SCRATCH)


def load_model(run_dir: Path) -> tuple[ModelSpec, nn.Module, dict[str, Any]]:
    """Read a saved model back, checking every tensor name and shape against its config."""
    from safetensors import SafetensorError, safe_open

    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not path.is_file():
        what = "the run did not finish saving, so retrain it" if (run_dir / CONFIG_FILE).is_file() else \
            "is this a run folder written by `tlearn train`?"
        raise TlearnError(f"{path} is missing: {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            embedded = (f.metadata() or {}).get("config")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise TlearnError(f"{path} is damaged ({e}); retrain or restore the run") from e
    config = read_config(run_dir, embedded) if embedded else read_config(run_dir)
    if embedded and (run_dir / CONFIG_FILE).is_file():
        try:
            on_disk = read_config(run_dir)
        except TlearnError:
            on_disk = None
        if on_disk != config:
            log.warning(f"{run_dir / CONFIG_FILE} differs from the config saved inside {MODEL_FILE} (an interrupted "
                        f"save, or an edit); using the one inside {MODEL_FILE}")
    spec = spec_of(config, path)
    model = spec.build()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in tensors.items()}
    if set(expected) != set(got):
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise TlearnError(f"{path} does not match {CONFIG_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise TlearnError(f"{path}: tensor {k} has shape {tuple(got[k])} but {CONFIG_FILE} "
                              f"({len(spec.classes)} classes, {spec.num_features} features) needs {tuple(shape)}")
    model.load_state_dict(tensors)
    return spec, model.eval(), config
