"""The ``tlearn`` command: one verb → one plain function. Flags come from the config dataclasses' fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlearn import report
from tlearn.config import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    RuntimeConfig,
    TlearnError,
    TrainConfig,
    check_parallel,
    validate,
)

START = time.perf_counter()  # the command's start, for the total time it reports
DEFAULT_INPUT_SIZE = 224  # the input size of the default backbone, pinned to timm's cfg by a test
MAX_PLOTTED = 12  # images in one `predict --plot` chart


def train(args: argparse.Namespace) -> None:
    """Train a classifier on a folder of images and write the run (model, metrics, curves) to --out."""
    data, options = _train_options(args)
    if args.devices > 1:
        return _launch(args, data)
    from tlearn.api import ImageClassifier

    out = Path(args.resume or args.out or _default_out(data))
    clf = ImageClassifier(**options)
    clf.fit(data.pop("path"), out=out, started=START, **data)  # the time budget counts from the command's start
    from tlearn import dist

    if not dist.is_main():  # one of several processes: rank 0 reports the run
        return
    for split, metrics in clf.metrics.items():
        print(report.format_metrics(metrics, split), end="\n\n")
    skipped = len(clf.data.skipped)
    print(f"run written to {out} in {time.perf_counter() - START:.1f} s (open "
          f"{out / 'report.html'})" + (f"; {skipped} file(s) skipped: see {out / 'skipped.csv'}" if skipped else ""))


def _launch(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """``--devices N``: this same command as N processes under PyTorch's elastic launcher (what ``torchrun
    --standalone --nproc-per-node N`` runs): one process per GPU with CUDA, else N CPU processes (gloo), each with
    its share of the cores. If one fails, the launcher stops the others; the checkpoint of the last finished
    epoch stays for ``--resume``."""
    import torch

    from tlearn import dist
    from tlearn.features import cpu_cores

    n = args.devices
    check_parallel(args.mode, n)  # before any process starts
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if cuda and n > torch.cuda.device_count():
        raise TlearnError(f"--devices {n}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if not args.out and not args.resume:  # one name for every process, chosen here
        args.argv += ["--out", _default_out(data)]
    argv = [a for i, a in enumerate(args.argv) if not a.startswith("--devices") and
            (i == 0 or args.argv[i - 1] != "--devices")]
    print(f"training on {n} {'GPUs' if cuda else 'CPU processes (gloo)'}: --batch-size {args.batch_size} is the "
          f"effective batch, {max(1, args.batch_size // n)} images per process", file=sys.stderr)
    try:
        dist.launch(n, argv, threads=cpu_cores() // n)  # the cores, shared out
    except dist.ProcessFailed as e:
        where = args.resume or args.out or "the run folder"
        raise TlearnError(f"training process {e.rank} of {n} stopped ({e.how}), so the others were stopped too; "
                          f"`tlearn train {data['path']} --resume {where} --devices {n}` continues from the last "
                          "finished epoch") from None


def compare(args: argparse.Namespace) -> None:
    """Train several models on one split and compare them (e.g. --models small-cnn,efficientnet_lite0:features)."""
    from tlearn.compare import compare as run_compare

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TlearnError("tlearn compare runs in one process; start each model with `tlearn train --devices N` to "
                          "train it data-parallel")
    data, options = _train_options(args)
    for name in ("mode", "model", "backbone", "resume"):
        options.pop(name)
    out = Path(args.out or _default_out(data, "compare"))
    run_compare(data.pop("path"), args.models, out, options, data)
    print((out / "compare.md").read_text())
    print(f"comparison written to {out} (compare.csv, compare.md, compare.png)")


def augment_preview(args: argparse.Namespace) -> None:
    """Draw a grid of augmented versions of an image, to see what an --augment setting does."""
    from tlearn.augment import preview
    from tlearn.backbones import preprocessing_of
    from tlearn.images import ImageDecodeError

    augment = _config(AugmentConfig, args)
    validate(augment)
    if args.model:
        from tlearn.models import SCRATCH

        preprocessing = SCRATCH[args.model].preprocessing()
    else:
        preprocessing = preprocessing_of(args.backbone)
    if not Path(args.image).is_file():
        raise TlearnError(f"image {args.image} does not exist")
    try:
        out = preview(Path(args.image), preprocessing, augment, args.n, Path(args.out), seed=args.seed)
    except ImageDecodeError as e:
        raise TlearnError(f"image {args.image}: {e}") from e
    print(f"preview written to {out}")


def check(args: argparse.Namespace) -> None:
    """Inspect every file of an image folder: undecodable, odd and duplicate files, leakage, class balance."""
    from tlearn.check import check as run_check
    from tlearn.check import format_report, quarantine_rows
    from tlearn.fileio import atomic_write_csv

    data = _config(DataConfig, args)
    validate(data)
    min_size = DEFAULT_INPUT_SIZE  # the default backbone's, without importing timm (about 4 s)
    if args.backbone:
        from tlearn.backbones import preprocessing_of

        min_size = preprocessing_of(args.backbone)["input_size"][-1]
    report = run_check(data, min_size=min_size, near_threshold=args.near_threshold, progress=not args.json)
    if args.labels:
        from tlearn.labels import suspects

        found = suspects(data, backbone=args.backbone or BackboneConfig.backbone, progress=not args.json)
        report.findings += found
        report.notes.append(f"suspected mislabels (--labels): {len(found)} found among the labelled images")
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    if args.fix_report:
        atomic_write_csv(Path(args.fix_report), ["path", "reason"], quarantine_rows(report))
    if args.strict and report.blocking():
        raise TlearnError(f"{len(report.blocking())} blocking finding(s) (--strict)")


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate a trained run on its test split, or on DATA (class sub-folders, or a split folder's test/)."""
    from tlearn.api import ImageClassifier

    clf = ImageClassifier.load(args.run, weights=args.weights, verbose=not args.json, **_where(args))
    metrics = clf.evaluate(args.data)
    if args.tta:  # both, so the difference shows
        plain, metrics = metrics, clf.evaluate(args.data, tta=True)
        metrics["without_tta"] = {"accuracy": plain["accuracy"], "loss": plain["loss"]}
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    print(report.format_metrics(metrics, metrics["split"]))
    if args.tta:
        print(f"\nwith test-time augmentation: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}; "
              f"without: accuracy {plain['accuracy']:.4f}, loss {plain['loss']:.4f}")


