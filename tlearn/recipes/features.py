"""Mode ``features``: a head on the cached features of the frozen base (or several, concatenated), chosen on
validation (``heads.py``), and remembered under the cache folder so that an unchanged re-run takes it from there.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Any

from tlearn.configio import to_dict
from tlearn.fileio import file_sha256, keyed_path
from tlearn.recipes.heads import MEMO_VERSION, Probe, Split, choose_head, describe, load_probe, refit, save_probe
from tlearn.recipes.job import Job, Trained, by_split, head_views, record, weight
from tlearn.recipes.multihead import MULTI_MEMO_VERSION, choose_multi_head, refit_multi
from tlearn.recipes.plan import Step

log = logging.getLogger("tlearn")
Found = tuple[Probe, Split | None, Split | None, dict[Path, str]]  # a chosen head, its splits (None when it
# was remembered), and the files that failed


def train_features(job: Job) -> Trained:
    start = time.perf_counter()
    found = probe_features(job, job.names)
    step = Step(f"features of {'+'.join(job.names)}, head chosen on validation", "features", 0.0)
    record(step, "kept", start, found[0], announce=False)  # the head search said it: this mode is not auto
    decision = dataclasses.replace(job.decision, plan=[step.as_dict()])
    return head_result(dataclasses.replace(job, decision=decision), job.names, found)


def probe_splits(job: Job, names: list[str]) -> tuple[Split, Split, dict[Path, str]]:
    """Cached features of ``names`` (the views of ``head_views``) of the train and validation splits."""
    xy, failed = by_split(job, lambda paths, views: job.extractor.features_views(paths, names, views),
                          head_views(job))
    train, val = (Split(X[0], X[1] if len(X) > 1 else None, y) for X, y in (xy["train"], xy["validation"]))
    return train, val, failed


def probe_features(job: Job, names: list[str]) -> Found:
    """The head chosen on the features of ``names``; remembered under the cache folder, so that a re-run on the
    same images, labels, split and settings takes it from there (the splits' features are then not loaded:
    None)."""
    memo = memo_path(job, names)
    found = load_probe(memo) if memo else None
    if found is not None:
        probe = found[0]
        log.info(f"head on {'+'.join(names)} features: {describe(probe.chosen)}, as chosen before on the same images, "
                 f"labels and settings")
        return probe, None, None, _failed_paths(job, found[1])
    train, val, failed = probe_splits(job, names)
    log.info(f"choosing the head on {'+'.join(names)} features ({train.X.shape[1]} per image"
             f"{', several labels an image' if job.data.multi_label else ''}):")
    probe = choose_multi_head(train, val, job.data.classes, job.train) if job.data.multi_label else \
        choose_head(train, val, len(job.data.classes), job.train, weight(job, train.y))
    log.info(f"  chosen: {describe(probe.chosen)} (val_loss {probe.val_loss:.4f}, "
             f"val_accuracy {probe.val_accuracy:.4f}, {probe.seconds:.1f} s)")
    if memo:
        save_probe(memo, probe, _failed_rows(job, failed))
    return probe, train, val, failed


def head_result(job: Job, names: list[str], found: Found) -> Trained:
    """The chosen head, refit on train + validation where that applies, as a trained model."""
    probe, train, val, failed = found
    job = job.without(failed)
    memo = memo_path(job, names, "refit")
    again = load_probe(memo) if memo and probe.chosen["head"] == "logreg" else None
    if again is not None:
        probe = again[0]
    else:
        if train is None:  # the choice was remembered but not the refit: its features are needed after all
            train, val, _ = probe_splits(job, names)
        probe = refit_multi(probe, train, val, job.train) if job.data.multi_label else \
            refit(probe, train, val, len(job.data.classes), job.train)
        if memo and probe.refit:
            save_probe(memo, probe, [])
    bb = job.extractor.base(names[0])
    shape = None if probe.chosen["head"] == "dense" else (0, 0.0)
    return Trained("head", probe.head, probe.history, bb.arch, bb.preprocessing, failed, job.decision,
                   "+".join(names), shape, probe)


def memo_path(job: Job, names: list[str], what: str = "chosen") -> Path | None:
    """Where the head chosen on these features is remembered: keyed by what decides it (the feature caches'
    identities, each training and validation image's content and label, the training settings and the library
    versions), or None when a file cannot be read."""
    try:
        rows = {split: [(file_sha256(s.path), s.targets if job.data.multi_label else s.label)
                        for s in job.data.split(split)]
                for split in ("train", "validation")}
    except OSError:
        return None
    settings = {k: v for k, v in to_dict(job.train).items() if k not in ("mode", "time_budget", "accept")}
    key = {"version": MEMO_VERSION, "what": what, "features": [job.extractor.namespace(n, v) for n in names
                                                               for v in head_views(job)],
           "rows": rows, "classes": len(job.data.classes), "train": settings,
           **({"multi_label": MULTI_MEMO_VERSION} if job.data.multi_label else {}),
           "libraries": [importlib.metadata.version(m) for m in ("scikit-learn", "torch", "numpy")]}
    return keyed_path(job.runtime.cache_dir, "heads", key, f"-{what}.safetensors")


def _failed_rows(job: Job, failed: dict[Path, str]) -> list[list[Any]]:
    return [[split, i, failed[s.path]] for split in ("train", "validation")
            for i, s in enumerate(job.data.split(split)) if s.path in failed]


def _failed_paths(job: Job, rows: list[list[Any]]) -> dict[Path, str]:
    samples = {split: job.data.split(split) for split in ("train", "validation")}
    return {samples[split][i].path: reason for split, i, reason in rows}
