"""What a person reads besides the HTML report: history.csv, predictions.csv, the skipped-files list, TensorBoard
scalars and the printed tables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlearn.config import TlearnError
from tlearn.data import Skipped
from tlearn.fileio import atomic_write_csv, read_csv_rows

if TYPE_CHECKING:  # torch loads only when something is trained: `tlearn check` starts fast
    from tlearn.train import History


# C0 and C1 control characters, DEL, and the bidirectional overrides that make text read differently than it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: Any, keep: str = "") -> str:
    """``text`` with its control characters written as escapes (``\\x1b``, ``\\n``, ``\\u202e``), so that a
    file or class name cannot move the cursor, retitle or recolour a terminal, or fake a line of output. ``keep``
    names the ones to leave as they are."""
    return _CONTROL.sub(lambda m: m[0] if m[0] in keep else m[0].encode("unicode_escape").decode("ascii"),
                        str(text))


class EscapingStream:
    """A text stream that passes everything written to it through ``printable`` (keeping newlines, tabs and the
    carriage returns of progress bars): what tlearn prints, its logs and its errors cannot carry terminal escape
    codes, whatever names they quote."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(printable(text, keep="\n\t\r"))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def write_history_csv(history: History, path: Path) -> None:
    keys = list(history.history)
    atomic_write_csv(path, ["epoch", "stage", *keys],
                     ([epoch, history.stage[i], *(f"{history.history[k][i]:.6f}" for k in keys)]
                      for i, epoch in enumerate(history.epoch)))


PREDICTION_COLUMNS = ["split", "path", "true", "predicted", "probability", "probability_uncalibrated", "p_true",
                      "loss", "novelty"]  # novelty: empty where the model has no scorer (and absent in older runs)


def prediction_rows(predictions: dict[str, tuple], classes: list[str], temperature: float) -> list[dict[str, Any]]:
    """One row per evaluated image (``predictions``: split → (paths, labels, logits, novelty or None)): true and
    predicted class, the predicted class's probability with and without temperature scaling, the true class's
    probability, the image's loss (-log of it) and its novelty (None where the model has no scorer)."""
    from tlearn.calibrate import calibrated

    rows = []
    for split, (paths, y, logits, novelty) in predictions.items():
        proba, raw = calibrated(logits, temperature), calibrated(logits, 1.0)
        k = proba.argmax(1)
        p_true = proba[np.arange(len(y)), y]
        for i, p in enumerate(paths):
            rows.append({"split": split, "path": str(p), "true": classes[y[i]], "predicted": classes[k[i]],
                         "probability": float(proba[i, k[i]]), "probability_uncalibrated": float(raw[i, k[i]]),
                         "p_true": float(p_true[i]), "loss": float(-np.log(max(p_true[i], 1e-12))),
                         "novelty": None if novelty is None else float(novelty[i])})
    return rows


def write_predictions_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``prediction_rows`` as predictions.csv."""
    atomic_write_csv(path, PREDICTION_COLUMNS, ([r[c] if i < 4 else "" if r[c] is None else f"{r[c]:.6f}"
                                                 for i, c in enumerate(PREDICTION_COLUMNS)] for r in rows))


def read_predictions_csv(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = read_csv_rows(path)
    for r in rows:
        for key in PREDICTION_COLUMNS[4:]:
            r[key] = float(r[key]) if r.get(key) not in (None, "") else None
    return rows


def write_outliers_csv(rows: list[tuple[Path, str, float]], path: Path) -> None:
    """The training images least like the rest of their class, most unusual first: (path, class, score)."""
    atomic_write_csv(path, ["path", "class", "score"], ([str(p), c, f"{score:.6f}"] for p, c, score in rows))


def write_tensorboard(history: History, metrics: dict[str, Any], folder: Path) -> None:
    """TensorBoard scalars per epoch (loss and accuracy, training and validation, tagged by stage), and the final
    metrics; history.csv stays the record, this is for users who track experiments in TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TlearnError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    with SummaryWriter(str(folder)) as writer:
        for i, epoch in enumerate(history.epoch):
            for key, values in history.history.items():
                split = "validation" if key.startswith("val_") else "training"
                writer.add_scalar(f"{key.removeprefix('val_')}/{split}", values[i], epoch)
            writer.add_text("stage", history.stage[i], epoch)
        for split, m in metrics.items():
            writer.add_scalar(f"final/{split}_accuracy", m["accuracy"], len(history.epoch))
            writer.add_scalar(f"final/{split}_loss", m["loss"], len(history.epoch))


