"""Training: one visible loop for every mode, over batches of cached features or of augmented images.

``fit`` runs epochs of ``train_one_epoch`` and ``evaluate``, keeps the weights of the epoch with the lowest
validation loss (or a stage's own ``select`` score), stops early after ``patience`` epochs without improvement,
and hands its full state to a checkpoint callback after each epoch so an interrupted run can resume."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tlearn import dist
from tlearn.config import TlearnError, TrainConfig
from tlearn.models import fold_logreg, make_head
from tlearn.progress import tqdm

log = logging.getLogger("tlearn")
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (x, y) batches per call


@dataclass
class History:
    """Per-epoch metrics in Keras's vocabulary: ``history["loss"]``, ``["accuracy"]``, ``["val_loss"]``,
    ``["val_accuracy"]``. ``stage`` names each epoch's training stage; ``best_epoch`` is the epoch whose
    weights were kept."""

    epoch: list[int] = field(default_factory=list)
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []})
    stage: list[str] = field(default_factory=list)
    best_epoch: int = 0
    closed_form: bool = False  # one fit of a logistic regression, not epochs of gradient descent

    def append(self, stage: str, **metrics: float) -> None:
        self.epoch.append(len(self.epoch) + 1)
        self.stage.append(stage)
        for k, v in metrics.items():
            self.history[k].append(float(v))

    def best(self) -> str:
        """The kept epoch in words: 'epoch 3 of 5', or, over several stages, which stage's epoch it is and how many
        each stage ran ('finetune epoch 1 of 1, after 11 head epochs')."""
        stages = list(dict.fromkeys(self.stage))
        if len(stages) < 2 or not self.best_epoch:
            return f"epoch {self.best_epoch} of {len(self.epoch)}"
        stage = self.stage[self.best_epoch - 1]
        within = self.stage[:self.best_epoch].count(stage)
        others = ", ".join(f"{self.stage.count(s)} {s}" for s in stages if s != stage)
        when = "after" if stages.index(stage) > 0 else "then"
        return f"{stage} epoch {within} of {self.stage.count(stage)}, {when} {others} epoch(s)"

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "stage": self.stage, "best_epoch": self.best_epoch,
                "closed_form": self.closed_form}

    def plot(self, title: str = "") -> Any:
        """The accuracy and loss curves, train against validation, with the best epoch and the start of each
        stage marked (the report's figure): a matplotlib ``Figure``, shown as a picture in a notebook."""
        from tlearn.plots import curves_figure

        return curves_figure(self, title)

    def _repr_html_(self) -> str:  # in a notebook: the curves and the last epochs
        from tlearn.display import history_html, safely

        return safely(history_html, self)


class DevicePlacementError(RuntimeError):
    """A model, its inputs or its loss's class weights were not placed on the training loop's device."""


@dataclass(eq=False)
class Precision:
    """The one owner of where and in which precision a training loop runs. The loop places its model, batches,
    labels and class weights through it (``module``, ``prepare``, ``put``), so that they share one device by
    construction, and ``check`` confirms it before the first batch of each pass. With the environment variable
    ``TLEARN_CHECK_DEVICES=1`` the check is armed: everything checked must also have been placed by this owner,
    so a tensor that skipped it fails on the CPU as it would fail on a GPU."""

    device: torch.device
    dtype: torch.dtype | None = None  # None: fp32
    _placed: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary, repr=False)

    def _mark(self, x: Any) -> Any:
        self._placed[id(x)] = x
        return x

    def module(self, model: nn.Module) -> nn.Module:
        """Move a model to the device (convolution weights channels-last)."""
        model = model.to(self.device, memory_format=torch.channels_last)
        for t in (*model.parameters(), *model.buffers()):
            self._mark(t)
        return self._mark(model)

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """Move a tensor (labels, class weights) to the device."""
        return self._mark(x.to(self.device, non_blocking=True))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device; image batches (B, C, H, W) go channels-last, which convolutions run
        about 1.6x faster on, on CPUs as on GPUs, with the same results."""
        if x.dim() == 4:
            return self._mark(x.to(self.device, memory_format=torch.channels_last, non_blocking=True))
        return self.put(x)

    def check(self, where: str, model: nn.Module, *tensors: torch.Tensor | None) -> None:
        """Raise ``DevicePlacementError`` unless the model's parameters and buffers and the tensors all sit on
        the device (and, armed, were placed by this owner)."""
        armed = os.environ.get("TLEARN_CHECK_DEVICES") == "1"
        named = [*(("model." + n, t) for n, t in (*model.named_parameters(), *model.named_buffers())),
                 *((f"tensor {i}", t) for i, t in enumerate(tensors) if t is not None)]
        for name, t in named:
            if t.device.type != self.device.type or (armed and self._placed.get(id(t)) is not t):
                got = t.device if t.device.type != self.device.type else f"{t.device}, not placed by the loop"
                raise DevicePlacementError(f"{where}: {name} is on {got}; the loop runs on {self.device}. "
                                           "This is a bug in tlearn: please report it with the command you ran.")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block from ``seed`` on PyTorch's global generators (weight initialisation and dropout draw from them,
    and take no generator of their own), then give the caller back its random state untouched: what ran before
    cannot change a result, and training changes nothing outside it."""
    cuda = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


