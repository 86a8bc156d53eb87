"""The saved model: ``model.safetensors`` (tensors) + ``config.json`` (everything else). Nothing here unpickles.

``config.json`` holds the model spec (classes, backbone and its weights identity, preprocessing, head shape)
next to the data, backbone and training configs that produced it, so a run can be read, reloaded and repeated.
The same config is also stored inside ``model.safetensors``'s metadata: that one file, written atomically, is
always a complete model, even if a save is killed between the two files.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlearn import __version__
from tlearn.config import (
    MAX_WIDTH,
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    Decision,
    TlearnError,
    TrainConfig,
    type_problem,
)
from tlearn.configio import from_dict
from tlearn.fileio import atomic_path, atomic_write_text, require_regular
from tlearn.images import RESAMPLE, VIEWS

if TYPE_CHECKING:
    from torch import nn

# torch, timm and the model code are imported where a module is built or saved: reading a spec (the predictor)
# needs none of them.

log = logging.getLogger("tlearn")
FORMAT = "tlearn-model"
FORMAT_VERSION = 2  # 2: the model may carry a novelty scorer (``ModelSpec.novelty`` and its reference tensor)
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
NOVELTY_TENSOR = "novelty.reference"  # the novelty scorer's reference features (``tlearn.novelty``), float16


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
    novelty: dict[str, Any] | None = None  # the novelty scorer's settings and threshold (``tlearn.novelty``); its
    # reference features are the tensor NOVELTY_TENSOR. None: saved before tlearn scored novelty
    multi_label: bool = False  # several labels an image: a sigmoid a label, each with its temperature and threshold
    temperatures: list[float] | None = None
    thresholds: list[float] | None = None

    def build(self) -> nn.Module:
        """The untrained module whose state_dict ``model.safetensors`` holds."""
        from tlearn.models import SCRATCH, Classifier, make_head

        if self.kind == "scratch":
            if self.arch not in SCRATCH:
                raise TlearnError(f"unknown scratch architecture {self.arch!r}; tlearn knows {', '.join(SCRATCH)}")
            return SCRATCH[self.arch].build(len(self.classes))
        head = make_head(self.num_features, len(self.classes), self.hidden, self.dropout)
        if self.kind == "head":
            return head
        from tlearn.backbones import create_network

        return Classifier(create_network(self.arch), head)


def save_model(run_dir: Path, spec: ModelSpec, model: nn.Module, extra: dict[str, Any],
               reference: Any = None) -> dict[str, Any]:
    """Write the tensors and the config atomically; ``extra`` adds sections (data, train, ...) to config.json, and
    ``reference`` (a float16 array) is the novelty scorer's. Returns the config as written."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if reference is not None:
        tensors[NOVELTY_TENSOR] = torch.from_numpy(reference).contiguous()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "versions": {"tlearn": __version__, "torch": torch.__version__,
                           "timm": importlib.metadata.version("timm")},
              "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "model": dataclasses.asdict(spec), **extra}
    text = json.dumps(config, indent=2) + "\n"
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "config": text})
    atomic_write_text(run_dir / CONFIG_FILE, text)
    return json.loads(text)


MAX_CONFIG_BYTES = 16 << 20  # a run's config.json is kilobytes; more is not a config tlearn wrote
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 1024  # characters
CROP_MODES = ("center", "squash", "border")
SECTIONS = {"backbone": BackboneConfig, "train": TrainConfig, "augment": AugmentConfig, "data": DataConfig,
            "decision": Decision}  # the config sections that are config dataclasses


@dataclass
class SavedRun:
    """A run folder read and validated without loading a tensor: its config (the one inside the model file), the
    model spec, and the name → (dtype, shape) of every tensor from the safetensors header."""

    run_dir: Path
    config: dict[str, Any]
    spec: ModelSpec
    header: dict[str, tuple[str, tuple[int, ...]]]


