"""The training modes, each a short recipe over the stages in ``train.py``.

- auto:     features first, then a larger base and fine-tuning while the time budget allows (``auto.py``);
- features: a head on cached features of the frozen base (or several, concatenated), chosen on validation;
- frozen:   the frozen base and a new head, end to end on augmented images (validation on cached features);
- finetune: the head on cached features first, then the top stages of the base with smaller learning rates;
- scratch:  small-cnn or alexnet from random weights on augmented images, or logreg-pixels.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tlearn import dist
from tlearn.backbones import Backbone
from tlearn.config import AugmentConfig, Decision, RuntimeConfig, TrainConfig, parse_lr_mult, to_dict
from tlearn.data import ImageFolder, Sample
from tlearn.features import Features, ImageFiles, collate, cpu_cores, default_workers, eval_transform, extract
from tlearn.fileio import file_sha256, keyed_path
from tlearn.models import SCRATCH, Classifier, PixelLinear, unfreeze_groups
from tlearn.probe import MEMO_VERSION, Probe, Split, choose_head, describe, load_probe, refit, save_probe
from tlearn.runtime import Engine, FrozenFeatures
from tlearn.strategy import REPORT_SECONDS, Clock, Step
from tlearn.train import (
    CPU,
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
    seeded,
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
    backbone: Callable[..., Backbone]  # (name=None: the chosen one) -> the frozen pretrained base
    engine: Callable[..., Engine]  # (name=None) -> what runs that base (ONNX Runtime or PyTorch)
    features: Callable[..., Features]  # (paths, names=None, view="center") -> cached pooled features, concatenated
    clock: Clock
    names: list[str]  # the bases whose features are concatenated (--backbone A+B); the first is "the" base
    missing: Callable[[list[Path], str, str], int] | None = None  # (paths, name, view) -> images not yet cached
    namespace: Callable[[str, str], str] | None = None  # (name, view) -> what keys that base's cached features
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
    backbone: str = ""  # the bases of a head: 'a' or 'a+b'
    head_shape: tuple[int, float] | None = None  # (hidden, dropout) when not the config's (a logistic regression)
    probe: Probe | None = None  # a head chosen on cached features: held-out logits and candidates


def run_mode(job: Job) -> Trained:
    if job.decision.mode == "auto":
        from tlearn.auto import train_auto  # mode auto is built from the recipes here, so it imports this module

        recipe = train_auto
    else:
        recipe = {"features": train_features, "frozen": train_frozen, "finetune": train_finetune,
                  "scratch": train_scratch}[job.decision.mode]
    with seeded(job.train.seed, job.run.device):
        return recipe(job)


def _by_split(job: Job, get: Callable[[list[Path], str], Features],
              views: tuple[str, ...] = ("center",)) -> tuple[dict[str, tuple[list[np.ndarray], np.ndarray]],
                                                             dict[Path, str]]:
    """([X of each view], y) of the train and validation splits, each split's features got on their own (no copy
    of the whole folder's), and the files that any view could not decode, which are dropped from the data."""
    out, failed = {}, {}
    for split in ("train", "validation"):
        samples = job.data.split(split)
        feats = [get([s.path for s in samples], view) for view in views]
        bad = {p: reason for f in feats for p, reason in f.failed.items()}
        keep = np.array([s.path not in bad for s in samples], dtype=bool)
        y = np.array([s.label for s in samples], dtype=np.int64)
        out[split] = [f.X if keep.all() else f.X[keep] for f in feats], y[keep]
        failed.update(bad)
    job.data.drop(failed)
    return out, failed


def _cached_features(job: Job) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[Path, str]]:
    """(X, y) per split from the feature cache, and the files that could not be decoded."""
    xy, failed = _by_split(job, lambda paths, view: job.features(paths, None, view))
    return {split: (X[0], y) for split, (X, y) in xy.items()}, failed


def _weight(job: Job, y_train: np.ndarray) -> torch.Tensor | None:
    return class_weights(y_train, len(job.data.classes), job.train.class_weight)  # the loop places them


Found = tuple[Probe, Split | None, Split | None, dict[Path, str]]  # a chosen head, its splits (None when it
# was remembered), and the files that failed


