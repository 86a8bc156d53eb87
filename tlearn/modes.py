"""The training modes, each a short recipe over the stages in ``train.py``.

- features: a head on cached features of the frozen base;
- frozen:   the frozen base and a new head, end to end on augmented images (validation on cached features);
- finetune: the head on cached features first, then the top stages of the base with smaller learning rates;
- scratch:  small-cnn or alexnet from random weights on augmented images, or logreg-pixels.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tlearn.augment import train_transform
from tlearn.backbones import Backbone
from tlearn.config import AugmentConfig, RuntimeConfig, TrainConfig, parse_lr_mult
from tlearn.data import ImageFolder, Sample
from tlearn.features import Features, ImageFiles, collate, cpu_cores, default_workers, eval_transform, extract
from tlearn.models import SCRATCH, Classifier, PixelLinear, unfreeze_groups
from tlearn.runtime import Engine, FrozenFeatures
from tlearn.strategy import Decision
from tlearn.train import (
    Batches,
    History,
    Precision,
    Stage,
    class_weights,
    evaluate,
    fit,
    fit_head,
    fold_logreg,
    make_head,
    tensor_batches,
)

log = logging.getLogger("tlearn")


@dataclass
class Job:
    """Everything a recipe needs: the split data, the configs, and the services the API provides."""

    data: ImageFolder
    decision: Decision
    train: TrainConfig
    augment: AugmentConfig
    runtime: RuntimeConfig
    run: Precision
    backbone: Callable[[], Backbone]
    engine: Callable[[], Engine]  # what runs the frozen base (ONNX Runtime or PyTorch)
    features: Callable[[list[Path]], Features]  # cached pooled features of the frozen base
    checkpoint: Callable[[dict[str, Any], dict[str, torch.Tensor]], None] | None = None
    resume: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None  # (state, RNG) from a checkpoint
    progress: bool = True


@dataclass
class Trained:
    """A trained model: ``kind`` is 'head' (head on the pretrained base), 'finetuned' (base + head) or
    'scratch'."""

    kind: str
    model: nn.Module
    history: History
    arch: str
    preprocessing: dict[str, Any]
    skipped: dict[Path, str]


def run_mode(job: Job) -> Trained:
    recipe = {"features": train_features, "frozen": train_frozen, "finetune": train_finetune,
              "scratch": train_scratch}[job.decision.mode]
    torch.manual_seed(job.train.seed)
    return recipe(job)


def _by_split(job: Job, paths: list[Path], feats: Features) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(X, y) of the train and validation splits from rows aligned with ``paths``; undecodable files are
    dropped from the data first."""
    job.data.drop(feats.failed)
    rows = {p: i for i, p in enumerate(paths)}
    out = {}
    for split in ("train", "validation"):
        samples = job.data.split(split)
        out[split] = feats.X[[rows[s.path] for s in samples]], np.array([s.label for s in samples], dtype=np.int64)
    return out


def _cached_features(job: Job) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[Path, str]]:
    """(X, y) per split from the feature cache, and the files that could not be decoded."""
    paths = [s.path for s in job.data.samples]
    feats = job.features(paths)
    return _by_split(job, paths, feats), feats.failed


def _weight(job: Job, y_train: np.ndarray) -> torch.Tensor | None:
    w = class_weights(y_train, len(job.data.classes), job.train.class_weight)
    return None if w is None else w.to(job.run.device)


def train_features(job: Job) -> Trained:
    xy, failed = _cached_features(job)
    bb = job.backbone()
    head, history, _ = fit_head(*xy["train"], *xy["validation"], len(job.data.classes), job.train,
                                weight=_weight(job, xy["train"][1]), progress=job.progress)
    return Trained("head", head, history, bb.arch, bb.preprocessing, failed)


def _image_batches(job: Job, samples: list[Sample], transform: Callable, failed: dict[Path, str],
                   generator: torch.Generator | None = None) -> Batches:
    """Batches of decoded images and labels; shuffled (and augmented, by ``transform``) when a generator is
    given. Files that fail to decode are left out and recorded in ``failed``."""
    files = ImageFiles([s.path for s in samples], transform)
    labels = torch.tensor([s.label for s in samples])
    workers = job.runtime.workers if job.runtime.workers is not None else default_workers()
    loader = DataLoader(files, batch_size=job.train.batch_size, shuffle=generator is not None, generator=generator,
                        num_workers=workers, collate_fn=collate, pin_memory=job.run.device.type == "cuda")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for ok, x, bad in loader:
            failed.update({files.paths[i]: reason for i, reason in bad})
            if x is not None:
                yield x, labels[ok]

    return batches


def _image_stage(job: Job, name: str, model: nn.Module, groups: list[dict], preprocessing: dict[str, Any],
                 failed: dict[Path, str], val: Batches | None = None, val_model: nn.Module | None = None) -> Stage:
    """A stage that trains ``model`` end to end on augmented training images."""
    generator = torch.Generator().manual_seed(job.train.seed)
    train = job.data.split("train")
    if val is None:
        val = _image_batches(job, job.data.split("validation"), eval_transform(preprocessing), failed)
    stage = Stage(name, model.to(job.run.device, memory_format=torch.channels_last), groups,
                  _image_batches(job, train, train_transform(preprocessing, job.augment), failed, generator),
                  val, job.train.max_epochs(job.decision.mode), math.ceil(len(train) / job.train.batch_size),
                  val_model=val_model, images_per_epoch=len(train), generator=generator)
    return stage


