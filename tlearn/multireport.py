"""The run files and report sections of a model with several labels an image.

``predictions.csv`` has a row per evaluated image: its split and path, its true and predicted labels (joined by
';', the predicted ones at each label's threshold), its loss (mean binary cross-entropy over labels, after
calibration) and a probability column per label (``p:<label>``). The report shows the metrics (mean average
precision, micro and macro F1, exact match), a table per label (precision, recall, F1, AP, support, threshold),
the precision-recall curve of each label, the labels most often missed or added, and the images with the
largest loss.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tlearn import plots
from tlearn.fileio import atomic_write_csv, read_csv_rows
from tlearn.multilabel import decide, sigmoid
from tlearn.pages import html_table, png_tag

BASE_COLUMNS = ["split", "path", "true", "predicted", "loss"]
SHOWN = 16  # images with the largest loss in the report


def prediction_rows(predictions: dict[str, tuple], classes: list[str], temperatures: list[float],
                    thresholds: list[float]) -> list[dict[str, Any]]:
    """One row per evaluated image (``predictions``: split → (paths, y (N, C), logits, novelty))."""
    rows = []
    for split, (paths, y, logits, _) in predictions.items():
        proba = sigmoid(logits / np.array(temperatures))
        decided = decide(proba, np.array(thresholds))
        loss = (np.logaddexp(0.0, logits / np.array(temperatures)) - y * logits / np.array(temperatures)).mean(1)
        for i, p in enumerate(paths):
            rows.append({"split": split, "path": str(p),
                         "true": ";".join(c for c, t in zip(classes, y[i], strict=True) if t > 0.5),
                         "predicted": ";".join(c for c, d in zip(classes, decided[i], strict=True) if d > 0.5),
                         "loss": float(loss[i]),
                         "proba": {c: float(q) for c, q in zip(classes, proba[i], strict=True)}})
    return rows


def write_predictions_csv(rows: list[dict[str, Any]], classes: list[str], path: Path) -> None:
    atomic_write_csv(path, BASE_COLUMNS + [f"p:{c}" for c in classes],
                     ([r["split"], r["path"], r["true"], r["predicted"], f"{r['loss']:.6f}",
                       *(f"{r['proba'][c]:.6f}" for c in classes)] for r in rows))


def read_predictions_csv(path: Path, classes: list[str]) -> list[dict[str, Any]]:
    out = []
    for r in read_csv_rows(path):
        out.append({**{k: r[k] for k in BASE_COLUMNS[:4]}, "loss": float(r["loss"]),
                    "proba": {c: float(r[f"p:{c}"]) for c in classes}})
    return out


def sections(metrics: dict[str, Any], rows: list[dict[str, Any]], classes: list[str], run_dir: Path,
             cache: Path) -> list[tuple[str, str]]:
    """(title, HTML) of the report's multi-label sections."""
    split = "test" if "test" in metrics else "validation"
    m, shown = metrics[split], [r for r in rows if r["split"] == split]
    summary = (f"<p class='big'>{split}: mean average precision {m['mean_average_precision']:.4f}, micro F1 "
               f"{m['micro_f1']:.4f}, macro F1 {m['macro_f1']:.4f}, exact match {m['exact_match']:.2%}, loss "
               f"{m['loss']:.4f} on {m['images']} images</p>")
    per_label = [[name, v["precision"], v["recall"], v["f1"], "–" if v["average_precision"] is None else
                  v["average_precision"], v["support"], v["threshold"]] for name, v in m["per_label"].items()]
    y = np.array([[c in r["true"].split(";") for c in classes] for r in shown], dtype=float)
    proba = np.array([[r["proba"][c] for c in classes] for r in shown])
    curves = plots.reuse(run_dir / "pr_curves.png", ["pr_curves", y.tolist(), proba.tolist(), classes],
                         lambda: plots.pr_curves(y, proba, classes, run_dir / "pr_curves.png"), cache)
    missed, added = Counter(), Counter()
    for r in shown:
        true, predicted = set(filter(None, r["true"].split(";"))), set(filter(None, r["predicted"].split(";")))
        missed.update(true - predicted)
        added.update(predicted - true)
    errors = [[name, missed[name], added[name]] for name in sorted(classes, key=lambda c: -(missed[c] + added[c]))
              if missed[name] or added[name]]
    worst = sorted(shown, key=lambda r: -r["loss"])[:SHOWN]
    largest = [[Path(r["path"]).name, r["true"].replace(";", ", "), r["predicted"].replace(";", ", ")
                or "(none)", r["loss"]] for r in worst]
    return [("Test metrics", summary + html_table(per_label, ["label", "precision", "recall", "f1",
                                                              "average precision", "support", "threshold"])
             + png_tag(curves)),
            ("Labels most often missed or added", html_table(errors, ["label", "missed", "added"]) if errors else
             "<p>None: every label of every image was decided right.</p>"),
            ("Largest losses", html_table(largest, ["image", "true labels", "predicted labels", "loss"]))]
