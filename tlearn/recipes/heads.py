"""More from cached features: the head, its regularisation and the mirror-image augmentation, chosen by validation.

Candidates, each trained on the training split and scored on the validation split (loss first, as a proper score
that does not tie on small splits, then accuracy):

- ``logreg``: scikit-learn's multinomial logistic regression on the raw pooled features (standardising them
  loses about a point on Oxford-17), its C (and, under ``--head logreg``, whether to add the mirrored images'
  cached features as extra training rows; ``--head auto`` always adds them) chosen by k-fold cross-validation on
  the training split (out-of-fold log loss);
- ``dense``: the Dropout + Linear head trained with early stopping (``train.fit_head``) on 15 % of the training
  split, on the images and their mirror images.

A head trained with mirror images also predicts from both views, averaging their logits (``ModelSpec.views``):
mirror-consistent predictions cost a second pass of the base and gained 0.4 to 1.1 points on Oxford-17.

The winner is refit on train + validation when it is a logistic regression (its settings no longer need the
held-out split), and the temperature for calibration is then fitted on held-out logits of train + validation
(the search's out-of-fold logits of the training split, and the validation split's from the model fitted on the
training split), so it is never fitted on predictions of images the model trained on. A dense head keeps its
early-stopped weights and is calibrated on validation as before.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from tlearn.calibrate import nll
from tlearn.config import TlearnError, TrainConfig
from tlearn.features import cpu_cores
from tlearn.fileio import atomic_path
from tlearn.models import logreg_linear
from tlearn.train import History, TrainingDiverged, fit_head, make_head

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

log = logging.getLogger("tlearn")
C_GRID = (1.0, 3.0, 10.0)  # inverse L2 strengths tried by cross-validation: raw features peak near 3, and C=0.3
# was never chosen on the shared datasets while costing a third of the search
FOLDS = 3  # for choosing C (on the training split)
DEFAULT_C = 3.0  # where nothing can be held out to choose C: raw features peak near 3
LARGE_TRAIN = 20_000  # training images above which --head auto trains the dense head alone: scikit-learn's
# full-batch solver copies the training features to float64 (0.9 GB for 42,000 images and their mirror images)
# and its cross-validation takes minutes, while the dense head reads mini-batches in place
MEMO_VERSION = "4"  # bump when a change to this module changes the heads it chooses or what is remembered (4: the
# failed rows written before the drop; History.closed_form)


@dataclass
class Split:
    """Cached features of one split: the centre view, the mirrored view (or None), and the labels."""

    X: np.ndarray  # (N, F)
    X_flip: np.ndarray | None
    y: np.ndarray  # (N,)

    def rows(self, flip: bool, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Training rows: the images at ``index`` (all by default), and with ``flip`` their mirror images too."""
        index = np.arange(len(self.y)) if index is None else index
        if not flip:
            return self.X[index], self.y[index]
        return np.vstack([self.X[index], self.X_flip[index]]), np.concatenate([self.y[index], self.y[index]])

    def logits(self, predict: Callable[[np.ndarray], np.ndarray], flip: bool,
               index: np.ndarray | None = None) -> np.ndarray:
        """Logits of the images at ``index``; with ``flip``, the mean of the image's and its mirror image's, as
        a model trained with mirror images predicts (a mirror-consistent model)."""
        index = np.arange(len(self.y)) if index is None else index
        z = predict(self.X[index])
        return (z + predict(self.X_flip[index])) / 2 if flip else z


@dataclass
class Probe:
    """The chosen head and the evidence: every candidate's validation score, and logits that were held out."""

    head: nn.Sequential
    history: History
    chosen: dict[str, Any]
    candidates: list[dict[str, Any]]
    val_logits: np.ndarray  # (N_val, C) of the model trained on the training split only
    train_oof: np.ndarray | None = None  # (N_train, C) out-of-fold logits of the chosen logistic regression
    calibration: tuple[np.ndarray, np.ndarray] | None = None  # out-of-fold (logits, y), when refit
    refit: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    model: Any = None  # the fitted LogisticRegression, or the dense head

    @property
    def val_loss(self) -> float:
        return self.chosen["val_loss"]

    @property
    def val_accuracy(self) -> float:
        return self.chosen["val_accuracy"]


def logreg_logits(clf: LogisticRegression, X: np.ndarray) -> np.ndarray:
    """(N, C) logits whose softmax is ``clf.predict_proba`` (binary: [0, z])."""
    z = clf.decision_function(X)
    return np.stack([np.zeros_like(z), z], 1) if z.ndim == 1 else z