def report_(args: argparse.Namespace) -> None:
    """(Re)build a run's report.html (and its figures) from the run folder."""
    from tlearn.htmlreport import build_report

    print(f"report written to {build_report(Path(args.run))}")


def predict(args: argparse.Namespace) -> None:
    """Top-k predictions for images and folders: `tlearn predict RUN IMAGES...`, or `--imagenet IMAGES...`."""
    if args.imagenet:
        from tlearn.api import predict_imagenet

        results = predict_imagenet(args.paths, backbone=args.backbone, weights=args.weights, top_k=args.top_k)
    else:
        from tlearn.predictor import Predictor  # inference only: ONNX Runtime and NumPy where it can

        if len(args.paths) < 2:
            raise TlearnError("usage: tlearn predict RUN IMAGE [IMAGE ...] (or tlearn predict --imagenet IMAGE ...)")
        model = Predictor.load(args.paths[0], weights=args.weights, verbose=not args.json, **_where(args))
        results = model.predict(args.paths[1:], top_k=args.top_k, calibration=not args.no_calibration, tta=args.tta)
        if args.tta and not args.json:
            print(f"with test-time augmentation: each image's probabilities come from the mean logits of "
                  f"{len(model.tta_views())} views ({', '.join(model.tta_views())})", file=sys.stderr)
    print(json.dumps(results, indent=2) if args.json else report.format_predictions(results))
    if args.plot:
        from tlearn.plots import prediction_charts

        chart = prediction_charts(results, Path(args.plot), MAX_PLOTTED)
        if chart:
            print(f"chart written to {chart}" + (f" (the first {MAX_PLOTTED} images)" if len(results) > MAX_PLOTTED
                                                 else ""), file=sys.stderr)
    if results and all("error" in r for r in results):
        raise TlearnError("no image could be read")