def head_views(job: Job) -> tuple[str, ...]:
    """The views a head on cached features trains with: the centre crop and its mirror image, unless the
    augmentation turns horizontal flips off (--no-horizontal-flip, or --augment none), as for images whose
    mirror image means something else."""
    return ("center", "flip") if job.augment.resolved()["horizontal_flip"] else ("center",)


def _probe_splits(job: Job, names: list[str]) -> tuple[Split, Split, dict[Path, str]]:
    """Cached features of ``names`` (the views of ``head_views``) of the train and validation splits."""
    xy, failed = _by_split(job, lambda paths, view: job.features(paths, names, view), head_views(job))
    train, val = (Split(X[0], X[1] if len(X) > 1 else None, y) for X, y in (xy["train"], xy["validation"]))
    return train, val, failed


def probe_features(job: Job, names: list[str]) -> Found:
    """The head chosen on the features of ``names``; remembered under the cache folder, so that a re-run on the
    same images, labels, split and settings takes it from there (the splits' features are then not loaded:
    None)."""
    memo = _memo_path(job, names)
    found = load_probe(memo) if memo else None
    if found is not None:
        probe, failed = found[0], _failed_paths(job, found[1])
        job.data.drop(failed)
        log.info(f"head on {'+'.join(names)} features: {describe(probe.chosen)}, as chosen before on the same images, "
                 f"labels and settings")
        return probe, None, None, failed
    train, val, failed = _probe_splits(job, names)
    log.info(f"choosing the head on {'+'.join(names)} features ({train.X.shape[1]} per image):")
    probe = choose_head(train, val, len(job.data.classes), job.train, _weight(job, train.y))
    log.info(f"  chosen: {describe(probe.chosen)} (val_loss {probe.val_loss:.4f}, "
             f"val_accuracy {probe.val_accuracy:.4f}, {probe.seconds:.1f} s)")
    if memo:
        save_probe(memo, probe, _failed_rows(job, failed))
    return probe, train, val, failed


def head_result(job: Job, names: list[str], found: Found) -> Trained:
    """The chosen head, refit on train + validation where that applies, as a trained model."""
    probe, train, val, failed = found
    memo = _memo_path(job, names, "refit")
    again = load_probe(memo) if memo and probe.chosen["head"] == "logreg" else None
    if again is not None:
        probe = again[0]
    else:
        if train is None:  # the choice was remembered but not the refit: its features are needed after all
            train, val, _ = _probe_splits(job, names)
        probe = refit(probe, train, val, len(job.data.classes), job.train)
        if memo and probe.refit:
            save_probe(memo, probe, [])
    bb = job.backbone(names[0])
    shape = None if probe.chosen["head"] == "dense" else (0, 0.0)
    return Trained("head", probe.head, probe.history, bb.arch, bb.preprocessing, failed, "+".join(names), shape, probe)


def _memo_path(job: Job, names: list[str], what: str = "chosen") -> Path | None:
    """Where the head chosen on these features is remembered: keyed by what decides it (the feature caches'
    identities, each training and validation image's content and label, the training settings and the library
    versions), or None when a file cannot be read."""
    if job.namespace is None:
        return None
    try:
        rows = {split: [(file_sha256(s.path), s.label) for s in job.data.split(split)]
                for split in ("train", "validation")}
    except OSError:
        return None
    settings = {k: v for k, v in to_dict(job.train).items() if k not in ("mode", "time_budget")}
    key = {"version": MEMO_VERSION, "what": what, "features": [job.namespace(n, v) for n in names
                                                               for v in head_views(job)],
           "rows": rows, "classes": len(job.data.classes), "train": settings,
           "libraries": [importlib.metadata.version(m) for m in ("scikit-learn", "torch", "numpy")]}
    return keyed_path(job.runtime.cache_dir, "heads", key, f"-{what}.safetensors")


def _failed_rows(job: Job, failed: dict[Path, str]) -> list[list[Any]]:
    return [[split, i, failed[s.path]] for split in ("train", "validation")
            for i, s in enumerate(job.data.split(split)) if s.path in failed]


