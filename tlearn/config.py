"""Typed configuration shared by the CLI, the Python API and the saved run's ``config.json``.

Each field carries its help text in ``metadata["help"]``; the CLI builds its flags from these fields, so a
flag, an API keyword and a ``config.json`` key always have the same name and the same default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_WIDTH = 1 << 16  # hidden units of a head, and features of a base


class TlearnError(Exception):
    """A problem the user can fix: the message names the argument, file or folder, and says what to do."""


def _f(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - "help" reads best at the call sites
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DataConfig:
    """Where the images are and how they are split into train, validation and test."""

    path: str = _f("", "image folder: one sub-folder per class, or train/ + validation/ (or val/) [+ test/]; or a "
                   "label file (.csv, .tsv or .jsonl: an image path and its label(s) per row)", positional=True)
    val: float = _f(0.15, "fraction of each class held out for validation when the folder is not split")
    test: float = _f(0.15, "fraction of each class held out for testing when the folder is not split (0 for none)")
    seed: int = _f(0, "seed of the stratified split (for `tlearn train`, also of initialisation and shuffling)")
    split_manifest: str | None = _f(None, "reuse the split in this CSV manifest (path,class,split) from an earlier run")
    label_file: str | None = _f(None, "a label file (.csv, .tsv or .jsonl), as DATA may be")
    images: str | None = _f(None, "folder the label file's relative paths start from (default: the file's folder)")
    path_column: str | None = _f(None, "the label file's path column (default: path, file, filename, image, id...)")
    label_column: str | None = _f(None, "the label file's label column (default: label, labels, class, tags...)")
    multi_label: bool | None = _f(None, "several labels an image (default: detected from the label file)")
    label_delimiter: str | None = _f(None, "what joins several labels in one cell (default: ';' or '|')")
    skip_bad_rows: bool = _f(False, "leave out the label file's bad rows (listed in skipped.csv) instead of stopping")

    def problems(self) -> list[str]:
        out = []
        if not self.path and not self.label_file:
            out.append("DATA is required: the folder that holds one sub-folder per class, or a label file")
        if self.path and self.label_file:
            out.append(f"give the label file once: as DATA or as --label-file. Received: {self.path} and "
                       f"--label-file {self.label_file}")
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

    backbone: str = _f("efficientnet_lite0", "registered backbone (see `tlearn backbones`) or any timm model name; "
                       "'A+B' concatenates the features of several (modes features and auto); 'alexnet' and "
                       "'squeezenet1_1' are torchvision's ImageNet-pretrained bases (--model alexnet is the "
                       "one trained from scratch)")
    weights: str | None = _f(None, "local weights file (.safetensors, .pth or .bin) for the backbone's architecture")
    pretrained: bool = _f(True, "start from pretrained weights; --no-pretrained uses random weights on purpose")

    def problems(self) -> list[str]:
        out = []
        if not self.backbone:
            out.append("--backbone must name a backbone; `tlearn backbones` lists them")
        if self.weights and not self.pretrained:
            out.append("--weights and --no-pretrained contradict each other: drop one")
        names = self.names()
        if len(names) > 1 and (not all(names) or len(set(names)) != len(names)):
            out.append(f"--backbone A+B must name distinct backbones. Received: backbone={self.backbone!r}")
        if len(names) > 1 and self.weights:
            out.append("--weights gives the weights of one backbone; with --backbone A+B, drop --weights")
        return out

    def names(self) -> list[str]:
        """The backbones whose features are concatenated: 'a+b' -> ['a', 'b']."""
        return [n.strip() for n in self.backbone.split("+")]


HEADS = ("auto", "dense", "logreg")
MODES = ("auto", "features", "frozen", "finetune", "scratch")
SCRATCH_MODELS = ("small-cnn", "alexnet", "logreg-pixels")
OPTIMIZERS = ("adamw", "sgd", "rmsprop")
CLASS_WEIGHTS = ("auto", "balanced", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "onnx")


@dataclass
class TrainConfig:
    """How the model is trained."""

    mode: str = _f("auto", "'features' (head on cached features), 'frozen' (frozen base + augmentation), "
                   "'finetune' (then unfreeze the top stages), 'scratch' (--model from random weights), or 'auto' "
                   "(features first, then a larger base, fine-tuning on cached activations and fine-tuning while "
                   "--time-budget allows, each kept only if the calibrated validation loss improves)")
    model: str = _f("small-cnn", "architecture for --mode scratch: small-cnn, alexnet or logreg-pixels (random "
                    "weights; the pretrained AlexNet is --backbone alexnet)")
    head: str = _f("auto", "head on features: 'logreg' (multinomial logistic regression, its C chosen by "
                   "cross-validation), 'dense' (Dropout + Linear, optional hidden layer), or 'auto' (whichever "
                   "does better on validation, with and without mirrored images)")
    hidden: int = _f(0, "width of an optional hidden ReLU layer in the dense head (0 for none, e.g. 256)")
    dropout: float = _f(0.2, "dropout before each Linear layer of the dense head")
    epochs: int = _f(0, "maximum number of epochs (0: 100 for a head on features, 10 for frozen/finetune, "
                     "50 for scratch)")
    head_epochs: int = _f(100, "finetune: most epochs of the first stage, the head on cached features (early stopping)")
    unfreeze: str = _f("1", "finetune: how many of the base's top stages to train, or 'all'")
    lr: float = _f(1e-3, "learning rate of the head (and of scratch models)")
    lr_mult: str = _f("0.1,0.01", "finetune: learning-rate factors of the top unfrozen stage and of deeper ones")
    optimizer: str = _f("adamw", "adamw, sgd (momentum 0.9) or rmsprop")
    weight_decay: float = _f(1e-4, "weight decay")
    batch_size: int = _f(32, "mini-batch size")
    warmup_epochs: float = _f(1.0, "image modes: epochs of linear learning-rate warm-up before the cosine decay")
    patience: int = _f(10, "stop after this many epochs without a better validation loss; the best epoch is kept")
    class_weight: str = _f("auto", "weight the loss by inverse class frequency: 'balanced', 'none', or 'auto' "
                           "(balanced when the largest class has over 1.5x the images of the smallest)")
    precision: str = _f("auto", "fp32, bf16 (autocast, on CPUs and GPUs that support it), fp16 (CUDA), or auto: "
                        "mixed precision on CUDA; on a CPU, fp32 training, and for the frozen base the fastest exact "
                        "path (ONNX Runtime fp32, else bf16 where the CPU has it natively)")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (CUDA when present)")
    time_budget: str = _f("auto", "wall time for the whole run, evaluation and report included, e.g. 90s, 10m, 2h; "
                          "'auto': for --mode auto on a CPU 3x the estimated time of --mode features on this data "
                          "and machine, on a GPU 30m; no limit for the other modes; 'none': no limit")
    auto_small: int = _f(1000, "the strategy table (shown, not binding): below this many training images, "
                         "train a head on features")
    auto_large: int = _f(10000, "the strategy table: from this many training images, fine-tune every stage")
    seed: int = _f(0, "seed of weight initialisation and shuffling")
    accept: float = _f(0.98, "share of validation images that the novelty threshold accepts as like the training "
                       "data; images less like it than that are called unknown")

    def problems(self) -> list[str]:
        out = []
        choices = (("mode", MODES), ("model", SCRATCH_MODELS), ("head", HEADS), ("optimizer", OPTIMIZERS),
                   ("class_weight", CLASS_WEIGHTS), ("precision", PRECISIONS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                out.append(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}. "
                           f"Received: {name}={getattr(self, name)!r}")
        for name in ("batch_size", "patience", "head_epochs"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be at least 1. Received: {name}={getattr(self, name)}")
        if self.epochs < 0:
            out.append(f"--epochs must be 0 (the mode's default) or more. Received: epochs={self.epochs}")
        if self.unfreeze != "all" and not (re.fullmatch("[0-9]{1,4}", self.unfreeze) and int(self.unfreeze) >= 1):
            out.append("--unfreeze must be a number of stages (1 or more) or 'all'. "
                       f"Received: unfreeze={self.unfreeze!r}")
        try:
            if not all(0 < v < math.inf for v in parse_lr_mult(self.lr_mult)):
                raise ValueError
        except ValueError:
            out.append(f"--lr-mult must be two positive numbers, e.g. 0.1,0.01. Received: lr_mult={self.lr_mult!r}")
        try:
            parse_duration(self.time_budget)
        except ValueError:
            out.append(f"--time-budget must be a duration such as 90s, 10m or 2h, or 'auto' or 'none'. "
                       f"Received: time_budget={self.time_budget!r}")
        if self.head == "logreg" and self.mode not in ("features", "auto"):
            out.append(f"--head logreg works with --mode features only. Received: mode={self.mode!r}")
        if not 0 <= self.hidden <= MAX_WIDTH:
            out.append(f"--hidden must be 0 to {MAX_WIDTH}. Received: hidden={self.hidden}")
        for name, top in (("epochs", 100_000), ("head_epochs", 100_000), ("patience", 100_000),
                          ("batch_size", 65_536), ("auto_small", 10**9), ("auto_large", 10**9)):
            if getattr(self, name) > top:
                out.append(f"--{name.replace('_', '-')} must be at most {top:,}. Received: {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            out.append(f"--seed must be 0 to {2**32 - 1}. Received: seed={self.seed}")
        if not 0 <= self.dropout < 1:
            out.append(f"--dropout must be in [0, 1). Received: dropout={self.dropout}")
        if not 0.5 <= self.accept <= 1:
            out.append(f"--accept must be from 0.5 to 1 (the share of images like the training data to accept). "
                       f"Received: accept={self.accept}")
        if self.lr <= 0:
            out.append(f"--lr must be positive. Received: lr={self.lr}")
        if self.weight_decay < 0:
            out.append(f"--weight-decay must be 0 or more. Received: weight_decay={self.weight_decay}")
        if self.warmup_epochs < 0:
            out.append(f"--warmup-epochs must be 0 or more. Received: warmup_epochs={self.warmup_epochs}")
        if not 0 < self.auto_small <= self.auto_large:
            out.append(f"--auto-small must be positive and at most --auto-large. "
                       f"Received: auto_small={self.auto_small}, auto_large={self.auto_large}")
        if not re.fullmatch("auto|cpu|cuda(:[0-9]{1,3})?", self.device):
            out.append(f"--device must be auto, cpu, cuda or cuda:N. Received: device={self.device!r}")
        return out

    def max_epochs(self, mode: str) -> int:
        return self.epochs or {"features": 100, "scratch": 50}.get(mode, 10)


FILL_MODES = ("nearest", "reflect", "constant", "wrap")
AUGMENT_PARAMS: dict[str, dict[str, Any]] = {
    "none": {"rotation_range": 0.0, "width_shift_range": 0.0, "height_shift_range": 0.0, "shear_range": 0.0,
             "zoom_range": 0.0, "horizontal_flip": False, "vertical_flip": False, "brightness_range": None,
             "fill_mode": "nearest"},
    "light": {"rotation_range": 10.0, "width_shift_range": 0.1, "height_shift_range": 0.1, "shear_range": 0.0,
              "zoom_range": 0.1, "horizontal_flip": True, "vertical_flip": False, "brightness_range": None,
              "fill_mode": "nearest"},
    # Deep Learning with Python, 5.2.5; its shear_range=0.2 was radians in the Keras of the time: 11.5 degrees.
    "default": {"rotation_range": 40.0, "width_shift_range": 0.2, "height_shift_range": 0.2, "shear_range": 11.5,
                "zoom_range": 0.2, "horizontal_flip": True, "vertical_flip": False, "brightness_range": None,
                "fill_mode": "nearest"},
    "strong": {"rotation_range": 40.0, "width_shift_range": 0.25, "height_shift_range": 0.25, "shear_range": 20.0,
               "zoom_range": 0.3, "horizontal_flip": True, "vertical_flip": False, "brightness_range": "0.7,1.3",
               "fill_mode": "reflect"},
}

AUGMENT_PRESETS = tuple(AUGMENT_PARAMS)


@dataclass
class AugmentConfig:
    """Data augmentation for the image modes, with the parameters of Keras's ImageDataGenerator. Each parameter
    left unset takes the value of the --augment preset."""

    augment: str = _f("default", "preset: none, light, default (Deep Learning with Python's values) or strong")
    rotation_range: float | None = _f(None, "random rotation in degrees, up to this many either way")
    width_shift_range: float | None = _f(None, "random horizontal shift, as a fraction of the width")
    height_shift_range: float | None = _f(None, "random vertical shift, as a fraction of the height")
    shear_range: float | None = _f(None, "random shear angle in degrees, up to this many either way")
    zoom_range: float | None = _f(None, "random zoom in [1 - z, 1 + z]")
    horizontal_flip: bool | None = _f(None, "flip half of the images left to right")
    vertical_flip: bool | None = _f(None, "flip half of the images upside down")
    brightness_range: str | None = _f(None, "random brightness factor range, e.g. 0.8,1.2")
    fill_mode: str | None = _f(None, "how to fill pixels moved in from outside: nearest, reflect, constant, wrap")

    def problems(self) -> list[str]:
        out = []
        if self.augment not in AUGMENT_PRESETS:
            out.append(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}. Received: augment={self.augment!r}")
        if self.fill_mode is not None and self.fill_mode not in FILL_MODES:
            out.append(f"--fill-mode must be one of {', '.join(FILL_MODES)}. Received: fill_mode={self.fill_mode!r}")
        for name in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range"):
            v = getattr(self, name)
            if v is not None and v < 0:
                out.append(f"--{name.replace('_', '-')} must be 0 or more. Received: {name}={v}")
        for name, top in (("rotation_range", 360), ("shear_range", 80)):
            v = getattr(self, name)
            if v is not None and v > top:
                out.append(f"--{name.replace('_', '-')} must be at most {top} degrees. Received: {name}={v}")
        for name in ("width_shift_range", "height_shift_range", "zoom_range"):
            v = getattr(self, name)
            if v is not None and v >= 1:
                out.append(f"--{name.replace('_', '-')} must be below 1. Received: {name}={v}")
        if self.brightness_range is not None:
            try:
                lo, hi = (float(v) for v in self.brightness_range.split(","))
                if not 0 < lo <= hi < math.inf:
                    raise ValueError
            except ValueError:
                out.append(f"--brightness-range must be two factors lo,hi with 0 < lo <= hi, e.g. 0.8,1.2. "
                           f"Received: brightness_range={self.brightness_range!r}")
        return out

    def resolved(self) -> dict[str, Any]:
        """The preset's parameters with every parameter set here taking its place."""
        return {**AUGMENT_PARAMS[self.augment], **{k: v for k, v in vars(self).items()
                                                   if k != "augment" and v is not None}}


