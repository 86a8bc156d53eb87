"""Novelty: how unlike the training data an image is, and whether it is unlike enough to be called unknown.

The score has two parts, each standardised by its mean and spread on the validation split:
- **distance**: the mean cosine distance from the image's features (the ones the head takes) to its ``k`` nearest
  training images, which separates images far from the training data (a car shown to a cats-and-dogs model);
- **energy**: ``-logsumexp`` of the head's logits, which is better near it (a flower species the model was not
  trained on, shown to a flower model).
``score = max(z(distance), z(energy))``: an image is novel when either part says so. Higher is less like the
training data. The combination and ``k`` were chosen by measurement (``bench/bench_novelty.py``, BENCHMARKS.md).
The threshold is the ``accept`` quantile of the validation split's scores, computed with the head and the reference
features of the training split alone, so that about that share of images like the training data is accepted.

The reference features are a per-class sample of the training split's, L2-normalised, in float16, capped in bytes
(``CAP_BYTES``) whatever the training set's size. NumPy only: the predictor's fast path needs no torch.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tlearn.artifact import NOVELTY_TENSOR as REFERENCE
from tlearn.config import TlearnError

if TYPE_CHECKING:
    from pathlib import Path

    from tlearn.data import Sample
    from tlearn.evaluate import PathsOutputs, Scored

log = logging.getLogger("tlearn")
KIND = "max(z(knn),z(energy))"
K = 10  # nearest training images the distance is the mean over
CAP_BYTES = 10 << 20  # what the reference features may add to a model file
MIN_VALIDATION = 30  # validation images below which the score is the distance alone (see ``fit``)
OUTLIERS = 16  # training images listed as least like the rest of their class
NETWORK_IMAGES = 1000  # training images a whole network (fine-tuned, scratch) is run on again for its reference;
# a head's features are in the cache already


def normalised(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def knn_distance(reference: np.ndarray, X: np.ndarray, k: int, exclude_self: bool = False,
                 chunk: int = 1024) -> np.ndarray:
    """(B,) mean cosine distance of each row of ``X`` to its ``k`` nearest rows of ``reference`` (both
    L2-normalised); with ``exclude_self``, ``X`` is ``reference`` and each row's own match is left out (a
    leave-one-out score). Rows go ``chunk`` at a time, so memory stays bounded whatever ``X``'s length."""
    ref = reference.astype(np.float32).T
    k = max(1, min(k, ref.shape[1] - exclude_self))
    out = np.empty(len(X), dtype=np.float32)
    for start in range(0, len(X), chunk):
        sim = normalised(X[start:start + chunk]) @ ref  # (b, N)
        if exclude_self:
            sim[np.arange(len(sim)), np.arange(start, start + len(sim))] = -np.inf
        out[start:start + chunk] = 1.0 - (-np.partition(-sim, k - 1, axis=1)[:, :k]).mean(1)
    return out


def energy(logits: np.ndarray) -> np.ndarray:
    """(B,) ``-logsumexp`` of each row of logits less its mean: low where the head is confident in some class.
    The mean is taken out because the softmax ignores it and heads differ in it (a binary logistic regression's
    logits are [0, z], whose raw energy would only say how likely the second class is)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.mean(1, keepdims=True)
    top = z.max(1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(1)))


@dataclass
class Novelty:
    """A fitted novelty scorer: its reference features and how its parts are standardised and combined."""

    reference: np.ndarray = field(repr=False)  # (N, F) float16, L2-normalised training features
    k: int = K
    center: list[float] = field(default_factory=lambda: [0.0, 0.0])  # (distance, energy) means on validation
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # ... and standard deviations
    threshold: float = math.inf  # scores above it are unknown
    accept: float = 0.98  # the share of validation images the threshold accepts
    kind: str = KIND
    fitted_on: str = ""  # what the threshold was set on, for people
    with_energy: bool = True  # False: the distance alone (fewer than MIN_VALIDATION validation images)

    def parts(self, features: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance, energy) z-scores of a batch."""
        d = knn_distance(self.reference, features, self.k)
        e = energy(logits)
        return (d - self.center[0]) / self.scale[0], (e - self.center[1]) / self.scale[1]

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """(B,) novelty scores of images with these head-input ``features`` and ``logits``."""
        d, e = self.parts(features, logits)
        return (np.maximum(d, e) if self.with_energy else d).astype(np.float32)

    def config(self) -> dict[str, Any]:
        """What config.json records (the reference goes into model.safetensors as ``REFERENCE``)."""
        out = {k: v for k, v in asdict(self).items() if k != "reference"}
        return {**out, "rows": int(self.reference.shape[0]), "features": int(self.reference.shape[1])}


