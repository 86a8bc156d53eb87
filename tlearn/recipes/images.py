"""The image modes, each a short recipe over the stages in ``train.py``:

- frozen:   the frozen base and a new head, end to end on augmented images (validation on cached features);
- finetune: the head on cached features first, then the top stages of the base with smaller learning rates;
- scratch:  small-cnn or alexnet from random weights on augmented images, or logreg-pixels.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tlearn import dist
from tlearn.config import parse_lr_mult
from tlearn.data import Sample
from tlearn.features import Features, ImageFiles, collate, cpu_cores, default_workers, extract
from tlearn.images import eval_transform
from tlearn.models import SCRATCH, Classifier, PixelLinear, fold_logreg, unfreeze_groups
from tlearn.recipes.job import Job, Trained, by_split, cached_features, labels_of, weight
from tlearn.recipes.plan import REPORT_SECONDS
from tlearn.runtime import FrozenFeatures
from tlearn.train import CPU, Batches, History, Stage, evaluate, fit, fit_head, make_head, tensor_batches

log = logging.getLogger("tlearn")


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
    labels = torch.from_numpy(labels_of(job, samples))
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
    xy, failed = cached_features(job)
    job = job.without(failed)
    bb = job.extractor.base()
    head = make_head(bb.num_features, len(job.data.classes), job.train.hidden, job.train.dropout)
    # Only the head learns, so the base runs as in feature extraction (ONNX Runtime on a CPU), while worker
    # processes decode and augment the next batches.
    base = FrozenFeatures(job.extractor.engine())
    model = nn.Sequential(base, head)
    history = History()
    # The base is frozen, so its features of the (unaugmented) validation images are exactly the cached ones.
    val = tensor_batches(*xy["validation"], 1024)
    stage = _image_stage(job, "frozen", model, [{"params": list(head.parameters()), "lr": job.train.lr}],
                         bb.preprocessing, failed, val=val, val_model=head)
    _fit_images(job, stage, history, weight(job, xy["train"][1]))
    return Trained("head", head.cpu().eval(), history, bb.arch, bb.preprocessing, failed, job.decision)


def train_finetune(job: Job) -> Trained:
    xy, failed = cached_features(job)
    job = job.without(failed)
    bb = job.extractor.base()
    class_weight = weight(job, xy["train"][1])
    history = History()
    resuming = job.resume is not None and job.resume[0]["stage"] == "finetune"
    if resuming:  # stage 1 is in the checkpoint's weights and history
        head = make_head(bb.num_features, len(job.data.classes), job.train.hidden, job.train.dropout)
    else:
        head, history, _ = fit_head(*xy["train"], *xy["validation"], len(job.data.classes), job.train,
                                    epochs=job.train.head_epochs, weight=class_weight, progress=job.progress)
    return finetune_stage(job, head, history, xy["train"][1], failed, resuming=resuming)


def finetune_stage(job: Job, head: nn.Module, history: History, y_train: np.ndarray, failed: dict[Path, str],
                   deadline: float | None = None, resuming: bool = False, shape: tuple[int, float] | None = None,
                   epochs: int | None = None, bar: float | None = None) -> Trained:
    """Stage 2 of fine-tuning: the top stages of a copy of the base, with ``head`` trained on its features as the
    start. It must beat the head alone on validation loss, or the head-only weights are kept."""
    bb = job.extractor.base()
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
    _fit_images(job, stage, history, weight(job, y_train), best=best)
    if history.stage[history.best_epoch - 1] == "head":
        log.info("finetune: no fine-tuning epoch beat the head alone on validation loss, so the head-only weights "
                 "are kept (the base stays as pretrained)")
    return Trained("finetuned", model.cpu().eval(), history, bb.arch, bb.preprocessing, failed, job.decision,
                   bb.name, shape)


def val_logits(job: Job, model: nn.Module, preprocessing: dict[str, Any]) -> np.ndarray:
    """(N_val, C) logits of a network on the validation images (those that decode), in order."""
    failed: dict[Path, str] = {}
    net = job.run.module(model).eval()
    with torch.no_grad():
        out = [net(job.run.prepare(x)).float().cpu() for x, _ in
               _image_batches(job, job.data.split("validation"), eval_transform(preprocessing), failed)()]
    return torch.cat(out).numpy()


def train_scratch(job: Job) -> Trained:
    name, entry = job.train.model, SCRATCH[job.train.model]
    preprocessing = entry.preprocessing()
    num_classes = len(job.data.classes)
    if name == "logreg-pixels":
        return _logreg_pixels(job, preprocessing)
    failed: dict[Path, str] = {}
    model = entry.build(num_classes)
    y_train = labels_of(job, job.data.split("train"))
    stage = _image_stage(job, "scratch", model, [{"params": list(model.parameters()), "lr": job.train.lr}],
                         preprocessing, failed)
    history = History()
    _fit_images(job, stage, history, weight(job, y_train))
    return Trained("scratch", model.cpu().eval(), history, name, preprocessing, failed, job.decision)


def _logreg_pixels(job: Job, preprocessing: dict[str, Any]) -> Trained:
    """scikit-learn's logistic regression on 32x32 pixels, folded into ``PixelLinear``."""
    def pixels(paths: list[Path], views: tuple[str, ...]) -> list[Features]:
        return [extract(paths, lambda x: x.flatten(1), transform=eval_transform(preprocessing, view),
                        dim=3 * preprocessing["input_size"][-1] ** 2, batch_size=64, lanes=cpu_cores(),
                        progress=job.progress) for view in views]

    xy, failed = by_split(job, pixels)
    ([X], y), ([Xv], yv) = xy["train"], xy["validation"]
    model = PixelLinear(len(job.data.classes), preprocessing["input_size"][-1])
    model.linear.load_state_dict(fold_logreg(X, y, len(job.data.classes), job.train.seed,
                                             balanced=job.train.class_weight == "balanced").state_dict())
    loss, acc = evaluate(model, tensor_batches(X, y, 1024)(), CPU)
    val_loss, val_acc = evaluate(model, tensor_batches(Xv, yv, 1024)(), CPU)
    history = History(best_epoch=1, closed_form=True)
    history.append("scratch", loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc)
    return Trained("scratch", model.eval(), history, "logreg-pixels", preprocessing, failed, job.decision)