def _logreg(C: float, config: TrainConfig) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=3000, random_state=config.seed, warm_start=True,
                              class_weight="balanced" if config.class_weight == "balanced" else None)


def _fit(clf: LogisticRegression, X: np.ndarray, y: np.ndarray) -> LogisticRegression:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a C that is too weak converges slowly; CV judges it
        return clf.fit(X, y)


def _path(train: Split, fit_idx: np.ndarray, held_idx: np.ndarray, flip: bool, Cs: tuple[float, ...],
          config: TrainConfig) -> list[np.ndarray]:
    """Logits of the held-out rows for each C, fitted along the path of increasing C with warm starts."""
    clf, out = _logreg(Cs[0], config), []
    X, y = train.rows(flip, fit_idx)
    for C in Cs:
        clf.set_params(C=C)
        _fit(clf, X, y)
        out.append(train.logits(functools.partial(logreg_logits, clf), flip, held_idx))
    return out


def cv_logits(data: Split, flip: bool, Cs: tuple[float, ...], folds: int, config: TrainConfig) -> list[np.ndarray]:
    """Out-of-fold logits of every image of ``data`` for each C (mirror images stay with their image's fold).

    An image of a class with a single training image is never held out (every fold's fit must know every class):
    its rows are NaN, and ``held`` picks the rows that have out-of-fold logits."""
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold

    classes, counts = np.unique(data.y, return_counts=True)
    rows, always = heldable(data.y)
    oof = [np.full((len(data.y), len(classes)), np.nan) for _ in Cs]
    if not len(rows):
        return oof
    folds = max(2, min(folds, int(counts[counts >= 2].min())))
    splits = [(np.concatenate([rows[a], always]), rows[b]) for a, b in
              StratifiedKFold(folds, shuffle=True, random_state=config.seed).split(rows, data.y[rows])]
    parts = Parallel(n_jobs=min(len(splits), cpu_cores()), prefer="threads")(
        delayed(_path)(data, a, b, flip, Cs, config) for a, b in splits)
    for (_, held), logits in zip(splits, parts, strict=True):
        for i, z in enumerate(logits):
            oof[i][held] = z
    return oof


def heldable(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows that can be held out, rows that cannot): an image whose class has a single image here cannot be held
    out, or the model fitted without it would not know its class."""
    single = np.bincount(y)[y] < 2
    return np.flatnonzero(~single), np.flatnonzero(single)


def held(z: np.ndarray) -> np.ndarray:
    """The rows of out-of-fold logits ``z`` that were held out (the others are NaN)."""
    return np.isfinite(z).all(1)


def _linear_head(clf: LogisticRegression, num_features: int, num_classes: int) -> nn.Sequential:
    """The fitted logistic regression as the Dropout(0) + Linear head that is saved and served like any other."""
    head = make_head(num_features, num_classes, hidden=0, dropout=0.0)
    head[1].load_state_dict(logreg_linear(clf, num_classes).state_dict())
    return head.eval()


def _torch_logits(head: nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head.eval()(torch.from_numpy(X)).numpy()


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def _logreg_candidate(train: Split, val: Split, flips: tuple[bool, ...], config: TrainConfig,
                      notes: list[str]) -> dict[str, Any]:
    """The logistic regression whose C and use of mirror images have the lowest out-of-fold loss on the training
    split, refit on all of it and scored on validation. Where no class has two training images there is nothing to
    hold out: C is then ``DEFAULT_C`` and the note says so."""
    oof = {(flip, C): z for flip in flips for C, z in zip(C_GRID, cv_logits(train, flip, C_GRID, FOLDS, config),
                                                          strict=True)}
    scores = {key: nll(z[rows], train.y[rows]) for key, z in oof.items() if (rows := held(z)).any()}
    if scores:
        flip, C = min(scores, key=scores.get)
        cv_loss = float(scores[flip, C])
    else:
        (flip, C), cv_loss = (flips[-1], DEFAULT_C), None
        notes.append(f"logreg: no class has two training images, so C is not cross-validated (C={C:g})")
        log.info(f"  {notes[-1]}")
    clf = _fit(_logreg(C, config), *train.rows(flip))
    logits = val.logits(functools.partial(logreg_logits, clf), flip)
    return {"head": "logreg", "flip": flip, "C": C, "cv_loss": cv_loss, "val_logits": logits,
            "model": clf, "val_loss": nll(logits, val.y), "val_accuracy": _accuracy(logits, val.y),
            "train_oof": oof[flip, C]}


def stop_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(rows to fit on, rows to stop early on, a note) of the training split: a stratified 15 %; on a small split
    at least one image of each class that has two or more (a class with one image is only fitted on), and the note
    says so. None when no class has two images."""
    from sklearn.model_selection import train_test_split

    rows, always = heldable(y)
    if not len(rows):
        return None
    usual = math.ceil(0.15 * len(rows))  # what test_size=0.15 holds out: on the usual split, the very same rows
    size = max(len(np.unique(y[rows])), usual)
    fit_rows, stop_rows = train_test_split(rows, test_size=size, stratify=y[rows], random_state=seed)
    note = "" if size == usual and not len(always) else (
        f"the dense head stops early on {size} training image(s), one or more of each class with two or more"
        + (f"; {len(always)} image(s) of classes with a single training image are only fitted on" if len(always)
           else ""))
    return np.concatenate([fit_rows, always]), stop_rows, note