@dataclass
class RuntimeConfig:
    """Where the feature cache lives and how extraction runs. Not part of a model's identity."""

    cache_dir: str | None = _f(None, "feature cache folder (default: $TLEARN_CACHE_DIR or ~/.cache/tlearn)")
    runtime: str = _f("auto", "what runs the frozen base: torch, onnx (ONNX Runtime, CPU, fp32), or auto "
                      "(onnx on a CPU when onnxruntime is installed, torch on CUDA)")
    extract_batch_size: int = _f(0, "images per forward pass of the frozen base (0: 8 on a CPU, 64 on CUDA)")
    workers: int | None = _f(None, "parallel image decoding: threads (lanes) for feature extraction and "
                             "prediction, processes for training (default: one per CPU core; 0: none)")

    def problems(self) -> list[str]:
        out = []
        if self.runtime not in RUNTIMES:
            out.append(f"--runtime must be one of {', '.join(RUNTIMES)}. Received: runtime={self.runtime!r}")
        if not 0 <= self.extract_batch_size <= 4096:
            out.append(f"--extract-batch-size must be 0 (automatic) to 4096. Received: {self.extract_batch_size}")
        if self.workers is not None and not 0 <= self.workers <= 256:
            out.append(f"--workers must be 0 to 256. Received: workers={self.workers}")
        return out