def explain(args: argparse.Namespace) -> None:
    """Draw where the evidence for each image's class lies: Grad-CAM heatmaps over the photos, as PNG files.

    Example: tlearn explain runs/demo photos/bee.jpg --out heatmaps  (the evidence for the predicted class; add
    --class ants for the evidence for ants)"""
    from tlearn.api import ImageClassifier
    from tlearn.data import expand_inputs
    from tlearn.plots import explained_figure, heatmap_path

    if len(args.paths) < 2:
        raise TlearnError("usage: tlearn explain RUN IMAGE [IMAGE ...] [--class NAME] [--out DIR]")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TlearnError(f"--out {out} is a file; give a folder to write the heatmaps into")
    clf = ImageClassifier.load(args.paths[0], weights=args.weights, verbose=False, **_where(args))
    results, taken = [], set()
    for r in clf.explainer().explain(expand_inputs(args.paths[1:]), args.class_name, args.top_k, with_image=True):
        if "error" in r:
            results.append(r)
            print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
            continue
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TlearnError(f"cannot create --out {out}: {e.strerror or e}; choose a writable folder") from e
        png = explained_figure(r, heatmap_path(out, Path(r["path"]), taken, args.class_name), report.printable)
        results.append({**r, "heatmap_png": str(png)})
        if not args.json:
            print(f"{r['path']}: {r['class']} ({r['probability']:.1%}): heatmap {png}")
    if args.json:
        print(json.dumps(results, indent=2))
    if results and all("error" in r for r in results):
        raise TlearnError("no image could be read")


def export(args: argparse.Namespace) -> None:
    """Export a run's whole classifier to one ONNX graph plus a JSON sidecar, checked against PyTorch.

    Example: tlearn export runs/demo --out demo.onnx  (then: tlearn predict demo.onnx photo.jpg)"""
    from tlearn.export import export as run_export
    from tlearn.export import summary

    result = run_export(args.run, args.out, int8=args.int8, data=args.data, overwrite=args.overwrite,
                        weights=args.weights, cache_dir=args.cache_dir)
    print(summary(result))


def serve(args: argparse.Namespace) -> None:
    """Serve a run (or an exported .onnx) over HTTP: a web page to drop photos on, and a REST API.

    Example: tlearn serve runs/demo --port 8000  (then open http://127.0.0.1:8000/, or
    curl -F files=@photo.jpg http://127.0.0.1:8000/predict)"""
    from tlearn.serve import serve as run_server

    run_server(args.run, host=args.host, port=args.port, runtime=args.runtime, device=args.device,
               weights=args.weights, cache_dir=args.cache_dir, max_upload_mb=args.max_upload_mb, top_k=args.top_k)


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


def _train_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data options and the ImageClassifier options from the flags, validated together."""
    data, bb, tr, aug, rt = (_config(cls, args) for cls in (DataConfig, BackboneConfig, TrainConfig, AugmentConfig,
                                                            RuntimeConfig))
    tr.seed = data.seed  # one --seed for the split, the initialisation and the shuffling
    validate(data, bb, tr, aug, rt)
    options = {**dataclasses.asdict(bb), **dataclasses.asdict(tr), **dataclasses.asdict(aug), **dataclasses.asdict(rt)}
    return dataclasses.asdict(data), options


def _default_out(data: dict[str, Any], kind: str = "") -> str:
    name = Path(data["path"]).resolve().name
    return f"runs/{name}{'-' + kind if kind else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


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
        if kind.startswith("bool"):  # bool, or bool | None where None means "the preset decides"
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        else:
            caster = _whole() if kind.startswith("int") else _number if kind.startswith("float") else str
            group.add_argument(flag, dest=f.name, type=caster, default=f.default,
                               help=f"{help_text} (default: {f.default})")


def _whole(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number written in ASCII digits (``int()`` also takes "²" and "١"), from ``lo`` to
    ``hi`` where given."""
    def whole(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", text.strip()):
            raise argparse.ArgumentTypeError(f"must be a whole number in digits 0-9, not {text!r}")
        value = int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, not {value}" if hi is not None
                                             else f"must be {lo} or more, not {value}")
        return value

    return whole


def _number(text: str) -> float:
    """An argparse type: a finite number written in ASCII (``float()`` also takes "nan", "inf" and "١.٥")."""
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"must be a finite number such as 0.001 or 1e-3, not {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _config(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    return dataclasses.asdict(_config(RuntimeConfig, args))


