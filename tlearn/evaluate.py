"""Metrics of predicted probabilities against true labels, from scikit-learn; and top-k results for people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tlearn.calibrate import calibrated, ece, nll


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
