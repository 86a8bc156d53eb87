"""The run writer: a trained result → a run folder (the model, the data split, the history and its curves, the
metrics, per-image predictions, TensorBoard scalars on request, and ``report.html``).

It takes plain results, never the ``ImageClassifier`` that made them, so anything that trains can write a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tlearn import plots, report
from tlearn.artifact import ModelSpec, save_model
from tlearn.check import Finding
from tlearn.checkpoint import CHECKPOINT_FILE
from tlearn.data import ImageFolder, write_manifest
from tlearn.fileio import atomic_write_text, default_cache_dir
from tlearn.htmlreport import build_report
from tlearn.train import History

log = logging.getLogger("tlearn")


@dataclass
class RunResult:
    """What a run produced. ``config`` holds the config.json sections besides the model spec (backbone, train,
    augment, data, decision, ...); ``predictions`` maps a split to its (paths, labels, logits)."""

    spec: ModelSpec
    model: nn.Module
    config: dict[str, Any]
    title: str  # names the curves: "efficientnet_lite0:features on photos"
    history: History | None = None
    data: ImageFolder | None = None
    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, tuple] = field(default_factory=dict)
    base: Any = None  # the loaded backbone, for the report's model summary (None: the report loads it if needed)
    tensorboard: bool = False
    cache_dir: Path | None = None  # where the report's figures are reused from (None: the default cache folder)


def write_run(run_dir: Path, result: RunResult) -> Path:
    """Write every file of the run into ``run_dir``; the model last but the report, each file atomically, and
    then remove the training checkpoint, so that a failure in the report cannot leave a finished run resumable.
    The report is built from what is in memory here, nothing is read back."""
    run_dir = Path(run_dir)
    cache = Path(result.cache_dir or default_cache_dir())
    if result.data is not None:
        write_manifest(result.data, run_dir / "split.csv")
        report.write_skipped_csv(result.data.skipped, run_dir / "skipped.csv")
        findings = [dataclasses.asdict(f) for f in result.findings]
        atomic_write_text(run_dir / "check.json", json.dumps({"findings": findings}, indent=2) + "\n")
    if result.history:
        report.write_history_csv(result.history, run_dir / "history.csv")
        plots.reuse(run_dir / "curves.png", ["curves", result.history.to_dict(), result.title],
                    lambda: plots.curves(result.history, run_dir / "curves.png", title=result.title), cache)
    if result.metrics:
        atomic_write_text(run_dir / "metrics.json", json.dumps(result.metrics, indent=2) + "\n")
    rows = report.prediction_rows(result.predictions, result.spec.classes, result.spec.temperature)
    if result.predictions:
        report.write_predictions_csv(rows, run_dir / "predictions.csv")
    config = save_model(run_dir, result.spec, result.model, result.config)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # the model is saved: nothing is left to resume
    if result.history and result.tensorboard:
        report.write_tensorboard(result.history, result.metrics, run_dir / "tensorboard")
    if result.metrics:
        train = None if result.data is None else [(s.path, result.data.classes[s.label])
                                                  for s in result.data.split("train")]
        page = build_report(run_dir, result.model, result.base, config=config, metrics=result.metrics,
                            predictions=rows, train=train, cache_dir=cache)
        log.info(f"report: {page}")
    return run_dir
