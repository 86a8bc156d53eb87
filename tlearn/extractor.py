"""The feature service: the frozen pretrained bases, the engines that run them, and their cached pooled features.

One ``Extractor`` per run (or per loaded model) owns what is costly to make and worth keeping: each base, loaded
once and placed on the run's device, and each base's engine (``tlearn.runtime``: ONNX Runtime or PyTorch).
Training recipes, the mislabel search, heatmaps, export and the predictor's PyTorch backend all get features
through it; none of them needs the ``ImageClassifier`` that may have made it.

>>> ex = Extractor(BackboneConfig(), TrainConfig(), RuntimeConfig())        # doctest: +SKIP
>>> ex.features([Path("a.jpg")]).X.shape                                    # doctest: +SKIP
(1, 1280)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tlearn import dist
from tlearn.artifact import ModelSpec, load_model, load_reference
from tlearn.backbones import Backbone, load_backbone, load_recorded
from tlearn.config import BackboneConfig, InferenceConfig, RuntimeConfig, TlearnError, TrainConfig, validate
from tlearn.configio import from_dict
from tlearn.features import FeatureCache, Features
from tlearn.fileio import file_sha256
from tlearn.models import split_top
from tlearn.novelty import Novelty, of_run
from tlearn.runtime import Engine, base_engine
from tlearn.train import Precision, resolve_precision

log = logging.getLogger("tlearn")


class Extractor:
    """Bases, engines and cached features for ``backbone``'s bases (``--backbone A+B``: several, concatenated).

    ``recorded`` maps a trained model's base names to the weights identities it was trained with: those bases are
    then checked against them when loaded (``backbones.load_recorded``)."""

    def __init__(self, backbone: BackboneConfig, train: TrainConfig, runtime: RuntimeConfig,
                 run: Precision | None = None, *, recorded: dict[str, str] | None = None, verbose: bool = True):
        self.backbone_config, self.train_config, self.runtime = backbone, train, runtime
        self.recorded = recorded or {}
        self.verbose = verbose
        self._run = run
        self._bases: dict[str, Backbone] = {}
        self._engines: dict[str, Engine] = {}

    @property
    def run(self) -> Precision:
        """Where the bases run (and the training loops): the device and precision the config asks for."""
        if self._run is None:
            self._run = resolve_precision(self.train_config.device, self.train_config.precision)
        return self._run

    @run.setter
    def run(self, run: Precision) -> None:
        self._run = run

    def names(self) -> list[str]:
        return self.backbone_config.names()

    def base(self, name: str | None = None) -> Backbone:
        """A frozen pretrained base by name (default: the first of --backbone), loaded on first use."""
        names = self.names()
        name = name or names[0]
        if name not in self._bases:
            if name in self.recorded:  # a trained model's: the weights it was trained with
                bb = load_recorded(self.backbone_config, name, self.recorded[name], self.runtime.cache_dir)
            else:
                config = dataclasses.replace(self.backbone_config, backbone=name,
                                             weights=self.backbone_config.weights if name == names[0] else None)
                bb = load_backbone(config, self.runtime.cache_dir)
            self._bases[name] = bb.to(self.run.device)
        return self._bases[name]

    def engine(self, name: str | None = None) -> Engine:
        """What runs base ``name`` for feature extraction, chosen on first use."""
        bb = self.base(name)
        if bb.name not in self._engines:
            self._engines[bb.name] = base_engine(bb, self.train_config, self.runtime)
            log.info(f"frozen base {bb.name}: {self._engines[bb.name].describe()}")
        return self._engines[bb.name]

    def top_engine(self, name: str | None = None) -> Engine:
        """An engine of base ``name`` whose forward gives (features, what enters its top stage) from one pass. Not
        kept: its graph is exported once (on disk) and its session opened only if an image is missing, so the
        session's memory goes with the pass that needed it."""
        return base_engine(self.base(name), self.train_config, self.runtime, top=True)

    def top_name(self, name: str | None = None) -> str | None:
        """Where base ``name`` splits for fine-tuning its top stage on cached activations, or None (no known split;
        the base is built to find out)."""
        split = split_top(self.base(name).model)
        return split and split[0]

    def top_store(self, name: str, view: str) -> FeatureCache:
        """The on-disk cache of what enters base ``name``'s top stage, in ``view`` (float16 activations)."""
        return FeatureCache(self.runtime.cache_dir, self.base(name), self.engine(name).precision, view,
                            top=self.top_name(name))

    def store(self, name: str, view: str) -> FeatureCache:
        """The on-disk cache of base ``name``'s features in ``view``."""
        return FeatureCache(self.runtime.cache_dir, self.base(name), self.engine(name).precision, view)

    def namespace(self, name: str, view: str) -> str:
        """What keys base ``name``'s cached features in ``view`` (its weights, preprocessing and numerics)."""
        return self.store(name, view).dir.name

    def missing(self, paths: list[Path], name: str, view: str, top: bool = False) -> int:
        """How many of ``paths`` base ``name`` has no cached features of in ``view`` (``top``: no cached top-stage
        input)."""
        store, n = self.top_store(name, view) if top else self.store(name, view), 0
        for path in paths:
            try:
                n += not store.has(file_sha256(path))
            except OSError:
                pass  # unreadable: skipped at extraction
        return n

    def features(self, paths: list[Path], names: list[str] | None = None, view: str = "center",
                 announce: bool = True, cache: bool = True) -> Features:
        """Pooled features of the frozen bases ``names`` (default: --backbone's), concatenated, in one of
        ``features.VIEWS``, through the feature cache unless ``cache`` is False; ``announce=False`` reports only
        real work."""
        parts = []
        for name in names or self.names():
            store = self.store(name, view) if cache else None
            if store is not None and dist.active():  # each process fills its share of the cache, then all read it
                self._extract_shard(paths, name, view, store)
            feats = self.engine(name).extract(paths, store, progress=self.verbose, view=view)
            parts.append(feats)
            if announce or (store is not None and (feats.extracted or feats.failed)):
                _said(name, "" if view == "center" else f" ({view} view)", len(paths), feats)
        return _joined(parts)

    def features_views(self, paths: list[Path], names: list[str] | None = None,
                       views: tuple[str, ...] = ("center",), top: bool = False) -> list[Features]:
        """``features`` of each of ``views``. The centre and mirror views together are one pass over the images,
        each decoded and resized once and its mirror made by flipping the preprocessed pixels, where every base's
        preprocessing allows it (``Engine.mirrors``) and no process group shares the work; else one pass a view.
        The cached features are the same either way. With ``top`` (one base, no process group), the same pass also
        caches what enters the base's top stage (``tops``)."""
        names = names or self.names()
        together = top or (views == ("center", "flip") and not dist.active()
                           and all(self.engine(n).mirrors() for n in names))
        if not together:
            return [self.features(paths, names, view, announce=False) for view in views]
        if top and len(names) != 1:
            raise ValueError("the top stage's input is cached for one base at a time")
        per_base = []
        for name in names:
            engine = self.top_engine(name) if top else self.engine(name)
            feats = engine.extract_views(paths, views, [self.store(name, v) for v in views],
                                         [self.top_store(name, v) for v in views] if top else None,
                                         progress=self.verbose)
            if feats[0].extracted or feats[0].failed:
                what = (f" ({' and '.join(views)} view{'s' * (len(views) > 1)}, with the top stage's input)" if top
                        else " (centre and mirror views, one decode each)")
                _said(name, what, len(paths), feats[0])
            per_base.append(feats)
        return [_joined(list(parts)) for parts in zip(*per_base, strict=True)]

    def tops(self, paths: list[Path], name: str, views: tuple[str, ...]) -> tuple[list[np.ndarray], dict[Path, str]]:
        """What enters base ``name``'s top stage for each of ``paths`` in each of ``views``, float16 (N, C, H, W),
        from the cache, extracting (with the features) what is missing; and the files that could not be decoded
        (their rows are zero)."""
        failed = {p: r for f in self.features_views(paths, [name], views, top=True) for p, r in f.failed.items()}
        out = []
        for view in views:
            store, rows = self.top_store(name, view), []
            for path in paths:
                a = None if path in failed else store.get(file_sha256(path))
                if a is None and path not in failed:
                    raise TlearnError(f"the cached top-stage input of {path} went missing from {store.dir} while it "
                                      "was read (another process cleaning the cache folder?); run again")
                rows.append(a)
            shape = next((a.shape for a in rows if a is not None), (0, 0, 0))
            out.append(np.stack([a if a is not None else np.zeros(shape, np.float16) for a in rows]) if rows
                       else np.zeros((0, *shape), np.float16))
        return out, failed

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
            self.engine(name).extract(list(mine.values()), store, progress=self.verbose, view=view)
        dist.barrier()


