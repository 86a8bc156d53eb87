"""The ``tlearn`` command: one verb → one plain function. Flags come from the config dataclasses' fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlearn import report
from tlearn.config import BackboneConfig, DataConfig, RuntimeConfig, TlearnError, TrainConfig, validate


def train(args: argparse.Namespace) -> None:
    """Train a classifier on a folder of images and write the run (model, metrics, curves) to --out."""
    from tlearn.api import ImageClassifier

    data, bb, tr, rt = (_config(cls, args) for cls in (DataConfig, BackboneConfig, TrainConfig, RuntimeConfig))
    tr.seed = data.seed  # one --seed for the split, the initialisation and the shuffling
    validate(data, bb, tr, rt)
    out = Path(args.out or f"runs/{Path(data.path).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}")
    clf = ImageClassifier(**dataclasses.asdict(bb), **dataclasses.asdict(tr), **dataclasses.asdict(rt))
    options = dataclasses.asdict(data)
    clf.fit(options.pop("path"), out=out, **options)
    for split, metrics in clf.metrics.items():
        print(report.format_metrics(metrics, split), end="\n\n")
    skipped = len(clf.data.skipped)
    print(f"run written to {out}" + (f" ({skipped} file(s) skipped: see {out / 'skipped.csv'})" if skipped else ""))


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate a trained run on its test split, or on DATA (class sub-folders, or a split folder's test/)."""
    from tlearn.api import ImageClassifier

    clf = ImageClassifier.load(args.run, weights=args.weights, verbose=not args.json, **_runtime(args))
    metrics = clf.evaluate(args.data)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(report.format_metrics(metrics, metrics["split"]))


def predict(args: argparse.Namespace) -> None:
    """Top-k predictions for images and folders: `tlearn predict RUN IMAGES...`, or `--imagenet IMAGES...`."""
    from tlearn.api import ImageClassifier, predict_imagenet

    if args.imagenet:
        results = predict_imagenet(args.paths, backbone=args.backbone, weights=args.weights, top_k=args.top_k)
    else:
        if len(args.paths) < 2:
            raise TlearnError("usage: tlearn predict RUN IMAGE [IMAGE ...] (or tlearn predict --imagenet IMAGE ...)")
        clf = ImageClassifier.load(args.paths[0], weights=args.weights, verbose=not args.json, **_runtime(args))
        results = clf.predict(args.paths[1:], top_k=args.top_k)
    print(json.dumps(results, indent=2) if args.json else report.format_predictions(results))
    if results and all("error" in r for r in results):
        raise TlearnError("no image could be read")


def split(args: argparse.Namespace) -> None:
    """Copy (hard-link) a folder of class sub-folders into DEST/train, DEST/validation and DEST/test."""
    from tlearn.data import materialise_split

    data = _config(DataConfig, args)
    validate(data)
    folder = materialise_split(data, Path(args.dest))
    print(report.format_counts(folder.counts()))
    print(f"split written to {args.dest}")


def backbones(args: argparse.Namespace) -> None:
    """List the registered backbones and which have their weights offline."""
    from tlearn.backbones import describe

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(report.table([[r["name"], r["timm"], r["input"], "yes" if r["offline"] else "no", r["weights"], r["about"]]
                        for r in rows], ["backbone", "timm architecture", "input", "offline", "weights", "about"]))
    print("\nAny other timm model name also works, with hub weights (online) or --weights FILE.")


# --- flags from dataclass fields ------------------------------------------------------------------------


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(cls.__doc__.split("\n")[0].rstrip("."))
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper() if f.name != "path" else "DATA", help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        else:
            caster = int if kind.startswith("int") else float if kind.startswith("float") else str
            group.add_argument(flag, dest=f.name, type=caster, default=f.default,
                               help=f"{help_text} (default: {f.default})")


def _config(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    return dataclasses.asdict(_config(RuntimeConfig, args))


def build_parser() -> argparse.ArgumentParser:
    from tlearn import __version__

    parser = argparse.ArgumentParser(prog="tlearn", description="Transfer learning for image classification: a "
                                     "folder of images → a trained, evaluated, deployable classifier.")
    parser.add_argument("--version", action="version", version=f"tlearn {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    def verb(fn: Callable) -> argparse.ArgumentParser:
        doc = fn.__doc__.strip()
        sub = verbs.add_parser(fn.__name__, help=doc.split("\n")[0], description=doc)
        sub.set_defaults(func=fn)
        return sub

    p = verb(train)
    _add_fields(p, DataConfig)
    _add_fields(p, BackboneConfig)
    _add_fields(p, TrainConfig, skip=("seed",))
    _add_fields(p, RuntimeConfig)
    p.add_argument("--out", help="run folder to write (default: runs/<data folder>-<date>-<time>)")

    p = verb(evaluate)
    p.add_argument("run", metavar="RUN", help="a run folder written by `tlearn train`")
    p.add_argument("data", metavar="DATA", nargs="?", help="folder to evaluate on (default: the run's test split)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--weights", help="the backbone weights file the run was trained with, if it has moved")
    _add_fields(p, RuntimeConfig)

    p = verb(predict)
    p.add_argument("paths", metavar="PATH", nargs="+", help="RUN followed by image files or folders")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--imagenet", action="store_true", help="use the backbone's own ImageNet head, not a run")
    _add_fields(p, BackboneConfig, skip=("pretrained",))
    _add_fields(p, RuntimeConfig)

    p = verb(split)
    _add_fields(p, DataConfig, skip=("split_manifest",))
    p.add_argument("dest", metavar="DEST", help="new folder to write train/, validation/ and test/ into")

    p = verb(backbones)
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report.enable_logging()
    try:
        args.func(args)
    except TlearnError as e:
        print(f"tlearn {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlearn {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