def cap_rows(num_features: int, cap_bytes: int = CAP_BYTES) -> int:
    """How many float16 reference rows of ``num_features`` fit in ``cap_bytes``."""
    return max(1, cap_bytes // (2 * max(num_features, 1)))


def sample_rows(y: np.ndarray, most: int, seed: int) -> np.ndarray:
    """Indices of at most ``most`` rows, as even a share of each class as fits (every row where all fit), in the
    order of ``y``."""
    if len(y) <= most:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    quota, left = {c: 0 for c in classes}, most
    while left > 0:  # deal one row at a time to the classes that still have rows, smallest quota first
        open_ = [c for c in classes if quota[c] < len(per_class[c])]
        for c in open_[:left]:
            quota[c] += 1
        left -= min(len(open_), left)
    return np.sort(np.concatenate([per_class[c][:quota[c]] for c in classes]))


def fit(train_X: np.ndarray, train_y: np.ndarray, val_X: np.ndarray, val_logits: np.ndarray, accept: float,
        seed: int = 0, cap_bytes: int = CAP_BYTES, with_energy: bool = True) -> Novelty:
    """A scorer whose reference is (a per-class sample of) the training features ``train_X``, standardised and
    thresholded on the validation split's features and logits (a head fitted on the training split alone).

    With fewer than ``MIN_VALIDATION`` validation images, their spread says too little: the score is then the
    distance alone, standardised and thresholded on the validation images pooled with the training images, each
    scored against the others (leave-one-out), and the threshold is at least the normal distribution's
    ``accept`` quantile, so that a handful of images cannot set it low."""
    if len(train_X) == 0 or len(val_X) == 0:
        raise TlearnError("novelty needs training and validation images")
    rows = sample_rows(train_y, cap_rows(train_X.shape[1], cap_bytes), seed)
    reference = normalised(train_X[rows]).astype(np.float16)
    scorer = Novelty(reference, accept=accept, with_energy=with_energy)
    d, e = knn_distance(reference, val_X, scorer.k), energy(val_logits)
    if len(val_X) >= MIN_VALIDATION:
        scorer.center = [float(d.mean()), float(e.mean())]
        scorer.scale = [float(max(d.std(), 1e-6)), float(max(e.std(), 1e-6))]
        scorer.threshold = float(np.quantile(scorer.score(val_X, val_logits), accept))
        scorer.fitted_on = f"{len(val_X)} validation images, scored by the model trained on the training split" + (
            "" if with_energy else ", on the distance alone (several labels an image: no softmax energy)")
        return scorer
    pooled = np.r_[d, knn_distance(reference, reference, scorer.k, exclude_self=True)] if len(rows) > 1 else d
    scorer.with_energy, scorer.center, scorer.scale = False, [float(pooled.mean()), 0.0], \
        [float(max(pooled.std(), 1e-6)), 1.0]
    z = (pooled - scorer.center[0]) / scorer.scale[0]
    scorer.threshold = float(max(np.quantile(z, accept), statistics.NormalDist().inv_cdf(accept)))
    scorer.fitted_on = (f"{len(val_X)} validation and {len(pooled) - len(val_X)} training images (each training "
                        "image scored against the others), on the distance alone (too few validation images for "
                        "the head's energy)")
    return scorer


def fit_run(outputs_of: PathsOutputs, train: list[Sample], classes: list[str], validation: Scored, accept: float,
            seed: int, cap_bytes: int = CAP_BYTES, most: int | None = None, multi_label: bool = False
            ) -> tuple[Novelty | None, list[tuple[Path, str, float]]]:
    """The novelty stage after training: the scorer of a trained model (``outputs_of``: its
    ``Predictor.paths_outputs``), on (a per-class sample of, at most ``most`` images and ``cap_bytes``) the
    ``train`` split's features, thresholded on the ``validation`` split as scored by the model trained on the
    training split alone (its logits and features); and the training images least like the rest of their class,
    most unusual first. Several labels an image (``multi_label``): the distance alone, a sample of all the
    training images, and no class to be unlike. The log says what it did."""
    from tlearn.evaluate import score

    if validation.features is None or not len(validation.y):
        log.warning("novelty: no validation image to set the threshold on, so predictions carry no novelty")
        return None, []
    start, y = time.perf_counter(), np.array([0 if multi_label else s.label for s in train])
    rows = sample_rows(y, min(cap_rows(validation.features.shape[1], cap_bytes), most or len(y)), seed)
    reference = score(outputs_of, [train[i] for i in rows])
    scorer = fit(reference.features, reference.y if not multi_label else np.zeros(len(rows), dtype=int),
                 validation.features, validation.logits, accept, seed, cap_bytes, with_energy=not multi_label)
    odd = outliers(reference.features, reference.y) if not multi_label else np.array([])
    order = [i for i in np.argsort(-np.nan_to_num(odd, nan=-np.inf)) if np.isfinite(odd[i])][:OUTLIERS]
    size = scorer.reference.nbytes / (1 << 20)
    log.info(f"novelty: reference features of {len(scorer.reference)} of {len(train)} training images "
             f"({size:.1f} MB, {time.perf_counter() - start:.1f} s); threshold {scorer.threshold:.3f}, set on "
             f"{scorer.fitted_on}, to accept {accept:.0%} of images like them (--accept): images less like the "
             "training data are called unknown")
    return scorer, [(reference.paths[i], classes[reference.y[i]], float(odd[i])) for i in order]


def outliers(X: np.ndarray, y: np.ndarray, k: int = K) -> np.ndarray:
    """(N,) how unlike the rest of its class each image is: the mean cosine distance to its ``k`` nearest other
    images of the same class (leave-one-out, so no image is scored against itself). NaN for a class of one."""
    out = np.full(len(y), np.nan, dtype=np.float32)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) > 1:
            ref = normalised(X[rows])
            out[rows] = knn_distance(ref, ref, k, exclude_self=True)
    return out


