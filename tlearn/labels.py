"""Suspected mislabels: images whose class folder disagrees with what a model that never saw them believes.

Confident learning (Northcutt, Jiang and Chuang, 2021), as cleanlab's ``find_label_issues`` does it with
``filter_by="confident_learning"`` and ``rank_by="self_confidence"``:
1. out-of-fold probabilities: a logistic regression on the frozen base's cached features (scaled to unit RMS,
   so that bases whose features are small or large are regularised alike), fitted on the other folds
   (stratified, 5 by default), predicts each image;
2. a per-class threshold: the mean probability of class j over the images labelled j;
3. an image is a suspect when the class it most confidently belongs to (the most probable among the classes
   whose probability reaches their threshold) is not its folder's;
4. suspects are ranked by their probability of their own folder's class, lowest (most suspicious) first.
The method is these few lines of NumPy; cleanlab itself would add pandas and more for them.

Several labels an image are searched as cleanlab's ``find_multilabel_issues`` does: each label is its own
two-class problem (there or not), with out-of-fold probabilities of a regression a label (shuffled folds), and
confident learning finds, label by label, the images whose tag is likely missing (not given, but the model is
confident it is there) or wrong (given, but confidently not there). An image is suspected when any of its labels
is, ranked by the lowest probability its tags get for what they say.

Nothing is moved or deleted: ``tlearn check DATA --labels`` lists the suspects as findings of kind ``mislabel``,
and every training run's report shows those among its training and validation images.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlearn.check import WARNING, Finding
from tlearn.config import DataConfig, TlearnError
from tlearn.data import ImageFolder, Sample, scan
from tlearn.fileio import atomic_write_text, file_sha256, keyed_path
from tlearn.multilabel import sigmoid, targets

if TYPE_CHECKING:
    from tlearn.extractor import Extractor
    from tlearn.features import Features

log = logging.getLogger("tlearn")
FOLDS = 5
OUTLIER_Z = 3.5  # a robust (median and MAD) z-score above which an image is listed as unlike its class


def out_of_fold(X: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """(N, C) probabilities of each row from a logistic regression fitted on the other folds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        raise TlearnError("--labels needs at least 2 images in every class, to predict each one from the others")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        X = X / max(float(np.sqrt(np.mean(X ** 2))), 1e-12)  # one scale for every base: RMS 1, geometry kept
        return cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), X, y, method="predict_proba",
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed))


def out_of_fold_multi(X: np.ndarray, Y: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """(N, C) probabilities of each label of each row, from a logistic regression a label (C=1, as for one label
    an image; ``models.fit_ovr``, scikit-learn's objective solved for every label at once) fitted on the other
    folds; a label that no image, or every image, of those folds has gets that share."""
    from sklearn.model_selection import KFold

    from tlearn.models import fit_ovr, ovr_logits  # torch: only when the search runs

    folds = min(folds, len(Y))
    if folds < 2:
        raise TlearnError("--labels needs at least 2 images, to predict each one from the others")
    X = X / max(float(np.sqrt(np.mean(X ** 2))), 1e-12)  # one scale for every base: RMS 1, geometry kept
    logits = np.zeros(Y.shape)
    for fit, held in KFold(folds, shuffle=True, random_state=seed).split(X):
        logits[held] = ovr_logits(fit_ovr(X[fit], Y[fit], 1.0, seed), X[held])
    return sigmoid(logits)


def multi_label_issues(proba: np.ndarray, Y: np.ndarray) -> list[tuple[int, list[int]]]:
    """The rows of ``Y`` (N, C) of 0/1 with a tag that confident learning doubts, label by label as a two-class
    problem (``label_issues``), each with the labels doubted; the most suspicious first (the lowest probability
    the doubted tags get for what they say)."""
    doubted: dict[int, list[int]] = {}
    for k in range(Y.shape[1]):
        y = Y[:, k].astype(int)
        if 0 < y.sum() < len(y):
            for i in label_issues(np.c_[1 - proba[:, k], proba[:, k]], y):
                doubted.setdefault(int(i), []).append(k)
    confidence = {i: min(proba[i, k] if Y[i, k] else 1 - proba[i, k] for k in ks) for i, ks in doubted.items()}
    return [(i, doubted[i]) for i in sorted(doubted, key=lambda i: (confidence[i], i))]


def label_issues(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the rows whose label ``y`` confident learning doubts, most suspicious first.

    >>> label_issues(np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.95, 0.05]]), np.array([0, 0, 1, 1]))
    array([3])
    """
    classes = proba.shape[1]
    thresholds = np.array([proba[y == j, j].mean() if (y == j).any() else 1.0 for j in range(classes)])
    confident = np.where(proba >= thresholds - 1e-12, proba, -1.0)  # (N, C): the classes each row reaches
    believed = confident.argmax(1)
    reached = confident.max(1) >= 0
    suspects = np.flatnonzero(reached & (believed != y))
    self_confidence = proba[suspects, y[suspects]]
    return suspects[np.argsort(self_confidence, kind="stable")]


def suspects(config: DataConfig, backbone: str = "efficientnet_lite0", cache_dir: str | None = None,
             progress: bool = True) -> list[Finding]:
    """The ``mislabel`` findings of a folder, most suspicious first, from ``backbone``'s cached features."""
    data, feats = _folder_features(config, backbone, cache_dir, progress)
    paths = [s.path for s in data.samples]
    return mislabels(paths, _labels(data, data.samples), data.classes, feats, seed=config.seed,
                     given=given_as(data))