def _fit_images(job: Job, stage: Stage, history: History, weight: torch.Tensor | None,
                best: dict[str, Any] | None = None) -> None:
    """``train.fit`` on an image stage, checkpointing after each epoch and resuming from a checkpoint."""
    generator = stage.generator
    resume = None
    if job.resume and job.resume[0]["stage"] == stage.name:
        resume, rng = job.resume
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and job.run.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], job.run.device)
        history.__dict__.update(resume["history"].__dict__)

    def checkpoint(state: dict[str, Any]) -> None:
        if job.checkpoint:
            rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
            if job.run.device.type == "cuda":  # dropout on the GPU draws from the device's own generator
                rng["cuda"] = torch.cuda.get_rng_state(job.run.device)
            job.checkpoint(state, rng)

    fit(stage, job.train, job.run, weight, history, best=best, resume=resume, checkpoint=checkpoint,
        progress=job.progress)


def train_frozen(job: Job) -> Trained:
    xy, failed = _cached_features(job)
    bb = job.backbone()
    head = make_head(bb.num_features, len(job.data.classes), job.train.hidden, job.train.dropout)
    # Only the head learns, so the base runs as in feature extraction (ONNX Runtime on a CPU), while worker
    # processes decode and augment the next batches.
    base = FrozenFeatures(job.engine())
    model = nn.Sequential(base, head)
    history = History()
    # The base is frozen, so its features of the (unaugmented) validation images are exactly the cached ones.
    val = tensor_batches(*xy["validation"], 1024)
    stage = _image_stage(job, "frozen", model, [{"params": list(head.parameters()), "lr": job.train.lr}],
                         bb.preprocessing, failed, val=val, val_model=head)
    _fit_images(job, stage, history, _weight(job, xy["train"][1]))
    return Trained("head", head.cpu().eval(), history, bb.arch, bb.preprocessing, failed)


def train_finetune(job: Job) -> Trained:
    xy, failed = _cached_features(job)
    bb = job.backbone()
    weight = _weight(job, xy["train"][1])
    history = History()
    resuming = job.resume is not None and job.resume[0]["stage"] == "finetune"
    if resuming:  # stage 1 is in the checkpoint's weights and history
        head, best = make_head(bb.num_features, len(job.data.classes), job.train.hidden, job.train.dropout), None
    else:
        head, history, best = fit_head(*xy["train"], *xy["validation"], len(job.data.classes), job.train,
                                       epochs=job.train.head_epochs, weight=weight, progress=job.progress)
    base = copy.deepcopy(bb.model)  # the pretrained base stays untouched for cached features
    model = Classifier(base, head)
    groups = unfreeze_groups(base, job.decision.unfreeze, job.train.lr, parse_lr_mult(job.decision.lr_mult))
    groups.insert(0, {"params": list(head.parameters()), "lr": job.train.lr, "name": "head"})
    if best is not None:  # stage 2 must beat the head alone, or the head-only weights are kept
        best = {**best, "weights": copy.deepcopy(model.state_dict())}
    stage = _image_stage(job, "finetune", model, groups, bb.preprocessing, failed)
    _fit_images(job, stage, history, weight, best=best)
    if history.stage[history.best_epoch - 1] == "head":
        log.info("finetune: no fine-tuning epoch beat the head alone on validation loss, so the head-only weights "
                 "are kept (the base stays as pretrained)")
    return Trained("finetuned", model.cpu().eval(), history, bb.arch, bb.preprocessing, failed)


def train_scratch(job: Job) -> Trained:
    name, entry = job.train.model, SCRATCH[job.train.model]
    preprocessing = entry.preprocessing()
    num_classes = len(job.data.classes)
    if name == "logreg-pixels":
        return _logreg_pixels(job, preprocessing)
    failed: dict[Path, str] = {}
    model = entry.build(num_classes)
    y_train = np.array([s.label for s in job.data.split("train")])
    stage = _image_stage(job, "scratch", model, [{"params": list(model.parameters()), "lr": job.train.lr}],
                         preprocessing, failed)
    history = History()
    _fit_images(job, stage, history, _weight(job, y_train))
    return Trained("scratch", model.cpu().eval(), history, name, preprocessing, failed)


def _logreg_pixels(job: Job, preprocessing: dict[str, Any]) -> Trained:
    """scikit-learn's logistic regression on 32x32 pixels, folded into ``PixelLinear``."""
    paths = [s.path for s in job.data.samples]
    pixels = extract(paths, lambda x: x.flatten(1), transform=eval_transform(preprocessing),
                     dim=3 * preprocessing["input_size"][-1] ** 2, batch_size=64, lanes=cpu_cores(),
                     progress=job.progress)
    xy = _by_split(job, paths, pixels)
    (X, y), (Xv, yv) = xy["train"], xy["validation"]
    model = PixelLinear(len(job.data.classes), preprocessing["input_size"][-1])
    model.linear.load_state_dict(fold_logreg(X, y, len(job.data.classes), job.train.seed,
                                             balanced=job.train.class_weight == "balanced").state_dict())
    cpu = Precision(torch.device("cpu"))
    loss, acc = evaluate(model, tensor_batches(X, y, 1024)(), cpu)
    val_loss, val_acc = evaluate(model, tensor_batches(Xv, yv, 1024)(), cpu)
    history = History(best_epoch=1)
    history.append("scratch", loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc)
    return Trained("scratch", model.eval(), history, "logreg-pixels", preprocessing, pixels.failed)