def read_run(run_dir: Path | str) -> SavedRun:
    """The one validated reading of a run folder, which ``load``, ``predict``, ``evaluate`` and the report all use.

    The safetensors header is read first; then the config inside it is checked against the schema (types, ranges,
    sizes) and against the header's tensor names, shapes and dtypes, before anything is allocated. Every problem
    is a TlearnError that names the file and the field."""
    from safetensors import SafetensorError, safe_open

    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not run_dir.is_dir():
        exported = run_dir.suffix.lower() == ".onnx" and run_dir.is_file()
        raise TlearnError(f"{run_dir} is an exported ONNX graph, not a run folder: load it with "
                          "tlearn.predictor.Predictor.load, as `tlearn predict` and `tlearn serve` do" if exported
                          else f"{run_dir} is not a run folder (no such folder); give the --out folder of "
                          "`tlearn train`")
    if not path.is_file() and not path.is_symlink():
        what = "the run did not finish saving, so retrain it" if (run_dir / CONFIG_FILE).is_file() else \
            "is this a run folder written by `tlearn train`?"
        raise TlearnError(f"{path} is missing: {what}")
    try:
        require_regular(path)
        with safe_open(str(path), framework="numpy") as f:
            embedded = (f.metadata() or {}).get("config")
            header = {k: (sl.get_dtype(), tuple(sl.get_shape())) for k in f.keys() for sl in [f.get_slice(k)]}
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
    if spec.kind == "head":  # the head's layout is known here; other kinds are checked when built, on no memory
        compare_tensors(head_tensors(spec) | novelty_tensor(spec), header, spec, path)
    elif spec.novelty is not None:  # the scorer's tensor here; the network's are checked when it is built
        compare_tensors(novelty_tensor(spec), {k: v for k, v in header.items() if k == NOVELTY_TENSOR}, spec, path)
    _check_sections(config, spec, path)
    return SavedRun(run_dir, config, spec, header)


def read_config(run_dir: Path, text: str | None = None) -> dict[str, Any]:
    """The run's config from ``config.json``, or from ``text`` (the copy inside model.safetensors)."""
    path = run_dir / (CONFIG_FILE if text is None else MODEL_FILE)
    if text is None and not path.is_file():
        raise TlearnError(f"{run_dir} is not a tlearn model folder: {CONFIG_FILE} is missing")
    try:
        if text is None:
            require_regular(path)
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise TlearnError(f"{path} is {path.stat().st_size:,} bytes, far more than a tlearn config; "
                                  "restore the run's config.json")
            text = path.read_text(encoding="utf-8")
        if len(text) > MAX_CONFIG_BYTES:
            raise TlearnError(f"{path}: its config is {len(text):,} characters, far more than tlearn writes")
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise TlearnError(f"{path} is damaged (its config is not valid JSON: {e}); retrain or restore the run") from e
    except OSError as e:
        raise TlearnError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise TlearnError(f"{path} is not a tlearn model config (no \"format\": \"{FORMAT}\")")
    version = config.get("format_version", 0)
    if type(version) is not int or version < 0:
        raise TlearnError(f"{path}: \"format_version\" must be a whole number, not {version!r}")
    if version > FORMAT_VERSION:
        raise TlearnError(f"{path} was written by a newer tlearn (format {version}); upgrade tlearn")
    return config


def spec_of(config: dict[str, Any], where: Path) -> ModelSpec:
    """The validated model spec of a run's config (``where`` names the file in errors): types, then ranges."""
    m = config.get("model")
    if not isinstance(m, dict):
        raise TlearnError(f"{where} has no \"model\" section; retrain")
    m = dict(m)
    if m.get("backbone") is not None:
        m["backbone"] = from_dict(BackboneConfig, m["backbone"], f"{where}, model.backbone")
        validate_at(f"{where}, model.backbone", m["backbone"])
    spec = from_dict(ModelSpec, m, f"{where}, model")
    problems = []
    classes = spec.classes
    if not 2 <= len(classes) <= MAX_CLASSES or not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME
                                                       for c in classes):
        problems.append(f"\"classes\" must list 2 to {MAX_CLASSES:,} names of 1 to {MAX_CLASS_NAME} characters")
    elif len(set(classes)) != len(classes):
        problems.append("\"classes\" must be distinct")
    if spec.kind not in KINDS:
        problems.append(f"\"kind\" must be one of {', '.join(KINDS)}, not {spec.kind!r}")
    if not 0 <= spec.num_features <= MAX_WIDTH or not 0 <= spec.hidden <= MAX_WIDTH:
        problems.append(f"\"num_features\" and \"hidden\" must be 0 to {MAX_WIDTH:,}")
    if spec.kind != "scratch" and spec.num_features < 1:
        problems.append("\"num_features\" must be at least 1 for a head on a base")
    if not 0 <= spec.dropout < 1:
        problems.append(f"\"dropout\" must be in [0, 1), not {spec.dropout!r}")
    if not spec.temperature > 0:
        problems.append(f"\"temperature\" must be a positive number, not {spec.temperature!r}")
    if not spec.views or not all(isinstance(v, str) for v in spec.views) or not set(spec.views) <= set(VIEWS):
        problems.append(f"\"views\" must be a non-empty list of {', '.join(VIEWS)}, not {spec.views!r}")
    problems += preprocessing_problems(spec.preprocessing, "preprocessing")
    if spec.novelty is not None:
        problems += novelty_problems(spec.novelty, spec.num_features if spec.kind != "scratch" else None)
    if spec.multi_label:
        problems += labelling_problems(spec.temperatures, spec.thresholds, len(spec.classes))
    for i, base in enumerate(spec.bases):
        if not (isinstance(base, dict) and isinstance(base.get("name"), str) and isinstance(base.get("identity"), dict)
                and isinstance(base["identity"].get("preprocessing"), dict)):
            problems.append(f"\"bases\"[{i}] must be {{\"name\": ..., \"identity\": {{\"preprocessing\": ...}}}}")
            continue
        problems += preprocessing_problems(base["identity"]["preprocessing"], f"bases[{i}].identity.preprocessing")
    if problems:
        raise TlearnError(f"{where}, model: " + "; ".join(problems[:5]) + "; retrain or restore the run")
    return spec


