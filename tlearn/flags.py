"""The ``tlearn`` command's flags: generated from the config dataclasses' fields (name, type, default and help),
so that the CLI, the Python API and the saved run share one declaration of each setting. A verb's own flags
(paths, ``--out``, ``--tta``, ...) are declared here too, beside the configs it takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from tlearn.config import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    InferenceConfig,
    OutputConfig,
    RuntimeConfig,
    TrainConfig,
)

LABEL_FILE_FLAGS = ("images", "path_column", "label_column", "multi_label", "label_delimiter", "skip_bad_rows")
DEFAULT_INPUT_SIZE = 224  # the input size of the default backbone, pinned to timm's cfg by a test
RUN = "a run folder written by `tlearn train`"


def config(cls: type, args: argparse.Namespace) -> Any:
    """The ``cls`` config of the parsed flags (fields a verb has no flag for keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def add_fields(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), only: tuple[str, ...] = (),
               defaults: dict[str, Any] | None = None) -> None:
    """A flag for each field of ``cls`` (``only`` some, or all but ``skip``), with the field's type, default (or
    the verb's own, from ``defaults``) and help."""
    group = parser.add_argument_group(cls.__doc__.split("\n")[0].rstrip("."))
    for f in dataclasses.fields(cls):
        if f.name in skip or (only and f.name not in only):
            continue
        help_text, default = f.metadata.get("help", ""), (defaults or {}).get(f.name, f.default)
        if f.metadata.get("positional"):  # optional where the field can come from a flag (DATA: --label-file)
            parser.add_argument(f.name, metavar=f.name.upper() if f.name != "path" else "DATA", help=help_text,
                                nargs="?", default=f.default)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind.startswith("bool"):  # bool, or bool | None where None means "the preset decides"
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            caster = whole() if kind.startswith("int") else number if kind.startswith("float") else str
            group.add_argument(flag, dest=f.name, type=caster, default=default,
                               help=help_text if "(default:" in help_text else f"{help_text} (default: {default})")


def whole(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number written in ASCII digits (``int()`` also takes "²" and "١"), from ``lo`` to
    ``hi`` where given."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", text.strip()):
            raise argparse.ArgumentTypeError(f"must be a whole number in digits 0-9, not {text!r}")
        value = int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, not {value}" if hi is not None
                                             else f"must be {lo} or more, not {value}")
        return value

    return parse


def number(text: str) -> float:
    """An argparse type: a finite number written in ASCII (``float()`` also takes "nan", "inf" and "١.٥")."""
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"must be a finite number such as 0.001 or 1e-3, not {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def build(verbs: list[Callable]) -> argparse.ArgumentParser:
    """The parser of every verb in ``verbs`` (plain functions of the parsed flags; the help comes from their
    docstrings)."""
    from tlearn import __version__

    parser = argparse.ArgumentParser(prog="tlearn", description="Transfer learning for image classification: a "
                                     "folder of images → a trained, evaluated, deployable classifier.")
    parser.add_argument("--version", action="version", version=f"tlearn {__version__}")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for fn in verbs:
        doc = fn.__doc__.strip()
        name = fn.__name__.strip("_").replace("_", "-")
        sub = subparsers.add_parser(name, help=doc.split("\n")[0], description=doc)
        sub.set_defaults(func=fn)
        FLAGS[name](sub)
    return parser


def _training(p: argparse.ArgumentParser, compare: bool = False) -> None:
    add_fields(p, DataConfig)
    if compare:
        p.add_argument("--models", required=True, help="comma-separated models: small-cnn, alexnet, "
                       "logreg-pixels (from scratch), or BACKBONE:MODE with MODE auto, features, frozen or finetune "
                       "(alexnet:features is the pretrained AlexNet)")
    add_fields(p, BackboneConfig)
    add_fields(p, TrainConfig, skip=("seed",))
    add_fields(p, AugmentConfig)
    add_fields(p, RuntimeConfig)
    add_fields(p, OutputConfig, skip=("resume",) if compare else ())
    p.add_argument("--out", help="folder to write (default: runs/<data folder>-<date>-<time>)")
    if not compare:
        p.add_argument("--devices", type=whole(1, 1024), default=1, help="train data-parallel in this many "
                       "processes (one per GPU with CUDA, else CPU processes); --batch-size stays the effective "
                       "batch (default: 1)")


