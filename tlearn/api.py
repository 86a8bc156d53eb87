"""The Python API: ``ImageClassifier``, a façade that assembles the services of the pipeline.

``fit``: folder → split (``data``) → recipe (``recipes``, on the feature service ``extractor``) → calibration and
evaluation (``evaluate``) and suspected mislabels (``labels``) → run folder (``run``). Prediction, evaluation and
explanation go through the ``Predictor`` and the ``Explainer``, as they do for a loaded run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlearn import dist, report
from tlearn.artifact import CONFIG_FILE, ModelSpec
from tlearn.backbones import Backbone, load_backbone
from tlearn.check import Finding, quick_check
from tlearn.checkpoint import CHECKPOINT_FILE, resume_configs, writer
from tlearn.config import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    Decision,
    InferenceConfig,
    OutputConfig,
    RuntimeConfig,
    TlearnError,
    TrainConfig,
    check_names,
    check_parallel,
    route_options,
    validate,
)
from tlearn.configio import from_dict, to_dict
from tlearn.data import ImageFolder, data_root, expand_inputs, recorded_split, scan, scan_labelled, write_manifest
from tlearn.display import Explanations, Metrics, Predictions
from tlearn.evaluate import PathsOutputs, Scored, against_others, assess, assess_multi, metrics_of, score, top_classes
from tlearn.extractor import Extractor, load_run
from tlearn.labels import run_mislabels
from tlearn.multilabel import metrics as multi_metrics
from tlearn.novelty import NETWORK_IMAGES, Novelty, fit_run
from tlearn.predictor import Predictor
from tlearn.recipes import Job, Trained
from tlearn.recipes import train as run_recipe
from tlearn.recipes.heads import FOLDS, describe
from tlearn.recipes.job import model_spec
from tlearn.recipes.plan import DERIVED, Clock, budget_seconds, choose, format_table
from tlearn.run import RunResult, claim_out, sections, write_run
from tlearn.samples import images_of
from tlearn.survey import check_data as check_data  # the Python API's ``tlearn check``: ``tlearn.check_data``
from tlearn.train import History, Precision

if TYPE_CHECKING:
    from torch import nn

    from tlearn.explain import Explainer  # imports torchcam: only where heatmaps are made

log = logging.getLogger("tlearn")
CONFIGS = (BackboneConfig, TrainConfig, AugmentConfig, RuntimeConfig, OutputConfig)


class ImageClassifier:
    """An image classifier trained by transfer learning (or from scratch, as a baseline).

    Options are the fields of :class:`BackboneConfig`, :class:`TrainConfig`, :class:`AugmentConfig`,
    :class:`RuntimeConfig` and :class:`OutputConfig`, with the CLI flags' names: ``mode="finetune"``,
    ``hidden=256``, ``epochs=5``, ...; or whole configs, as the CLI hands them over: ``configs=(train_config,)``.

    >>> clf = ImageClassifier(backbone="efficientnet_lite0")        # doctest: +SKIP
    >>> history = clf.fit("photos/")                                # doctest: +SKIP
    >>> clf.evaluate()["accuracy"]                                  # doctest: +SKIP
    0.95
    >>> clf.predict(["a.jpg"], top_k=2)                             # doctest: +SKIP
    [{'path': 'a.jpg', 'predictions': [{'class': 'bees', 'probability': 0.97}, ...]}]
    >>> clf.save("runs/mine"); clf = ImageClassifier.load("runs/mine")  # doctest: +SKIP
    """

    def __init__(self, backbone: str | None = None, *, verbose: bool = True, configs: Sequence[Any] = (),
                 **options: Any):
        configs = route_options(CONFIGS, {**({"backbone": backbone} if backbone else {}), **options}, configs)
        self.backbone_config, self.train_config, self.augment_config, self.runtime, self.output = configs
        validate(*configs)
        self.verbose = verbose
        if verbose:
            report.enable_logging()
        self.extractor = Extractor(self.backbone_config, self.train_config, self.runtime, verbose=verbose)
        self.classes: list[str] = []
        self.model: nn.Module | None = None  # a head, a fine-tuned base + head, or a scratch network
        self.spec: ModelSpec | None = None
        self.history: History | None = None
        self.decision: Decision | None = None
        self.data: ImageFolder | None = None
        self.data_config: DataConfig | None = None
        self.metrics: dict[str, dict[str, Any]] = {}
        self.predictions: dict[str, tuple] = {}  # split: (paths, y, logits, novelty)
        self.novelty: Novelty | None = None  # the novelty scorer (None: a model saved before tlearn had one)
        self.outliers: list[tuple[Path, str, float]] = []  # training images least like the rest of their class
        self.findings: list[Finding] = []  # duplicates, leakage, conflicting labels and suspected mislabels
        self.params: dict[str, int] = {}
        self.train_seconds = 0.0
        self.run_dir: Path | None = None  # where a loaded model came from
        self.run_config: dict[str, Any] = {}  # ...and its config.json

    @property
    def backbone(self) -> Backbone:  # the (first) frozen pretrained base; ``self.extractor`` has them all
        return self.extractor.base()

    def fit(self, data: str | Path | DataConfig, *, out: str | Path | None = None, started: float | None = None,
            **data_options: Any) -> History:
        """Split ``data`` (a folder, or a :class:`DataConfig`; ``data_options`` are its fields) and train in the
        configured mode; with ``out``, evaluate on the validation and test splits and write the run there
        (checkpointing each epoch, so ``resume=out`` can continue it). The time budget counts from ``started`` (a
        ``time.perf_counter()`` value; default: now). Returns the history."""
        resume = None
        if self.output.resume:
            out, data_options = self.output.resume, {**data_options, "split_manifest": str(
                Path(self.output.resume) / "split.csv")}
            *resume, (self.backbone_config, self.train_config, self.augment_config) = resume_configs(Path(out))
            self.extractor = Extractor(self.backbone_config, self.train_config, self.runtime, verbose=self.verbose)
        given = [data] if isinstance(data, DataConfig) else []
        path = {} if given else {"path": str(data), "seed": self.train_config.seed}  # one seed, as the CLI's --seed
        (self.data_config,) = route_options((DataConfig,), {**path, **data_options}, given)
        validate(self.data_config)
        self._join_processes()
        created, writes = out is not None and not Path(out).exists(), out is not None and dist.is_main()
        if writes:  # before any work, and before any write
            claim_out(out, data_root(self.data_config), overwrite=self.output.overwrite)
        start = time.perf_counter()
        folder, self.findings, self.decision = _prepare(self.data_config, self.train_config,
                                                        self.extractor.run.device.type)
        check_names(self.backbone_config, self.train_config)
        if writes:
            write_manifest(folder, Path(out) / "split.csv")  # before training, so an interrupted run can resume
        job = Job(folder, self.decision, self.train_config, self.augment_config, self.runtime, self.extractor,
                  Clock(self.decision.budget, started), self.backbone_config.names(),
                  resume=tuple(resume) if resume else None,
                  progress=self.verbose, checkpoint=writer(Path(out) / CHECKPOINT_FILE, self._config_sections())
                  if writes else None)
        with _tidy_on_failure(Path(out) if writes and not resume else None, created):
            return self._finish(_train(job), folder, start, out)

    def _finish(self, trained: Trained, folder: ImageFolder, start: float, out: str | Path | None) -> History:
        """After training: adopt the model; on rank 0, calibrate, evaluate, search for mislabels and write."""
        dist.finish()  # training was the shared part: rank 0 evaluates and writes alone
        folder, self.decision = folder.without(trained.skipped), trained.decision
        for path, reason in trained.skipped.items():
            log.warning(f"skipped {path}: {reason}")
        self.spec, self.params, backbone = model_spec(trained, folder.classes, self.extractor, self.train_config)
        if backbone is not None:  # mode auto may have moved to other bases
            self.backbone_config = self.extractor.backbone_config = backbone
        self.classes, self.data, self.model, self.history = folder.classes, folder, trained.model, trained.history
        self.train_seconds = time.perf_counter() - start
        if not dist.is_main():  # the other processes' part ends with training: rank 0 evaluates and writes the run
            return self.history
        outputs_of = self.predictor().paths_outputs  # no novelty scorer yet: it is fitted on these outputs
        held, calibration = _held_out(trained, folder, outputs_of, self.train_seconds)
        self.novelty, self.outliers = fit_run(outputs_of, folder.split("train"), self.classes, held,
                                              self.train_config.accept, self.train_config.seed,
                                              most=None if self.spec.kind == "head" else NETWORK_IMAGES,
                                              multi_label=folder.multi_label)
        self.spec.novelty = self.novelty and self.novelty.config()
        if folder.multi_label:
            return self._finish_multi(outputs_of, held, calibration, folder, out)
        held.novelty = self.novelty and self.novelty.score(held.features, held.logits)
        assessed = assess(self.predictor().paths_outputs, held, calibration, folder.split("test"), self.classes,
                          full=out is not None, threshold=self.novelty and self.novelty.threshold)
        self.spec.temperature, self.metrics, self.predictions = assessed.temperature, assessed.metrics, \
            assessed.predictions
        if out is not None:
            self.data = folder.without(assessed.failed)
            if self.spec.kind != "scratch":
                self.findings += run_mislabels(self.data, self.extractor, self.train_config.seed,
                                               self.runtime.cache_dir)
            self.save(out)  # removes the checkpoint once the model is written
        return self.history

    def _finish_multi(self, outputs_of: PathsOutputs, held: Scored, calibration: Any, folder: ImageFolder,
                      out: str | Path | None) -> History:
        """``_finish``'s part for several labels an image: per-label calibration and thresholds, the multi-label
        metrics, suspected mislabels, and the run."""
        assessed = assess_multi(outputs_of, held, calibration, folder.split("test"), self.classes,
                                full=out is not None)
        self.spec.multi_label = True
        self.spec.temperatures, self.spec.thresholds = assessed.temperatures.tolist(), assessed.thresholds.tolist()
        self.metrics, self.predictions = assessed.metrics, assessed.predictions
        if out is not None:
            self.data = folder.without(assessed.failed)
            if self.spec.kind != "scratch":
                self.findings += run_mislabels(self.data, self.extractor, self.train_config.seed,
                                               self.runtime.cache_dir)
            self.save(out)
        return self.history

    def _join_processes(self) -> None:
        """Under a launcher (torchrun, accelerate launch, ``--devices``), join its process group: this process
        trains on its own device, and only rank 0 logs, shows progress and writes files."""
        if dist.active():
            check_parallel(self.train_config.mode, dist.world_size())
            run = self.extractor.run
            self.extractor.run = Precision(dist.init(run.device), run.dtype)
            if not dist.is_main():
                self.verbose = self.extractor.verbose = False
                log.setLevel(logging.WARNING)

    def _config_sections(self) -> dict[str, Any]:  # what a run is saved with (config.json) and resumed from
        return {k: to_dict(c) for k, c in (("backbone", self.backbone_config), ("train", self.train_config),
                                           ("augment", self.augment_config))}

    def _require_fitted(self) -> None:  # cheap: saving or explaining needs no predictor
        if self.model is None:
            raise TlearnError("this classifier is not trained yet: call fit(DATA) or ImageClassifier.load(RUN)")

    def predictor(self) -> Predictor:
        """The ``Predictor`` of this model, in PyTorch on its feature service (``Predictor.of``)."""
        self._require_fitted()
        return Predictor.of(self.spec, self.model, self.extractor, novelty=self.novelty)

    def evaluate(self, data: str | Path | DataConfig | None = None, tta: bool = False,
                 unknown: str | Path | None = None, **data_options: Any) -> Metrics:
        """Metrics on ``data`` (a folder of class sub-folders, a split folder's test/, or a label file read as
        ``data_options``, :class:`DataConfig`'s fields, say). With no argument: the
        test split of the fitted data, or of a loaded run's recorded split (validation when there is no test).
        ``tta`` averages the logits of six test-time views (centre, mirrored, four corners). ``unknown``, a folder
        of images of none of the classes, adds how well the novelty score tells them apart (AUROC) and the share
        of each called unknown."""
        outputs_of = self.predictor().paths_outputs  # fitted?
        if data is not None:
            given = [data] if isinstance(data, DataConfig) else []
            (config,) = route_options((DataConfig,), {**({} if given else {"path": str(data)}), **data_options}, given)
            validate(config)
            labelled = scan_labelled(config, self.classes, self.spec.multi_label)
            for s in labelled.skipped:
                log.warning(f"skipped {s.path}: {s.reason}")
            samples, split = labelled.samples, config.label_file or config.path
        else:  # the fitted data, or a loaded run's recorded split
            folder = self.data or recorded_split(self.run_dir, self.run_config)
            split = "test" if folder.split("test") else "validation"
            samples = folder.split(split)
        threshold = self.novelty and self.novelty.threshold
        scored = score(outputs_of, samples, tta)
        if self.spec.multi_label:
            out = {"split": split, "tta": tta, **multi_metrics(scored.y, scored.logits, self.classes, np.array(
                self.spec.temperatures), np.array(self.spec.thresholds))}
        else:
            out = {"split": split, **metrics_of(scored, self.classes, self.spec.temperature, tta, threshold)}
        if unknown is not None:  # novelty is scored on the model's own views, with or without ``tta``
            out["unknown"] = against_others(outputs_of, scored, unknown, threshold)
        return Metrics(out)

    def predict(self, inputs: str | Path | Iterable[str | Path], top_k: int = 3, *, calibration: bool = True,
                tta: bool = False, unknown: bool = True) -> Predictions:
        """Top-k classes with probabilities for image files and the images in folders, in order: ``{"path",
        "predictions": [{"class", "probability"}, ...], "novelty", "unknown"}``, or ``{"path", "error"}`` for a
        file that could not be read. Probabilities are temperature-scaled unless ``calibration`` is False; ``tta``
        averages six views. ``novelty`` is higher for images less like the training data, ``unknown`` says it is
        above the model's threshold; ``unknown=False`` leaves both out."""
        return self.predictor().predict(inputs, top_k, calibration=calibration, tta=tta, unknown=unknown)

    def explain(self, inputs: str | Path | Iterable[str | Path], class_name: str | None = None, top_k: int = 3, *,
                calibration: bool = True) -> Explanations:
        """Where the evidence for the predicted class (or ``class_name``) lies in each image: Grad-CAM on the
        model's last convolutional feature map (``tlearn.explain``). Each result is ``{"path", "class",
        "probability", "heatmap", "predictions"}``: ``heatmap`` is a float array of the image's height x width, in
        [0, 1] and zero outside the crop the model saw. A file that cannot be read gets ``{"path", "error"}``."""
        return Explanations(self.explainer().explain(expand_inputs(inputs), class_name, top_k,
                                                     calibration=calibration))

    def explainer(self) -> Explainer:
        """The ``tlearn.explain.Explainer`` of this model (its frozen bases loaded for a head)."""
        from tlearn.explain import explainer_of  # torchcam: only where heatmaps are made

        self._require_fitted()
        return explainer_of(self.spec, self.model, self.extractor)

    def save(self, run_dir: str | Path) -> Path:
        """Write the model (``model.safetensors`` + ``config.json``) and whatever the run produced: history.csv,
        curves.png, metrics.json, the split manifest and the skipped-files list."""
        self._require_fitted()
        extra = sections(self._config_sections(), self.decision, self.params, self.train_seconds,
                         self.history.best_epoch if self.history else None, self.data_config, self.data)
        base = self.backbone if self.metrics and self.spec.kind == "head" and "+" not in self.spec.arch else None
        title = self.describe() + (f" on {self.data.root.name}" if self.data else "")
        cache = Path(self.runtime.cache_dir) if self.runtime.cache_dir else None
        return write_run(Path(run_dir), RunResult(self.spec, self.model, extra, title, self.history,
                                                  self.data if self.data_config else None,
                                                  self.findings, self.metrics, self.predictions, base,
                                                  self.output.tensorboard, cache, self.novelty, self.outliers),
                         overwrite=self.output.overwrite)

    def summary(self) -> dict[str, Any]:
        """What this classifier is, in a few values: its base and mode (and why), classes, and held-out scores."""
        about: dict[str, Any] = {"model": self.describe() if self.model is not None else "not trained yet"}
        if self.decision is not None:
            about["why"] = self.decision.reason
        for split, m in self.metrics.items():
            score = "mean_average_precision" if "per_label" in m else "accuracy"
            about[f"{split} {score.replace('_', ' ')}"] = round(m[score], 4)
        if self.run_dir is not None:
            about["run"] = str(self.run_dir)
        return {**about, "classes": self.classes}

    def __repr__(self) -> str:
        about = self.summary()
        return f"ImageClassifier({about.pop('model')}, {len(about.pop('classes'))} classes" + "".join(
            f", {k}: {v}" for k, v in about.items() if k != "why") + ")"

    def _repr_html_(self) -> str:  # in a notebook: the summary as a table
        from tlearn.display import classifier_html, safely

        return safely(classifier_html, self.summary())

    def show_report(self, run_dir: str | Path | None = None, height: int = 800) -> Any:
        """The run's ``report.html`` in the notebook (a frame holding the self-contained file, so it shows in an
        exported notebook too); ``run_dir``: where the run was written (default: where it was loaded from)."""
        from tlearn.display import Frame

        report_file = Path(run_dir or self.run_dir or "") / "report.html"
        if not report_file.is_file():
            raise TlearnError(f"no report at {report_file}: fit(DATA, out=RUN) writes one, then show_report(RUN)")
        return Frame(report_file, height)

    def describe(self) -> str:
        """A short name: backbone and mode, or the scratch model."""
        if self.spec and self.spec.kind == "scratch":
            return self.spec.arch
        mode = self.decision.mode if self.decision else self.spec.kind if self.spec else self.train_config.mode
        return f"{self.backbone_config.backbone}:{mode}"

    @classmethod
    def load(cls, run_dir: str | Path, *, verbose: bool = True, configs: Sequence[Any] = (),
             **options: Any) -> ImageClassifier:
        """Load a saved model (``extractor.load_run``: its bases must have the weights it was trained with, by
        SHA-256). ``configs`` are an :class:`InferenceConfig` and a :class:`RuntimeConfig`, ``options`` their
        fields by name (``weights`` if the file has moved; ``device`` and ``precision``: where it runs)."""
        inference, runtime = route_options((InferenceConfig, RuntimeConfig), options, configs)
        loaded = load_run(run_dir, inference, runtime, verbose)
        ex = loaded.extractor
        clf = cls(verbose=verbose, configs=(ex.backbone_config, ex.train_config, ex.runtime))
        clf.extractor = ex
        if "decision" in loaded.config:
            clf.decision = from_dict(Decision, loaded.config["decision"], str(Path(run_dir) / CONFIG_FILE))
        clf.classes, clf.model, clf.spec, clf.novelty = loaded.spec.classes, loaded.model, loaded.spec, loaded.novelty
        clf.run_dir, clf.run_config = loaded.run_dir, loaded.config
        return clf


def _train(job: Job) -> Trained:
    """The recipe of ``job``'s mode; a process that loses its peers is one line."""
    try:
        return run_recipe(job)
    except RuntimeError as e:
        if not dist.lost_peer(e):
            raise
        raise TlearnError(f"training process {dist.rank()} lost contact with the others ({str(e)[:160]}); "
                          "the launcher's message says which one stopped") from None


def _prepare(data: DataConfig, train: TrainConfig, device: str) -> tuple[ImageFolder, list[Finding], Decision]:
    """The split, the duplicates found in it, and the decision of what to train within which budget; said in the
    log: the blocking duplicates, the class counts per split, the mode and the budget."""
    budget, budget_why = budget_seconds(train, device)
    folder = scan(data)
    if folder.multi_label and train.mode == "scratch" and train.model == "logreg-pixels":
        raise TlearnError(f"--model logreg-pixels takes one class an image, and {folder.layout} has several labels "
                          "an image: use --model small-cnn, or --no-multi-label if each cell is one class")
    findings = quick_check(folder)
    decision = dataclasses.replace(choose(len(folder.split("train")), len(folder.classes), train), budget=budget)
    for f in findings:
        if f.severity == "error":
            log.warning(f"{f.kind}: {f.path}: {f.detail}")
    log.info(f"data: {folder.root} ({folder.layout}), {len(folder.classes)} classes\n"
             f"{report.format_counts(folder.counts(), images_of(folder))}\nmode: {decision.mode} ({decision.reason})")
    if decision.mode == "auto":
        log.info(f"the classic strategy table (shown for reference; auto decides from measurements):\n"
                 f"{format_table(len(folder.split('train')), len(folder.classes), train)}")
    if decision.budget is not None or budget_why == DERIVED:
        log.info(f"time budget: {budget_why}" if decision.budget is None else
                 f"time budget: {decision.budget:.0f} s ({budget_why})")
    return folder, findings, decision


def _held_out(trained: Trained, folder: ImageFolder, outputs_of: PathsOutputs, seconds: float
              ) -> tuple[Scored, tuple[np.ndarray, np.ndarray, str] | None]:
    """The validation split's scores, and what the temperature is fitted on (None: those scores). A head on
    features is scored as it was chosen, by the model fitted on the training split alone (its logits, beside the
    features it took), and a refit logistic regression is calibrated on held-out logits of train and validation;
    the log says how it went."""
    p, h, held = trained.probe, trained.history, score(outputs_of, folder.split("validation"))
    if p is None:
        i = h.best_epoch - 1
        log.info(f"trained: best {h.best()}: val_accuracy {h.history['val_accuracy'][i]:.4f}, val_loss "
                 f"{h.history['val_loss'][i]:.4f} ({seconds:.1f} s in all)")
        return held, None
    log.info(f"trained: head {describe(p.chosen)}{' (refit on train + validation)' if p.refit else ''}: "
             f"val_accuracy {p.val_accuracy:.4f}, val_loss {p.val_loss:.4f} ({seconds:.1f} s in all)")
    held.logits = p.val_logits  # the same images: the undecodable ones were left out of both
    return held, None if p.calibration is None else (*p.calibration, f"held-out logits of train ({FOLDS}-fold) "
                                                                     "and validation")


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


def predict_imagenet(inputs: list[str | Path], backbone: str = "efficientnet_lite0", weights: str | None = None,
                     top_k: int = 5) -> list[dict[str, Any]]:
    """Top-k ImageNet classes from the backbone's own 1000-class head, with readable names
    (like Keras's ``decode_predictions``)."""
    from timm.data import ImageNetInfo

    from tlearn.calibrate import calibrated
    from tlearn.runtime import net_engine
    from tlearn.train import CPU

    bb = load_backbone(BackboneConfig(backbone=backbone, weights=weights))
    if bb.model.num_classes != 1000:
        raise TlearnError(f"backbone {backbone} has no 1000-class ImageNet head ({bb.model.num_classes} classes)")
    paths = expand_inputs(inputs)
    if not paths:
        return []
    feats = net_engine(bb.model, bb.preprocessing, 1000, CPU, RuntimeConfig()).extract(paths)  # (N, 1000) logits
    info = ImageNetInfo()
    return top_classes(paths, feats.failed, calibrated(feats.X, 1.0),
                       [info.index_to_description(i) for i in range(1000)], top_k)