def unusual(config: DataConfig, backbone: str = "efficientnet_lite0", cache_dir: str | None = None,
            progress: bool = True) -> list[Finding]:
    """The ``outlier`` findings of a folder: images whose ``backbone`` features are far from the rest of their
    class (``novelty.outliers``: the mean cosine distance to their nearest other images of the class, each left
    out of its own score), by a robust z-score above ``OUTLIER_Z`` within the class; the farthest first."""
    from tlearn.novelty import K, outliers

    data, feats = _folder_features(config, backbone, cache_dir, progress)
    if data.multi_label:
        raise TlearnError(f"{config.label_file or config.path} gives several labels an image, and --outliers looks "
                          "for images unlike the rest of their one class: drop --outliers (--labels searches such "
                          "data)")
    rows = [i for i, s in enumerate(data.samples) if s.path not in feats.failed]
    keep = [data.samples[i] for i in rows]
    y = np.array([s.label for s in keep])
    score = outliers(feats.X[rows], y)
    z = np.full(len(y), -np.inf)
    for c in np.unique(y):
        mine = (y == c) & np.isfinite(score)
        if mine.sum() >= 3:
            centre = np.median(score[mine])
            spread = 1.4826 * np.median(np.abs(score[mine] - centre))
            z[mine] = (score[mine] - centre) / max(spread, 1e-6)
    found = [i for i in np.argsort(-np.nan_to_num(score, nan=-1.0), kind="stable") if z[i] > OUTLIER_Z]
    return [Finding("outlier", WARNING, str(keep[i].path), f"unlike the rest of {data.classes[y[i]]!r}: mean cosine "
                    f"distance {score[i]:.3f} to its {K} nearest others there, {z[i]:.1f} robust standard deviations "
                    "above the class's median") for i in found]


def _folder_features(config: DataConfig, backbone: str, cache_dir: str | None, progress: bool
                     ) -> tuple[ImageFolder, Features]:
    from tlearn.config import BackboneConfig, RuntimeConfig, TrainConfig, validate
    from tlearn.extractor import Extractor  # torch and timm: only when the search runs

    data = scan(config)
    settings = BackboneConfig(backbone=backbone), TrainConfig(), RuntimeConfig(cache_dir=cache_dir)
    validate(*settings)
    extractor = Extractor(*settings, verbose=progress)
    return data, extractor.features([s.path for s in data.samples], announce=False)


