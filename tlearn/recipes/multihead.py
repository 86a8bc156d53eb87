"""Several labels an image: the head on cached features.

The multi-label counterpart of ``heads.choose_head``, with the same shape of result (a ``Probe``):

- ``logreg`` (the default, ``--head auto``): one L2-regularised logistic regression per label, solved together
  (``fit_ovr``), its C chosen by 3-fold cross-validation on the training split (out-of-fold binary
  cross-entropy, the mirror images staying with their image's fold), trained with the mirror images as extra
  rows where they are cached. A label that every training image has, or none has, gets a constant logit (its
  smoothed log-odds) instead of a regression;
- ``dense`` (``--head dense``): the Dropout + Linear head trained with binary cross-entropy (``train.fit_head``),
  early-stopped on a seeded 15 % of the training split.

``--head auto`` does not try the dense head for several labels an image: on the multi-label benchmark
(BENCHMARKS.md) it won on validation loss and lost on test loss, mAP and F1 to the regressions.

A label combination is never a class: each label has its own output. The chosen logistic regression is refit on
train + validation, with held-out logits of those images kept for calibration, as for one label an image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch

from tlearn.config import TrainConfig
from tlearn.models import Linear, fit_ovr, ovr_logits
from tlearn.multilabel import bce, metrics
from tlearn.recipes.heads import C_GRID, FOLDS, Probe, Split, held, winner
from tlearn.train import History, fit_head, make_head

MULTI_MEMO_VERSION = "1"  # in the key of a remembered multi-label head: bump when the choice here changes


def cv_logits(data: Split, flip: bool, Cs: tuple[float, ...], folds: int, seed: int) -> list[np.ndarray]:
    """Out-of-fold logits of every image of ``data`` for each C (seeded folds; mirror images with their image)."""
    from sklearn.model_selection import KFold

    oof = [np.full(data.y.shape, np.nan) for _ in Cs]
    for fit_rows, held_rows in KFold(min(folds, len(data.y)), shuffle=True, random_state=seed).split(data.X):
        X, Y = data.rows(flip, fit_rows)
        for i, C in enumerate(Cs):
            oof[i][held_rows] = data.logits(functools.partial(ovr_logits, fit_ovr(X, Y, C, seed)), flip, held_rows)
    return oof


def _scores(logits: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    m = metrics(y, logits, classes, np.ones(y.shape[1]), np.full(y.shape[1], 0.5))
    return {"val_loss": m["loss"], "val_accuracy": m["exact_match"], "val_map": m["mean_average_precision"]}


def _logreg_candidate(train: Split, val: Split, flip: bool, classes: list[str], config: TrainConfig) -> dict:
    oof = dict(zip(C_GRID, cv_logits(train, flip, C_GRID, FOLDS, config.seed), strict=True))
    scores = {C: bce(train.y[held(z)], z[held(z)]) for C, z in oof.items()}
    C = min(scores, key=scores.get)
    linear = fit_ovr(*train.rows(flip), C, config.seed)
    logits = val.logits(functools.partial(ovr_logits, linear), flip)
    return {"head": "logreg", "flip": flip, "C": C, "cv_loss": float(scores[C]), "val_logits": logits,
            "model": linear, "train_oof": oof[C], **_scores(logits, val.y, classes)}


def _dense_candidate(train: Split, val: Split, flip: bool, classes: list[str], config: TrainConfig) -> dict:
    order = np.random.default_rng(config.seed).permutation(len(train.y))
    stop = max(1, math.ceil(0.15 * len(order)))
    head, history, _ = fit_head(train.X, train.y, train.X, train.y, len(classes),
                                dataclasses.replace(config, head="dense"), mirror=train.X_flip if flip else None,
                                rows=np.sort(order[stop:]), val_rows=np.sort(order[:stop]))
    logits = val.logits(functools.partial(_torch_logits, head), flip)
    return {"head": "dense", "flip": flip, "val_logits": logits, "model": head, "history": history,
            **_scores(logits, val.y, classes)}


def _torch_logits(head: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head.eval()(torch.from_numpy(X)).numpy()


def _linear_head(linear: Linear) -> torch.nn.Sequential:
    """One regression per label as the Dropout(0) + Linear head that is saved and served like any other."""
    head = make_head(linear[0].shape[1], linear[0].shape[0], hidden=0, dropout=0.0)
    with torch.no_grad():
        head[1].weight.copy_(torch.from_numpy(linear[0]))
        head[1].bias.copy_(torch.from_numpy(linear[1]))
    return head.eval()


def choose_multi_head(train: Split, val: Split, classes: list[str], config: TrainConfig) -> Probe:
    """Train the candidate heads of ``config.head`` on ``train`` (``y``: (N, C) of 0/1) and keep the best on
    ``val``; the mirror images are used where they are cached."""
    start = time.perf_counter()
    flip = train.X_flip is not None
    candidates = []
    if config.head in ("auto", "logreg"):
        candidates.append(_logreg_candidate(train, val, flip, classes, config))
    if config.head == "dense" and len(train.y) >= 2:
        candidates.append(_dense_candidate(train, val, flip, classes, config))
    best, chosen, table = winner(candidates, lambda c: (c["val_loss"], -c["val_map"]))
    if best["head"] == "dense":
        probe = Probe(best["model"].eval(), best["history"], chosen, table, best["val_logits"], model=best["model"])
    else:
        history = History(best_epoch=1, closed_form=True)
        train_logits = train.logits(functools.partial(ovr_logits, best["model"]), flip)
        fitted = _scores(train_logits, train.y, classes)
        history.append("head", loss=fitted["val_loss"], accuracy=fitted["val_accuracy"],
                       val_loss=best["val_loss"], val_accuracy=best["val_accuracy"])
        probe = Probe(_linear_head(best["model"]), history, chosen, table, best["val_logits"], best["train_oof"],
                      model=best["model"])
    probe.seconds = time.perf_counter() - start
    return probe


def refit_multi(probe: Probe, train: Split, val: Split, config: TrainConfig) -> Probe:
    """A logistic-regression probe refit on train + validation with its C, with the held-out logits of those
    images (out-of-fold for train, from the training split's fit for validation) kept for calibration; a dense
    probe as it is."""
    if probe.chosen["head"] != "logreg":
        return probe
    start = time.perf_counter()
    flip = probe.chosen["flip"]
    both = Split(np.vstack([train.X, val.X]), np.vstack([train.X_flip, val.X_flip]) if flip else None,
                 np.vstack([train.y, val.y]))
    linear = fit_ovr(*both.rows(flip), probe.chosen["C"], config.seed)
    held_out = np.vstack([probe.train_oof, probe.val_logits])
    return dataclasses.replace(
        probe, head=_linear_head(linear), model=linear, calibration=(held_out, both.y), refit=True,
        seconds=probe.seconds + time.perf_counter() - start,
        notes=[*probe.notes, f"refit on train + validation ({len(both.y)} images) with the chosen settings"])