@dataclass
class OutputConfig:
    """Where and how the run is written."""

    resume: str | None = _f(None, "continue the interrupted run in this folder from its last completed epoch")
    overwrite: bool = _f(False, "write the run into an --out folder that holds files tlearn did not write (tlearn's "
                         "own files there are replaced, the others kept); without it such a folder is refused")
    tensorboard: bool = _f(False, "also write TensorBoard scalars to RUN/tensorboard (needs the tensorboard package)")

    def problems(self) -> list[str]:
        return []


@dataclass
class InferenceConfig:
    """How a trained model is loaded, where it runs, and what is shown."""

    weights: str | None = _f(None, "the backbone weights file the run was trained with, if it has moved")
    device: str = _f("auto", "where the model runs: cpu, cuda, cuda:N, or auto (CUDA when present); whatever the run "
                     "was trained on")
    precision: str = _f("auto", "fp32, bf16, fp16 (CUDA), or auto (mixed precision on CUDA, the fastest exact path "
                        "on a CPU); whatever the run was trained on")
    top_k: int = _f(3, "how many classes to show per image")
    json: bool = _f(False, "print the results as JSON")
    unknown: bool = _f(True, "give each result's novelty (higher: less like the training data) and whether it is "
                       "unknown (above the model's threshold); --no-unknown leaves both out")

    def problems(self) -> list[str]:
        out = []
        if not re.fullmatch("auto|cpu|cuda(:[0-9]{1,3})?", self.device):
            out.append(f"--device must be auto, cpu, cuda or cuda:N. Received: device={self.device!r}")
        if self.precision not in PRECISIONS:
            out.append(f"--precision must be one of {', '.join(PRECISIONS)}. Received: precision={self.precision!r}")
        if not 1 <= self.top_k <= 100_000:
            out.append(f"--top-k must be 1 or more. Received: top_k={self.top_k}")
        return out