def preprocessing_problems(pp: dict[str, Any], name: str) -> list[str]:
    """What is wrong with a preprocessing dict (timm's data config), for the config field ``name``."""
    def numbers(v: Any, n: int) -> bool:
        return isinstance(v, list | tuple) and len(v) == n and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)

    size = pp.get("input_size")
    problems = []
    if not (numbers(size, 3) and all(isinstance(x, int) for x in size) and size[0] == 3
            and all(8 <= x <= 4096 for x in size[1:])):
        problems.append(f"\"{name}.input_size\" must be [3, height, width] with sides of 8 to 4096 pixels")
    if pp.get("interpolation") not in RESAMPLE:
        problems.append(f"\"{name}.interpolation\" must be one of {', '.join(RESAMPLE)}")
    if not numbers(pp.get("mean"), 3) or not numbers(pp.get("std"), 3) or min(pp["std"]) <= 0:
        problems.append(f"\"{name}.mean\" and \"std\" must be three finite numbers, std above 0")
    crop = pp.get("crop_pct", 1.0)
    if not (isinstance(crop, int | float) and not isinstance(crop, bool) and 0.1 <= crop <= 2):
        problems.append(f"\"{name}.crop_pct\" must be a number from 0.1 to 2")
    if pp.get("crop_mode", "center") not in CROP_MODES:
        problems.append(f"\"{name}.crop_mode\" must be one of {', '.join(CROP_MODES)}")
    return problems


def labelling_problems(temperatures: Any, thresholds: Any, classes: int) -> list[str]:
    """What is wrong with a multi-label model's temperatures (each above 0) and thresholds (each in [0, 1]), one of
    each a class."""
    def numbers(values: Any, ok: Callable[[float], bool]) -> bool:
        return isinstance(values, list) and len(values) == classes and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and ok(v) for v in values)

    problems = []
    if not numbers(temperatures, lambda v: v > 0):
        problems.append(f"\"temperatures\" must list {classes} finite numbers above 0, one a class")
    if not numbers(thresholds, lambda v: 0 <= v <= 1):
        problems.append(f"\"thresholds\" must list {classes} numbers from 0 to 1, one a class")
    return problems


def validate_at(where: str, config: Any) -> None:
    problems = config.problems()
    if problems:
        raise TlearnError(f"{where}: " + "; ".join(problems[:5]))


def _check_sections(config: dict[str, Any], spec: ModelSpec, where: Path) -> None:
    """The config's other sections: each config dataclass typed and in range, the data summary's counts naming
    the model's classes, and the plain numbers numbers."""
    for key, cls in SECTIONS.items():
        if key in config:
            section = from_dict(cls, config[key], f"{where}, {key}")
            if hasattr(section, "problems"):
                validate_at(f"{where}, {key}", section)
    summary = config.get("data_summary")
    if summary is not None:
        counts = summary.get("counts") if isinstance(summary, dict) else None
        ok = isinstance(counts, dict) and isinstance(summary.get("root"), str) and all(
            isinstance(per_class, dict) and set(per_class) == set(spec.classes)
            and all(type(n) is int and n >= 0 for n in per_class.values()) for per_class in counts.values())
        if not ok:
            raise TlearnError(f"{where}, data_summary: \"counts\" must give a count of images per split for each "
                              "of the model's classes; retrain or restore the run")
    for key in ("train_seconds", "best_epoch"):
        if key in config and type_problem(config[key], "float"):
            raise TlearnError(f"{where}: {key!r} {type_problem(config[key], 'float')}")
    params = config.get("params", {})
    if not isinstance(params, dict) or not all(type(v) is int for v in params.values()):
        raise TlearnError(f"{where}: \"params\" must map names to whole numbers")


