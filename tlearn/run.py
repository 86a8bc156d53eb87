"""The run writer: a trained result → a run folder (the model, the data split, the history and its curves, the
metrics, per-image predictions, TensorBoard scalars on request, and ``report.html``).

It takes plain results, never the ``ImageClassifier`` that made them, so anything that trains can write a run.

The run folder is the user's to trust:
- ``claim_out`` is asked before any work: ``--out`` must be a new folder, an empty one, an earlier tlearn run, or
  ``--overwrite`` must be given; it may neither sit inside the data folder nor hold it.
- A run is written into a hidden sibling folder and renamed into place at the end, so a kill leaves the old run
  or the new one (or, between two renames, neither, with the old one kept beside it and put back next time),
  never a mix. Files in the folder that tlearn did not write are carried over into the new run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tlearn import multireport, plots, report
from tlearn.artifact import CONFIG_FILE, FORMAT, MODEL_FILE, ModelSpec, save_model
from tlearn.check import Finding
from tlearn.checkpoint import CHECKPOINT_FILE
from tlearn.config import TlearnError
from tlearn.configio import to_dict
from tlearn.data import ImageFolder, write_manifest
from tlearn.fileio import UMASK, atomic_write_text, default_cache_dir, is_partial, outside_data
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
    novelty: Any = None  # the novelty scorer (``tlearn.novelty.Novelty``), saved with the model; None: none
    outliers: list[tuple[Path, str, float]] = field(default_factory=list)  # training images least like their class


# Every name tlearn writes in a run folder; anything else there is the user's and is never replaced or removed.
RUN_FILES = frozenset({MODEL_FILE, CONFIG_FILE, CHECKPOINT_FILE, "split.csv", "skipped.csv", "check.json",
                       "history.csv", "curves.png", "metrics.json", "predictions.csv", "report.html", "samples.png",
                       "confusion.png", "top_losses.png", "correct.png", "mislabels.png", "reliability.png",
                       "tensorboard", "outliers.csv", "novelty.png", "outliers.png", "pr_curves.png"})
_STAGING = re.compile(r"^\.(?P<name>.+)\.tlearn-(?P<kind>new|old)-(?P<pid>\d+)-[^/]*$")


def sections(configs: dict[str, Any], decision: Any = None, params: dict[str, int] | None = None,
             train_seconds: float = 0.0, best_epoch: int | None = None, data_config: Any = None,
             data: ImageFolder | None = None) -> dict[str, Any]:
    """config.json's sections besides the model spec: the configs (``to_dict``'s), the decision, the parameter
    counts and training time, the kept epoch, and the data it was trained on."""
    out = dict(configs)
    if decision is not None:
        out["decision"] = dataclasses.asdict(decision)
    if params:
        out |= {"params": params, "train_seconds": round(train_seconds, 2)}
    if best_epoch is not None:
        out["best_epoch"] = best_epoch
    if data is not None and data_config is not None:
        out |= {"data": to_dict(data_config),
                "data_summary": {"root": str(data.root), "layout": data.layout, "counts": data.counts()}}
    return out


def claim_out(out: Path | str, data_root: Path | str | None = None, *, overwrite: bool = False,
              kind: str = "run", flag: str = "--out") -> Path:
    """Check, before any work, that a run (``kind`` "run") or a comparison ("compare") may be written to ``out``;
    tidy what a killed earlier write left beside it. Returns ``out``."""
    out = Path(out).expanduser()
    if data_root is not None:
        outside_data(out, data_root, flag, "the run's files")
    _tidy(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise TlearnError(f"{flag} {out} exists and is not a folder; choose a new folder for the run")
    entries = sorted(e.name for e in out.iterdir() if not is_partial(e.name))
    earlier = is_run(out) if kind == "run" else (out / "compare.csv").is_file() or all(
        (out / e).is_dir() and is_run(out / e) for e in entries)
    if not entries or earlier or overwrite:
        return out
    raise TlearnError(f"{flag} {out} is not an earlier tlearn {kind} and already holds files ({', '.join(entries[:3])}"
                      f"{', ...' if len(entries) > 3 else ''}); choose a new folder, or pass --overwrite to write "
                      f"there (tlearn's own files, such as report.html, are replaced; the others are kept)")


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a tlearn run, finished or interrupted: its config says so, or it holds a training
    checkpoint, or only the split manifest that a run writes before it trains."""
    try:
        if (folder / CONFIG_FILE).is_file() and json.loads((folder / CONFIG_FILE).read_text()).get("format") == FORMAT:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    if (folder / CHECKPOINT_FILE).is_file():
        return True
    try:
        with open(folder / "split.csv", encoding="utf-8", errors="replace") as f:
            return f.readline().strip() in ("path,class,split", "path,labels,split")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, as someone else's process
        return True
    return True


