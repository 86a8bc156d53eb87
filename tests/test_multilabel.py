"""Multi-label targets, calibration, thresholds and metrics (multilabel.py), against brute force and against
scikit-learn and PyTorch computed another way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from tlearn.config import TrainConfig
from tlearn.models import ovr_logits
from tlearn.multilabel import (
    DEFAULT_THRESHOLD,
    bce,
    decide,
    fit_temperatures,
    fit_thresholds,
    metrics,
    predictions,
    sigmoid,
    targets,
)
from tlearn.recipes.heads import Split
from tlearn.recipes.multihead import choose_multi_head, refit_multi
from tlearn.train import criterion, hits, tensor_batches


def noisy(seed: int = 0, n: int = 400, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Targets and logits that tell them apart imperfectly."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.linspace(0.1, 0.5, c)).astype(np.float32)
    return y, (y * 2 - 1) * 1.5 + rng.normal(0, 1.5, (n, c))


def test_targets_and_a_stable_binary_cross_entropy() -> None:
    assert targets([(0, 2), (1,), ()], 3).tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    y, z = noisy()
    z[0, 0], z[1, 1] = 400.0, -400.0  # no overflow
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(y).double()).item()
    assert bce(y, z) == pytest.approx(expected, rel=1e-9)
    assert np.allclose(sigmoid(np.array([-800.0, 0.0, 800.0])), [0.0, 0.5, 1.0])


def test_each_threshold_is_where_that_labels_f1_is_best() -> None:
    y, z = noisy(1)
    proba = sigmoid(z)
    thresholds = fit_thresholds(y, proba)
    for k in range(y.shape[1]):
        best = max(f1_score(y[:, k], proba[:, k] >= t) for t in np.unique(proba[:, k]))
        assert f1_score(y[:, k], proba[:, k] >= thresholds[k]) == pytest.approx(best)
        assert not np.isclose(proba[:, k], thresholds[k]).any()  # a margin on both sides
    y[:, 2] = 0
    y[:4, 3] = 1
    y[4:, 3] = 0
    assert fit_thresholds(y, proba)[2] == DEFAULT_THRESHOLD  # nothing to fit it on
    assert fit_thresholds(y, proba)[3] == DEFAULT_THRESHOLD  # too little: 4 positive images
    tied = fit_thresholds(np.array([[1], [0], [1], [1], [1], [1]], dtype=np.float32),
                          np.array([[0.7], [0.7], [0.2], [0.9], [0.9], [0.8]]))
    assert tied[0] == pytest.approx(0.1)  # equal probabilities are decided together: cut below 0.7's pair


def test_each_labels_temperature_undoes_a_known_scaling() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, (4000, 3))
    y = (rng.random(z.shape) < sigmoid(z)).astype(np.float32)
    fitted = fit_temperatures(y, z * np.array([1.0, 3.0, 0.5]))  # over-, then under-confident
    assert fitted == pytest.approx([1.0, 3.0, 0.5], rel=0.15)
    y[:, 1] = 1
    assert fit_temperatures(y, z)[1] == 1.0


def test_the_metrics_agree_with_scikit_learn_computed_per_label() -> None:
    y, z = noisy(3)
    classes = [f"tag{k}" for k in range(y.shape[1])]
    temperatures, thresholds = fit_temperatures(y, z), fit_thresholds(y, sigmoid(z))
    m = metrics(y, z, classes, temperatures, thresholds)
    proba = sigmoid(z / temperatures)
    decided = decide(proba, thresholds)
    assert m["mean_average_precision"] == pytest.approx(np.mean([average_precision_score(y[:, k], proba[:, k])
                                                                 for k in range(5)]))
    assert m["micro_f1"] == pytest.approx(f1_score(y, decided, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, decided, average="macro"))
    assert m["exact_match"] == pytest.approx(np.mean([(d == t).all() for d, t in zip(decided, y, strict=True)]))
    assert m["loss"] <= m["loss_uncalibrated"] + 1e-9
    assert m["per_label"]["tag4"]["support"] == int(y[:, 4].sum())
    y[:, 0] = 0  # a label with no positive image: left out of the means, its AP None
    m = metrics(y, z, classes, temperatures, thresholds)
    assert m["per_label"]["tag0"]["average_precision"] is None
    assert m["macro_f1"] == pytest.approx(np.mean([m["per_label"][c]["f1"] for c in classes[1:]]))


def test_a_prediction_gives_every_label_at_its_threshold_and_the_top_k() -> None:
    proba = np.array([[0.9, 0.2, 0.35], [0.1, 0.05, 0.2]])
    out = predictions(proba, ["sky", "sea", "dog"], np.array([0.5, 0.5, 0.3]), top_k=2)
    assert [r["class"] for r in out[0]["labels"]] == ["sky", "dog"] and out[1]["labels"] == []
    assert [r["class"] for r in out[1]["predictions"]] == ["dog", "sky"]
    assert out[0]["labels"][1] == {"class": "dog", "probability": 0.35, "threshold": 0.3}


def synthetic(n: int, seed: int, flip: bool = True) -> Split:
    """Features where each of 4 labels is a noisy linear function of them (a constant fifth label: every image)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 1, (n, 16)).astype(np.float32)
    W = np.random.default_rng(99).normal(0, 1, (16, 4))
    y = np.hstack([(X @ W + rng.normal(0, 1, (n, 4)) > 0.8), np.ones((n, 1))]).astype(np.float32)
    mirrored = (X + rng.normal(0, 0.05, X.shape)).astype(np.float32) if flip else None
    return Split(X, mirrored, y)


