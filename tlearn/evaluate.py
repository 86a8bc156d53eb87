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
from tlearn.data import Sample, expand_inputs
from tlearn.multilabel import bce, fit_temperatures, fit_thresholds, sigmoid, targets
from tlearn.multilabel import metrics as multi_metrics

log = logging.getLogger("tlearn")
PathsOutputs = Callable[[list[Path], bool, bool], Any]  # (paths, tta, cache) -> ``predictor.Outputs``:
# ``Predictor.paths_outputs``


@dataclass
class Scored:
    """Uncalibrated logits and labels of the decodable images of a split, their paths, and the failures; with the
    features the head takes and the novelty scores, where the model gives them."""

    logits: np.ndarray  # (N, C)
    y: np.ndarray  # (N,)
    paths: list[Path]
    failed: dict[Path, str] = field(default_factory=dict)
    features: np.ndarray | None = None  # (N, F)
    novelty: np.ndarray | None = None  # (N,)


def score(outputs_of: PathsOutputs, samples: list[Sample], tta: bool = False) -> Scored:
    """The model's outputs of ``samples`` (through the feature cache: they are a run's own images), without the
    images that could not be decoded."""
    paths = [s.path for s in samples]
    out = outputs_of(paths, tta, True)
    keep = [i for i, p in enumerate(paths) if p not in out.failed]
    if not keep:
        raise TlearnError("none of the images to evaluate on could be decoded")
    multi = samples[keep[0]].label < 0  # several labels an image: (N, C) of 0/1
    y = targets([samples[i].labels for i in keep], out.logits.shape[1]) if multi else \
        np.array([samples[i].label for i in keep])
    return Scored(out.logits[keep], y, [paths[i] for i in keep], out.failed,
                  None if out.features is None else out.features[keep],
                  None if out.novelty is None else out.novelty[keep])


def metrics_of(scored: Scored, classes: list[str], temperature: float, tta: bool = False,
               threshold: float | None = None) -> dict[str, Any]:
    """``calibrated_metrics`` of scored images, with the files that were skipped, and the share of them called
    unknown at ``threshold`` where the model scores novelty."""
    metrics = {**calibrated_metrics(scored.y, scored.logits, classes, temperature), "tta": tta}
    if scored.novelty is not None and threshold is not None:
        metrics["novelty"] = {"threshold": threshold, "unknown": float((scored.novelty > threshold).mean()),
                              "median": float(np.median(scored.novelty))}
    if scored.failed:
        metrics["skipped"] = {str(p): r for p, r in scored.failed.items()}
    return metrics


def against_others(outputs_of: PathsOutputs, inside: Scored, folder: str | Path, threshold: float | None
                   ) -> dict[str, Any]:
    """How well the novelty score tells the images in ``folder`` (of none of the model's classes) from the scored
    images ``inside`` them: the AUROC, and the share of each called unknown at ``threshold``."""
    from sklearn.metrics import roc_auc_score

    if threshold is None or inside.novelty is None:
        raise TlearnError("this model has no novelty score to measure: it was saved before tlearn scored novelty; "
                          "train it again")
    if not Path(folder).is_dir():
        raise TlearnError(f"--unknown {folder}: no such folder; give a folder of photos of none of the model's "
                          "classes")
    others = [Sample(p, 0, "test") for p in expand_inputs([folder])]
    if not others:
        raise TlearnError(f"--unknown {folder}: no images there; give a folder of photos of none of the model's "
                          "classes")
    a, b = inside.novelty, score(outputs_of, others).novelty
    return {"folder": str(folder), "images": len(b), "auroc": float(roc_auc_score(
        np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b])), "unknown": float((b > threshold).mean()),
        "unknown_in_distribution": float((a > threshold).mean()), "threshold": threshold}


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