def _check(p: argparse.ArgumentParser) -> None:
    add_fields(p, DataConfig)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--strict", action="store_true", help="exit with status 2 when there are blocking findings")
    p.add_argument("--fix-report", metavar="CSV", help="write the files worth setting aside to this CSV, with "
                   "--labels' suspects among them (nothing is moved)")
    p.add_argument("--overwrite", action="store_true", help="replace --fix-report even if tlearn did not write it")
    p.add_argument("--backbone", help="flag images smaller than this backbone's input (default: "
                   f"{DEFAULT_INPUT_SIZE} px, {BackboneConfig.backbone}'s)")
    p.add_argument("--labels", action="store_true", help="also list suspected mislabels: images whose folder "
                   "disagrees with a model trained without them (confident learning on the backbone's features; "
                   "nothing is moved)")
    p.add_argument("--outliers", action="store_true", help="also list the images least like the rest of their "
                   "class (the mean cosine distance of the backbone's features to their nearest others of the class, "
                   "each image left out of its own score), most unusual first; nothing is moved")
    p.add_argument("--near-threshold", type=whole(0, 64), default=4, help="largest difference-hash distance (of "
                   "64 bits) between near duplicates (default: 4)")


def _augment_preview(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--n", type=whole(1, 64), default=8, help="how many augmented versions, 1 to 64 (default: 8)")
    p.add_argument("--out", default="augment_preview.png", help="PNG file to write (default: augment_preview.png)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="preprocess for this backbone's input")
    p.add_argument("--model", choices=("small-cnn", "alexnet"), help="preprocess for this scratch model instead")
    p.add_argument("--seed", type=whole(0, 2**32 - 1), default=0, help="seed of the random augmentations (default: 0)")
    add_fields(p, AugmentConfig)


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("data", metavar="DATA", nargs="?", help="folder or label file to evaluate on (default: the run's "
                   "test split)")
    p.add_argument("--tta", action="store_true", help="also evaluate with test-time augmentation (centre, mirrored, "
                   "four corners; mean logits) and show both")
    p.add_argument("--unknown", dest="unknown_folder", metavar="FOLDER", help="photos of things the model was not "
                   "trained on: report how well the novelty score tells them from the test split (AUROC) and the "
                   "share of each called unknown")
    add_fields(p, InferenceConfig, skip=("top_k", "unknown"))
    add_fields(p, RuntimeConfig)
    add_fields(p, DataConfig, only=LABEL_FILE_FLAGS)


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help=RUN)


def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", metavar="PATH", nargs="+", help="RUN followed by image files or folders (with "
                   "--from-list, RUN alone will do)")
    p.add_argument("--imagenet", action="store_true", help="use the backbone's own ImageNet head, not a run")
    p.add_argument("--plot", metavar="PNG", help="also draw each image beside a bar chart of its top-k classes")
    p.add_argument("--no-calibration", action="store_true", help="raw softmax probabilities, without the run's "
                   "temperature scaling")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: mean logits of the centre crop, its "
                   "mirror image and four corner crops")
    p.add_argument("--out", metavar="FILE", help="write one row an image to FILE (.csv, .jsonl, or .parquet with "
                   "pyarrow) as it goes, in input order, with a progress bar, instead of printing the results")
    p.add_argument("--resume", action="store_true", help="with --out: continue the file, predicting only the images "
                   "not already in it")
    p.add_argument("--from-list", metavar="TXT", help="also predict the paths listed in TXT, one a line (relative "
                   "ones from TXT's folder; blank lines and lines starting with # skipped)")
    p.add_argument("--overwrite", action="store_true", help="replace --out or --plot even if tlearn did not write it")
    p.add_argument("--devices", type=whole(1, 1024), default=1, help="with --out: predict in this many processes "
                   "(one a GPU with CUDA, else CPU processes sharing the cores), each taking every N-th image; "
                   "the parts are merged into --out in input order")
    add_fields(p, InferenceConfig, skip=("weights",))  # BackboneConfig's --weights: the same file
    add_fields(p, BackboneConfig, skip=("pretrained",))
    add_fields(p, RuntimeConfig)


