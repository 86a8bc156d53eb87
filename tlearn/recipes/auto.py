"""Mode ``auto``: the plan of ``plan.py`` carried out step by step, with the recipes of ``features.py``,
``top.py`` and ``images.py``.

Features of the chosen base always come first; a larger offline base, fine-tuning the top stage on cached
activations and fine-tuning on images follow while the time budget allows, each re-checked against the clock before it
starts and kept only if it lowers the validation loss after temperature scaling.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from tlearn.backbones import REGISTRY, larger_offline
from tlearn.calibrate import calibrated_losses
from tlearn.recipes.features import Found, head_result, probe_features
from tlearn.recipes.images import finetune_stage, val_logits
from tlearn.recipes.job import Job, Trained, head_views, labels_of, record
from tlearn.recipes.plan import (
    Clock,
    Measured,
    Step,
    can_take,
    derived_budget,
    derives_budget,
    evaluation_reserve,
    format_plan,
    plan,
)
from tlearn.recipes.top import STAGE, finetune_top, seconds_per_sample

log = logging.getLogger("tlearn")
AUTO_FINETUNE_PATIENCE = 2  # epochs of fine-tuning in mode auto without beating the best validation loss so far


def train_auto(job: Job) -> Trained:
    """Features first; then, while the budget allows, a larger base, fine-tuning the top stage on cached activations
    and fine-tuning on images, each kept only if it lowers the calibrated validation loss (``plan.py``)."""
    names = job.names
    m = _measure(job, names)
    if derives_budget(job.train, job.run.device.type):
        budget, why = derived_budget(m, job.clock.elapsed())
        job = dataclasses.replace(job, clock=Clock(budget, job.clock.start),
                                  decision=dataclasses.replace(job.decision, budget=budget, budget_why=why))
    measured = {k: round(v, 1) if isinstance(v, float) else v for k, v in dataclasses.asdict(m).items()}
    job = dataclasses.replace(job, decision=dataclasses.replace(job.decision, measured=measured))
    steps = plan(m, job.clock, job.train.max_epochs("finetune"), finetune=len(names) == 1, small=job.train.auto_small)
    budget = "no limit" if job.clock.budget is None else f"{job.clock.budget:.0f} s"
    how = f": {job.decision.budget_why}" if job.decision.budget_why else ""
    log.info(f"auto: measured {m.rate:.0f} img/s through {names[0]} here; plan (time budget {budget}{how}; "
             f"{job.clock.elapsed():.0f} s spent):\n{format_plan(steps)}")

    start = time.perf_counter()
    if any(s.kind == "top" and s.status == "planned" for s in steps):  # one pass caches the top stage's input too
        train_val = [s.path for split in ("train", "validation") for s in job.data.split(split)]
        job.extractor.features_views(train_val, names, head_views(job), top=True)
    first = probe_features(job, names)
    job = job.without(first[3])  # the next steps work on the images that decoded
    y_val = labels_of(job, job.data.split("validation"))
    best = _Best(_losses(steps[0], first[0].val_logits, y_val), names, first)
    record(steps[0], "kept", start, first[0])
    for step in steps[1:]:
        if step.status == "skipped":
            continue
        left = job.clock.left() - evaluation_reserve(m)  # again, with the measured times of the steps before
        fits, why = can_take(m, step, left, sum(s.seconds for s in steps), job.train.auto_small)
        if not fits:
            step.status, step.why = "skipped", why
            log.info(f"auto: skipping '{step.name}' ({why})")
            continue
        start = time.perf_counter()
        if step.kind == "larger":
            got_names = [*names, m.larger]
            got = probe_features(job, got_names)
            step.detail["features"] = "+".join(got_names)
            losses = _losses(step, got[0].val_logits, y_val)
            if _beats(step, losses, best):
                best = _Best(losses, got_names, got)
            record(step, "kept" if best.found is got else "discarded", start, got[0])
        else:
            tuned, logits = _auto_tune(job, step, first, best.score, m, left)
            losses = None if logits is None else _losses(step, logits, y_val)
            if tuned is not None and _beats(step, losses, best):
                best = _Best(losses, names, first, tuned)
            record(step, "kept" if tuned is not None and best.tuned is tuned else "discarded", start)
    if best.tuned is not None:
        return _finish(job, best.tuned, "finetune", steps)
    return _finish(job, head_result(job, best.names, best.found), "features", steps)


@dataclass
class _Best:
    """The step to beat: each validation image's loss after temperature scaling, and its model (a head on
    ``names``' features, found by the head search, or a fine-tuned network)."""

    losses: np.ndarray
    names: list[str]
    found: Found
    tuned: Trained | None = None

    @property
    def score(self) -> float:
        return float(self.losses.mean())


def _losses(step: Step, logits: np.ndarray, y_val: np.ndarray) -> np.ndarray:
    """Each validation image's loss after the temperature fitted on ``logits``; their mean recorded on the step."""
    losses = calibrated_losses(logits, y_val)
    step.detail["val_loss_calibrated"] = round(float(losses.mean()), 4)
    return losses