def _dense_candidate(train: Split, val: Split, flip: bool, num_classes: int, config: TrainConfig,
                     weight: torch.Tensor | None, stop: tuple[np.ndarray, np.ndarray, str] | None) -> dict[str, Any]:
    """The dense head, early-stopped on ``stop``'s rows of the training split (``stop_split``), so that its
    validation score is as honest as the logistic regression's (stopping on the validation split itself would
    flatter it). Without them (``--head dense`` on a training split with no two images of a class), it stops on
    the validation split, the one held-out set there is."""
    if stop is None:
        head, history, _ = fit_head(train.X, train.y, val.X, val.y, num_classes, config, weight=weight,
                                    mirror=train.X_flip if flip else None)
    else:
        head, history, _ = fit_head(train.X, train.y, train.X, train.y, num_classes, config, weight=weight,
                                    mirror=train.X_flip if flip else None, rows=stop[0], val_rows=stop[1])
    logits = val.logits(functools.partial(_torch_logits, head), flip)
    return {"head": "dense", "flip": flip, "val_logits": logits, "model": head, "history": history,
            "val_loss": nll(logits, val.y), "val_accuracy": _accuracy(logits, val.y)}


def choose_head(train: Split, val: Split, num_classes: int, config: TrainConfig,
                weight: torch.Tensor | None = None) -> Probe:
    """Train every candidate head of ``config.head`` on ``train`` and keep the best on ``val``."""
    start = time.perf_counter()
    flips = (False, True) if train.X_flip is not None else (False,)
    candidates, notes = [], []
    large = config.head == "auto" and len(train.y) > LARGE_TRAIN
    if large:
        notes.append(f"{len(train.y)} training images: the dense head alone (above {LARGE_TRAIN:,}, the logistic "
                     "regression's solver and cross-validation cost too much memory and time; --head logreg forces "
                     "it)")
        log.info(f"  {notes[-1]}")
    # --head auto trains with the mirror images where they are cached: in every benchmark here the candidates
    # with them won (BENCHMARKS.md), and trying without them cost a third of the search; --head logreg or dense
    # tries both
    tried = flips[-1:] if config.head == "auto" else flips
    if config.head == "logreg" or (config.head == "auto" and not large):
        candidates.append(_logreg_candidate(train, val, tried, config, notes))
    stop = stop_split(train.y, config.seed) if config.head in ("auto", "dense") else None
    if config.head in ("auto", "dense") and (stop is None or stop[2]):
        dense = "stops early on the validation split" if config.head == "dense" else "is not a candidate"
        notes.append(stop[2] if stop else "no class has two training images to hold out for the dense head's early "
                     f"stopping, so it {dense}")
        log.info(f"  {notes[-1]}")
    if config.head == "dense" or (config.head == "auto" and stop is not None):
        for flip in tried:
            try:
                candidates.append(_dense_candidate(train, val, flip, num_classes, config, weight, stop))
            except TrainingDiverged as e:
                if config.head == "dense" or not candidates:
                    raise
                log.warning(f"  head dense{', + mirrored images' if flip else ''} left out: {e}")
    for c in candidates:
        log.info(f"  head {describe(c)}: val_loss {c['val_loss']:.4f}, val_accuracy {c['val_accuracy']:.4f}")
    best, chosen, table = winner(candidates, lambda c: (c["val_loss"], -c["val_accuracy"]))
    if best["head"] == "dense":
        probe = Probe(best["model"].eval(), best["history"], chosen, table, best["val_logits"], model=best["model"])
    else:
        clf, history = best["model"], History(best_epoch=1, closed_form=True)
        train_logits = train.logits(functools.partial(logreg_logits, clf), best["flip"])
        history.append("head", loss=nll(train_logits, train.y), accuracy=_accuracy(train_logits, train.y),
                       val_loss=best["val_loss"], val_accuracy=best["val_accuracy"])
        probe = Probe(_linear_head(clf, train.X.shape[1], num_classes), history, chosen, table, best["val_logits"],
                      best["train_oof"], model=clf)
    probe.seconds, probe.notes = time.perf_counter() - start, notes
    return probe