def run_mislabels(folder: ImageFolder, extractor: Extractor, seed: int, cache_dir: str | None) -> list[Finding]:
    """Suspected mislabels among a run's training and validation images, from the first base's features. Only
    where these are all in the cache already, as every mode but scratch leaves them: the report gets them without
    another pass over the images."""
    samples = folder.split("train") + folder.split("validation")
    paths, name = [s.path for s in samples], extractor.names()[0]
    if extractor.missing(paths, name, "center"):
        return []
    start, labels = time.perf_counter(), _labels(folder, samples)
    key = {"what": "mislabels", "version": 1, "given": given_as(folder),
           "features": extractor.namespace(name, "center"),
           "rows": [[file_sha256(p), y] for p, y in zip(paths, labels, strict=True)], "classes": folder.classes,
           "seed": seed, "scikit-learn": importlib.metadata.version("scikit-learn")}
    try:
        found = mislabels(paths, labels, folder.classes, extractor.features(paths, names=[name], announce=False),
                          seed=seed, memo=keyed_path(cache_dir, "labels", key, ".json"), given=key["given"])
    except TlearnError as e:  # too few images in a class to predict each from the others
        log.info(f"suspected mislabels: not searched ({e})")
        return []
    log.info(f"suspected mislabels: {len(found)} among {len(paths)} training and validation images "
             f"({time.perf_counter() - start:.1f} s)")
    return found


def _labels(data: ImageFolder, samples: list[Sample]) -> list[int] | list[tuple[int, ...]]:
    """Each image's class, or (several labels an image) its labels."""
    return [s.labels if data.multi_label else s.label for s in samples]


def given_as(data: ImageFolder) -> str:
    """How an image's label was given, as the findings say it: its class folder, or a label file's row."""
    return "labelled" if data.layout.startswith("label file") else "in folder"


def mislabels(paths: list[Path], labels: list[int] | list[tuple[int, ...]], classes: list[str], feats: Features,
              seed: int = 0, memo: Path | None = None, given: str = "in folder") -> list[Finding]:
    """The ``mislabel`` findings among ``paths`` (with their folders' ``labels``, or each image's tuple of labels;
    ``given`` says how, "in folder" or "labelled"), most suspicious first, from their features (rows of the images
    ``feats`` could not read are left out). ``memo`` is a file keyed by everything the result depends on: found
    there, the result is read back instead of searched for again."""
    remembered = _recall(memo, len(paths))
    if remembered is not None:
        return [Finding("mislabel", WARNING, str(paths[i]), detail) for i, detail in remembered]
    keep = [i for i, p in enumerate(paths) if p not in feats.failed]
    search = _multi_mislabels if keep and isinstance(labels[keep[0]], tuple) else _mislabels
    found = [(keep[i], detail) for i, detail in search(feats.X[keep], [labels[i] for i in keep], classes, seed, given)]
    if memo is not None:
        with contextlib.suppress(TlearnError):  # a read-only cache folder: searched again next time
            atomic_write_text(memo, json.dumps([[int(i), detail] for i, detail in found]))
    return [Finding("mislabel", WARNING, str(paths[i]), detail) for i, detail in found]


def _mislabels(X: np.ndarray, labels: list[int], classes: list[str], seed: int, given: str) -> list[tuple[int, str]]:
    y = np.array(labels)
    proba = out_of_fold(X, y, seed=seed)
    own, found = "its folder's class" if given == "in folder" else "its label", []
    for i in label_issues(proba, y):
        believed = int(proba[i].argmax())
        found.append((int(i), f"{given} {classes[y[i]]!r}, but a model that never saw it believes "
                              f"{classes[believed]!r} ({proba[i, believed]:.2f}); {own} has {proba[i, y[i]]:.2f}"))
    return found


def _multi_mislabels(X: np.ndarray, labels: list[tuple[int, ...]], classes: list[str], seed: int, given: str
                     ) -> list[tuple[int, str]]:
    Y = targets(labels, len(classes))
    proba = out_of_fold_multi(X, Y, seed=seed)
    found = []
    for i, doubted in multi_label_issues(proba, Y):
        missing = [f"{classes[k]!r} is there ({proba[i, k]:.2f})" for k in doubted if not Y[i, k]]
        wrong = [f"{classes[k]!r} is not ({1 - proba[i, k]:.2f})" for k in doubted if Y[i, k]]
        tags = ";".join(classes[k] for k in labels[i]) or "nothing"
        found.append((i, f"{given} {tags!r}, but a model that never saw it believes {' and '.join(missing + wrong)}"))
    return found


def _recall(memo: Path | None, n: int) -> list[tuple[int, str]] | None:
    try:
        rows = json.loads(memo.read_text()) if memo is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)
                                             and 0 <= r[0] < n and isinstance(r[1], str) for r in rows):
        return None  # damaged: searched again
    return [(i, detail) for i, detail in rows]
