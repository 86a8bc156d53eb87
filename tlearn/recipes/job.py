"""What a recipe is given (``Job``) and what it gives back (``Trained``), and the steps every recipe shares.

A recipe takes a ``Job`` and returns a ``Trained``: the model, its history, the decision as it ended (mode,
plan, reason) and the files that could not be decoded. It changes nothing it was given; where it works on fewer
images than it got (undecodable ones left out), it goes on with a new ``Job`` of its own (``Job.without``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlearn.artifact import ModelSpec
from tlearn.config import AugmentConfig, BackboneConfig, Decision, RuntimeConfig, TrainConfig
from tlearn.data import ImageFolder, Sample
from tlearn.extractor import Extractor
from tlearn.features import Features
from tlearn.models import parameter_counts
from tlearn.multilabel import targets
from tlearn.recipes.heads import Probe, describe
from tlearn.recipes.plan import Clock, Step
from tlearn.train import History, Precision, class_weights

log = logging.getLogger("tlearn")
Checkpoint = Callable[[dict[str, Any], dict[str, torch.Tensor]], None]  # (training state, RNG states) -> saved


@dataclass(frozen=True)
class Job:
    """Everything a recipe needs: the split data, the decision so far, the configs, the feature service and the
    clock of the time budget."""

    data: ImageFolder
    decision: Decision
    train: TrainConfig
    augment: AugmentConfig
    runtime: RuntimeConfig
    extractor: Extractor  # the frozen bases, their engines and cached features
    clock: Clock
    names: list[str]  # the bases whose features are concatenated (--backbone A+B); the first is "the" base
    checkpoint: Checkpoint | None = None  # where an image stage saves its state after each epoch
    resume: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None  # (state, RNG) from a checkpoint
    progress: bool = True

    @property
    def run(self) -> Precision:
        """Where the training loops run."""
        return self.extractor.run

    def without(self, failed: dict[Path, str]) -> Job:
        """This job on the images that decoded: the ``failed`` ones left out of its data."""
        return self if not failed else dataclasses.replace(self, data=self.data.without(failed))


@dataclass
class Trained:
    """A trained model: ``kind`` is 'head' (head on the pretrained base), 'finetuned' (base + head) or
    'scratch'."""

    kind: str
    model: nn.Module
    history: History
    arch: str
    preprocessing: dict[str, Any]
    skipped: dict[Path, str]  # files that could not be decoded, left out of training
    decision: Decision  # the decision as the recipe ended it: mode auto records what it kept, and its plan
    backbone: str = ""  # the bases of a head: 'a' or 'a+b'
    head_shape: tuple[int, float] | None = None  # (hidden, dropout) when not the config's (a logistic regression)
    probe: Probe | None = None  # a head chosen on cached features: held-out logits and candidates


def model_spec(trained: Trained, classes: list[str], extractor: Extractor, train: TrainConfig
               ) -> tuple[ModelSpec, dict[str, int], BackboneConfig | None]:
    """What is saved of a trained model: its spec, its parameter counts, and the backbone config of its bases
    (mode auto may have moved to other bases: a larger one, or several concatenated; None for scratch)."""
    if trained.kind == "scratch":
        trainable, total = parameter_counts(trained.model)
        spec = ModelSpec(classes, "scratch", trained.arch, trained.preprocessing)
        return spec, {"trainable": int(trainable), "total": int(total), "classes": len(classes)}, None
    backbone = dataclasses.replace(extractor.backbone_config,
                                   backbone=trained.backbone or extractor.backbone_config.backbone)
    bases = [extractor.base(name) for name in backbone.names()]
    weights = backbone.weights and str(Path(backbone.weights).expanduser().resolve())
    hidden, dropout = trained.head_shape or (train.hidden, train.dropout)  # a logreg head is a plain Linear
    mirrored = trained.kind == "head" and trained.probe is not None and trained.probe.chosen["flip"]
    spec = ModelSpec(classes, trained.kind, "+".join(b.arch for b in bases), bases[0].preprocessing,
                     dataclasses.replace(backbone, weights=weights), "+".join(b.weights_id for b in bases),
                     sum(b.num_features for b in bases), hidden, dropout,
                     views=["center", "flip"] if mirrored else ["center"],
                     bases=[{"name": b.name, "identity": b.identity()} for b in bases])
    head = trained.model.head if trained.kind == "finetuned" else trained.model
    head_params = sum(p.numel() for p in head.parameters())
    trainable = parameter_counts(trained.model)[0] if trained.kind == "finetuned" else head_params
    total = sum(b.params for b in bases) + head_params
    return spec, {"trainable": int(trainable), "total": int(total), "classes": len(classes)}, backbone


def by_split(job: Job, get: Callable[[list[Path], tuple[str, ...]], list[Features]],
             views: tuple[str, ...] = ("center",)) -> tuple[dict[str, tuple[list[np.ndarray], np.ndarray]],
                                                            dict[Path, str]]:
    """([X of each view], y) of the train and validation splits (``get``: paths and views → their features, a
    view each), each split's features got on their own (no copy of the whole folder's), without the files that
    any view could not decode, which are returned."""
    out, failed = {}, {}
    for split in ("train", "validation"):
        samples = job.data.split(split)
        feats = get([s.path for s in samples], views)
        bad = {p: reason for f in feats for p, reason in f.failed.items()}
        keep = np.array([s.path not in bad for s in samples], dtype=bool)
        y = labels_of(job, samples)
        out[split] = [f.X if keep.all() else f.X[keep] for f in feats], y[keep]
        failed.update(bad)
    return out, failed


def labels_of(job: Job, samples: list[Sample]) -> np.ndarray:
    """What the loss is taken against: the class indices (N,), or (N, C) 0/1 targets for several labels an
    image."""
    if job.data.multi_label:
        return targets([s.labels for s in samples], len(job.data.classes))
    return np.array([s.label for s in samples], dtype=np.int64)


def cached_features(job: Job) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[Path, str]]:
    """(X, y) per split from the feature cache, and the files that could not be decoded."""
    xy, failed = by_split(job, lambda paths, views: job.extractor.features_views(paths, None, views))
    return {split: (X[0], y) for split, (X, y) in xy.items()}, failed


def weight(job: Job, y_train: np.ndarray) -> torch.Tensor | None:
    if job.data.multi_label:  # each label is its own binary problem: no weights between classes
        return None
    return class_weights(y_train, len(job.data.classes), job.train.class_weight)  # the loop places them


def head_views(job: Job) -> tuple[str, ...]:
    """The views a head on cached features trains with: the centre crop and its mirror image, unless the
    augmentation turns horizontal flips off (--no-horizontal-flip, or --augment none), as for images whose
    mirror image means something else."""
    return ("center", "flip") if job.augment.resolved()["horizontal_flip"] else ("center",)


def record(step: Step, status: str, start: float, probe: Probe | None = None, announce: bool = True) -> None:
    """A plan step's outcome: its status, time and scores (and a head's candidates)."""
    step.status, step.seconds = status, time.perf_counter() - start
    if probe is not None:
        step.val_loss, step.val_accuracy = probe.val_loss, probe.val_accuracy
        step.detail["head"] = describe(probe.chosen)
        step.detail["candidates"] = [{"head": describe(c), "val_loss": round(c["val_loss"], 4),
                                      "val_accuracy": round(c["val_accuracy"], 4)} for c in probe.candidates]
    score = f": val_loss {step.val_loss:.4f}, val_accuracy {step.val_accuracy:.4f}" if step.val_loss else ""
    if announce:
        log.info(f"auto: {step.name}: {status}{score} ({step.seconds:.1f} s)")