def top_classes(paths: list[Path], failed: dict[Path, str], proba: np.ndarray, names: list[str], k: int,
                novelty: np.ndarray | None = None, threshold: float | None = None,
                labels: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One result per path, in order: its ``k`` most probable classes, with its ``novelty`` and whether it is
    ``unknown`` (above ``threshold``) where those are given; or the reason it could not be read. With ``labels``
    (several labels an image: each label's threshold), also ``"labels"``: every label at or above its threshold,
    most probable first."""
    results: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        if path in failed:
            results.append({"path": str(path), "error": failed[path]})
            continue
        order = np.argsort(-proba[i])[:k]
        results.append({"path": str(path),
                        "predictions": [{"class": names[j], "probability": float(proba[i, j])} for j in order]})
        if labels is not None:
            results[-1]["labels"] = [{"class": names[j], "probability": float(proba[i, j])}
                                     for j in np.argsort(-proba[i]) if proba[i, j] >= labels[j]]
        if novelty is not None and threshold is not None:
            results[-1] |= novelty_fields(float(novelty[i]), threshold)
    return results


def novelty_fields(novelty: float, threshold: float) -> dict[str, Any]:
    """A result's ``"novelty"`` and whether it is ``"unknown"``: above the model's threshold."""
    return {"novelty": round(novelty, 4), "unknown": novelty > threshold}


@dataclass
class Assessed:
    """A trained model's evaluation: its calibration temperature, and per split its metrics (what the temperature
    was fitted on among them) and per-image (paths, labels, logits)."""

    temperature: float
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    temperatures: np.ndarray | None = None  # several labels an image: each label's temperature and threshold
    thresholds: np.ndarray | None = None
    predictions: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = field(default_factory=dict)
    failed: dict[Path, str] = field(default_factory=dict)  # images that could not be decoded when scored


def assess(outputs_of: PathsOutputs, validation: Scored, calibration: tuple[np.ndarray, np.ndarray, str] | None,
           test: list[Sample], classes: list[str], full: bool = True, threshold: float | None = None) -> Assessed:
    """Calibrate on ``calibration`` (held-out logits, labels and what they are; default: the validation split's),
    then, with ``full``, score the validation and ``test`` splits with the calibrated probabilities (and the share
    called unknown at the novelty ``threshold``)."""
    logits, y, where = calibration or (validation.logits, validation.y, "validation")
    out = Assessed(fit_temperature(logits, y))
    log.info(f"calibration: temperature {out.temperature:.3f}, fitted on {where} (loss {nll(logits, y):.4f} -> "
             f"{nll(logits, y, out.temperature):.4f})")
    if not full:
        return out
    for split, scored in _scored_splits(outputs_of, validation, test, out).items():
        out.metrics[split] = metrics_of(scored, classes, out.temperature, threshold=threshold)
        out.metrics[split]["calibration"]["fitted_on"] = where
        out.predictions[split] = (scored.paths, scored.y, scored.logits, scored.novelty)
    return out


def _scored_splits(outputs_of: PathsOutputs, validation: Scored, test: list[Sample], out: Assessed
                   ) -> dict[str, Scored]:
    """The validation split's scores and the ``test`` split's (where it has images); the files that could not be
    decoded are said and join ``out.failed``."""
    splits = {"validation": validation, **({"test": score(outputs_of, test)} if test else {})}
    for scored in splits.values():
        for path, reason in scored.failed.items():
            log.warning(f"skipped {path}: {reason}")
        out.failed.update(scored.failed)
    return splits


def assess_multi(outputs_of: PathsOutputs, validation: Scored, calibration: tuple[np.ndarray, np.ndarray, str] | None,
                 test: list[Sample], classes: list[str], full: bool = True) -> Assessed:
    """``assess`` for several labels an image: each label's temperature and decision threshold (best F1) fitted on
    ``calibration`` (held-out logits; default: the validation split's), then, with ``full``, the multi-label
    metrics of the validation and ``test`` splits."""
    logits, y, where = calibration or (validation.logits, validation.y, "validation")
    temperatures = fit_temperatures(y, logits)
    out = Assessed(1.0, temperatures=temperatures, thresholds=fit_thresholds(y, sigmoid(logits / temperatures)))
    log.info(f"calibration: a temperature and a threshold a label, fitted on {where} (loss {bce(y, logits):.4f} -> "
             f"{bce(y, logits / temperatures):.4f})")
    if not full:
        return out
    for split, scored in _scored_splits(outputs_of, validation, test, out).items():
        out.metrics[split] = {**multi_metrics(scored.y, scored.logits, classes, temperatures, out.thresholds),
                              "fitted_on": where, "tta": False}
        if scored.failed:
            out.metrics[split]["skipped"] = {str(p): r for p, r in scored.failed.items()}
        out.predictions[split] = (scored.paths, scored.y, scored.logits, None)
    return out
