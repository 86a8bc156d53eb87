"""The ``tlearn`` command: one verb → one plain function of typed configs. The flags come from the configs'
fields (``flags.py``); each verb builds its configs from them and hands them to the API as they are."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tlearn import report
from tlearn.config import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    InferenceConfig,
    OutputConfig,
    RuntimeConfig,
    TlearnError,
    TrainConfig,
    check_parallel,
    validate,
)
from tlearn.flags import DEFAULT_INPUT_SIZE, config

START = time.perf_counter()  # the command's start, for the total time it reports
MAX_PLOTTED = 12  # images in one `predict --plot` chart


def train(args: argparse.Namespace) -> None:
    """Train a classifier on a folder of images and write the run (model, metrics, curves) to --out."""
    data, configs = _training(args)
    if args.devices > 1:
        return _launch(args, data)
    from tlearn.api import ImageClassifier

    out = Path(args.resume or args.out or _default_out(data))
    clf = ImageClassifier(configs=configs)
    clf.fit(data, out=out, started=START)  # the time budget counts from the command's start
    from tlearn import dist

    if not dist.is_main():  # one of several processes: rank 0 reports the run
        return
    for split, metrics in clf.metrics.items():
        print(report.format_metrics(metrics, split), end="\n\n")
    skipped = len(clf.data.skipped)
    print(f"run written to {out} in {time.perf_counter() - START:.1f} s (open "
          f"{out / 'report.html'})" + (f"; {skipped} file(s) skipped: see {out / 'skipped.csv'}" if skipped else ""))


def _launch(args: argparse.Namespace, data: DataConfig) -> None:
    """``--devices N``: this same command as N processes under PyTorch's elastic launcher (what ``torchrun
    --standalone --nproc-per-node N`` runs): one process per GPU with CUDA, else N CPU processes (gloo), each with
    its share of the cores. If one fails, the launcher stops the others; the checkpoint of the last finished
    epoch stays for ``--resume``."""

    from tlearn import dist
    from tlearn.features import cpu_cores

    n = args.devices
    check_parallel(args.mode, n)  # before any process starts
    cuda = _gpu_processes(n, args.device)
    if not args.out and not args.resume:  # one name for every process, chosen here
        args.argv += ["--out", _default_out(data)]
    argv = _without_devices(args.argv)
    print(f"training on {n} {'GPUs' if cuda else 'CPU processes (gloo)'}: --batch-size {args.batch_size} is the "
          f"effective batch, {max(1, args.batch_size // n)} images per process", file=sys.stderr)
    try:
        dist.launch(n, argv, threads=cpu_cores() // n)  # the cores, shared out
    except dist.ProcessFailed as e:
        where = args.resume or args.out or "the run folder"
        raise TlearnError(f"training process {e.rank} of {n} stopped ({e.how}), so the others were stopped too; "
                          f"`tlearn train {data.path} --resume {where} --devices {n}` continues from the last "
                          "finished epoch") from None


def _without_devices(argv: list[str]) -> list[str]:
    """The command's arguments without ``--devices N`` (or ``--devices=N``), for each launched process."""
    return [a for i, a in enumerate(argv) if not a.startswith("--devices") and (i == 0 or argv[i - 1] != "--devices")]


def compare(args: argparse.Namespace) -> None:
    """Train several models on one split and compare them (e.g. --models small-cnn,efficientnet_lite0:features)."""
    from tlearn.compare import compare as run_compare

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TlearnError("tlearn compare runs in one process; start each model with `tlearn train --devices N` to "
                          "train it data-parallel")
    data, configs = _training(args)
    out = Path(args.out or _default_out(data, "compare"))
    run_compare(data, args.models, out, configs)
    print((out / "compare.md").read_text())
    print(f"comparison written to {out} (compare.csv, compare.md, compare.png)")