def _explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", metavar="PATH", nargs="+", help="RUN followed by image files or folders")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="show the evidence for this class, or label "
                   "of a model of several labels an image (default: each image's most probable one)")
    p.add_argument("--out", default="heatmaps", help="folder to write IMAGE.heatmap.png files into (default: "
                   "heatmaps); only earlier heatmaps are ever replaced")
    add_fields(p, InferenceConfig, skip=("unknown",))
    add_fields(p, RuntimeConfig)


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help=RUN)
    p.add_argument("--format", choices=("onnx",), default="onnx", help="the file format (default: onnx)")
    p.add_argument("--out", help="the .onnx file to write, with a .json sidecar beside it (default: RUN.onnx, or "
                   "RUN-int8.onnx with --int8, next to the run folder)")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (ONNX Runtime static quantization); its "
                   "accuracy is measured and printed next to fp32's")
    p.add_argument("--data", metavar="DATA", help="labelled images (class sub-folders, or a label file) to check and "
                   "measure the export on (default: the run's test split, or validation where it has none)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier export")
    add_fields(p, InferenceConfig, only=("weights",))
    add_fields(p, RuntimeConfig, only=("cache_dir",))
    add_fields(p, DataConfig, only=LABEL_FILE_FLAGS)


def _serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help=f"{RUN}, or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=whole(1, 65535), default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--runtime", choices=("auto", "onnx", "torch"), default="auto", help="auto: the predictor's "
                   "choice; onnx: the whole classifier as one ONNX graph (exported once, lowest latency on a CPU); "
                   "torch: PyTorch (default: auto)")
    p.add_argument("--max-upload-mb", type=number, default=20, help="largest request body in MiB; larger ones get "
                   "HTTP 413 (default: 20)")
    p.add_argument("--api-key-file", metavar="FILE", help="accept only requests that carry one of the keys in FILE "
                   "(one a line) as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'; the environment variable "
                   "TLEARN_API_KEY adds one. The page and /health stay open")
    p.add_argument("--no-auth", action="store_true", help="serve without a key on an address reachable from the "
                   "network (refused otherwise)")
    p.add_argument("--max-queue", type=whole(1, 1_000_000), metavar="N", help="images that may wait in one server "
                   "process; a request beyond them gets HTTP 503 with Retry-After at once (default: about 3 s of "
                   "work, measured at the start)")
    p.add_argument("--timeout", type=number, default=30, metavar="S", help="seconds to answer a request, after "
                   "which it gets HTTP 504 and its work is dropped (default: 30)")
    p.add_argument("--processes", type=whole(1, 256), default=1, metavar="N", help="server processes sharing the "
                   "port, each with the model loaded once and its share of the cores (default: 1)")
    p.add_argument("--log-names", action="store_true", help="name the uploaded files in the access log (left out "
                   "by default)")
    add_fields(p, InferenceConfig, only=("weights", "device", "top_k", "unknown"), defaults={"top_k": 5})
    add_fields(p, RuntimeConfig, only=("cache_dir",))


def _split(p: argparse.ArgumentParser) -> None:
    add_fields(p, DataConfig, skip=("split_manifest",))
    p.add_argument("dest", metavar="DEST", help="new folder to write train/, validation/ and test/ into; or a new "
                   ".csv file to write a label file with a split column to")


def _backbones(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON")


FLAGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train": _training, "compare": lambda p: _training(p, compare=True), "check": _check,
    "augment-preview": _augment_preview, "evaluate": _evaluate, "report": _report, "predict": _predict,
    "explain": _explain, "export": _export, "serve": _serve, "split": _split, "backbones": _backbones}