def test_the_multi_label_head_is_chosen_on_validation_and_refit_with_held_out_logits() -> None:
    train, val = synthetic(300, 0), synthetic(120, 1)
    classes = ["a", "b", "c", "d", "all"]
    probe = choose_multi_head(train, val, classes, TrainConfig(seed=0))
    assert [c["head"] for c in probe.candidates] == ["logreg"]  # --head auto: the regressions (BENCHMARKS.md)
    assert probe.chosen["val_map"] > 0.85  # labels that the features determine up to noise
    dense = choose_multi_head(train, val, classes, TrainConfig(seed=0, lr=0.01, epochs=30, head="dense"))
    assert dense.chosen["head"] == "dense" and dense.chosen["val_map"] > 0.8
    assert dense.history.history["val_loss"]  # trained by the loop, on binary cross-entropy
    logreg = next(c for c in probe.candidates if c["head"] == "logreg")
    assert logreg["C"] in (1.0, 3.0, 10.0) and logreg["cv_loss"] > 0
    with torch.no_grad():
        z = probe.head(torch.from_numpy(val.X)).numpy()
    assert z.shape == (120, 5) and (z[:, 4] > 3).all()  # the constant label: its smoothed log-odds
    np.testing.assert_allclose(z, ovr_logits(probe.model, val.X), atol=1e-4)
    np.testing.assert_allclose((z + probe.head(torch.from_numpy(val.X_flip)).detach().numpy()) / 2,
                               probe.val_logits, atol=1e-4)
    only = choose_multi_head(train, val, classes, TrainConfig(seed=0, head="logreg"))
    again = refit_multi(only, train, val, TrainConfig(seed=0))
    assert again.refit and again.calibration[0].shape == (420, 5) and np.isfinite(again.calibration[0]).all()
    np.testing.assert_array_equal(again.calibration[1], np.vstack([train.y, val.y]))
    assert not np.allclose(again.head[1].weight.detach().numpy(), only.head[1].weight.detach().numpy())


def test_the_training_loop_takes_several_labels_an_image() -> None:
    """train.criterion and train.hits: cross-entropy for classes, binary cross-entropy (mean over labels, then
    images) and exact match for 0/1 targets."""


    z = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 0.2]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    per_image = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").mean(1)
    assert criterion(z, y, None).item() == pytest.approx(per_image.mean().item())
    assert criterion(z, y, None, "sum").item() == pytest.approx(per_image.sum().item())
    assert hits(z, y) == 1  # the second image's third label is wrong at 0.5
    assert criterion(z, torch.tensor([0, 1]), None).item() == pytest.approx(
        torch.nn.functional.cross_entropy(z, torch.tensor([0, 1])).item())
    _, t = next(iter(tensor_batches(np.zeros((2, 4), np.float32), y.numpy(), 8)()))
    assert t.dtype == torch.float32 and t.shape == (2, 3)