def _beats(step: Step, losses: np.ndarray, best: _Best) -> bool:
    """Whether a step's calibrated validation losses are lower than the best's by more than the noise: their mean
    paired change (image by image) plus its standard error is below zero. A small validation split cannot tell a
    change of a few thousandths from luck, and keeping it would swap a model for one no better. Recorded on the
    step."""
    change = losses - best.losses
    noise = float(change.std(ddof=1) / math.sqrt(len(change))) if len(change) > 1 else math.inf
    step.detail["change"], step.detail["noise"] = round(float(change.mean()), 4), round(noise, 4)
    beats = float(change.mean()) + noise < 0
    if not beats:
        step.why = (f"calibrated val_loss {change.mean():+.4f} against the best so far, noise {noise:.4f}: not lower "
                    "by more than the noise")
    return beats


def _auto_tune(job: Job, step: Step, first: Found, bar: float, m: Measured, left: float
               ) -> tuple[Trained | None, np.ndarray | None]:
    """A fine-tuning step from the first step's head: on cached activations (``top``) or on images
    (``finetune``); the fine-tuned model if an epoch beat its bar, and its validation logits (else None, None)."""
    probe = first[0]
    shape = None if probe.chosen["head"] == "dense" else (0, 0.0)
    deadline = job.clock.deadline(evaluation_reserve(m))
    epochs = int(min(job.train.max_epochs("finetune"),
                     (left - step.detail.get("extract_s", 0.0)) // max(step.detail["epoch_estimate_s"], 0.1)))
    quick = dataclasses.replace(job, train=dataclasses.replace(job.train, patience=AUTO_FINETUNE_PATIENCE))
    history = copy.deepcopy(probe.history)
    scores: list[float] = []
    if step.kind == "top":
        tuned, logits, scores = finetune_top(quick, probe.head, history, bar, shape, deadline, epochs)
    else:
        y_train = labels_of(job, job.data.split("train"))
        tuned = finetune_stage(quick, copy.deepcopy(probe.head), history, y_train, first[3], deadline,
                               shape=shape, epochs=epochs, bar=probe.val_loss)
        # epochs are kept on the raw validation loss against the head they start from, then compared calibrated
        tuned = tuned if history.stage[history.best_epoch - 1] == "finetune" else None
        logits = val_logits(job, tuned.model, tuned.preprocessing) if tuned else None
    stage = "finetune" if step.kind == "finetune" else STAGE
    epochs_run = [i for i, s in enumerate(history.stage) if s == stage]
    step.detail["epochs"] = len(epochs_run)
    if epochs_run:  # its best epoch: on the calibrated loss where that chose, else on the raw loss
        best = int(np.argmin(scores)) if scores else None
        i = epochs_run[best] if best is not None else min(epochs_run, key=lambda i: history.history["val_loss"][i])
        step.val_loss, step.val_accuracy = history.history["val_loss"][i], history.history["val_accuracy"][i]
        if scores:
            step.detail["val_loss_calibrated"] = round(scores[best], 4)
    return tuned, logits


def _measure(job: Job, names: list[str]) -> Measured:
    """What the plan is estimated from: the split sizes, the base's throughput here (two batches per lane, not
    cached), and how many image views each base still has to extract."""
    data, ex = job.data, job.extractor
    paths = [s.path for s in data.samples]
    n = {split: len(data.split(split)) for split in ("train", "validation", "test")}
    rate = ex.engine(names[0]).rate([s.path for s in data.split("train")])
    misses = sum(ex.missing(paths, name, view) for name in names for view in head_views(job))
    m = Measured(n["train"], n["validation"], n["test"], sum(ex.base(x).num_features for x in names), rate, misses)
    if len(names) == 1:
        m.views, m.top = len(head_views(job)), seconds_per_sample(job)
        if m.top is not None:
            train_val = [s.path for split in ("train", "validation") for s in data.split(split)]
            m.top_extra = sum(ex.missing(train_val, names[0], view, top=True) - ex.missing(train_val, names[0], view)
                              for view in head_views(job))
    larger = _larger(job, names)
    if larger:
        m.larger, m.larger_cost = larger
        m.larger_features = ex.base(m.larger).num_features
        m.larger_misses = sum(ex.missing(paths, m.larger, view) for view in head_views(job))
    return m


def _larger(job: Job, names: list[str]) -> tuple[str, float] | None:
    """The larger offline base that auto may add, and its extraction cost relative to the chosen base: offered
    where the chosen base has packaged weights (not a --weights file of its own)."""
    if not job.extractor.base(names[0]).weights_source.startswith("package"):
        return None
    larger = larger_offline(names)
    return (larger, REGISTRY[larger].cost / REGISTRY[names[0]].cost) if larger else None


def _finish(job: Job, trained: Trained, mode: str, steps: list[Step]) -> Trained:
    """The trained model with the decision as auto ended it: the mode it kept, why, and the plan's outcome."""
    kept = [s for s in steps if s.status == "kept"][-1]
    reason = (f"auto: kept '{kept.name}'" + (f" ({kept.detail['features']})" if "features" in kept.detail else "")
              + f", which had the lowest calibrated validation loss of the {sum(s.seconds > 0 for s in steps)} "
              f"step(s) tried in {job.clock.elapsed():.0f} s")
    log.info(f"{reason}\n{format_plan(steps)}")
    decision = dataclasses.replace(job.decision, mode=mode, plan=[s.as_dict() for s in steps], reason=reason)
    return dataclasses.replace(trained, decision=decision)