def restore(config: dict[str, Any], reference: np.ndarray, where: str) -> Novelty:
    """A saved scorer from its config (checked by ``artifact.read_run``) and its reference tensor, whose shape and
    dtype the file's header was checked for: here its values are (finite, and rows of unit length)."""
    if config.get("kind") != KIND:
        raise TlearnError(f"{where}: its novelty scorer is {config.get('kind')!r}, which this tlearn does not know "
                          f"({KIND!r}); upgrade tlearn, or retrain")
    norms = np.linalg.norm(reference.astype(np.float32), axis=1)
    if not np.isfinite(norms).all() or ((np.abs(norms - 1) > 0.01) & (norms > 0)).any():
        raise TlearnError(f"{where}: tensor {REFERENCE} is damaged (its rows must be finite and of unit length); "
                          "retrain or restore the run")
    fields = {k: config[k] for k in ("k", "center", "scale", "threshold", "accept", "kind", "fitted_on",
                                     "with_energy")
              if k in config}
    return Novelty(reference, **fields)


def of_run(spec: Any, reference: np.ndarray | None, where: str) -> Novelty | None:
    """A loaded model's scorer (``spec`` its ``ModelSpec``, ``reference`` its tensor), or None, said once, for a
    model saved before tlearn scored novelty."""
    if spec.novelty is None and getattr(spec, "multi_label", False):
        log.info(f"{where} gives several labels an image: its predictions carry no novelty score (not built yet)")
        return None
    if spec.novelty is None:
        log.warning(f"{where} was saved before tlearn scored novelty, so its predictions carry no \"novelty\" or "
                    "\"unknown\"; train it again to get them")
        return None
    return restore(spec.novelty, reference, where)


def graph_module(scorer: Novelty) -> Any:
    """The scorer as a PyTorch module, for an exported graph: (features (B, F), logits (B, C)) -> (B,) scores."""
    import torch
    from torch import nn

    class Score(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("reference", torch.from_numpy(scorer.reference.copy()))
            self.k = max(1, min(scorer.k, scorer.reference.shape[0]))
            self.center, self.scale = scorer.center, scorer.scale

        def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            x = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
            distance = 1 - (x @ self.reference.float().T).topk(self.k, dim=1).values.mean(1)
            z = (distance - self.center[0]) / self.scale[0]
            if not scorer.with_energy:
                return z
            energy = -torch.logsumexp(logits - logits.mean(1, keepdim=True), 1)
            return torch.maximum(z, (energy - self.center[1]) / self.scale[1])

    return Score().eval()
