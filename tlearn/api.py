"""The Python API: ``ImageClassifier`` runs the pipeline folder → features → head → evaluation → saved run."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import ImageNetInfo

from tlearn import report
from tlearn.artifact import ModelSpec, load_model, save_model
from tlearn.backbones import Backbone, load_backbone
from tlearn.config import BackboneConfig, DataConfig, RuntimeConfig, TlearnError, TrainConfig, to_dict, validate
from tlearn.data import ImageFolder, Sample, expand_inputs, scan, scan_labelled, write_manifest
from tlearn.evaluate import classification_metrics
from tlearn.features import FeatureCache, Features, eval_transform, extract
from tlearn.fileio import atomic_write_text
from tlearn.train import History, fit_head

log = logging.getLogger("tlearn")


def _options(configs: tuple[type, ...], options: dict[str, Any]) -> list[Any]:
    """Route keyword options to the config dataclass that has a field of that name."""
    fields = {f.name: cls for cls in configs for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TlearnError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(fields))}")
    return [cls(**{k: v for k, v in options.items() if fields[k] is cls}) for cls in configs]


class ImageClassifier:
    """An image classifier on a pretrained convolutional base.

    Options are the fields of :class:`BackboneConfig`, :class:`TrainConfig` and :class:`RuntimeConfig`
    (the same names as the CLI flags), e.g. ``hidden=256``, ``head="logreg"``, ``cache_dir="..."``.

    >>> clf = ImageClassifier(backbone="efficientnet_lite0")        # doctest: +SKIP
    >>> history = clf.fit("photos/")                                # doctest: +SKIP
    >>> clf.evaluate()["accuracy"]                                  # doctest: +SKIP
    0.95
    >>> clf.predict(["a.jpg"], top_k=2)                             # doctest: +SKIP
    [{'path': 'a.jpg', 'predictions': [{'class': 'bees', 'probability': 0.97}, ...]}]
    >>> clf.save("runs/mine"); clf = ImageClassifier.load("runs/mine")  # doctest: +SKIP
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, verbose: bool = True, **options: Any):
        self.backbone_config, self.train_config, self.runtime = _options(
            (BackboneConfig, TrainConfig, RuntimeConfig), {"backbone": backbone, **options})
        validate(self.backbone_config, self.train_config, self.runtime)
        if verbose:
            report.enable_logging()
        self.classes: list[str] = []
        self.head: torch.nn.Module | None = None
        self.history: History | None = None
        self.data: ImageFolder | None = None
        self.data_config: DataConfig | None = None
        self.metrics: dict[str, dict[str, Any]] = {}
        self._spec: ModelSpec | None = None
        self._backbone: Backbone | None = None
        self._features: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (X, y) of the fitted data
        self._run_dir: Path | None = None  # where a loaded model came from
        self._run_config: dict[str, Any] = {}

    # --- stages ------------------------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        """The frozen base, loaded on first use; for a loaded model, checked against the saved weights identity."""
        if self._backbone is None:
            try:
                bb = load_backbone(self.backbone_config)
            except TlearnError as e:
                if not self._spec:
                    raise
                raise TlearnError(f"cannot load the backbone this model was trained with: {e}") from e
            if self._spec and bb.weights_id != self._spec.weights_id:
                raise TlearnError(
                    f"the backbone weights now available ({bb.weights_source}) differ from the ones this model was "
                    f"trained with ({self._spec.weights_id}); pass the original file with --weights")
            self._backbone = bb
        return self._backbone

    def _extract(self, paths: list[Path]) -> Features:
        bb = self.backbone
        cache = FeatureCache(self.runtime.cache_dir, bb)
        feats = extract(paths, bb.features, transform=eval_transform(bb.preprocessing), dim=bb.num_features,
                        cache=cache, batch_size=self.runtime.extract_batch_size, workers=self.runtime.workers)
        rate = f" ({feats.extracted / feats.seconds:.1f} img/s)" if feats.extracted else ""
        log.info(f"features: {len(paths)} images, {feats.cached} from cache, {feats.extracted} extracted{rate}, "
                 f"{len(feats.failed)} skipped, {feats.seconds:.1f} s")
        return feats

    def fit(self, data: str | Path, *, out: str | Path | None = None, **data_options: Any) -> History:
        """Split ``data``, extract (or reuse) features, and train the head; with ``out``, evaluate on the test
        split and write the whole run there. ``data_options`` are :class:`DataConfig` fields (val, test, seed,
        split_manifest). Returns the per-epoch history."""
        (self.data_config,) = _options((DataConfig,), {"path": str(data), **data_options})
        validate(self.data_config)
        start = time.perf_counter()
        folder = scan(self.data_config)
        log.info(f"data: {folder.root} ({folder.layout}), {len(folder.classes)} classes\n"
                 f"{report.format_counts(folder.counts())}")
        paths = [s.path for s in folder.samples]
        feats = self._extract(paths)
        folder.drop(feats.failed)
        for path, reason in feats.failed.items():
            log.warning(f"skipped {path}: {reason}")
        row = {p: i for i, p in enumerate(paths)}
        self._features = {split: self._xy(folder.split(split), feats.X, row) for split in folder.counts()}
        (X_train, y_train), (X_val, y_val) = self._features["train"], self._features["validation"]
        bb = self.backbone
        self.head, self.history = fit_head(X_train, y_train, X_val, y_val, len(folder.classes), self.train_config)
        self.classes, self.data = folder.classes, folder
        weights = self.backbone_config.weights and str(Path(self.backbone_config.weights).expanduser().resolve())
        dense = self.train_config.head == "dense"  # a logreg head is saved as a plain Linear layer
        self._spec = ModelSpec(folder.classes, dataclasses.replace(self.backbone_config, weights=weights), bb.arch,
                               bb.weights_id, bb.preprocessing, bb.num_features,
                               hidden=self.train_config.hidden if dense else 0,
                               dropout=self.train_config.dropout if dense else 0.0)
        h = self.history.history
        i = self.history.best_epoch - 1
        log.info(f"head: best epoch {self.history.best_epoch} of {len(self.history.epoch)}: "
                 f"val_accuracy {h['val_accuracy'][i]:.4f}, val_loss {h['val_loss'][i]:.4f} "
                 f"({time.perf_counter() - start:.1f} s in all)")
        self.metrics = {}
        if out is not None:
            for split in ("validation", "test"):
                if split in self._features:
                    self.metrics[split] = self._metrics(*self._features[split])
            self.save(out)
        return self.history

    @staticmethod
    def _xy(samples: list[Sample], X: np.ndarray, row: dict[Path, int]) -> tuple[np.ndarray, np.ndarray]:
        idx = [row[s.path] for s in samples]
        return X[idx], np.array([s.label for s in samples], dtype=np.int64)

    def _require_fitted(self) -> None:
        if self.head is None:
            raise TlearnError("this classifier is not trained yet: call fit(DATA) or ImageClassifier.load(RUN)")

    def _proba(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self.head(torch.from_numpy(X)), dim=1).numpy()

    def _metrics(self, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return classification_metrics(y, self._proba(X), self.classes)

    def evaluate(self, data: str | Path | None = None) -> dict[str, Any]:
        """Metrics on ``data`` (a folder of class sub-folders, or a split folder's test/). With no argument: the
        test split of the fitted data, or of a loaded run's recorded split (validation when there is no test)."""
        self._require_fitted()
        if data is not None:
            folder = scan_labelled(data, self.classes)
            return {"split": str(data), **self._evaluate_samples(folder.samples)}
        if self._features:
            split = "test" if "test" in self._features else "validation"
            return {"split": split, **self._metrics(*self._features[split])}
        folder = self._recorded_split()
        split = "test" if folder.split("test") else "validation"
        return {"split": split, **self._evaluate_samples(folder.split(split))}

    def _recorded_split(self) -> ImageFolder:
        manifest = self._run_dir / "split.csv" if self._run_dir else None
        summary = self._run_config.get("data_summary")
        if not manifest or not manifest.is_file() or not summary:
            raise TlearnError("no data split is recorded with this model; pass the folder to evaluate on")
        return scan(DataConfig(path=summary["root"], split_manifest=str(manifest)))

    def _evaluate_samples(self, samples: list[Sample]) -> dict[str, Any]:
        paths = [s.path for s in samples]
        feats = self._extract(paths)
        kept = [s for s in samples if s.path not in feats.failed]
        if not kept:
            raise TlearnError("none of the images to evaluate on could be decoded")
        X, y = self._xy(kept, feats.X, {p: i for i, p in enumerate(paths)})
        metrics = self._metrics(X, y)
        if feats.failed:
            metrics["skipped"] = {str(p): r for p, r in feats.failed.items()}
        return metrics

    def predict(self, inputs: str | Path | list[str | Path], top_k: int = 3) -> list[dict[str, Any]]:
        """Top-k classes with probabilities for image files and the images in folders.

        Each result is ``{"path", "predictions": [{"class", "probability"}, ...]}``, or ``{"path", "error"}``
        for a file that could not be read.
        """
        self._require_fitted()
        paths = expand_inputs(inputs if isinstance(inputs, list) else [inputs])
        if not paths:
            return []
        feats = self._extract(paths)
        return _top_k(paths, feats, self._proba(feats.X), self.classes, top_k)

    # --- files -------------------------------------------------------------------------------------------

    def save(self, run_dir: str | Path) -> Path:
        """Write the model (``model.safetensors`` + ``config.json``) and whatever the run produced: history.csv,
        curves.png, metrics.json, the split manifest and the skipped-files list."""
        self._require_fitted()
        run_dir = Path(run_dir)
        extra: dict[str, Any] = {"backbone": to_dict(self.backbone_config), "train": to_dict(self.train_config)}
        if self.data_config and self.data:
            extra["data"] = to_dict(self.data_config)
            extra["data_summary"] = {"root": str(self.data.root), "layout": self.data.layout,
                                     "counts": self.data.counts()}
            write_manifest(self.data, run_dir / "split.csv")
            report.write_skipped_csv(self.data.skipped, run_dir / "skipped.csv")
        if self.history:
            report.write_history_csv(self.history, run_dir / "history.csv")
            data_name = f" on {self.data.root.name}" if self.data else ""
            title = f"{self._spec.backbone.backbone} + {self.train_config.head} head{data_name}"
            report.plot_curves(self.history, run_dir / "curves.png", title=title)
        if self.metrics:
            atomic_write_text(run_dir / "metrics.json", json.dumps(self.metrics, indent=2) + "\n")
        save_model(run_dir, self._spec, self.head, extra)
        return run_dir

    @classmethod
    def load(cls, run_dir: str | Path, *, weights: str | None = None, verbose: bool = True,
             **runtime_options: Any) -> ImageClassifier:
        """Load a saved model; its backbone weights are loaded on first use and must match the ones it was
        trained with (by SHA-256). ``weights`` points to the weights file when it has moved since training."""
        spec, head, config = load_model(Path(run_dir))
        clf = cls(spec.backbone.backbone, verbose=verbose, weights=weights or spec.backbone.weights,
                  pretrained=spec.backbone.pretrained, **runtime_options)
        if "train" in config:
            (clf.train_config,) = _options((TrainConfig,), config["train"])
        clf.classes, clf.head, clf._spec = spec.classes, head, spec
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
    feats = extract(paths, bb.model, transform=eval_transform(bb.preprocessing), dim=1000)  # (N, 1000) logits
    proba = torch.softmax(torch.from_numpy(feats.X), 1).numpy()
    info = ImageNetInfo()
    return _top_k(paths, feats, proba, [info.index_to_description(i) for i in range(1000)], top_k)


def _top_k(paths: list[Path], feats: Features, proba: np.ndarray, names: list[str],
           top_k: int) -> list[dict[str, Any]]:
    """One result per path, in order: its ``top_k`` classes, or the reason it could not be read."""
    results: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        if path in feats.failed:
            results.append({"path": str(path), "error": feats.failed[path]})
            continue
        order = np.argsort(-proba[i])[:top_k]
        results.append({"path": str(path),
                        "predictions": [{"class": names[j], "probability": float(proba[i, j])} for j in order]})
    return results