def _tidy(out: Path) -> None:
    """Put back what a write killed between its two renames left beside ``out``, remove its unfinished folders,
    and the temporary files of killed atomic writes inside ``out``."""
    parent = out.parent if out.parent.is_dir() else None
    for entry in sorted(parent.iterdir()) if parent else []:
        m = _STAGING.match(entry.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])) or not entry.is_dir():
            continue
        if m["kind"] == "new":
            shutil.rmtree(entry, ignore_errors=True)  # an unfinished run: tlearn's files only
        elif not out.exists():
            os.rename(entry, out)  # the old run, whose replacement never arrived
            log.warning(f"{out}: put back the earlier run that an interrupted write had set aside")
        else:
            _carry_over(entry, out)
            shutil.rmtree(entry, ignore_errors=True)
    if out.is_dir():
        for entry in out.iterdir():
            if is_partial(entry.name):
                with contextlib.suppress(OSError):
                    entry.unlink()


def _carry_over(old: Path, new: Path) -> None:
    """Move the entries of ``old`` that tlearn did not write into ``new``, where ``new`` has no such name."""
    for entry in old.iterdir():
        if entry.name not in RUN_FILES and not is_partial(entry.name) and not (new / entry.name).exists():
            os.rename(entry, new / entry.name)


@contextlib.contextmanager
def staged(out: Path, *, overwrite: bool = False):
    """Yield a new hidden folder beside ``out`` to write a whole run into; when the block succeeds it becomes
    ``out`` (an earlier run there is replaced, the user's files in it carried over); otherwise it is removed."""
    out = claim_out(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tlearn-new-{os.getpid()}-"))
    except OSError as e:
        raise TlearnError(f"cannot write {out}: {e.strerror or e}; choose a writable folder") from e
    try:
        os.chmod(folder, 0o777 & ~UMASK)  # mkdtemp makes 0700; a run folder is made as mkdir would make it
        yield folder
        if not out.exists():
            os.rename(folder, out)
            return
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tlearn-old-{os.getpid()}-"))
        os.rmdir(old)
        os.rename(out, old)
        os.rename(folder, out)
        _carry_over(old, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def write_run(run_dir: Path, result: RunResult, *, overwrite: bool = False) -> Path:
    """Write every file of the run into a staging folder and rename it onto ``run_dir``, each file atomically.
    The run appears whole or not at all: the training checkpoint goes with the old folder once the new one is in
    place, and a failure before that (in the report, say) leaves ``run_dir`` as it was, resumable. The report is
    built from what is in memory here, nothing is read back."""
    run_dir = Path(run_dir)
    with staged(run_dir, overwrite=overwrite) as stage:
        _write_files(stage, result, shown_as=run_dir)
    return run_dir


def _write_files(run_dir: Path, result: RunResult, shown_as: Path) -> None:
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
    spec = result.spec
    if spec.multi_label:
        rows = multireport.prediction_rows(result.predictions, spec.classes, spec.temperatures, spec.thresholds)
        if result.predictions:
            multireport.write_predictions_csv(rows, spec.classes, run_dir / "predictions.csv")
    else:
        rows = report.prediction_rows(result.predictions, spec.classes, spec.temperature)
        if result.predictions:
            report.write_predictions_csv(rows, run_dir / "predictions.csv")
    if result.outliers:
        report.write_outliers_csv(result.outliers, run_dir / "outliers.csv")
    config = save_model(run_dir, result.spec, result.model, result.config,
                        None if result.novelty is None else result.novelty.reference)
    if result.history and result.tensorboard:
        report.write_tensorboard(result.history, result.metrics, run_dir / "tensorboard")
    if result.metrics:
        train = None if result.data is None else [(s.path, ";".join(result.data.classes[k] for k in s.targets))
                                                  for s in result.data.split("train")]
        page = build_report(run_dir, result.model, result.base, config=config, metrics=result.metrics,
                            predictions=rows, train=train, cache_dir=cache, shown_as=shown_as)
        log.info(f"report: {shown_as / page.name}")