def winner(candidates: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
           ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(the best candidate by ``key``, its settings and scores, every candidate's) without the arrays and models."""
    best = min(candidates, key=key)
    arrays = ("val_logits", "model", "history", "train_oof")
    return best, {k: v for k, v in best.items() if k not in arrays}, [
        {k: v for k, v in c.items() if k not in arrays} for c in candidates]


def refit(probe: Probe, train: Split, val: Split, num_classes: int, config: TrainConfig) -> Probe:
    """A logistic-regression probe refit on train + validation with its chosen settings, with held-out logits of
    those images for calibration (the search's out-of-fold logits of the training split, and the validation
    split's from the model fitted on the training split); a dense probe as it is (it needs the held-out split
    for early stopping)."""
    if probe.chosen["head"] != "logreg":
        return probe
    start = time.perf_counter()
    flip, C = probe.chosen["flip"], probe.chosen["C"]
    both = Split(np.vstack([train.X, val.X]), np.vstack([train.X_flip, val.X_flip]) if flip else None,
                 np.concatenate([train.y, val.y]))
    clf = _fit(_logreg(C, config), *both.rows(flip))
    held_out = np.vstack([probe.train_oof, probe.val_logits])
    kept = held(held_out)  # not the training images that were never held out (a class's only one)
    return dataclasses.replace(
        probe, head=_linear_head(clf, train.X.shape[1], num_classes), model=clf,
        calibration=(held_out[kept], both.y[kept]),
        refit=True, seconds=probe.seconds + time.perf_counter() - start,
        notes=[*probe.notes, f"refit on train + validation ({len(both.y)} images) with the chosen settings"])


def describe(c: dict[str, Any]) -> str:
    """'logreg C=1, mirrored' / 'dense'."""
    what = f"logreg C={c['C']:g}" if c["head"] == "logreg" else "dense"
    return what + (", + mirrored images" if c["flip"] else "")


def save_probe(path: Path, probe: Probe, failed: list[list[Any]]) -> None:
    """Remember a chosen (or refit) head under the cache folder, with the files that failed on the way as
    [split, row, reason]; a cache folder that cannot be written only loses the saving."""
    arrays = {f"head.{k}": v.numpy() for k, v in probe.head.state_dict().items()}
    arrays["val_logits"] = probe.val_logits
    if probe.train_oof is not None:
        arrays["train_oof"] = probe.train_oof
    if probe.calibration is not None:
        arrays["calibration_logits"], arrays["calibration_y"] = probe.calibration
    shape = [probe.head[1].out_features if len(probe.head) > 2 else 0, float(probe.head[0].p)]  # see make_head
    about = {"chosen": probe.chosen, "candidates": probe.candidates, "history": probe.history.to_dict(),
             "refit": probe.refit, "seconds": probe.seconds, "notes": probe.notes, "failed": failed, "shape": shape}
    try:
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp,
                      metadata={"probe": json.dumps(about)})
    except TlearnError as e:
        log.debug(f"head not remembered: {e}")


def load_probe(path: Path) -> tuple[Probe, list[list[Any]]] | None:
    """A head remembered by ``save_probe`` and the failed files, or None when there is none (or it is damaged)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:  # one read: the metadata and the arrays
            about = json.loads(f.metadata()["probe"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    weights = {k[5:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("head.")}
    last = max(weights, key=lambda k: int(k.split(".")[0]))
    head = make_head(weights["1.weight"].shape[1], weights[last].shape[0], about["shape"][0], about["shape"][1])
    head.load_state_dict(weights)
    h = about["history"]
    history = History(h["epoch"], h["history"], h["stage"], h["best_epoch"], h.get("closed_form", False))
    calibration = (arrays["calibration_logits"], arrays["calibration_y"]) if "calibration_y" in arrays else None
    probe = Probe(head.eval(), history, about["chosen"], about["candidates"], arrays["val_logits"],
                  arrays.get("train_oof"), calibration, about["refit"], about["seconds"], about["notes"])
    return probe, about["failed"]