def novelty_problems(config: Any, width: int | None) -> list[str]:
    """What is wrong with a saved novelty config (``width``: the features the head takes, where the spec says)."""
    if not isinstance(config, dict):
        return ["\"novelty\" must be an object"]

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    problems = []
    if not isinstance(config.get("kind"), str):
        problems.append("\"novelty.kind\" must name the scorer")
    for key in ("k", "rows", "features"):
        if type(config.get(key)) is not int or not 1 <= config[key] <= MAX_WIDTH:
            problems.append(f"\"novelty.{key}\" must be a whole number from 1 to {MAX_WIDTH:,}")
    pairs = [config.get("center"), config.get("scale")]
    if not all(isinstance(p, list) and len(p) == 2 and all(number(v) for v in p) for p in pairs) \
            or min(pairs[1]) <= 0:
        problems.append("\"novelty.center\" and \"scale\" must be two finite numbers each, the scales above 0")
    if not number(config.get("threshold")):
        problems.append("\"novelty.threshold\" must be a finite number")
    if not (number(config.get("accept")) and 0 < config["accept"] <= 1):
        problems.append("\"novelty.accept\" must be in (0, 1]")
    if not isinstance(config.get("fitted_on", ""), str) or not isinstance(config.get("with_energy", True), bool):
        problems.append("\"novelty.fitted_on\" must be text and \"with_energy\" true or false")
    if width is not None and config.get("features") != width:
        problems.append(f"\"novelty.features\" must be the {width} features the head takes")
    return problems


def novelty_tensor(spec: ModelSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The novelty scorer's tensor as the spec describes it (none for a model saved without one)."""
    if spec.novelty is None:
        return {}
    return {NOVELTY_TENSOR: ("F16", (spec.novelty["rows"], spec.novelty["features"]))}


def head_tensors(spec: ModelSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors of a head (``models.make_head``'s layout): Dropout, Linear[, ReLU, Dropout, Linear]."""
    n = len(spec.classes)
    if spec.hidden:
        shapes = {"1.weight": (spec.hidden, spec.num_features), "1.bias": (spec.hidden,),
                  "4.weight": (n, spec.hidden), "4.bias": (n,)}
    else:
        shapes = {"1.weight": (n, spec.num_features), "1.bias": (n,)}
    return {k: ("F32", v) for k, v in shapes.items()}


def compare_tensors(expected: dict[str, tuple[str, tuple[int, ...]]], header: dict[str, tuple[str, tuple[int, ...]]],
                    spec: ModelSpec, path: Path) -> None:
    """Every tensor the spec needs is in the file, with its shape and dtype, and nothing else is."""
    if set(expected) != set(header):
        missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise TlearnError(f"{path} does not match its config: missing tensors {missing[:5]}, unexpected "
                          f"{unexpected[:5]}; retrain or restore the run")
    for k, (dtype, shape) in expected.items():
        if header[k][1] != shape:
            raise TlearnError(f"{path}: tensor {k} has shape {header[k][1]} but the config ({len(spec.classes)} "
                              f"classes, {spec.num_features} features, {spec.hidden} hidden) needs {shape}")
        if header[k][0] != dtype:
            raise TlearnError(f"{path}: tensor {k} is {header[k][0]}, but a tlearn model stores it as {dtype}")


_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
           "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def load_model(run_dir: Path) -> tuple[ModelSpec, nn.Module, dict[str, Any]]:
    """Read a saved model back: ``read_run``'s checks, then the module built on the meta device (no memory)
    and compared tensor by tensor with the file, and only then built for real and filled."""
    import torch
    from safetensors import SafetensorError, safe_open

    run = read_run(run_dir)
    spec, path = run.spec, Path(run_dir) / MODEL_FILE
    with torch.device("meta"):
        shapes = spec.build()
    expected = {k: (_DTYPES.get(str(v.dtype).removeprefix("torch."), str(v.dtype)), tuple(v.shape))
                for k, v in shapes.state_dict().items()}
    compare_tensors(expected | novelty_tensor(spec), run.header, spec, path)
    model = spec.build()
    try:  # the network's tensors only: the novelty reference is read where it is used (``load_reference``)
        with safe_open(str(path), framework="pt") as f:
            model.load_state_dict({k: f.get_tensor(k) for k in f.keys() if k != NOVELTY_TENSOR})
    except (OSError, RuntimeError, SafetensorError) as e:
        raise TlearnError(f"{path} is damaged ({e}); retrain or restore the run") from e
    return spec, model.eval(), run.config


def load_reference(run_dir: Path, spec: ModelSpec) -> Any:
    """The novelty scorer's reference features (a float16 array, shape and dtype checked by ``read_run``), or None
    for a model saved without one."""
    from safetensors import SafetensorError, safe_open

    if spec.novelty is None:
        return None
    path = Path(run_dir) / MODEL_FILE
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(NOVELTY_TENSOR)
    except (SafetensorError, OSError, ValueError) as e:
        raise TlearnError(f"{path} is damaged ({e}); retrain or restore the run") from e