# Heads on cached features train on the CPU, where the features are: a head of a few thousand parameters gains
# nothing from a GPU, and the features need no copy.
CPU = Precision(torch.device("cpu"))


def resolve_precision(device: str = "auto", precision: str = "auto") -> Precision:
    """The device (CUDA when present, unless ``device`` says otherwise) and the autocast dtype of the training
    loops: with ``auto``, bf16 or fp16 mixed precision on CUDA and fp32 on a CPU."""
    if device == "auto":
        where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        where = torch.device(device)
        if where.type == "cuda" and not torch.cuda.is_available():
            raise TlearnError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
            raise TlearnError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if precision == "auto":
        precision = "fp32" if where.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and where.type != "cuda":
        raise TlearnError("--precision fp16 needs a CUDA device; on a CPU use bf16 or fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Precision(where, dtype)


def class_weights(y: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency loss weights (scikit-learn's 'balanced'), or None. 'auto' weighs only when the largest
    class has more than 1.5 times the images of the smallest."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if mode == "none" or (mode == "auto" and counts.max() <= 1.5 * counts.min()):
        return None
    return torch.tensor(len(y) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def make_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 10 % of each group's lr, then cosine decay to 0, stepped once per iteration."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.1 + 0.9 * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    opt: torch.optim.Optimizer, run: Precision, weight: torch.Tensor | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    progress: tqdm | None = None) -> tuple[float, float]:
    """One pass over the batches; returns mean loss and accuracy."""
    # in place: the optimizer's parameters stay the model's (a DistributedDataParallel wrapper is placed already)
    model = (model if isinstance(model, DistributedDataParallel) else run.module(model)).train()
    # several processes may get a different number of batches (one whose images all failed to decode is left
    # out): DistributedDataParallel's join lets a process that has finished shadow the others' gradient syncs
    uneven = model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    with uneven:
        total_loss, correct, seen = _epoch(model, batches, opt, run, weight, scheduler, scaler, progress)
    total_loss, correct, seen = dist.all_sum([total_loss, correct, seen])  # over every process's share
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], opt: torch.optim.Optimizer,
           run: Precision, weight: torch.Tensor | None, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
           scaler: torch.amp.GradScaler | None, progress: tqdm | None) -> tuple[float, int, int]:
    """The steps of one pass: summed loss, correct predictions and images seen."""
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in batches:
        x, y = run.prepare(x), run.put(y)
        if not seen:
            run.check("training", model, x, y, weight)
        with run.autocast():
            logits = model(x)  # (B, C)
            loss = criterion(logits.float(), y, weight)
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if scheduler:
            scheduler.step()
        total_loss += loss.item() * len(y)
        correct += hits(logits, y)
        seen += len(y)
        if progress is not None:
            progress.update(len(y))
            progress.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    return total_loss, correct, seen


def criterion(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
              reduction: str = "mean") -> torch.Tensor:
    """The loss: cross-entropy against class indices (B,); binary cross-entropy against several labels an image
    ((B, C) of 0/1, mean over labels), ``weight`` then weighing each label's positives. A sum is over images."""
    if y.ndim == 1:
        return F.cross_entropy(logits, y, weight=weight, reduction=reduction)
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=weight, reduction="none").mean(1)
    return loss.sum() if reduction == "sum" else loss.mean()


def hits(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Images predicted right: the class, or every label (at probability 0.5)."""
    right = logits.argmax(1) == y if y.ndim == 1 else ((logits > 0) == (y > 0.5)).all(1)
    return int(right.sum().item())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], run: Precision,
             weight: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean loss and accuracy in eval mode."""
    model = run.module(model).eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in batches:
        x, y = run.prepare(x), run.put(y)
        if not seen:
            run.check("evaluation", model, x, y, weight)
        with run.autocast():
            logits = model(x).float()
        total_loss += criterion(logits, y, weight, "sum").item()
        correct += hits(logits, y)
        seen += len(y)
    total_loss, correct, seen = dist.all_sum([total_loss, correct, seen])  # the same numbers on every process
    return total_loss / max(seen, 1), correct / max(seen, 1)


def tensor_batches(X: np.ndarray, y: np.ndarray, batch_size: int, generator: torch.Generator | None = None,
                   mirror: np.ndarray | None = None, rows: np.ndarray | None = None) -> Batches:
    """Batches of in-memory features; shuffled each pass when a generator is given. ``rows`` picks the rows of
    ``X`` to use (all by default); ``mirror``, the features of the mirror images aligned with ``X``, adds each
    picked row's mirror image as one more row. Rows are gathered per batch, so no copy of ``X`` is ever made."""
    yt = torch.from_numpy(y).long() if y.ndim == 1 else torch.from_numpy(y).float()  # classes, or 0/1 per label
    Xt, Mt = torch.from_numpy(X), None if mirror is None else torch.from_numpy(mirror)
    picked = torch.arange(len(Xt)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if Mt is not None:  # row i of the mirror view is index i + len(X)
        picked = torch.cat([picked, picked + len(Xt)])

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = picked[torch.randperm(len(picked), generator=generator)] if generator is not None else picked
        for idx in order.split(batch_size):
            if Mt is None:
                yield Xt[idx], yt[idx]
            else:
                plain, flipped = idx[idx < len(Xt)], idx[idx >= len(Xt)] - len(Xt)
                yield torch.cat([Xt[plain], Mt[flipped]]), torch.cat([yt[plain], yt[flipped]])

    return batches


@dataclass
class Stage:
    """One training stage: what to train, on what, for how long."""

    name: str
    model: nn.Module  # trained on ``train``
    groups: list[dict]  # optimizer parameter groups, each with its own lr
    train: Batches
    val: Batches
    epochs: int
    steps_per_epoch: int
    val_model: nn.Module | None = None  # evaluated on ``val`` (default: ``model``)
    schedule: bool = True  # warm-up + cosine; off for a head on features
    images_per_epoch: int = 0  # for the progress bar
    generator: torch.Generator | None = None  # the shuffling RNG, whose state goes into checkpoints
    deadline: float | None = None  # perf_counter() time by which the stage must end (the time budget)
    select: Callable[[nn.Module], float] | None = None  # picks the best epoch, lower is better (default: val_loss)


def fit(stage: Stage, config: TrainConfig, run: Precision, weight: torch.Tensor | None, history: History,
        best: dict[str, Any] | None = None, resume: dict[str, Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``stage`` and return the best state ``{"loss", "epoch", "weights"}`` (``best`` carries a previous
    stage's best in, so a stage that never improves on it leaves the weights as they were)."""
    model = run.module(stage.model)
    val_model = model if stage.val_model is None else run.module(stage.val_model)
    # several processes: gradients are averaged across them by DistributedDataParallel in backward()
    trained = model if not dist.active() else \
        DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    weight = None if weight is None else run.put(weight)
    opt = make_optimizer(stage.groups, config)
    total = stage.epochs * stage.steps_per_epoch
    warmup = round(config.warmup_epochs * stage.steps_per_epoch)
    scheduler = warmup_cosine(opt, warmup, total) if stage.schedule else None
    scaler = torch.amp.GradScaler() if run.dtype == torch.float16 else None
    carried = best is not None  # a previous stage's weights to fall back on: even the first epoch may be skipped
    best = best or {"loss": float("inf"), "epoch": 0, "weights": copy.deepcopy(model.state_dict())}
    first, waited = 1, 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if scheduler:
            scheduler.load_state_dict(resume["scheduler"])
        best, first, waited = resume["best"], resume["epoch"] + 1, resume["waited"]
    epoch_seconds = 0.0
    for epoch in range(first, stage.epochs + 1):
        start = time.perf_counter()
        if stage.deadline is not None and start + epoch_seconds > stage.deadline and (epoch > 1 or carried):
            log.info(f"{stage.name}: stopping before epoch {epoch}: the time budget leaves "
                     f"{max(stage.deadline - start, 0):.0f} s, an epoch takes about {epoch_seconds:.0f} s")
            break
        if epoch == 1 and stage.deadline is not None and start > stage.deadline and not carried:
            log.warning(f"{stage.name}: the time budget is spent before the first epoch; training one epoch anyway, "
                        "so that there is a model (raise --time-budget for more)")
        with tqdm(total=stage.images_per_epoch or None, unit="img", leave=False, disable=not progress or None,
                  desc=f"{stage.name} epoch {epoch}/{stage.epochs}") as bar:
            loss, acc = train_one_epoch(trained, stage.train(), opt, run, weight, scheduler, scaler, bar)
        val_loss, val_acc = evaluate(val_model, stage.val(), run)  # unweighted, comparable across runs
        history.append(stage.name, loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc)
        if not (math.isfinite(loss) and math.isfinite(val_loss)):
            _diverged(stage.name, epoch, loss if not math.isfinite(loss) else val_loss, best, config, model)
            break
        seconds = epoch_seconds = time.perf_counter() - start
        if stage.images_per_epoch:
            log.info(f"{stage.name} epoch {epoch}/{stage.epochs}: loss {loss:.4f}, accuracy {acc:.4f}, "
                     f"val_loss {val_loss:.4f}, val_accuracy {val_acc:.4f} ({stage.steps_per_epoch} iterations of "
                     f"{config.batch_size}, {seconds:.1f} s, {stage.images_per_epoch / seconds:.1f} img/s)")
        score = val_loss if stage.select is None else stage.select(val_model)
        if score < best["loss"]:
            best, waited = {"loss": score, "epoch": len(history.epoch),
                            "weights": copy.deepcopy(model.state_dict())}, 0
        else:
            waited += 1
        history.best_epoch = best["epoch"]
        stop = waited >= config.patience
        if checkpoint:
            checkpoint({"stage": stage.name, "epoch": epoch, "waited": waited, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict() if scheduler else {},
                        "best": best, "history": history, "done": stop or epoch == stage.epochs})
        if stop:
            break
    model.load_state_dict(best["weights"])
    return best


class TrainingDiverged(TlearnError):
    """The loss became NaN or infinite before any epoch gave usable weights."""


def _diverged(stage: str, epoch: int, loss: float, best: dict[str, Any], config: TrainConfig,
              model: nn.Module) -> None:
    """A non-finite loss ends the stage: back to the best weights when they are usable (a validation loss below
    the uniform guess's, log C), else an error."""
    advice = f"lower --lr (now {config.lr:g}){' or --lr-mult' if stage != 'head' else ''}"
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    if not best["loss"] < math.log(classes):
        raise TrainingDiverged(f"{stage}: training diverged in epoch {epoch} (the loss is {loss}) and no epoch "
                               f"gave usable weights (a validation loss below {math.log(classes):.4f}, the uniform "
                               f"guess's); {advice}")
    log.warning(f"{stage}: training diverged in epoch {epoch} (the loss is {loss}); stopped, keeping the best "
                f"finite weights (epoch {best['epoch']}). To train further, {advice}")


def fit_head(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, num_classes: int,
             config: TrainConfig, *, epochs: int | None = None, history: History | None = None,
             weight: torch.Tensor | None = None, progress: bool = False, mirror: np.ndarray | None = None,
             rows: np.ndarray | None = None, val_rows: np.ndarray | None = None) -> tuple[nn.Sequential, History, dict]:
    """Train a head on cached features (mode features, and the first stage of finetune). The dense head trains on
    the ``rows`` of ``X_train`` (all by default) and their ``mirror`` rows, if given, and stops early on the
    ``val_rows`` of ``X_val`` (see ``tensor_batches``)."""
    history = history if history is not None else History()
    if config.head == "logreg":
        head = _logreg_head(X_train, y_train, num_classes, config)
        loss, acc = evaluate(head, tensor_batches(X_train, y_train, 4096)(), CPU)
        val_loss, val_acc = evaluate(head, tensor_batches(X_val, y_val, 4096)(), CPU)
        history.append("head", loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc)
        history.best_epoch = len(history.epoch)
        return head, history, {"loss": val_loss, "epoch": history.best_epoch, "weights": head.state_dict()}
    generator = torch.Generator().manual_seed(config.seed)
    with seeded(config.seed):
        head = make_head(X_train.shape[1], num_classes, config.hidden, config.dropout)
        n_epochs = epochs or config.max_epochs("features")
        n_rows = (len(X_train) if rows is None else len(rows)) * (1 if mirror is None else 2)
        stage = Stage("head", head, [{"params": list(head.parameters()), "lr": config.lr}],
                      tensor_batches(X_train, y_train, config.batch_size, generator, mirror, rows),
                      tensor_batches(X_val, y_val, 4096, rows=val_rows), n_epochs,
                      math.ceil(n_rows / config.batch_size), schedule=False)
        best = fit(stage, config, CPU, weight, history, progress=progress)
    return head.eval(), history, best


def _logreg_head(X: np.ndarray, y: np.ndarray, num_classes: int, config: TrainConfig) -> nn.Sequential:
    """scikit-learn's multinomial logistic regression on standardised features, folded into one Linear layer
    so that it is saved, loaded and served exactly like the dense head."""
    linear = fold_logreg(X, y, num_classes, config.seed, balanced=config.class_weight == "balanced")
    head = make_head(X.shape[1], num_classes, hidden=0, dropout=0.0)
    head[1].load_state_dict(linear.state_dict())
    return head.eval()