@dataclass
class Decision:
    """What was trained and why; for ``auto``, with the plan and the measured evidence."""

    mode: str
    unfreeze: str
    lr_mult: str
    reason: str
    budget: float | None = None  # seconds
    budget_why: str = ""  # where the budget came from, where auto derived it
    table: str = ""  # the strategy table's recommendation for this data
    plan: list[dict[str, Any]] = field(default_factory=list)  # Step.as_dict() of each step
    measured: dict[str, Any] = field(default_factory=dict)  # what the plan was estimated from


def route_options(configs: tuple[type, ...], options: dict[str, Any], given: Sequence[Any] = ()) -> list[Any]:
    """One instance of each of the ``configs`` classes: the one ``given`` (the CLI hands its configs over as they
    are) or the defaults, with the keyword ``options`` (the flags' names, as the Python API takes them) routed to
    the class that has a field of that name."""
    fields = {f.name: cls for cls in configs for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TlearnError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(fields))}")
    strangers = [type(c).__name__ for c in given if type(c) not in configs]
    if strangers:
        raise TypeError(f"configs of type {', '.join(strangers)} do not belong here: {configs}")
    base = {type(c): c for c in given}
    return [dataclasses.replace(base.get(cls) or cls(), **{k: v for k, v in options.items() if fields[k] is cls})
            for cls in configs]