def _failed_paths(job: Job, rows: list[list[Any]]) -> dict[Path, str]:
    samples = {split: job.data.split(split) for split in ("train", "validation")}
    return {samples[split][i].path: reason for split, i, reason in rows}


def train_features(job: Job) -> Trained:
    start = time.perf_counter()
    found = probe_features(job, job.names)
    step = Step(f"features of {'+'.join(job.names)}, head chosen on validation", "features", 0.0)
    record(step, "kept", start, found[0], announce=False)  # the head search said it: this mode is not auto
    job.decision.plan = [step.as_dict()]
    return head_result(job, job.names, found)


def record(step: Step, status: str, start: float, probe: Probe | None = None, announce: bool = True) -> None:
    step.status, step.seconds = status, time.perf_counter() - start
    if probe is not None:
        step.val_loss, step.val_accuracy = probe.val_loss, probe.val_accuracy
        step.detail["head"] = describe(probe.chosen)
        step.detail["candidates"] = [{"head": describe(c), "val_loss": round(c["val_loss"], 4),
                                      "val_accuracy": round(c["val_accuracy"], 4)} for c in probe.candidates]
    score = f": val_loss {step.val_loss:.4f}, val_accuracy {step.val_accuracy:.4f}" if step.val_loss else ""
    if announce:
        log.info(f"auto: {step.name}: {status}{score} ({step.seconds:.1f} s)")