def test_the_regressions_solved_together_are_scikit_learns_one_per_label() -> None:
    from sklearn.linear_model import LogisticRegression

    from tlearn.models import fit_ovr

    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (300, 12))
    Y = (X @ rng.normal(0, 1, (12, 3)) + rng.normal(0, 2, (300, 3)) > 1).astype(float)
    Y[:, 2] = 0  # a constant label: its smoothed log-odds, no weights
    W, b = fit_ovr(X, Y, 3.0, seed=0)
    for k in range(2):
        ref = LogisticRegression(C=3.0, max_iter=5000, tol=1e-10).fit(X, Y[:, k])
        np.testing.assert_allclose(W[k], ref.coef_[0], atol=1e-4)
        assert b[k] == pytest.approx(ref.intercept_[0], abs=1e-4)
    assert not W[2].any() and b[2] == pytest.approx(np.log(0.5 / 300.5))


def test_auto_compares_steps_of_several_labels_on_calibrated_binary_cross_entropy() -> None:
    from tlearn.calibrate import calibrated_losses

    y, z = noisy(4)
    losses = calibrated_losses(z, y)
    temperatures = fit_temperatures(y, z)
    assert losses.shape == (len(y),)
    assert losses.mean() == pytest.approx(bce(y, z / temperatures), rel=1e-9)
    assert losses.mean() <= bce(y, z) + 1e-12  # calibration never raises the loss it is fitted on
    rescaled = calibrated_losses(z * np.array([1.0, 3.0, 0.5, 2.0, 1.0]), y)  # a model only over-/under-confident
    assert rescaled.mean() == pytest.approx(losses.mean(), abs=2e-3)


def test_missing_and_wrong_tags_are_found_out_of_fold_most_suspicious_first() -> None:
    from tlearn.features import Features
    from tlearn.labels import mislabels, multi_label_issues, out_of_fold_multi

    rng = np.random.default_rng(5)
    n, c = 300, 4
    truth = (rng.random((n, c)) < 0.35).astype(np.float32)
    X = (truth @ rng.normal(0, 3, (c, 16)) + rng.normal(0, 1, (n, 16))).astype(np.float32)
    given = truth.copy()
    missing, wrong = [3, 50, 120], [10, 77, 200]
    for i in missing:
        given[i, np.flatnonzero(truth[i])[0] if truth[i].any() else 0] = 0
    for i in wrong:
        given[i, np.flatnonzero(truth[i] == 0)[0]] = 1
    planted = {i for i in missing + wrong if (given[i] != truth[i]).any()}
    proba = out_of_fold_multi(X, given, seed=0)
    assert proba.shape == (n, c) and ((proba > 0) & (proba < 1)).all()
    found = [i for i, _ in multi_label_issues(proba, given)]
    assert planted <= set(found[:len(planted) + 2])  # the planted errors lead the list
    for i, labels in multi_label_issues(proba, given):
        assert all((proba[i, k] > 0.5) != bool(given[i, k]) for k in labels)  # each doubted tag is contradicted
    paths = [Path(f"img{i}.jpg") for i in range(n)]
    tags = [tuple(np.flatnonzero(row).tolist()) for row in given]
    findings = mislabels(paths, tags, ["cat", "dog", "sea", "sky"], Features(X, {}), given="labelled")
    first = findings[0]
    assert int(first.path[3:-4]) in planted and first.detail.startswith("labelled '")
    assert "is there (" in first.detail or "is not (" in first.detail


def test_a_multi_label_models_temperatures_and_thresholds_are_checked_when_read() -> None:
    from tlearn.artifact import labelling_problems

    assert labelling_problems([1.0, 2.0], [0.3, 0.5], 2) == []
    assert len(labelling_problems([1.0, 0.0], [0.3, 0.5], 2)) == 1  # a temperature of 0 would divide by zero
    assert len(labelling_problems([1.0, 1.0], [0.3, 1.5], 2)) == 1
    assert len(labelling_problems([1.0], None, 2)) == 2
    assert len(labelling_problems([1.0, float("nan")], [0.3, True], 2)) == 2
