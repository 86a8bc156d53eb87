"""Fine-tuning a CPU can afford: the top stage of the base and the head, trained on cached activations.

The frozen lower stages run once per image and view (in the same pass that makes the pooled features), and what
enters the top stage is cached in float16 beside them (``Extractor.tops``). Training then runs only the top stage
(for EfficientNet-Lite0, one block, conv_head and bn2 on 192x7x7 activations) and the head, with the mirror view as
augmentation and the base's BatchNorm statistics frozen, so an epoch costs a small part of fine-tuning on images.

Epochs are kept on the validation loss after temperature scaling (``calibrate``): fine-tuning makes the head
sharper, so its raw validation loss can rise while the calibrated loss, and the accuracy, improve.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
from torch import nn

from tlearn.calibrate import calibrated_loss
from tlearn.config import parse_lr_mult
from tlearn.models import Classifier, TopStage, split_top
from tlearn.recipes.job import Job, Trained, head_views, labels_of, weight
from tlearn.train import CPU, History, Stage, fit, tensor_batches

log = logging.getLogger("tlearn")
STAGE = "finetune-top"  # the history's name of its epochs
SECONDS_PER_SAMPLE_PROBE = 32  # samples of the timing probe (``seconds_per_sample``)
# The head has converged on the frozen features, so it moves more gently than a new head would: at the full --lr
# it never got back below the features' calibrated validation loss on Oxford-17 (0.1066 against 0.1028), at 0.3x
# it reached 0.0991 (bench/bench_top.py, BENCHMARKS.md; one run, and within the validation split's noise).
HEAD_LR = 0.3


class TopHead(nn.Module):
    """Cached top-stage input -> logits: (B, C, H, W) float16 -> (B, classes)."""

    def __init__(self, top: TopStage, head: nn.Module):
        super().__init__()
        self.top, self.head = top, head

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.top(a.float()))


def seconds_per_sample(job: Job) -> tuple[float, float] | None:
    """Measured here: seconds of one training sample (forward and backward) and of one validation sample (forward)
    through the chosen base's top stage, on random activations of its shape; None where the base has no known
    split. Costs well under a second."""
    bb = job.extractor.base(job.names[0])
    split = split_top(copy.deepcopy(bb.model).cpu().float())
    if split is None:
        return None
    _, lower, top = split
    size = bb.preprocessing["input_size"]
    with torch.no_grad():
        shape = lower(torch.zeros(1, *size)).shape[1:]
    top.requires_grad_(True)
    a = torch.randn(SECONDS_PER_SAMPLE_PROBE, *shape)
    top(a[:2]).sum().backward()  # warm-up
    start = time.perf_counter()
    top(a).sum().backward()
    train = (time.perf_counter() - start) / len(a)
    start = time.perf_counter()
    with torch.no_grad():
        top(a)
    return train, (time.perf_counter() - start) / len(a)


def finetune_top(job: Job, head: nn.Module, history: History, bar: float, shape: tuple[int, float] | None,
                 deadline: float | None = None, epochs: int | None = None
                 ) -> tuple[Trained | None, np.ndarray | None, list[float]]:
    """The chosen base with its top stage fine-tuned on cached activations, and ``head`` (trained on its frozen
    features) fine-tuned with it, if an epoch beat ``bar`` (the best calibrated validation loss so far), else None;
    its validation logits (None with it); and each epoch's calibrated validation loss. The top stage learns at
    --lr times the first --lr-mult factor, the head at ``HEAD_LR`` times --lr, on the CPU (where the step pays; on
    a GPU fine-tuning on images is cheap). ``shape``: the head's (hidden, dropout) where it is not the config's,
    as ``Trained.head_shape``."""
    name = job.names[0]
    bb, ex = job.extractor.base(name), job.extractor
    views = head_views(job)
    train, val = job.data.split("train"), job.data.split("validation")
    acts, failed = ex.tops([s.path for s in train], name, views)
    (val_acts,), failed_val = ex.tops([s.path for s in val], name, ("center",))
    failed = {**failed, **failed_val}
    keep = np.array([s.path not in failed for s in train])
    keep_val = np.array([s.path not in failed for s in val])
    y, y_val = labels_of(job, train), labels_of(job, val)
    acts, val_acts, y, y_val = [a[keep] for a in acts], val_acts[keep_val], y[keep], y_val[keep_val]

    base = copy.deepcopy(bb.model).cpu().float()  # the pretrained base stays untouched for cached features
    _, _, top = split_top(base)
    top.requires_grad_(True)
    head = copy.deepcopy(head).cpu()
    head.requires_grad_(True)
    model = TopHead(top, head)
    mult = parse_lr_mult(job.decision.lr_mult)[0]
    groups = [{"params": list(head.parameters()), "lr": job.train.lr * HEAD_LR, "name": "head"},
              {"params": list(top.parameters()), "lr": job.train.lr * mult, "name": "top stage"}]
    generator = torch.Generator().manual_seed(job.train.seed)
    n = len(y) * len(acts)
    batches = tensor_batches(acts[0], y, job.train.batch_size, generator, acts[1] if len(acts) > 1 else None)
    val_batches = tensor_batches(val_acts, y_val, 256)

    def logits_of(m: nn.Module) -> np.ndarray:
        m.eval()  # the head's dropout off
        with torch.no_grad():
            return torch.cat([m(x) for x, _ in val_batches()]).float().numpy()

    scores: list[float] = []

    def select(m: nn.Module) -> float:
        scores.append(calibrated_loss(logits_of(m), y_val))
        log.info(f"{STAGE}: val_loss after temperature scaling {scores[-1]:.4f} (to beat: {bar:.4f})")
        return scores[-1]

    stage = Stage(STAGE, model, groups, batches, val_batches, epochs or job.train.max_epochs("finetune"),
                  math.ceil(n / job.train.batch_size), images_per_epoch=n, generator=generator, deadline=deadline,
                  select=select)
    best = {"loss": bar, "epoch": history.best_epoch, "weights": copy.deepcopy(model.state_dict())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.train.seed)
        fit(stage, job.train, CPU, weight(job, y), history, best=best, progress=job.progress)
    if history.stage[history.best_epoch - 1] != STAGE:  # no epoch beat the bar
        return None, None, scores
    classifier = Classifier(base.requires_grad_(False), head.requires_grad_(False)).eval()
    return Trained("finetuned", classifier, history, bb.arch, bb.preprocessing, failed, job.decision,
                   bb.name, shape), logits_of(model), scores