def _image_batches(job: Job, samples: list[Sample], transform: Callable, failed: dict[Path, str],
                   generator: torch.Generator | None = None) -> Batches:
    """Batches of decoded images and labels; shuffled (and augmented, by ``transform``) when a generator is
    given. Files that fail to decode are left out and recorded in ``failed``.

    With several processes, --batch-size is the effective batch: each process takes its share of every batch
    (``batch_size / world_size`` images), so the learning rate and the steps per epoch stay those of one process.
    Training images are dealt out by PyTorch's ``DistributedSampler``, reshuffled each epoch from ``generator``
    (whose state the checkpoints keep); evaluation images are split into disjoint shares."""
    world = dist.world_size()
    if generator is None and dist.active():
        samples = dist.shard(samples)
    files = ImageFiles([s.path for s in samples], transform)
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    workers = job.runtime.workers if job.runtime.workers is not None else default_workers()
    sampler = DistributedSampler(files, world, dist.rank(), shuffle=True) if generator is not None and world > 1 \
        else None
    loader = DataLoader(files, batch_size=max(1, job.train.batch_size // world), sampler=sampler,
                        shuffle=generator is not None and sampler is None, generator=generator, num_workers=workers,
                        collate_fn=collate, pin_memory=job.run.device.type == "cuda")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if sampler is not None:  # the same order on every process: the epoch's seed comes from the shared generator
            sampler.set_epoch(int(torch.randint(2**31, (1,), generator=generator)))
        for ok, x, bad in loader:
            failed.update({files.paths[i]: reason for i, reason in bad})
            if x is not None:
                yield x, labels[ok]

    return batches


def _image_stage(job: Job, name: str, model: nn.Module, groups: list[dict], preprocessing: dict[str, Any],
                 failed: dict[Path, str], val: Batches | None = None, val_model: nn.Module | None = None) -> Stage:
    """A stage that trains ``model`` end to end on augmented training images."""
    from tlearn.augment import train_transform  # torchvision, only for the modes that train on images

    generator = torch.Generator().manual_seed(job.train.seed)
    train = job.data.split("train")
    if val is None:
        val = _image_batches(job, job.data.split("validation"), eval_transform(preprocessing), failed)
    stage = Stage(name, model, groups,
                  _image_batches(job, train, train_transform(preprocessing, job.augment), failed, generator),
                  val, job.train.max_epochs(job.decision.mode), math.ceil(len(train) / job.train.batch_size),
                  val_model=val_model, images_per_epoch=len(train), generator=generator,
                  deadline=job.clock.deadline(REPORT_SECONDS))
    return stage


def _fit_images(job: Job, stage: Stage, history: History, weight: torch.Tensor | None,
                best: dict[str, Any] | None = None) -> None:
    """``train.fit`` on an image stage, checkpointing after each epoch and resuming from a checkpoint."""
    generator = stage.generator
    resume = None
    if job.resume and job.resume[0]["stage"] == stage.name:
        resume, rng = job.resume
        mine = f".rank{dist.rank()}"  # each process's own random state, where several saved theirs
        generator.set_state(rng.get("generator" + mine, rng["generator"]))
        torch.set_rng_state(rng.get("torch" + mine, rng["torch"]))
        if "cuda" in rng and job.run.device.type == "cuda":
            torch.cuda.set_rng_state(rng.get("cuda" + mine, rng["cuda"]), job.run.device)
        history.__dict__.update(resume["history"].__dict__)

    def checkpoint(state: dict[str, Any]) -> None:
        rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
        if job.run.device.type == "cuda":  # dropout on the GPU draws from the device's own generator
            rng["cuda"] = torch.cuda.get_rng_state(job.run.device)
        if dist.active():  # every process's state, gathered (all take part), and written by rank 0 alone
            rng = {**rng, **{f"{k}.rank{r}": t for k, v in rng.items() for r, t in enumerate(dist.gather(v))}}
        if job.checkpoint:
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
        head = make_head(bb.num_features, len(job.data.classes), job.train.hidden, job.train.dropout)
    else:
        head, history, _ = fit_head(*xy["train"], *xy["validation"], len(job.data.classes), job.train,
                                    epochs=job.train.head_epochs, weight=weight, progress=job.progress)
    return finetune_stage(job, head, history, xy["train"][1], failed, resuming=resuming)


def finetune_stage(job: Job, head: nn.Module, history: History, y_train: np.ndarray, failed: dict[Path, str],
                   deadline: float | None = None, resuming: bool = False, shape: tuple[int, float] | None = None,
                   epochs: int | None = None, bar: float | None = None) -> Trained:
    """Stage 2 of fine-tuning: the top stages of a copy of the base, with ``head`` trained on its features as the
    start. It must beat the head alone on validation loss, or the head-only weights are kept."""
    bb = job.backbone()
    base = copy.deepcopy(bb.model)  # the pretrained base stays untouched for cached features
    model = Classifier(base, head)
    groups = unfreeze_groups(base, job.decision.unfreeze, job.train.lr, parse_lr_mult(job.decision.lr_mult))
    groups.insert(0, {"params": list(head.parameters()), "lr": job.train.lr, "name": "head"})
    best = None
    if not resuming:
        i = history.best_epoch - 1
        best = {"loss": history.history["val_loss"][i] if bar is None else bar, "epoch": history.best_epoch,
                "weights": copy.deepcopy(model.state_dict())}
    stage = _image_stage(job, "finetune", model, groups, bb.preprocessing, failed)
    stage.deadline, stage.epochs = deadline or stage.deadline, epochs or stage.epochs
    _fit_images(job, stage, history, _weight(job, y_train), best=best)
    if history.stage[history.best_epoch - 1] == "head":
        log.info("finetune: no fine-tuning epoch beat the head alone on validation loss, so the head-only weights "
                 "are kept (the base stays as pretrained)")
    return Trained("finetuned", model.cpu().eval(), history, bb.arch, bb.preprocessing, failed, bb.name, shape)


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
    def pixels(paths: list[Path], view: str) -> Features:
        return extract(paths, lambda x: x.flatten(1), transform=eval_transform(preprocessing),
                       dim=3 * preprocessing["input_size"][-1] ** 2, batch_size=64, lanes=cpu_cores(),
                       progress=job.progress)

    xy, failed = _by_split(job, pixels)
    ([X], y), ([Xv], yv) = xy["train"], xy["validation"]
    model = PixelLinear(len(job.data.classes), preprocessing["input_size"][-1])
    model.linear.load_state_dict(fold_logreg(X, y, len(job.data.classes), job.train.seed,
                                             balanced=job.train.class_weight == "balanced").state_dict())
    loss, acc = evaluate(model, tensor_batches(X, y, 1024)(), CPU)
    val_loss, val_acc = evaluate(model, tensor_batches(Xv, yv, 1024)(), CPU)
    history = History(best_epoch=1, closed_form=True)
    history.append("scratch", loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc)
    return Trained("scratch", model.eval(), history, "logreg-pixels", preprocessing, failed)