def _where(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime settings of a loaded model, with where it runs: the caller's choice, never the run's."""
    return {**_runtime(args), "device": args.device, "precision": args.precision}


def _add_placement(p: argparse.ArgumentParser) -> None:
    """--device and --precision of a loaded model, as TrainConfig describes them."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("device", "precision"):
            p.add_argument(f"--{f.name}", default=f.default, help=f"{f.metadata['help']}; whatever the run was "
                           f"trained on (default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    from tlearn import __version__

    parser = argparse.ArgumentParser(prog="tlearn", description="Transfer learning for image classification: a "
                                     "folder of images → a trained, evaluated, deployable classifier.")
    parser.add_argument("--version", action="version", version=f"tlearn {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    def verb(fn: Callable) -> argparse.ArgumentParser:
        doc = fn.__doc__.strip()
        sub = verbs.add_parser(fn.__name__.strip("_").replace("_", "-"), help=doc.split("\n")[0], description=doc)
        sub.set_defaults(func=fn)
        return sub

    for fn in (train, compare):
        p = verb(fn)
        _add_fields(p, DataConfig)
        if fn is compare:
            p.add_argument("--models", required=True, help="comma-separated models: small-cnn, alexnet, "
                           "logreg-pixels, or BACKBONE:MODE with MODE auto, features, frozen or finetune")
        _add_fields(p, BackboneConfig)
        _add_fields(p, TrainConfig, skip=("seed",))
        _add_fields(p, AugmentConfig)
        _add_fields(p, RuntimeConfig)
        p.add_argument("--out", help="folder to write (default: runs/<data folder>-<date>-<time>)")
        if fn is train:
            p.add_argument("--devices", type=_whole(1, 1024), default=1, help="train data-parallel in this many "
                           "processes (one per GPU with CUDA, else CPU processes); --batch-size stays the effective "
                           "batch (default: 1)")

    p = verb(check)
    _add_fields(p, DataConfig)
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--strict", action="store_true", help="exit with status 2 when there are blocking findings")
    p.add_argument("--fix-report", metavar="CSV", help="write the files worth setting aside to this CSV, with "
                   "--labels' suspects among them (nothing is moved)")
    p.add_argument("--backbone", help="flag images smaller than this backbone's input (default: "
                   f"{DEFAULT_INPUT_SIZE} px, {BackboneConfig.backbone}'s)")
    p.add_argument("--labels", action="store_true", help="also list suspected mislabels: images whose folder "
                   "disagrees with a model trained without them (confident learning on the backbone's features; "
                   "nothing is moved)")
    p.add_argument("--near-threshold", type=_whole(0, 64), default=4, help="largest difference-hash distance (of "
                   "64 bits) between near duplicates (default: 4)")

    p = verb(augment_preview)
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--n", type=_whole(1, 64), default=8, help="how many augmented versions, 1 to 64 (default: 8)")
    p.add_argument("--out", default="augment_preview.png", help="PNG file to write (default: augment_preview.png)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="preprocess for this backbone's input")
    p.add_argument("--model", choices=("small-cnn", "alexnet"), help="preprocess for this scratch model instead")
    p.add_argument("--seed", type=_whole(0, 2**32 - 1), default=0, help="seed of the random augmentations (default: 0)")
    _add_fields(p, AugmentConfig)

    p = verb(evaluate)
    p.add_argument("run", metavar="RUN", help="a run folder written by `tlearn train`")
    p.add_argument("data", metavar="DATA", nargs="?", help="folder to evaluate on (default: the run's test split)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--weights", help="the backbone weights file the run was trained with, if it has moved")
    p.add_argument("--tta", action="store_true", help="also evaluate with test-time augmentation (centre, mirrored, "
                   "four corners; mean logits) and show both")
    _add_fields(p, RuntimeConfig, skip=("resume", "tensorboard", "overwrite"))  # nothing is trained here
    _add_placement(p)

    p = verb(report_)
    p.add_argument("run", metavar="RUN", help="a run folder written by `tlearn train`")

    p = verb(predict)
    p.add_argument("paths", metavar="PATH", nargs="+", help="RUN followed by image files or folders")
    p.add_argument("--top-k", type=_whole(1), default=3, help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--imagenet", action="store_true", help="use the backbone's own ImageNet head, not a run")
    p.add_argument("--plot", metavar="PNG", help="also draw each image beside a bar chart of its top-k classes")
    p.add_argument("--no-calibration", action="store_true", help="raw softmax probabilities, without the run's "
                   "temperature scaling")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: mean logits of the centre crop, its "
                   "mirror image and four corner crops")
    _add_fields(p, BackboneConfig, skip=("pretrained",))
    _add_fields(p, RuntimeConfig, skip=("resume", "tensorboard", "overwrite"))
    _add_placement(p)

    p = verb(explain)
    p.add_argument("paths", metavar="PATH", nargs="+", help="RUN followed by image files or folders")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="show the evidence for this class (default: "
                   "each image's predicted class)")
    p.add_argument("--out", default="heatmaps", help="folder to write IMAGE.heatmap.png files into (default: "
                   "heatmaps); only earlier heatmaps are ever replaced")
    p.add_argument("--top-k", type=_whole(1), default=3, help="classes in each figure's title (default: 3)")
    p.add_argument("--json", action="store_true", help="print the results (without the arrays) as JSON")
    p.add_argument("--weights", help="the backbone weights file the run was trained with, if it has moved")
    _add_fields(p, RuntimeConfig, skip=("resume", "tensorboard", "overwrite"))
    _add_placement(p)

    p = verb(export)
    p.add_argument("run", metavar="RUN", help="a run folder written by `tlearn train`")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="the file format (default: onnx)")
    p.add_argument("--out", help="the .onnx file to write, with a .json sidecar beside it (default: RUN.onnx, or "
                   "RUN-int8.onnx with --int8, next to the run folder)")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (ONNX Runtime static quantization); its "
                   "accuracy is measured and printed next to fp32's")
    p.add_argument("--data", metavar="FOLDER", help="labelled images (class sub-folders) to check and measure the "
                   "export on (default: the run's test split, or validation where it has none)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier export")
    p.add_argument("--weights", help="the backbone weights file the run was trained with, if it has moved")
    p.add_argument("--cache-dir", help="the feature and ONNX cache folder (default: $TLEARN_CACHE_DIR or "
                   "~/.cache/tlearn)")

    p = verb(serve)
    p.add_argument("run", metavar="RUN", help="a run folder written by `tlearn train`, or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=_whole(1, 65535), default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--runtime", choices=("auto", "onnx", "torch"), default="auto", help="auto: the predictor's "
                   "choice; onnx: the whole classifier as one ONNX graph (exported once, lowest latency on a CPU); "
                   "torch: PyTorch (default: auto)")
    p.add_argument("--device", default="auto", help="where the model runs: auto, cpu, cuda, cuda:N, mps "
                   "(default: auto)")
    p.add_argument("--max-upload-mb", type=_number, default=20, help="largest request body in MiB; larger ones get "
                   "HTTP 413 (default: 20)")
    p.add_argument("--top-k", type=_whole(1), default=5, help="classes per image unless a request asks (default: 5)")
    p.add_argument("--weights", help="the backbone weights file the run was trained with, if it has moved")
    p.add_argument("--cache-dir", help="the feature and ONNX cache folder (default: $TLEARN_CACHE_DIR or "
                   "~/.cache/tlearn)")

    p = verb(split)
    _add_fields(p, DataConfig, skip=("split_manifest",))
    p.add_argument("dest", metavar="DEST", help="new folder to write train/, validation/ and test/ into")

    p = verb(backbones)
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    for stream in streams:
        if hasattr(stream, "reconfigure"):  # file names that are not valid UTF-8 print as escapes, not a crash
            stream.reconfigure(errors="backslashreplace")
    sys.stdout, sys.stderr = (report.EscapingStream(s) for s in streams)  # no name can send escape codes
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --devices`, which runs it again
        report.enable_logging()
        return _run(args)
    finally:
        sys.stdout, sys.stderr = streams


def _run(args: argparse.Namespace) -> int:
    """Run the verb; a problem the user can fix is one line and exit 2, never a traceback."""
    try:
        args.func(args)
        sys.stdout.flush()
    except TlearnError as e:
        print(f"tlearn {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlearn {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`tlearn predict ... | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # a bug in tlearn, not the user's mistake: one line, the traceback on request
        if os.environ.get("TLEARN_DEBUG"):
            raise
        print(f"tlearn {args.verb}: internal error: {type(e).__name__}: {str(e)[:300]} (a bug in tlearn: run again "
              "with TLEARN_DEBUG=1 to see where, and please report it)", file=sys.stderr)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