def _said(name: str, what: str, n: int, feats: Features) -> None:
    """The log line of an extraction: how many images came from the cache, were extracted (and how fast), failed."""
    rate = f" ({feats.extracted / feats.seconds:.1f} img/s)" if feats.extracted else ""
    log.info(f"features of {name}{what}: {n} images, {feats.cached} from cache, {feats.extracted} extracted{rate}, "
             f"{len(feats.failed)} skipped, {feats.seconds:.1f} s")


def _joined(parts: list[Features]) -> Features:
    """Several bases' features of the same images, side by side."""
    if len(parts) == 1:
        return parts[0]
    return Features(np.hstack([f.X for f in parts]), {k: v for f in parts for k, v in f.failed.items()},
                    sum(f.extracted for f in parts), sum(f.cached for f in parts), sum(f.seconds for f in parts))


@dataclass
class Loaded:
    """A saved run read back (``artifact.load_model``): its spec, model and config, and the feature service of the
    bases it was trained on."""

    run_dir: Path
    spec: ModelSpec
    model: nn.Module
    config: dict[str, Any]
    extractor: Extractor
    novelty: Novelty | None = None  # None: saved before tlearn scored novelty

    @property
    def names(self) -> list[str]:
        """The bases a head takes the features of, in order."""
        return [b["name"] for b in self.spec.bases] or self.extractor.names()


def load_run(run_dir: str | Path, inference: InferenceConfig, runtime: RuntimeConfig, verbose: bool = True) -> Loaded:
    """A run folder's model, with an ``Extractor`` whose bases must have the weights it was trained with (by
    SHA-256; ``inference.weights`` points to the file if it has moved). It runs where ``inference`` says, never
    where it was trained."""
    validate(inference, runtime)
    spec, model, config = load_model(Path(run_dir))
    novelty = of_run(spec, load_reference(Path(run_dir), spec), str(run_dir))
    saved = spec.backbone or BackboneConfig()
    backbone = BackboneConfig(saved.backbone, inference.weights or saved.weights, saved.pretrained)
    train = TrainConfig(device=inference.device, precision=inference.precision)
    validate(backbone)
    if "train" in config:  # how it was trained; where it runs stays the caller's choice
        train = dataclasses.replace(from_dict(TrainConfig, config["train"], str(Path(run_dir) / "config.json")),
                                    device=inference.device, precision=inference.precision)
    recorded = {} if spec.kind == "scratch" else dict(zip(backbone.names(), spec.weights_id.split("+"), strict=False))
    return Loaded(Path(run_dir), spec, model, config,
                  Extractor(backbone, train, runtime, recorded=recorded, verbose=verbose), novelty)
