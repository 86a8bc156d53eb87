"""Are the probabilities honest? Expected calibration error, the reliability diagram's bins, and temperature
scaling (Guo et al., 2017): one scalar T fitted on the validation split, dividing the logits before the softmax.

Temperature scaling never changes which class is predicted, only how confident the prediction is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax, softmax

from tlearn.multilabel import calibrated_bce, sigmoid

BINS = 15


@dataclass
class Reliability:
    """Per confidence bin: mean confidence, accuracy and the number of predictions (empty bins have count 0)."""

    edges: np.ndarray  # (BINS + 1,)
    confidence: np.ndarray  # (BINS,)
    accuracy: np.ndarray  # (BINS,)
    count: np.ndarray  # (BINS,)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean gap between accuracy and confidence."""
        total = self.count.sum()
        return float((self.count * np.abs(self.accuracy - self.confidence)).sum() / total) if total else 0.0


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = BINS) -> Reliability:
    """Bin the top-1 confidence of ``proba`` (N, C) against whether the top-1 class is ``y``."""
    return binned(proba.max(1), proba.argmax(1) == y, bins)


def binned(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> Reliability:
    """Top-1 confidences (N,) and whether each prediction was right (N,), in ``bins`` equal-width bins over
    (0, 1]; a confidence that falls on an edge belongs to the bin below it, so 1.0 is in the last bin."""
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, np.bincount(which, confidence, bins) / count, 0.0)
        accuracy = np.where(count > 0, np.bincount(which, correct, bins) / count, 0.0)
    return Reliability(edges, mean_conf, accuracy, count.astype(int))


def ece(proba: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    return reliability(proba, y, bins).ece


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes after dividing the logits by ``temperature``."""
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the NLL of ``logits`` (N, C) on labels ``y``; 1 when every
    prediction is right, since the NLL then falls without end as the temperature goes to 0."""
    if (logits.argmax(1) == y).all():
        return 1.0
    from scipy.optimize import minimize_scalar  # 0.2 s to import, and only training fits a temperature

    result = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=(np.log(0.05), np.log(20)),
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def probabilities(logits: np.ndarray, temperature: float = 1.0, temperatures: np.ndarray | None = None,
                  calibration: bool = True) -> np.ndarray:
    """What prediction gives: the softmax of ``logits / temperature`` over the classes or, several labels an image
    (``temperatures``, one a label), a sigmoid a label of the logits divided by that label's temperature; the
    temperatures are left out when ``calibration`` is False."""
    if temperatures is None:
        return calibrated(logits, temperature if calibration else 1.0)
    return sigmoid(logits / temperatures if calibration else logits)


def calibrated_losses(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each image's NLL after the temperature fitted on all of ``logits``: how two models' validation scores
    compare once each is calibrated, image by image (mode auto keeps its steps on them). Against (N, C) 0/1
    targets, several labels an image: each image's binary cross-entropy after a temperature a label."""
    if y.ndim == 2:
        return calibrated_bce(y, logits)
    return -log_softmax(logits / fit_temperature(logits, y), axis=1)[np.arange(len(y)), y]


def calibrated_loss(logits: np.ndarray, y: np.ndarray) -> float:
    """The mean of ``calibrated_losses``."""
    return float(calibrated_losses(logits, y).mean())


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities (N, C) from logits divided by ``temperature``."""
    return softmax(logits / temperature, axis=1)
