"""Several labels an image: targets, per-label calibration and decision thresholds, and metrics.

Values in, values out. A multi-label model's outputs are one logit per label; each label's probability is the
sigmoid of its logit divided by that label's temperature. The decision threshold of each label is fitted on
validation where the F1 score of that label is best. The metrics are scikit-learn's: mean average precision
(the mean over labels with a positive image of the area under the precision-recall curve), micro and macro F1 at
the thresholds, exact match (every label of an image right), and per label precision, recall, F1, AP, support
and threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5  # a label with fewer than MIN_POSITIVES held-out images keeps it
MIN_POSITIVES = 5  # held-out images of a label below which its threshold is not fitted (too few to place it)
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))  # the grid a label's temperature is chosen on


def targets(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """(N, C) 0/1 targets from each image's label indices."""
    y = np.zeros((len(labels), num_classes), dtype=np.float32)
    for i, ks in enumerate(labels):
        y[i, list(ks)] = 1.0
    return y


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exact and without overflow for large |z|


def bce(y: np.ndarray, logits: np.ndarray, per_label: bool = False) -> np.ndarray | float:
    """Mean binary cross-entropy, stable for any logit: log(1 + e^z) - y z."""
    loss = np.logaddexp(0.0, logits) - y * logits
    return loss.mean(axis=0) if per_label else float(loss.mean())


def fit_temperatures(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Each label's temperature, chosen on a log grid to minimise its binary cross-entropy on held-out logits (1
    where a label has only one kind of image there: nothing to fit it on)."""
    out = np.ones(y.shape[1], dtype=np.float64)
    for k in range(y.shape[1]):
        if 0 < y[:, k].sum() < len(y):
            losses = [bce(y[:, k], logits[:, k] / t) for t in TEMPERATURES]
            out[k] = TEMPERATURES[int(np.argmin(losses))]
    return out


def calibrated_bce(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Each image's binary cross-entropy (mean over labels) after each label's temperature fitted on all of
    ``logits``: how two models' validation scores compare once each is calibrated, image by image."""
    z = logits / fit_temperatures(y, logits)
    return (np.logaddexp(0.0, z) - y * z).mean(axis=1)


def fit_thresholds(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Each label's decision threshold where its F1 score on held-out probabilities is best (the midpoint between
    that probability and the next lower one, so a little noise does not flip the decision);
    ``DEFAULT_THRESHOLD`` for a label with fewer than ``MIN_POSITIVES`` positive images there."""
    out = np.full(y.shape[1], DEFAULT_THRESHOLD)
    for k in range(y.shape[1]):
        positives = y[:, k].sum()
        if positives < MIN_POSITIVES:
            continue
        order = np.argsort(-proba[:, k], kind="stable")
        p, hits = proba[order, k], np.cumsum(y[order, k])
        f1 = 2 * hits / (np.arange(1, len(p) + 1) + positives)  # predicting the top i+1 as positive
        last = np.r_[p[1:] < p[:-1], True]  # ties decided together: only cut below the last of equal values
        i = int(np.argmax(np.where(last, f1, -1)))
        out[k] = (p[i] + p[i + 1]) / 2 if i + 1 < len(p) else p[i] / 2
    return out


def decide(proba: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, C) 0/1 decisions: a label is given where its probability reaches its threshold."""
    return (proba >= thresholds).astype(np.float32)


def metrics(y: np.ndarray, logits: np.ndarray, classes: list[str], temperatures: np.ndarray,
            thresholds: np.ndarray) -> dict[str, Any]:
    """The multi-label metrics of ``logits`` against ``y`` (both (N, C)), after calibration, at ``thresholds``."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support

    proba = sigmoid(logits / temperatures)
    decided = decide(proba, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(y, decided, average=None, zero_division=0)
    present = y.sum(axis=0) > 0
    ap = np.array([average_precision_score(y[:, k], proba[:, k]) if present[k] else np.nan
                   for k in range(len(classes))])
    micro = precision_recall_fscore_support(y, decided, average="micro", zero_division=0)[2]
    return {
        "images": len(y), "labels": len(classes),
        "mean_average_precision": float(np.nanmean(ap)) if present.any() else float("nan"),
        "micro_f1": float(micro), "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "exact_match": float((decided == y).all(axis=1).mean()),
        "loss": bce(y, logits / temperatures), "loss_uncalibrated": bce(y, logits),
        "per_label": {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                             "average_precision": None if np.isnan(ap[k]) else float(ap[k]),
                             "support": int(support[k]), "threshold": float(thresholds[k]),
                             "temperature": float(temperatures[k])}
                      for k, name in enumerate(classes)},
    }


def predictions(proba: np.ndarray, classes: list[str], thresholds: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """For each image: every label at or above its threshold (most probable first), and the ``top_k`` labels, each
    with its probability and threshold."""
    out = []
    for p in proba:
        order = np.argsort(-p, kind="stable")
        row = [{"class": classes[k], "probability": float(p[k]), "threshold": float(thresholds[k])} for k in order]
        out.append({"labels": [r for r in row if r["probability"] >= r["threshold"]],
                    "predictions": row[:top_k]})
    return out
