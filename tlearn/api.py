"""The Python API: ``ImageClassifier`` runs the pipeline folder → model → evaluation → saved run."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tlearn import dist, report
from tlearn.artifact import CONFIG_FILE, ModelSpec, load_model
from tlearn.backbones import Backbone, load_backbone, load_recorded
from tlearn.calibrate import calibrated, fit_temperature, nll
from tlearn.check import Finding, quick_check
from tlearn.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from tlearn.config import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    Decision,
    RuntimeConfig,
    TlearnError,
    TrainConfig,
    check_parallel,
    from_dict,
    to_dict,
    validate,
)
from tlearn.data import ImageFolder, Sample, expand_inputs, scan, scan_labelled, write_manifest
from tlearn.evaluate import calibrated_metrics, top_classes
from tlearn.features import FeatureCache, Features, tta_views
from tlearn.fileio import file_sha256, keyed_path
from tlearn.labels import mislabels
from tlearn.models import parameter_counts
from tlearn.modes import Job, Trained, run_mode
from tlearn.probe import FOLDS, Probe, describe
from tlearn.run import RunResult, claim_out, write_run
from tlearn.runtime import Engine, base_engine, net_engine
from tlearn.strategy import Clock, budget_seconds, choose, format_table
from tlearn.train import CPU, History, Precision, resolve_precision

if TYPE_CHECKING:
    from tlearn.explain import Explainer  # imports torchcam: only where heatmaps are made

log = logging.getLogger("tlearn")
CONFIGS = (BackboneConfig, TrainConfig, AugmentConfig, RuntimeConfig)


@contextlib.contextmanager
def _tidy_on_failure(out: Path | None, created: bool) -> Iterator[None]:
    """Training into ``out`` that fails before its first checkpoint leaves nothing there to resume from: take its
    split manifest away again (and ``out`` itself, if this run created it and nothing else is in it)."""
    try:
        yield
    except BaseException:
        if out is not None and not (out / CHECKPOINT_FILE).exists() and not (out / CONFIG_FILE).exists():
            with contextlib.suppress(OSError):
                (out / "split.csv").unlink()
                if created:
                    out.rmdir()
        raise


def _options(configs: tuple[type, ...], options: dict[str, Any]) -> list[Any]:
    """Route keyword options to the config dataclass that has a field of that name."""
    fields = {f.name: cls for cls in configs for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TlearnError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(fields))}")
    return [cls(**{k: v for k, v in options.items() if fields[k] is cls}) for cls in configs]


class ImageClassifier:
    """An image classifier trained by transfer learning (or from scratch, as a baseline).

    Options are the fields of :class:`BackboneConfig`, :class:`TrainConfig`, :class:`AugmentConfig` and
    :class:`RuntimeConfig`, with the CLI flags' names: ``mode="finetune"``, ``hidden=256``, ``epochs=5``, ...

    >>> clf = ImageClassifier(backbone="efficientnet_lite0")        # doctest: +SKIP
    >>> history = clf.fit("photos/")                                # doctest: +SKIP
    >>> clf.evaluate()["accuracy"]                                  # doctest: +SKIP
    0.95
    >>> clf.predict(["a.jpg"], top_k=2)                             # doctest: +SKIP
    [{'path': 'a.jpg', 'predictions': [{'class': 'bees', 'probability': 0.97}, ...]}]
    >>> clf.save("runs/mine"); clf = ImageClassifier.load("runs/mine")  # doctest: +SKIP
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, verbose: bool = True, **options: Any):
        self.backbone_config, self.train_config, self.augment_config, self.runtime = _options(
            CONFIGS, {"backbone": backbone, **options})
        validate(self.backbone_config, self.train_config, self.augment_config, self.runtime)
        self.verbose = verbose
        if verbose:
            report.enable_logging()
        self.classes: list[str] = []
        self.model: nn.Module | None = None  # a head, a fine-tuned base + head, or a scratch network
        self.spec: ModelSpec | None = None
        self.history: History | None = None
        self.decision: Decision | None = None
        self.data: ImageFolder | None = None
        self.data_config: DataConfig | None = None
        self.metrics: dict[str, dict[str, Any]] = {}
        self.predictions: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = {}  # split: (paths, y, logits)
        self.findings: list[Finding] = []  # duplicates, leakage and conflicting labels found by fit
        self.params: dict[str, int] = {}
        self.train_seconds = 0.0
        self._bases: dict[str, Backbone] = {}
        self._engines: dict[str, Engine] = {}
        self._run: Precision | None = None
        self._run_dir: Path | None = None  # where a loaded model came from
        self._run_config: dict[str, Any] = {}

    # --- services the stages use ---------------------------------------------------------------------------

    @property
    def run(self) -> Precision:
        if self._run is None:
            self._run = resolve_precision(self.train_config.device, self.train_config.precision)
        return self._run

    @property
    def backbone(self) -> Backbone:
        """The (first) frozen pretrained base, loaded on first use."""
        return self.base()

    def base(self, name: str | None = None) -> Backbone:
        """A frozen pretrained base by name (default: the first of --backbone), loaded on first use; for a loaded
        model, checked against the weights identity it was trained with."""
        names = self.backbone_config.names()
        name = name or names[0]
        if name not in self._bases:
            if self.spec and name in names:  # a trained model's: the weights it was trained with
                bb = load_recorded(self.backbone_config, name, self.spec.weights_id.split("+")[names.index(name)],
                                   self.runtime.cache_dir)
            else:
                config = dataclasses.replace(self.backbone_config, backbone=name,
                                             weights=self.backbone_config.weights if name == names[0] else None)
                bb = load_backbone(config, self.runtime.cache_dir)
            self._bases[name] = bb.to(self.run.device)
        return self._bases[name]

    @property
    def engine(self) -> Engine:
        """What runs the (first) frozen base for feature extraction (see ``tlearn.runtime``)."""
        return self.engine_of()

    def engine_of(self, name: str | None = None) -> Engine:
        """What runs base ``name`` for feature extraction, chosen on first use."""
        bb = self.base(name)
        if bb.name not in self._engines:
            self._engines[bb.name] = base_engine(bb, self.train_config, self.runtime)
            log.info(f"frozen base {bb.name}: {self._engines[bb.name].describe()}")
        return self._engines[bb.name]

    def _store(self, name: str, view: str) -> FeatureCache:
        return FeatureCache(self.runtime.cache_dir, self.base(name), self.engine_of(name).precision, view)

    def _missing(self, paths: list[Path], name: str, view: str) -> int:
        """How many of ``paths`` base ``name`` has no cached features of in ``view``."""
        store, n = self._store(name, view), 0
        for path in paths:
            try:
                n += not store.has(file_sha256(path))
            except OSError:
                pass  # unreadable: skipped at extraction
        return n

    def features(self, paths: list[Path], names: list[str] | None = None, view: str = "center",
                 announce: bool = True, cache: bool = True) -> Features:
        """Pooled features of the frozen pretrained bases ``names`` (default: --backbone's), concatenated, in
        one of ``features.VIEWS``, through the feature cache unless ``cache`` is False; ``announce=False``
        reports only real work."""
        parts = []
        for name in names or self.backbone_config.names():
            store = self._store(name, view) if cache else None
            if store is not None and dist.active():  # each process fills its share of the cache, then all read it
                self._extract_shard(paths, name, view, store)
            feats = self.engine_of(name).extract(paths, store, progress=self.verbose, view=view)
            parts.append(feats)
            if announce or (store is not None and (feats.extracted or feats.failed)):
                rate = f" ({feats.extracted / feats.seconds:.1f} img/s)" if feats.extracted else ""
                log.info(f"features of {name}{'' if view == 'center' else f' ({view} view)'}: {len(paths)} images, "
                         f"{feats.cached} from cache, {feats.extracted} extracted{rate}, {len(feats.failed)} "
                         f"skipped, {feats.seconds:.1f} s")
        if len(parts) == 1:
            return parts[0]
        return Features(np.hstack([f.X for f in parts]), {k: v for f in parts for k, v in f.failed.items()},
                        sum(f.extracted for f in parts), sum(f.cached for f in parts), sum(f.seconds for f in parts))

    def _extract_shard(self, paths: list[Path], name: str, view: str, store: FeatureCache) -> None:
        """Sharded extraction: each image content (its SHA-256) belongs to one process (``dist.owns``), which
        extracts it into the content-addressed cache if it is not there yet (atomic writes, so concurrent writers
        never clash); then all wait for the others. The cache then holds every image, each extracted once, and
        the owners need no agreement on what was missing, so processes on machines that share the cache folder
        divide the work the same way."""
        mine: dict[str, Path] = {}
        for path in paths:
            try:
                digest = file_sha256(path)
            except OSError:
                continue  # unreadable: every process reports it when it reads the cache
            if dist.owns(digest) and not store.has(digest):
                mine.setdefault(digest, path)
        if mine:
            self.engine_of(name).extract(list(mine.values()), store, progress=self.verbose, view=view)
        dist.barrier()

    # --- training ------------------------------------------------------------------------------------------

    def fit(self, data: str | Path, *, out: str | Path | None = None, started: float | None = None,
            **data_options: Any) -> History:
        """Split ``data`` and train in the configured mode; with ``out``, evaluate on the validation and test
        splits and write the whole run there (checkpointing each epoch, so ``resume=out`` can continue it).
        ``data_options`` are :class:`DataConfig` fields (val, test, seed, split_manifest). The time budget counts
        from ``started`` (a ``time.perf_counter()`` value; default: now). Returns the history."""
        resume = self._resume_state(Path(self.runtime.resume)) if self.runtime.resume else None
        if resume:
            out = self.runtime.resume
            data_options = {**data_options, "split_manifest": str(Path(out) / "split.csv")}
        # one seed, as the CLI's --seed: the split's too, unless given here
        (self.data_config,) = _options((DataConfig,), {"path": str(data), "seed": self.train_config.seed,
                                                       **data_options})
        validate(self.data_config)
        self._join_processes()
        created = out is not None and not Path(out).exists()
        if out is not None and dist.is_main():  # before any work, and before any write
            claim_out(out, self.data_config.path, overwrite=self.runtime.overwrite)
        start = time.perf_counter()
        budget, budget_why = budget_seconds(self.train_config, self.run.device.type)
        clock = Clock(budget, started)
        folder = scan(self.data_config)
        self.findings = quick_check(folder)
        for f in self.findings:
            if f.severity == "error":
                log.warning(f"{f.kind}: {f.path}: {f.detail}")
        n_train = len(folder.split("train"))
        self.decision = choose(n_train, len(folder.classes), self.train_config)
        self.decision.budget = budget
        log.info(f"data: {folder.root} ({folder.layout}), {len(folder.classes)} classes\n"
                 f"{report.format_counts(folder.counts())}\nmode: {self.decision.mode} ({self.decision.reason})")
        if self.decision.mode == "auto":
            log.info(f"the classic strategy table (shown for reference; auto decides from measurements):\n"
                     f"{format_table(n_train, len(folder.classes), self.train_config)}")
        if budget is not None:
            log.info(f"time budget: {budget:.0f} s ({budget_why})")
        self._check_names()
        if out is not None and dist.is_main():
            write_manifest(folder, Path(out) / "split.csv")  # before training, so an interrupted run can resume
        with _tidy_on_failure(Path(out) if out is not None and dist.is_main() and not resume else None, created):
            return self._finish(self._train(folder, resume, clock, out), folder, start, out)

    def _train(self, folder: ImageFolder, resume: tuple[dict[str, Any], dict[str, torch.Tensor]] | None,
               clock: Clock, out: str | Path | None) -> Trained:
        job = Job(folder, self.decision, self.train_config, self.augment_config, self.runtime, self.run,
                  self.base, self.engine_of, functools.partial(self.features, announce=False), clock,
                  self.backbone_config.names(), self._missing, lambda name, view: self._store(name, view).dir.name,
                  progress=self.verbose, resume=resume,
                  checkpoint=self._checkpointer(Path(out)) if out is not None and dist.is_main() else None)
        try:
            trained = run_mode(job)
        except RuntimeError as e:
            if not dist.lost_peer(e):
                raise
            raise TlearnError(f"training process {dist.rank()} lost contact with the others ({str(e)[:160]}); "
                              "the launcher's message says which one stopped") from None
        return trained

    def _finish(self, trained: Trained, folder: ImageFolder, start: float, out: str | Path | None) -> History:
        """After training: adopt the model, calibrate, evaluate and (with ``out``) write the run."""
        dist.finish()  # training was the shared part: rank 0 evaluates and writes alone
        folder.drop(trained.skipped)
        for path, reason in trained.skipped.items():
            log.warning(f"skipped {path}: {reason}")
        self._adopt(trained, folder)
        self.train_seconds = time.perf_counter() - start
        if not dist.is_main():  # the other processes' part ends with training: rank 0 evaluates and writes the run
            return self.history
        h, i = self.history.history, self.history.best_epoch - 1
        if trained.probe is not None:  # a head on features: its score on the held-out validation split
            p = trained.probe
            log.info(f"trained: head {describe(p.chosen)}{' (refit on train + validation)' if p.refit else ''}: "
                     f"val_accuracy {p.val_accuracy:.4f}, val_loss {p.val_loss:.4f} "
                     f"({self.train_seconds:.1f} s in all)")
        else:
            log.info(f"trained: best {self.history.best()}: "
                     f"val_accuracy {h['val_accuracy'][i]:.4f}, val_loss {h['val_loss'][i]:.4f} "
                     f"({self.train_seconds:.1f} s in all)")
        self.metrics, self.predictions = {}, {}
        scored = self._scored(folder.split("validation"), held_out=trained.probe)
        logits, y, where = scored[0], scored[1], "validation"
        if trained.probe is not None and trained.probe.calibration is not None:
            (logits, y), where = trained.probe.calibration, \
                f"held-out logits of train ({FOLDS}-fold) and validation"
        self.spec.temperature = fit_temperature(logits, y)
        log.info(f"calibration: temperature {self.spec.temperature:.3f}, fitted on {where} (loss "
                 f"{nll(logits, y):.4f} -> {nll(logits, y, self.spec.temperature):.4f})")
        if out is not None:
            self.metrics["validation"] = self._metrics(scored, split="validation")
            if folder.split("test"):
                test = self._scored(folder.split("test"))  # the test split's features are first read here
                folder.drop(test[3])
                for path, reason in test[3].items():
                    log.warning(f"skipped {path}: {reason}")
                self.metrics["test"] = self._metrics(test, split="test")
            for m in self.metrics.values():
                m["calibration"]["fitted_on"] = where
            self.findings += self._mislabels(folder)
            self.save(out)  # removes the checkpoint once the model is written
        return self.history

    def _mislabels(self, folder: ImageFolder) -> list[Finding]:
        """Suspected mislabels among the training and validation images (``tlearn.labels``, as ``tlearn check
        --labels`` finds them), from the first base's features. Only where these are all in the cache already,
        as every mode but scratch leaves them: the report gets them without another pass over the images."""
        samples = folder.split("train") + folder.split("validation")
        paths, name = [s.path for s in samples], self.backbone_config.names()[0]
        if self.spec.kind == "scratch" or self._missing(paths, name, "center"):
            return []
        start, labels = time.perf_counter(), [s.label for s in samples]
        key = {"what": "mislabels", "version": 1, "features": self._store(name, "center").dir.name,
               "rows": [[file_sha256(p), y] for p, y in zip(paths, labels, strict=True)], "classes": folder.classes,
               "seed": self.train_config.seed, "scikit-learn": importlib.metadata.version("scikit-learn")}
        try:
            found = mislabels(paths, labels, folder.classes, self.features(paths, names=[name], announce=False),
                              seed=self.train_config.seed, memo=keyed_path(self.runtime.cache_dir, "labels", key,
                                                                           ".json"))
        except TlearnError as e:  # too few images in a class to predict each from the others
            log.info(f"suspected mislabels: not searched ({e})")
            return []
        log.info(f"suspected mislabels: {len(found)} among {len(paths)} training and validation images "
                 f"({time.perf_counter() - start:.1f} s)")
        return found

    def _join_processes(self) -> None:
        """Under a launcher (torchrun, accelerate launch, ``--devices``), join the process group: this process
        trains on its own device, and only rank 0 logs, shows progress and writes files."""
        if not dist.active():
            return
        check_parallel(self.train_config.mode, dist.world_size())
        self._run = Precision(dist.init(self.run.device), self.run.dtype)
        if not dist.is_main():
            self.verbose = False
            log.setLevel(logging.WARNING)

    def _adopt(self, trained: Trained, folder: ImageFolder) -> None:
        """Take the trained model as this classifier's own, with its spec and parameter counts."""
        self.classes, self.data, self.model, self.history = folder.classes, folder, trained.model, trained.history
        n_classes = len(folder.classes)
        if trained.kind == "scratch":
            self.spec = ModelSpec(folder.classes, "scratch", trained.arch, trained.preprocessing)
            trainable, total = parameter_counts(trained.model)
        else:
            # mode auto may have moved to other bases (a larger one, or several concatenated)
            self.backbone_config.backbone = trained.backbone or self.backbone_config.backbone
            bases = [self.base(name) for name in self.backbone_config.names()]
            tc = self.train_config
            weights = self.backbone_config.weights and str(Path(self.backbone_config.weights).expanduser().resolve())
            hidden, dropout = trained.head_shape or (tc.hidden, tc.dropout)  # a logreg head is a plain Linear
            mirrored = trained.kind == "head" and trained.probe is not None and trained.probe.chosen["flip"]
            self.spec = ModelSpec(folder.classes, trained.kind, "+".join(b.arch for b in bases),
                                  bases[0].preprocessing, dataclasses.replace(self.backbone_config, weights=weights),
                                  "+".join(b.weights_id for b in bases), sum(b.num_features for b in bases),
                                  hidden, dropout, views=["center", "flip"] if mirrored else ["center"],
                                  bases=[{"name": b.name, "identity": b.identity()} for b in bases])
            head = trained.model.head if trained.kind == "finetuned" else trained.model
            head_params = sum(p.numel() for p in head.parameters())
            trainable = parameter_counts(trained.model)[0] if trained.kind == "finetuned" else head_params
            total = sum(b.params for b in bases) + head_params
        self.params = {"trainable": int(trainable), "total": int(total), "classes": n_classes}

    def _check_names(self) -> None:
        if len(self.backbone_config.names()) > 1 and self.train_config.mode not in ("features", "auto"):
            raise TlearnError(f"--backbone {self.backbone_config.backbone} concatenates the features of several "
                              f"bases, which only a head on features can use: use --mode features or auto. "
                              f"Received: mode={self.train_config.mode!r}")

    def _config_sections(self) -> dict[str, Any]:
        """The configs a run is saved with (config.json) and resumed from (checkpoints)."""
        return {"backbone": to_dict(self.backbone_config), "train": to_dict(self.train_config),
                "augment": to_dict(self.augment_config)}

    def _checkpointer(self, run_dir: Path):
        configs = self._config_sections()

        def checkpoint(state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
            if state.pop("done"):
                return  # the final save follows; an interrupted save leaves the last epoch's checkpoint
            save_checkpoint(run_dir / CHECKPOINT_FILE, state, configs, rng)

        return checkpoint

    def _resume_state(self, run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        state, configs, rng = load_checkpoint(run_dir / CHECKPOINT_FILE)
        where = str(run_dir / CHECKPOINT_FILE)
        self.backbone_config = from_dict(BackboneConfig, configs.get("backbone"), where)
        self.train_config = from_dict(TrainConfig, configs.get("train"), where)
        self.augment_config = from_dict(AugmentConfig, configs.get("augment"), where)
        validate(self.backbone_config, self.train_config, self.augment_config)
        self._run, self._bases, self._engines = None, {}, {}
        log.info(f"resuming {run_dir} after epoch {state['epoch']} of stage {state['stage']}, with its saved settings")
        return state, rng

    # --- using the model -----------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self.model is None:
            raise TlearnError("this classifier is not trained yet: call fit(DATA) or ImageClassifier.load(RUN)")

    def _logits(self, paths: list[Path], cache: bool = True, tta: bool = False) -> tuple[np.ndarray, dict[Path, str]]:
        """(N, C) uncalibrated logits for ``paths`` (rows of unreadable files are zero and listed with their
        reason). With ``tta``, the mean logits of the test-time views (``features.tta_views``). Features of
        evaluation splits go through the cache; predictions don't, so serving leaves no files behind."""
        views = tta_views(self.spec.preprocessing) if tta else self.spec.views
        total, failed = 0.0, {}
        if self.spec.kind != "head":  # a whole network: base and head in one engine
            engine = net_engine(self.model, self.spec.preprocessing, len(self.classes), self.run, self.runtime)
        for view in views:
            if self.spec.kind == "head":
                out = self.features(paths, view=view, announce=False, cache=cache and view in ("center", "flip"))
                with torch.no_grad():
                    out.X = self.model.eval()(torch.from_numpy(out.X)).numpy()
            else:
                out = engine.extract(paths, progress=self.verbose, view=view)
            failed = out.failed
            total = total + out.X
        return total / len(views), failed

    def _scored(self, samples: list[Sample], tta: bool = False,
                held_out: Probe | None = None) -> tuple[np.ndarray, np.ndarray, list[Path], dict[Path, str]]:
        """Uncalibrated logits and labels of the decodable ``samples``, their paths, and the failures. With
        ``held_out``, the validation logits that head selection computed with the model fitted on the training
        split alone (the final one may be refit on validation too, so its own would be in-sample)."""
        paths = [s.path for s in samples]
        if held_out is not None:
            return held_out.val_logits, np.array([s.label for s in samples]), paths, {}
        logits, failed = self._logits(paths, tta=tta)
        keep = [i for i, p in enumerate(paths) if p not in failed]
        if not keep:
            raise TlearnError("none of the images to evaluate on could be decoded")
        return logits[keep], np.array([samples[i].label for i in keep]), [paths[i] for i in keep], failed

    def _metrics(self, scored: tuple[np.ndarray, np.ndarray, list[Path], dict[Path, str]], tta: bool = False,
                 split: str | None = None) -> dict[str, Any]:
        """Metrics of ``_scored`` results' calibrated probabilities, with the calibration before and after; with
        ``split``, the per-image results are kept for ``predictions.csv`` and the report."""
        logits, y, paths, failed = scored
        metrics = {**calibrated_metrics(y, logits, self.classes, self.spec.temperature), "tta": tta}
        if failed:
            metrics["skipped"] = {str(p): r for p, r in failed.items()}
        if split:
            self.predictions[split] = (paths, y, logits)
        return metrics

    def evaluate(self, data: str | Path | None = None, tta: bool = False) -> dict[str, Any]:
        """Metrics on ``data`` (a folder of class sub-folders, or a split folder's test/). With no argument: the
        test split of the fitted data, or of a loaded run's recorded split (validation when there is no test).
        ``tta`` averages the logits of six test-time views (centre, mirrored, four corners)."""
        self._require_fitted()
        if data is not None:
            folder = scan_labelled(data, self.classes)
            return {"split": str(data), **self._metrics(self._scored(folder.samples, tta), tta)}
        folder = self.data or self.recorded_split()
        split = "test" if folder.split("test") else "validation"
        return {"split": split, **self._metrics(self._scored(folder.split(split), tta), tta)}

    def recorded_split(self) -> ImageFolder:
        """The data split this loaded run was trained on, from its split.csv (the folder must still be there)."""
        manifest = self._run_dir / "split.csv" if self._run_dir else None
        summary = self._run_config.get("data_summary")
        if not manifest or not manifest.is_file() or not summary:
            raise TlearnError("no data split is recorded with this model; pass the folder to evaluate on")
        return scan(DataConfig(path=summary["root"], split_manifest=str(manifest)))

    def predict(self, inputs: str | Path | Iterable[str | Path], top_k: int = 3, *, calibration: bool = True,
                tta: bool = False) -> list[dict[str, Any]]:
        """Top-k classes with probabilities for image files and the images in folders, in order.

        Each result is ``{"path", "predictions": [{"class", "probability"}, ...]}``, or ``{"path", "error"}``
        for a file that could not be read. Probabilities are temperature-scaled (see ``tlearn.calibrate``)
        unless ``calibration`` is False; ``tta`` averages six test-time views.
        """
        self._require_fitted()
        paths = expand_inputs(inputs)
        if not paths:
            return []
        logits, failed = self._logits(paths, cache=False, tta=tta)
        proba = calibrated(logits, self.spec.temperature if calibration else 1.0)
        return top_classes(paths, failed, proba, self.classes, top_k)

    def explain(self, inputs: str | Path | Iterable[str | Path], class_name: str | None = None, top_k: int = 3, *,
                calibration: bool = True) -> list[dict[str, Any]]:
        """Where the evidence for the predicted class (or ``class_name``) lies in each image: Grad-CAM on the
        model's last convolutional feature map (see ``tlearn.explain``), in the model's own preprocessing.

        Each result is ``{"path", "class", "probability", "heatmap", "predictions"}``: ``heatmap`` is a float
        array of the image's height x width, in [0, 1] and zero outside the crop the model saw; ``predictions``
        are the top-k classes as ``predict`` gives them. A file that cannot be read gets ``{"path", "error"}``.
        """
        self._require_fitted()
        paths = expand_inputs(inputs)
        return list(self.explainer().explain(paths, class_name, top_k, calibration=calibration))

    def explainer(self) -> Explainer:
        """The ``tlearn.explain.Explainer`` of this model (its frozen bases loaded for a head)."""
        from tlearn.explain import Explainer, head_explainer

        self._require_fitted()
        if self.spec.kind != "head":
            return Explainer(self.spec, self.model)
        bases = [self.base(name) for name in self.backbone_config.names()]
        return head_explainer(self.spec, self.model, bases, self.runtime, self.run.device)

    # --- files ---------------------------------------------------------------------------------------------

    def save(self, run_dir: str | Path) -> Path:
        """Write the model (``model.safetensors`` + ``config.json``) and whatever the run produced: history.csv,
        curves.png, metrics.json, the split manifest and the skipped-files list."""
        self._require_fitted()
        extra: dict[str, Any] = self._config_sections()
        if self.decision:
            extra["decision"] = dataclasses.asdict(self.decision)
        if self.params:
            extra["params"] = self.params
            extra["train_seconds"] = round(self.train_seconds, 2)
        if self.history:
            extra["best_epoch"] = self.history.best_epoch
        data = self.data if self.data_config else None
        if data is not None:
            extra["data"] = to_dict(self.data_config)
            extra["data_summary"] = {"root": str(data.root), "layout": data.layout, "counts": data.counts()}
        base = self.backbone if self.metrics and self.spec.kind == "head" and "+" not in self.spec.arch else None
        title = self.describe() + (f" on {self.data.root.name}" if self.data else "")
        return write_run(Path(run_dir), RunResult(self.spec, self.model, extra, title, self.history, data,
                                                  self.findings, self.metrics, self.predictions, base,
                                                  self.runtime.tensorboard,
                                                  Path(self.runtime.cache_dir) if self.runtime.cache_dir else None),
                         overwrite=self.runtime.overwrite)

    def describe(self) -> str:
        """A short name: backbone and mode, or the scratch model."""
        if self.spec and self.spec.kind == "scratch":
            return self.spec.arch
        mode = self.decision.mode if self.decision else self.spec.kind if self.spec else self.train_config.mode
        return f"{self.backbone_config.backbone}:{mode}"

    @classmethod
    def load(cls, run_dir: str | Path, *, weights: str | None = None, verbose: bool = True,
             **runtime_options: Any) -> ImageClassifier:
        """Load a saved model. A head on a pretrained base loads that base on first use, which must have the
        weights it was trained with (by SHA-256); ``weights`` points to the file if it has moved. The model runs
        where ``device`` and ``precision`` say (default: auto), never where it was trained."""
        spec, model, config = load_model(Path(run_dir))
        backbone = spec.backbone or BackboneConfig()
        clf = cls(backbone.backbone, verbose=verbose, weights=weights or backbone.weights,
                  pretrained=backbone.pretrained, **runtime_options)
        where = str(Path(run_dir) / "config.json")
        if "train" in config:  # how it was trained; where it runs stays the caller's choice
            saved = from_dict(TrainConfig, config["train"], where)
            clf.train_config = dataclasses.replace(saved, device=clf.train_config.device,
                                                   precision=clf.train_config.precision)
        if "decision" in config:
            clf.decision = from_dict(Decision, config["decision"], where)
        clf.classes, clf.model, clf.spec = spec.classes, model, spec
        clf._run_dir, clf._run_config = Path(run_dir), config
        return clf


def predict_imagenet(inputs: list[str | Path], backbone: str = "efficientnet_lite0", weights: str | None = None,
                     top_k: int = 5) -> list[dict[str, Any]]:
    """Top-k ImageNet classes from the backbone's own 1000-class head, with readable names
    (like Keras's ``decode_predictions``)."""
    bb = load_backbone(BackboneConfig(backbone=backbone, weights=weights))
    if bb.model.num_classes != 1000:
        raise TlearnError(f"backbone {backbone} has no 1000-class ImageNet head ({bb.model.num_classes} classes)")
    paths = expand_inputs(inputs)
    if not paths:
        return []
    engine = net_engine(bb.model, bb.preprocessing, 1000, CPU, RuntimeConfig())
    feats = engine.extract(paths)  # (N, 1000) logits
    proba = torch.softmax(torch.from_numpy(feats.X), 1).numpy()
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return top_classes(paths, feats.failed, proba, [info.index_to_description(i) for i in range(1000)], top_k)