def write_skipped_csv(skipped: list[Skipped], path: Path) -> None:
    atomic_write_csv(path, ["path", "reason"], ([str(s.path), s.reason] for s in skipped))


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(c) for c in header]] + [[printable(_fmt(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    return f"{c:.4f}" if isinstance(c, float) else str(c)


def format_metrics(metrics: dict[str, Any], split: str) -> str:
    if "per_label" in metrics:  # several labels an image
        return _format_multi(metrics, split)
    rows = [[name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in metrics["per_class"].items()]
    head = f"{split}: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} on {metrics['n']} images"
    if "calibration" in metrics:
        c = metrics["calibration"]
        head += (f"\ncalibration: ECE {c['ece']:.4f} at temperature {c['temperature']:.3f} (uncalibrated: ECE "
                 f"{c['ece_uncalibrated']:.4f}, loss {c['loss_uncalibrated']:.4f})")
    if metrics.get("tta"):
        head += "\ntest-time augmentation: mean logits of 6 views (centre, mirrored, 4 corners)"
    if "novelty" in metrics:
        head += (f"\nnovelty: {metrics['novelty']['unknown']:.1%} called unknown (threshold "
                 f"{metrics['novelty']['threshold']:.3f})")
    if "unknown" in metrics:
        u = metrics["unknown"]
        head += (f"\nimages of other things ({printable(u['folder'])}, {u['images']}): AUROC {u['auroc']:.4f} against "
                 f"this split; {u['unknown']:.1%} of them called unknown, and {u['unknown_in_distribution']:.1%} of "
                 f"this split")
    cm = metrics["confusion_matrix"]
    names = metrics["classes"]
    cm_rows = [[f"true {names[i]}", *cm[i]] for i in range(len(names))]
    return "\n\n".join([head, table(rows, ["class", "precision", "recall", "f1", "support"]),
                        "confusion matrix (rows: true, columns: predicted)",
                        table(cm_rows, ["", *names])])


def _format_multi(metrics: dict[str, Any], split: str) -> str:
    head = (f"{split}: mean average precision {metrics['mean_average_precision']:.4f}, micro F1 "
            f"{metrics['micro_f1']:.4f}, macro F1 {metrics['macro_f1']:.4f}, exact match {metrics['exact_match']:.4f}, "
            f"loss {metrics['loss']:.4f} on {metrics['images']} images\ncalibration: a temperature a label (loss "
            f"{metrics['loss_uncalibrated']:.4f} -> {metrics['loss']:.4f}); thresholds fitted on "
            f"{metrics.get('fitted_on', 'validation')}")
    rows = [[name, m["precision"], m["recall"], m["f1"], "-" if m["average_precision"] is None else
             m["average_precision"], m["support"], m["threshold"]] for name, m in metrics["per_label"].items()]
    return "\n\n".join([head, table(rows, ["label", "precision", "recall", "f1", "AP", "support", "threshold"])])


def format_counts(counts: dict[str, dict[str, int]], images: dict[str, int] | None = None) -> str:
    """The images of each class per split, and the total; with several labels an image, the images with each
    label, and ``images`` (per split) as the last row."""
    splits = list(counts)
    classes = list(next(iter(counts.values())))
    rows = [[c, *(counts[s][c] for s in splits)] for c in classes]
    rows.append(["images", *(images[s] for s in splits)] if images else
                ["total", *(sum(counts[s].values()) for s in splits)])
    return table(rows, ["label" if images else "class", *splits])


def format_predictions(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{printable(r['path'])}: skipped: {printable(r['error'])}")
            continue
        top = ", ".join(f"{printable(p['class'])} {p['probability']:.3f}" for p in r["predictions"])
        unknown = f"unknown (novelty {r['novelty']:.2f}, unlike the training images); " if r.get("unknown") else ""
        if "labels" in r:  # several labels an image: those at their thresholds, then the top-k
            given = ", ".join(printable(p["class"]) for p in r["labels"]) or "no label"
            top = f"labels: {given} (top: {top})"
        lines.append(f"{printable(r['path'])}: {unknown}{top}")
    return "\n".join(lines)


def enable_logging() -> None:
    """Show tlearn's progress messages on stderr (once), as plain lines."""
    import logging
    import sys

    class Stderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is at the time, with control characters escaped."""

        @property
        def stream(self) -> Any:
            return sys.stderr

        @stream.setter
        def stream(self, _value: Any) -> None:
            pass

        def format(self, record: logging.LogRecord) -> str:
            return printable(super().format(record), keep="\n\t")

    logger = logging.getLogger("tlearn")
    if not logger.handlers:
        handler = Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
