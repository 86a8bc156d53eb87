"""The classifier head: learning, early stopping with the best epoch restored, determinism, logreg folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tlearn.config import TrainConfig
from tlearn.train import Precision, evaluate, fit_head, make_head


def blobs(n: int, classes: int, dim: int = 16, seed: int = 0, spread: float = 1.0):
    centres = np.random.default_rng(1234).normal(0, 3, (classes, dim))  # the same classes for every seed
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = (centres[y] + rng.normal(0, spread, (n, dim))).astype(np.float32)
    return X, y.astype(np.int64)


def test_dense_head_learns_and_keeps_the_best_epoch() -> None:
    X, y = blobs(300, 3)
    Xv, yv = blobs(90, 3, seed=1, spread=2.5)
    head, history, _ = fit_head(X, y, Xv, yv, 3, TrainConfig(epochs=60, patience=5))
    h = history.history
    assert set(h) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history.epoch) == len(h["loss"]) <= 60
    best = history.best_epoch
    assert h["val_loss"][best - 1] == min(h["val_loss"])
    loss, acc = evaluate(head, [(torch.from_numpy(Xv), torch.from_numpy(yv))], Precision(torch.device("cpu")))
    assert loss == pytest.approx(h["val_loss"][best - 1], rel=1e-5)
    assert acc > 0.9 and h["loss"][-1] < h["loss"][0]


def test_early_stopping_stops_after_patience() -> None:
    X, y = blobs(60, 2, spread=4.0)
    Xv, yv = blobs(60, 2, seed=5, spread=4.0)
    _, history, _ = fit_head(X, y, Xv, yv, 2, TrainConfig(epochs=500, patience=3, hidden=64, dropout=0.0, lr=0.05))
    assert len(history.epoch) == history.best_epoch + 3 < 500


def test_same_seed_same_result_other_seed_other_result() -> None:
    X, y = blobs(120, 2, spread=3.0)
    Xv, yv = blobs(40, 2, seed=1, spread=3.0)
    a = fit_head(X, y, Xv, yv, 2, TrainConfig(epochs=5, seed=7))[1].history
    b = fit_head(X, y, Xv, yv, 2, TrainConfig(epochs=5, seed=7))[1].history
    c = fit_head(X, y, Xv, yv, 2, TrainConfig(epochs=5, seed=8))[1].history
    assert a == b and a != c


def test_hidden_layer_head_shape() -> None:
    head = make_head(1280, 5, hidden=256, dropout=0.5)
    assert [tuple(p.shape) for p in head.parameters()] == [(256, 1280), (256,), (5, 256), (5,)]
    assert head(torch.zeros(2, 1280)).shape == (2, 5)


@pytest.mark.parametrize("classes", [2, 4])
def test_logreg_head_equals_scikit_learn(classes: int) -> None:
    X, y = blobs(200, classes, spread=3.0)
    Xv, yv = blobs(50, classes, seed=1, spread=3.0)
    head, history, _ = fit_head(X, y, Xv, yv, classes, TrainConfig(head="logreg"))
    scaler = StandardScaler().fit(X)
    reference = LogisticRegression(max_iter=2000, random_state=0).fit(scaler.transform(X), y)
    with torch.no_grad():
        ours = torch.softmax(head(torch.from_numpy(Xv)), 1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(scaler.transform(Xv)), atol=1e-5)
    assert history.epoch == [1] and history.best_epoch == 1
