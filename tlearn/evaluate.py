"""Metrics of predicted probabilities against true labels, from scikit-learn; and top-k results for people."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlearn.calibrate import calibrated, ece, fit_temperature, nll
from tlearn.config import TlearnError
from tlearn.data import Sample

log = logging.getLogger("tlearn")
PathsLogits = Callable[[list[Path], bool, bool], tuple[np.ndarray, dict[Path, str]]]  # (paths, tta, cache) ->
# (logits, failed): ``Predictor.paths_logits``


@dataclass
class Scored:
    """Uncalibrated logits and labels of the decodable images of a split, their paths, and the failures."""

    logits: np.ndarray  # (N, C)
    y: np.ndarray  # (N,)
    paths: list[Path]
    failed: dict[Path, str] = field(default_factory=dict)


def score(logits_of: PathsLogits, samples: list[Sample], tta: bool = False) -> Scored:
    """The model's logits of ``samples`` (through the feature cache: they are a run's own images), without the
    images that could not be decoded."""
    paths = [s.path for s in samples]
    logits, failed = logits_of(paths, tta, True)
    keep = [i for i, p in enumerate(paths) if p not in failed]
    if not keep:
        raise TlearnError("none of the images to evaluate on could be decoded")
    return Scored(logits[keep], np.array([samples[i].label for i in keep]), [paths[i] for i in keep], failed)


def metrics_of(scored: Scored, classes: list[str], temperature: float, tta: bool = False) -> dict[str, Any]:
    """``calibrated_metrics`` of scored images, with the files that were skipped."""
    metrics = {**calibrated_metrics(scored.y, scored.logits, classes, temperature), "tta": tta}
    if scored.failed:
        metrics["skipped"] = {str(p): r for p, r in scored.failed.items()}
    return metrics


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, cross-entropy loss, per-class precision/recall/F1/support and the confusion matrix.

    ``proba`` is (N, C); ``confusion_matrix[i][j]`` counts images of class i predicted as class j.

    >>> m = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    >>> m["accuracy"], round(m["loss"], 4)
    (1.0, 0.1643)
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

    labels = list(range(len(classes)))  # scikit-learn is imported here: predictions need none of it
    y_pred = proba.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "loss": float(log_loss(y_true, proba, labels=labels)),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }


def calibrated_metrics(y_true: np.ndarray, logits: np.ndarray, classes: list[str],
                       temperature: float) -> dict[str, Any]:
    """``classification_metrics`` of the temperature-scaled probabilities, with the calibration before and after."""
    proba = calibrated(logits, temperature)
    metrics = classification_metrics(y_true, proba, classes)
    metrics["calibration"] = {"temperature": temperature, "ece": ece(proba, y_true),
                              "ece_uncalibrated": ece(calibrated(logits, 1.0), y_true),
                              "loss_uncalibrated": nll(logits, y_true)}
    return metrics


def top_classes(paths: list[Path], failed: dict[Path, str], proba: np.ndarray, names: list[str],
          k: int) -> list[dict[str, Any]]:
    """One result per path, in order: its ``k`` most probable classes, or the reason it could not be read."""
    results: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        if path in failed:
            results.append({"path": str(path), "error": failed[path]})
            continue
        order = np.argsort(-proba[i])[:k]
        results.append({"path": str(path),
                        "predictions": [{"class": names[j], "probability": float(proba[i, j])} for j in order]})
    return results


@dataclass
class Assessed:
    """A trained model's evaluation: its calibration temperature, and per split its metrics (what the temperature
    was fitted on among them) and per-image (paths, labels, logits)."""

    temperature: float
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictions: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = field(default_factory=dict)
    failed: dict[Path, str] = field(default_factory=dict)  # images that could not be decoded when scored


def assess(logits_of: PathsLogits, validation: Scored, calibration: tuple[np.ndarray, np.ndarray, str] | None,
           test: list[Sample], classes: list[str], full: bool = True) -> Assessed:
    """Calibrate on ``calibration`` (held-out logits, labels and what they are; default: the validation split's),
    then, with ``full``, score the validation and ``test`` splits with the calibrated probabilities."""
    logits, y, where = calibration or (validation.logits, validation.y, "validation")
    out = Assessed(fit_temperature(logits, y))
    log.info(f"calibration: temperature {out.temperature:.3f}, fitted on {where} (loss {nll(logits, y):.4f} -> "
             f"{nll(logits, y, out.temperature):.4f})")
    if not full:
        return out
    splits = {"validation": validation, **({"test": score(logits_of, test)} if test else {})}
    for split, scored in splits.items():
        for path, reason in scored.failed.items():
            log.warning(f"skipped {path}: {reason}")
        out.failed.update(scored.failed)
        out.metrics[split] = metrics_of(scored, classes, out.temperature)
        out.metrics[split]["calibration"]["fitted_on"] = where
        out.predictions[split] = (scored.paths, scored.y, scored.logits)
    return out
