"""Mode ``auto``: the plan of ``plan.py`` carried out step by step, with the recipes of ``features.py`` and
``images.py``.

Features of the chosen base always come first; a larger offline base and fine-tuning follow while the time
budget allows, each re-checked against the clock before it starts and kept only if it lowers the validation loss.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import numpy as np

from tlearn.backbones import REGISTRY, larger_offline
from tlearn.recipes.features import Found, head_result, probe_features
from tlearn.recipes.images import finetune_stage
from tlearn.recipes.job import Job, Trained, head_views, record
from tlearn.recipes.plan import Measured, Step, can_take, evaluation_reserve, format_plan, plan

log = logging.getLogger("tlearn")
AUTO_FINETUNE_PATIENCE = 2  # epochs of fine-tuning in mode auto without beating the best validation loss so far


def train_auto(job: Job) -> Trained:
    """Features first; then, while the budget allows, a larger base and fine-tuning, each kept only if it lowers
    the validation loss (see ``plan.py``)."""
    names = job.names
    m = _measure(job, names)
    measured = {k: round(v, 1) if isinstance(v, float) else v for k, v in dataclasses.asdict(m).items()}
    job = dataclasses.replace(job, decision=dataclasses.replace(job.decision, measured=measured))
    steps = plan(m, job.clock, job.train.max_epochs("finetune"), finetune=len(names) == 1, small=job.train.auto_small)
    budget = "no limit" if job.clock.budget is None else f"{job.clock.budget:.0f} s"
    log.info(f"auto: measured {m.rate:.0f} img/s through {names[0]} here; plan (time budget {budget}, "
             f"{job.clock.elapsed():.0f} s spent):\n{format_plan(steps)}")

    start = time.perf_counter()
    first = best_found = probe_features(job, names)
    best, best_names = first[0], names
    job = job.without(first[3])  # the next steps work on the images that decoded
    record(steps[0], "kept", start, best)
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
            if got[0].val_loss < best.val_loss:
                best_found, best, best_names = got, got[0], got_names
                record(step, "kept", start, got[0])
            else:
                record(step, "discarded", start, got[0])
        elif step.kind == "finetune":
            deadline = job.clock.deadline(evaluation_reserve(m))
            tuned = _auto_finetune(job, step, first, best.val_loss, deadline, left)
            record(step, "kept" if tuned else "discarded", start)
            if tuned:
                return _finish(job, tuned, "finetune", steps)
    return _finish(job, head_result(job, best_names, best_found), "features", steps)


def _measure(job: Job, names: list[str]) -> Measured:
    """What the plan is estimated from: the split sizes, the base's throughput here (two batches per lane, not
    cached), and how many image views each base still has to extract."""
    data, ex = job.data, job.extractor
    paths = [s.path for s in data.samples]
    n = {split: len(data.split(split)) for split in ("train", "validation", "test")}
    rate = ex.engine(names[0]).rate([s.path for s in data.split("train")])
    misses = sum(ex.missing(paths, name, view) for name in names for view in head_views(job))
    m = Measured(n["train"], n["validation"], n["test"], sum(ex.base(x).num_features for x in names), rate, misses)
    larger = _larger(job, names)
    if larger:
        m.larger, m.larger_cost = larger
        m.larger_features = ex.base(m.larger).num_features
        m.larger_misses = sum(ex.missing(paths, m.larger, view) for view in head_views(job))
    return m


def _auto_finetune(job: Job, step: Step, first: Found, bar: float,
                   deadline: float | None, left: float) -> Trained | None:
    """Fine-tune the top stage from the first step's head while it keeps beating ``bar`` (the best validation loss
    so far); the fine-tuned model if it did, else None. The step records its best epoch's scores."""
    probe, _, _, failed = first
    y_train = np.array([s.label for s in job.data.split("train")])
    shape = None if probe.chosen["head"] == "dense" else (0, 0.0)
    epochs = int(min(job.train.max_epochs("finetune"), left // step.detail["epoch_estimate_s"]))
    quick = dataclasses.replace(job, train=dataclasses.replace(job.train, patience=AUTO_FINETUNE_PATIENCE))
    tuned = finetune_stage(quick, copy.deepcopy(probe.head), copy.deepcopy(probe.history), y_train, failed, deadline,
                           shape=shape, epochs=epochs, bar=bar)
    h = tuned.history
    epochs_run = [i for i, stage in enumerate(h.stage) if stage == "finetune"]
    step.detail["epochs"] = len(epochs_run)
    if epochs_run:
        i = min(epochs_run, key=lambda i: h.history["val_loss"][i])
        step.val_loss, step.val_accuracy = h.history["val_loss"][i], h.history["val_accuracy"][i]
    # finetune_stage keeps a fine-tuned epoch only if it beat the bar; otherwise its best epoch is the head's
    return tuned if h.stage[h.best_epoch - 1] == "finetune" else None


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
              + f", which had the lowest validation loss of the {sum(s.seconds > 0 for s in steps)} step(s) tried in "
              f"{job.clock.elapsed():.0f} s")
    log.info(f"{reason}\n{format_plan(steps)}")
    decision = dataclasses.replace(job.decision, mode=mode, plan=[s.as_dict() for s in steps], reason=reason)
    return dataclasses.replace(trained, decision=decision)