def check_names(backbone: BackboneConfig, train: TrainConfig) -> None:
    """Several bases (--backbone A+B) are concatenated features, which only a head on features can use."""
    if len(backbone.names()) > 1 and train.mode not in ("features", "auto"):
        raise TlearnError(f"--backbone {backbone.backbone} concatenates the features of several bases, which only a "
                          f"head on features can use: use --mode features or auto. Received: mode={train.mode!r}")


def check_parallel(mode: str, processes: int) -> None:
    """Data-parallel training takes a fixed mode: ``auto`` decides from timings, which differ between processes."""
    if processes > 1 and mode == "auto":
        raise TlearnError(f"with {processes} processes, choose --mode features, frozen, finetune or scratch: mode "
                          "auto decides from timings, which would differ between processes")


def parse_duration(text: str) -> float | None:
    """'90s' -> 90.0, '10m' -> 600.0, '2h' -> 7200.0, '45' -> 45.0 (seconds); 'auto' and 'none' -> None."""
    text = text.strip().lower()
    if text in ("auto", "none"):
        return None
    factor = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], 0)
    value = float(text[:-1] if factor else text) * (factor or 1)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


def parse_lr_mult(text: str) -> tuple[float, float]:
    """'0.1,0.01' -> (0.1, 0.01): the learning-rate factors of the top unfrozen stage and of deeper ones."""
    top, deeper = (float(v) for v in text.split(","))
    return top, deeper


def validate(*configs: Any) -> None:
    """Raise one TlearnError that lists every problem in the given configs at once: first each value's type
    (numbers finite), then each config's ranges."""
    _refuse([f"--{f.name.replace('_', '-')} {why}" for c in configs for f in dataclasses.fields(c)
             if (why := type_problem(getattr(c, f.name), str(f.type)))])
    _refuse([p for c in configs for p in c.problems()])


def _refuse(problems: list[str]) -> None:
    """One problem as one line; several as a list."""
    if len(problems) == 1:
        raise TlearnError(problems[0])
    if problems:
        raise TlearnError("invalid arguments:\n  - " + "\n  - ".join(problems))


MAX_TEXT = 10_000  # characters in one string value of a saved config


def type_problem(value: Any, annotation: str) -> str | None:
    """Why ``value`` does not have the type ``annotation`` (a dataclass field's annotation, as text) names, or
    None. Numbers must be finite; nested configs (a class name) must be JSON objects; strings are bounded."""
    for kind in (a.strip() for a in annotation.split("|")):
        if (kind == "None" and value is None) or kind == "Any":
            return None
        if kind == "bool" and isinstance(value, bool):
            return None
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return None
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return None if math.isfinite(value) else f"must be a finite number, not {value!r}"
        if kind == "str" and isinstance(value, str):
            return None if len(value) <= MAX_TEXT else f"is a string of {len(value):,} characters"
        if isinstance(value, list | dict) and kind.startswith(type(value).__name__):  # list[...] or dict[...]
            return None
        if re.fullmatch(r"[A-Z]\w*", kind) and (isinstance(value, dict) or type(value).__name__ == kind):
            return None  # a nested config: a JSON object, or the config itself
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"must be {annotation.replace('|', 'or')}, not {type(value).__name__} {shown}"