def augment_preview(args: argparse.Namespace) -> None:
    """Draw a grid of augmented versions of an image, to see what an --augment setting does."""
    from tlearn.augment import preview
    from tlearn.backbones import preprocessing_of
    from tlearn.images import ImageDecodeError

    augment = config(AugmentConfig, args)
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
    from tlearn.check import format_report, quarantine_rows
    from tlearn.fileio import atomic_write_csv
    from tlearn.survey import check_data

    data = config(DataConfig, args)
    validate(data)
    if args.fix_report:
        from tlearn.data import data_root
        from tlearn.fileio import claim_file

        claim_file(args.fix_report, [data_root(data)], overwrite=args.overwrite, flag="--fix-report",
                   ours=lambda path: path.open("rb").read(13) == b"path,reason\r\n")  # its header
    min_size = DEFAULT_INPUT_SIZE  # the default backbone's, without importing timm (about 4 s)
    if args.backbone:
        from tlearn.backbones import preprocessing_of

        min_size = preprocessing_of(args.backbone)["input_size"][-1]
    report = check_data(data, labels=args.labels, outliers=args.outliers, backbone=args.backbone, min_size=min_size,
                        near_threshold=args.near_threshold, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    if args.fix_report:
        atomic_write_csv(Path(args.fix_report), ["path", "reason"], quarantine_rows(report))
    if args.strict and report.blocking():
        raise TlearnError(f"{len(report.blocking())} blocking finding(s) (--strict)")


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate a trained run on its test split, or on DATA (class sub-folders, or a split folder's test/)."""
    from tlearn.api import ImageClassifier

    inference, runtime = _inference(args)
    clf = ImageClassifier.load(args.run, verbose=not inference.json, configs=(inference, runtime))
    data = args.data and dataclasses.replace(config(DataConfig, args), path=args.data)
    metrics = clf.evaluate(data, unknown=args.unknown_folder)
    if args.tta:  # both, so the difference shows
        plain, metrics = metrics, clf.evaluate(data, tta=True, unknown=args.unknown_folder)
        metrics["without_tta"] = {"accuracy": plain["accuracy"], "loss": plain["loss"]}
    if inference.json:
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
    """Top-k predictions for images and folders: `tlearn predict RUN IMAGES...`, or `--imagenet IMAGES...`; with
    --out, streamed to a file (see tlearn.stream)."""
    inference, runtime = _inference(args)
    from tlearn.stream import claim_outputs, listed

    inputs = args.paths[0 if args.imagenet else 1:] + (listed(Path(args.from_list)) if args.from_list else [])
    if args.out and args.imagenet:
        raise TlearnError("--out writes a run's predictions; --imagenet prints its results")
    if (args.resume or args.devices > 1) and not args.out:
        raise TlearnError(f"{'--resume' if args.resume else '--devices'} goes with --out FILE, which it continues "
                          "or writes in parts")
    claimed = claim_outputs(args.out, args.plot, [p for p in inputs if Path(p).expanduser().is_dir()],
                            overwrite=args.overwrite, resume=args.resume)
    if args.devices > 1:
        return _launch_predict(args)
    if args.imagenet:
        from tlearn.api import predict_imagenet

        results = predict_imagenet(inputs, backbone=args.backbone, weights=args.weights, top_k=inference.top_k)
    else:
        from tlearn import dist
        from tlearn.predictor import Predictor  # inference only: ONNX Runtime and NumPy where it can

        if not inputs:
            raise TlearnError("usage: tlearn predict RUN IMAGE [IMAGE ...] (or --from-list TXT, or tlearn predict "
                              "--imagenet IMAGE ...)")
        if dist.active() and inference.device in ("auto", "cuda") and _cuda():  # one GPU a process
            inference = dataclasses.replace(inference, device=f"cuda:{dist.local_rank()}")
        model = Predictor.load(args.paths[0], verbose=not inference.json and dist.is_main(),
                               configs=(inference, runtime))
        if args.tta and not inference.json:
            print(f"with test-time augmentation: each image's probabilities come from the mean logits of "
                  f"{len(model.tta_views())} views ({', '.join(model.tta_views())})", file=sys.stderr)
        if args.out:
            return _predict_to_file(args, model, inference, inputs, claimed)
        results = model.predict(inputs, top_k=inference.top_k, calibration=not args.no_calibration,
                                tta=args.tta, unknown=inference.unknown)
    print(json.dumps(results, indent=2) if inference.json else report.format_predictions(results))
    _chart(results, claimed)
    if results and all("error" in r for r in results):
        raise TlearnError("no image could be read")


def _chart(results: list[dict], claimed: dict[str, Path]) -> None:
    if "plot" not in claimed:
        return
    from tlearn.plots import prediction_charts

    chart = prediction_charts(results, claimed["plot"], MAX_PLOTTED)
    if chart:
        print(f"chart written to {chart}" + (f" (the first {MAX_PLOTTED} images)" if len(results) > MAX_PLOTTED
                                             else ""), file=sys.stderr)


def _predict_to_file(args: argparse.Namespace, model: object, inference: InferenceConfig, inputs: list[str],
                     claimed: dict[str, Path]) -> None:
    from tlearn import dist
    from tlearn.stream import predict_to_file

    written = predict_to_file(model, inputs, claimed["out"], top_k=inference.top_k,
                              calibration=not args.no_calibration, tta=args.tta, unknown=inference.unknown,
                              resume=args.resume, keep_first=MAX_PLOTTED if args.plot else 0,
                              progress=not inference.json)
    if not dist.is_main():
        return
    print(written.summary(), file=sys.stderr)
    _chart(written.first, claimed)
    if written.skipped and not written.predicted and not written.resumed:
        raise TlearnError("no image could be read")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_processes(n: int, device: str) -> bool:
    """Whether ``--devices n`` runs one process a GPU (CUDA is there and ``device`` allows it); more processes than
    GPUs are refused before any starts."""
    import torch

    cuda = _cuda() and device in ("auto", "cuda")
    if cuda and n > torch.cuda.device_count():
        raise TlearnError(f"--devices {n}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                          "--device cpu for CPU processes")
    return cuda


def _launch_predict(args: argparse.Namespace) -> None:
    """``predict --out FILE --devices N``: this same command as N processes (as ``train --devices``), each taking
    every N-th image; rank 0 merges the parts into --out."""
    from tlearn import dist
    from tlearn.features import cpu_cores

    n = args.devices
    _gpu_processes(n, args.device)
    print(f"predicting in {n} processes", file=sys.stderr)
    try:
        dist.launch(n, _without_devices(args.argv), threads=cpu_cores() // n)
    except dist.ProcessFailed as e:
        raise TlearnError(f"prediction process {e.rank} of {n} stopped ({e.how}), so the others were stopped too; "
                          f"the same command with --resume continues where they were") from None


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
    inference, runtime = _inference(args)
    clf = ImageClassifier.load(args.paths[0], verbose=False, configs=(inference, runtime))
    results, taken = [], set()
    for r in clf.explainer().explain(expand_inputs(args.paths[1:]), args.class_name, inference.top_k,
                                     with_image=True):
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
        if not inference.json:
            print(f"{r['path']}: {r['class']} ({r['probability']:.1%}): heatmap {png}")
    if inference.json:
        print(json.dumps(results, indent=2))
    if results and all("error" in r for r in results):
        raise TlearnError("no image could be read")


def export(args: argparse.Namespace) -> None:
    """Export a run's whole classifier to one ONNX graph plus a JSON sidecar, checked against PyTorch.

    Example: tlearn export runs/demo --out demo.onnx  (then: tlearn predict demo.onnx photo.jpg)"""
    from tlearn.export import export as run_export
    from tlearn.export import summary

    data = args.data and dataclasses.replace(config(DataConfig, args), path=args.data)
    result = run_export(args.run, args.out, int8=args.int8, data=data, overwrite=args.overwrite,
                        weights=args.weights, cache_dir=args.cache_dir)
    print(summary(result))


def serve(args: argparse.Namespace) -> None:
    """Serve a run (or an exported .onnx) over HTTP: a web page to drop photos on, and a REST API.

    Example: tlearn serve runs/demo --port 8000  (then open http://127.0.0.1:8000/, or
    curl -F files=@photo.jpg http://127.0.0.1:8000/predict)"""
    from tlearn.serve import ServeOptions
    from tlearn.serve import serve as run_server

    inference = config(InferenceConfig, args)
    validate(inference)
    options = ServeOptions(args.run, runtime=args.runtime, device=inference.device, weights=inference.weights,
                           cache_dir=args.cache_dir, max_upload_mb=args.max_upload_mb, top_k=inference.top_k,
                           unknown=inference.unknown, api_key_file=args.api_key_file, max_queue=args.max_queue,
                           timeout=args.timeout, log_names=args.log_names)
    run_server(options, host=args.host, port=args.port, processes=args.processes, no_auth=args.no_auth)


def split(args: argparse.Namespace) -> None:
    """Copy (hard-link) a folder of class sub-folders, or a label file's images, into DEST/train, DEST/validation
    and DEST/test; or write the split as a label file with a split column (DEST ending in .csv)."""
    from tlearn.data import materialise_split
    from tlearn.samples import images_of

    data = config(DataConfig, args)
    validate(data)
    folder = materialise_split(data, Path(args.dest))
    print(report.format_counts(folder.counts(), images_of(folder)))
    print(f"split written to {args.dest}")


def backbones(args: argparse.Namespace) -> None:
    """List the registered backbones and which have their weights offline."""
    from tlearn.backbones import describe

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(report.table([[r["name"], r["timm"], r["input"], "yes" if r["offline"] else "no", r["weights"], r["about"]]
                        for r in rows], ["backbone", "architecture", "input", "offline", "weights", "about"]))
    print("\nAny other timm model name also works, with hub weights (online) or --weights FILE.")


def _training(args: argparse.Namespace) -> tuple[DataConfig, tuple[Any, ...]]:
    """The data config and the ImageClassifier's configs from the flags, validated together."""
    data, *configs = (config(cls, args) for cls in (DataConfig, BackboneConfig, TrainConfig, AugmentConfig,
                                                     RuntimeConfig, OutputConfig))
    configs[1].seed = data.seed  # one --seed for the split, the initialisation and the shuffling
    validate(data, *configs)
    return data, tuple(configs)


def _inference(args: argparse.Namespace) -> tuple[InferenceConfig, RuntimeConfig]:
    """How a loaded model runs (where, in which precision, with which weights) and shows its results."""
    inference, runtime = config(InferenceConfig, args), config(RuntimeConfig, args)
    validate(inference, runtime)
    return inference, runtime


def _default_out(data: DataConfig, kind: str = "") -> str:
    from tlearn.data import data_name

    name = data_name(data)
    return f"runs/{name}{'-' + kind if kind else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


VERBS = (train, compare, check, augment_preview, evaluate, report_, predict, explain, export, serve, split, backbones)


def build_parser() -> argparse.ArgumentParser:
    from tlearn.flags import build

    return build(list(VERBS))


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
