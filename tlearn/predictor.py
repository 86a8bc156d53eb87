"""Inference only: a run folder, or an exported ``.onnx`` classifier, → top-k probabilities, with the fewest
imports that can do it.

A ``Predictor`` is a list of inputs (each a preprocessing: an image becomes a normalised (3, H, W) array) and a
``forward`` that maps one batch per input to logits (B, C). Three backends fill them in:
- **onnx** (a head on frozen bases, on a CPU, with each base's ONNX export in this machine's cache, which
  training put there): ONNX Runtime for the bases, the head in NumPy. No torch, no timm, no scikit-learn, so a
  single ``tlearn predict`` starts in about a second.
- **exported** (a file written by ``tlearn export``): the whole classifier in one ONNX graph, described by its
  JSON sidecar. No torch either.
- **torch** (anything else: a fine-tuned or scratch network, a GPU, ``--runtime torch``, a base not exported
  here): the run read back with its feature service (``tlearn.extractor``), whose engines training used too.
  Paths are extracted on several threads, and a run's own images through the feature cache. ``ImageClassifier``
  predicts, evaluates and scores its splits through this backend (``Predictor.of``): there is one prediction
  loop.

``predict`` takes paths; ``predict_images`` takes decoded pictures (the server's uploads). All give the same
answers. Each result also says how unlike the training data the image is (``"novelty"``, higher: less like it) and
whether that is above the model's threshold (``"unknown"``): the scorer of ``tlearn.novelty``, saved with the
model, on the features the head takes (an exported graph computes it itself).

>>> p = Predictor.load("runs/demo")                        # doctest: +SKIP
>>> p.predict(["ant.jpg"], top_k=2)                         # doctest: +SKIP
[{'path': 'ant.jpg', 'predictions': [{'class': 'ants', 'probability': 0.98}, ...]}]
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tlearn import calibrate, graph
from tlearn.artifact import MODEL_FILE, NOVELTY_TENSOR, ModelSpec, read_run
from tlearn.config import TlearnError
from tlearn.data import expand_inputs
from tlearn.display import Predictions
from tlearn.evaluate import top_classes
from tlearn.fileio import file_sha256, onnx_export_path, require_regular
from tlearn.graph import read_sidecar, sidecar_path
from tlearn.images import VIEWS, ImageDecodeError, crop_resize_fits, eval_transform, load_image, tta_views
from tlearn.novelty import Novelty, of_run

if TYPE_CHECKING:
    from tlearn.config import InferenceConfig, RuntimeConfig

log = logging.getLogger("tlearn")
BATCH = 8
TTA_VIEWS = list(VIEWS)  # CropResize's preprocessings have all six
Forward = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray | None]]  # one (B, 3, H, W) batch per input
# -> ((B, C) logits, (B, F) the features the head takes; for an exported graph, its (B,) novelty; or None)


@dataclass
class Outputs:
    """What the model makes of images: rows in order, zero for files that could not be read (listed with why)."""

    logits: np.ndarray  # (N, C) uncalibrated, the mean over the views
    features: np.ndarray | None  # (N, F) the head's input, the mean over the model's own views (None: an
    # exported graph's, and for many files through ONNX Runtime, where they are not kept)
    novelty: np.ndarray | None  # (N,) None where the model has no novelty scorer
    failed: dict[Path, str] = field(default_factory=dict)


def _no_gpu() -> bool:
    """True when this machine has no NVIDIA driver, so that mode auto would run on the CPU (checked without
    importing torch)."""
    return not Path("/proc/driver/nvidia/version").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES")


class Predictor:
    """A trained classifier for prediction. ``Predictor.load`` picks the backend (see the module docstring)."""

    def __init__(self, classes: list[str], inputs: list[dict[str, Any]], forward: Forward, *, temperature: float = 1.0,
                 views: list[str] | None = None, backend: str = "onnx", about: dict[str, Any] | None = None,
                 spec: ModelSpec | None = None, novelty: Novelty | None = None, threshold: float | None = None,
                 labelling: tuple[Sequence[float], Sequence[float]] | None = None):
        self.classes, self.inputs, self.forward = classes, inputs, forward
        # several labels an image: each label's temperature and decision threshold (None: one class an image)
        self.temperatures, self.thresholds = (None, None) if labelling is None else \
            (np.asarray(labelling[0], dtype=np.float64), np.asarray(labelling[1], dtype=np.float64))
        self.novelty = novelty  # the scorer, where this process computes the score
        self.threshold = novelty.threshold if novelty is not None else threshold  # None: no novelty
        self.temperature, self.views = temperature, views or ["center"]
        self.backend = backend  # onnx | exported | torch
        self.about = about or {}  # what `GET /model` shows: model id, backbone, kind, metrics, when trained
        self.spec = spec
        self.stack: tuple[Any, Any, list[Any], list[str]] | None = None  # the torch backend's (model, extractor,
        # engines, a head's bases)
        self._transforms: dict[str, list[Callable[[Image.Image], np.ndarray]]] = {}

    @classmethod
    def load(cls, path: str | Path, *, verbose: bool = True, configs: Sequence[Any] = (), **options: Any
             ) -> Predictor:
        """The run folder at ``path``, or the classifier that ``tlearn export`` wrote to ``path`` (a ``.onnx``
        file). ``configs`` are an ``InferenceConfig`` (weights, device, precision) and a ``RuntimeConfig``
        (cache_dir, runtime, ...), and ``options`` their fields by name, as for ``ImageClassifier.load``."""
        from tlearn.config import InferenceConfig, RuntimeConfig, route_options, validate

        inference, runtime = route_options((InferenceConfig, RuntimeConfig), options, configs)
        validate(inference, runtime)
        path = Path(path)
        if path.suffix.lower() == ".onnx" and not path.is_dir():
            return cls.exported(path, inference, runtime)
        return cls._fast(path, inference, runtime) or cls._torch(path, inference, runtime, verbose)

    @classmethod
    def _fast(cls, run_dir: Path, inference: InferenceConfig, runtime: RuntimeConfig) -> Predictor | None:
        """The ONNX predictor of a run, or None where it does not apply (see the module docstring)."""
        device, precision = inference.device, inference.precision
        on_cpu = device == "cpu" or (device == "auto" and _no_gpu())
        if runtime.runtime == "torch" or not on_cpu or precision not in ("auto", "fp32") \
                or not importlib.util.find_spec("onnxruntime"):
            return None
        saved = read_run(run_dir)  # validated against the file's tensors: what follows can trust it
        spec = saved.spec
        if spec.kind != "head" or not spec.bases or \
                not all(crop_resize_fits(b["identity"]["preprocessing"]) for b in spec.bases):
            return None
        files = [onnx_export_path(runtime.cache_dir, b["name"], b["identity"]) for b in spec.bases]
        if not all(f.is_file() for f in files):
            return None
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(run_dir / MODEL_FILE))
            sessions = [graph.session(f) for f in files]
        except Exception:  # noqa: BLE001 - a damaged file: the full loader names it (or exports the base again)
            return None
        novelty = of_run(spec, tensors.pop(NOVELTY_TENSOR, None), str(run_dir))
        layers = [(tensors[f"{i}.weight"], tensors[f"{i}.bias"])
                  for i in sorted({int(k.split(".")[0]) for k in tensors})]  # the head's tensors (read_run checked)

        def forward(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            parts = [session.run(None, {"image": x})[0] for session, x in zip(sessions, arrays, strict=True)]
            features = np.hstack(parts)
            return _dense(features, layers), features  # (B, F) -> (B, C)

        return cls(spec.classes, [b["identity"]["preprocessing"] for b in spec.bases], forward,
                   temperature=spec.temperature, views=spec.views, backend="onnx", about=run_about(saved), spec=spec,
                   novelty=novelty, labelling=labelling(spec))

    @classmethod
    def _torch(cls, run_dir: Path, inference: InferenceConfig, runtime: RuntimeConfig, verbose: bool) -> Predictor:
        """The full stack: the run read back with its feature service (``extractor.load_run``), on the device and
        in the precision asked for."""
        from tlearn.extractor import load_run

        loaded = load_run(run_dir, inference, runtime, verbose)
        return cls.of(loaded.spec, loaded.model, loaded.extractor, about=run_about(read_run(run_dir)),
                      novelty=loaded.novelty)

    @classmethod
    def of(cls, spec: ModelSpec, model: Any, extractor: Any, about: dict[str, Any] | None = None,
           novelty: Novelty | None = None) -> Predictor:
        """The PyTorch predictor of a model in memory: ``model`` with its ``spec`` and its novelty scorer (None:
        none), and the ``Extractor`` of its frozen bases (a head's) or of the device it runs on (a whole
        network's)."""
        import torch

        from tlearn.models import Embedded, embed_width
        from tlearn.runtime import net_engine

        names = [b["name"] for b in spec.bases] or extractor.names()  # a head's bases, in order
        classes = len(spec.classes)
        if spec.kind == "head":
            engines, inputs = [extractor.engine(n) for n in names], [extractor.base(n).preprocessing for n in names]
        else:  # the network's logits and the features its last layer takes, side by side
            engines = [net_engine(Embedded(model), spec.preprocessing, classes + embed_width(model), extractor.run,
                                  extractor.runtime)]
            inputs = [spec.preprocessing]

        def forward(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                out = [torch.as_tensor(e.forward(torch.from_numpy(x))).float().cpu()
                       for e, x in zip(engines, arrays, strict=True)]
                if spec.kind == "head":
                    features = torch.cat(out, 1)
                    return model(features).numpy(), features.numpy()
                return out[0][:, :classes].numpy(), out[0][:, classes:].numpy()

        predictor = cls(spec.classes, inputs, forward, temperature=spec.temperature, views=spec.views,
                        backend="torch", about=about, spec=spec, novelty=novelty, labelling=labelling(spec))
        predictor.stack = (model, extractor, engines, names)
        return predictor

    @classmethod
    def exported(cls, path: str | Path, inference: InferenceConfig | None = None,
                 runtime: RuntimeConfig | None = None) -> Predictor:
        """A classifier written by ``tlearn export``: its ONNX graph and the sidecar that describes it, both
        checked before use."""
        path = Path(path)
        if (runtime and runtime.runtime == "torch") or (inference and inference.device not in ("auto", "cpu")):
            raise TlearnError(f"{path} is an ONNX graph, which runs in ONNX Runtime on the CPU; drop --runtime torch "
                              "and --device, or pass the run folder instead")
        if not path.is_file():
            raise TlearnError(f"{path} does not exist; write it with `tlearn export RUN --out {path}`")
        card = read_sidecar(sidecar_path(path))
        try:
            require_regular(path)
            session = graph.session(path)
        except Exception as e:
            raise TlearnError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:200]}); "
                              "export it again") from e
        names = [i.name for i in session.get_inputs()]
        wanted = [i["name"] for i in card["inputs"]]
        outputs = {o.name: o.shape for o in session.get_outputs()}
        width = outputs.get("logits", [None])[-1]  # a number, or a symbolic name when the graph leaves it open
        if names != wanted or "logits" not in outputs or (isinstance(width, int) and width != len(card["classes"])):
            raise TlearnError(f"{path} does not match {sidecar_path(path)} (inputs {names}, outputs {outputs}); "
                              "export the two again together")

        scored = "novelty" in outputs and "novelty" in card
        if not scored:
            log.warning(f"{path} was exported without a novelty score, so its predictions carry no \"novelty\" or "
                        "\"unknown\"; export the run again (and train it again if it predates them)")

        def forward(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
            out = session.run(["logits", "novelty"] if scored else ["logits"], dict(zip(wanted, arrays, strict=True)))
            return out[0], out[1] if scored else None

        about = {**card.get("source", {}), "model_id": file_sha256(path)[:12], "precision": card["precision"],
                 "backend": "exported"}
        # the graph averages its own views (the centre crop and, where trained so, its mirror image)
        return cls(card["classes"], [i["preprocessing"] for i in card["inputs"]], forward,
                   temperature=card["temperature"], views=["center"], backend="exported", about=about,
                   threshold=card["novelty"]["threshold"] if scored else None,
                   labelling=(card["temperatures"], card["thresholds"]) if card.get("multi_label") else None)

    # --- prediction ----------------------------------------------------------------------------------------

    def tta_views(self) -> list[str]:
        """The views that test-time augmentation averages: the centre crop, its mirror image and the four corner
        crops (corner crops need a square centre-crop preprocessing; without one, the first two)."""
        return TTA_VIEWS if all(tta_views(pp) == TTA_VIEWS for pp in self.inputs) else ["center", "flip"]

    def prepare(self, images: list[Image.Image], tta: bool = False) -> list[list[np.ndarray]]:
        """Decoded pictures → for each view of the model (or the six test-time views with ``tta``), one
        (B, 3, H, W) float32 batch per model input. The mirror view is the centre crop's array flipped, which is
        what resampling and then mirroring the picture gives, at no second resampling."""
        if tta and self.backend == "exported":
            raise TlearnError("--tta needs the run folder: an exported graph computes its own views")
        views = self.tta_views() if tta else self.views
        out: dict[str, list[np.ndarray]] = {}
        for view in views:
            if view == "flip" and "center" in out and all(crop_resize_fits(pp) for pp in self.inputs):
                out[view] = [np.ascontiguousarray(x[..., ::-1]) for x in out["center"]]
                continue
            if view not in self._transforms:
                self._transforms[view] = [eval_transform(pp, view, array=True) for pp in self.inputs]
            out[view] = [np.stack([t(image) for image in images]) for t in self._transforms[view]]
        return list(out.values())

    def run(self, prepared: list[list[np.ndarray]]) -> Outputs:
        """``prepare``'s batches → (B, C) uncalibrated logits, the mean over the views, which go through the
        model together as one batch of V x B; with the features and novelty of the model's own views."""
        views = len(prepared)
        together = [np.concatenate(per_input) for per_input in zip(*prepared, strict=True)]  # (V*B, 3, H, W) each
        logits, extra = self.forward(together)
        return self.outputs(logits.reshape(views, -1, logits.shape[1]),
                            None if extra is None else extra.reshape(views, logits.shape[0] // views, -1))

    def outputs(self, logits: np.ndarray, extra: np.ndarray | None) -> Outputs:
        """Per-view (V, B, C) logits and (V, B, F) head features (an exported graph: (V, B, 1) novelty) → the mean
        logits over every view; the features, and their novelty, of the model's own views, which come first (the
        test-time views start with them), as the threshold was set on them."""
        own = len(self.views)
        if extra is None or self.backend == "exported":
            return Outputs(logits.mean(0), None, None if extra is None else extra[:own].mean(0)[:, 0])
        features = extra[:own].mean(0)
        novelty = self.novelty.score(features, logits[:own].mean(0)) if self.novelty is not None else None
        return Outputs(logits.mean(0), features, novelty)

    def logits(self, images: list[Image.Image], tta: bool = False) -> np.ndarray:
        """(B, C) uncalibrated logits of decoded pictures, averaged over the model's views (or the six test-time
        views with ``tta``)."""
        return self.run(self.prepare(images, tta)).logits

    def probabilities(self, logits: np.ndarray, calibration: bool = True) -> np.ndarray:
        """Softmax probabilities of the classes, or (several labels an image) a sigmoid probability a label, with
        the temperature scaling fitted on held-out images unless ``calibration`` is False."""
        return calibrate.probabilities(logits, self.temperature, self.temperatures, calibration)

    def predict_images(self, images: list[Image.Image], top_k: int = 3, *, calibration: bool = True,
                       tta: bool = False, unknown: bool = True) -> list[dict[str, Any]]:
        """Each decoded picture's ``{"predictions": [{"class", "probability"}, ...], "novelty", "unknown"}``, most
        probable first (the last two where the model scores novelty, unless ``unknown`` is False)."""
        if not images:
            return []
        out = self.run(self.prepare(images, tta))
        names = [str(i) for i in range(len(images))]
        return [{k: v for k, v in r.items() if k != "path"} for r in top_classes(
            names, {}, self.probabilities(out.logits, calibration), self.classes, top_k,
            *((out.novelty, self.threshold) if unknown else (None, None)), labels=self.thresholds)]

    def predict(self, inputs: str | Path | Iterable[str | Path], top_k: int = 3, *, calibration: bool = True,
                tta: bool = False, unknown: bool = True) -> Predictions:
        """Top-k classes with probabilities for image files and the images in folders, in order: ``{"path",
        "predictions": [{"class", "probability"}, ...], "novelty", "unknown"}``, or ``{"path", "error"}`` for a
        file that could not be read. ``novelty`` (higher: less like the training data) and ``unknown`` (above the
        model's threshold) are there where the model scores novelty, unless ``unknown`` is False."""
        paths = expand_inputs(inputs)
        if not paths:
            return Predictions()
        out = self.paths_outputs(paths, tta)
        return Predictions(top_classes(paths, out.failed, self.probabilities(out.logits, calibration), self.classes,
                                       top_k, *((out.novelty, self.threshold) if unknown else (None, None)),
                                       labels=self.thresholds))

    def paths_outputs(self, paths: list[Path], tta: bool = False, cache: bool = False) -> Outputs:
        """The ``Outputs`` of the images at ``paths``: (N, C) uncalibrated logits, the mean over the model's views
        (or the test-time views with ``tta``), with the features and novelty of the model's own views; rows of
        files that cannot be read are zero and listed with the reason.

        The PyTorch backend extracts on several threads through its engines, and a head's features of the centre
        and mirror views go through the feature cache where ``cache`` is set (a run's own splits), so that its
        metrics use the very features it was trained and chosen on."""
        if self.stack is not None:
            return self._stack_outputs(paths, tta, cache)
        logits = np.zeros((len(paths), len(self.classes)), dtype=np.float32)
        novelty = None if self.threshold is None else np.zeros(len(paths), dtype=np.float32)
        failed: dict[Path, str] = {}
        for start in range(0, len(paths), BATCH):
            rows, images = [], []
            for i in range(start, min(start + BATCH, len(paths))):
                try:
                    images.append(load_image(paths[i]))
                    rows.append(i)
                except ImageDecodeError as e:
                    failed[paths[i]] = str(e)
            if images:
                out = self.run(self.prepare(images, tta))
                logits[rows] = out.logits
                if novelty is not None:
                    novelty[rows] = out.novelty
        return Outputs(logits, None, novelty, failed)  # no (N, F) features: those of many files add up

    def _stack_outputs(self, paths: list[Path], tta: bool, cache: bool) -> Outputs:
        """The PyTorch backend: each view's features extracted on several threads (a head's through the feature
        cache where ``cache`` is set), then the head, or the whole network's logits and features."""
        import torch

        model, extractor, engines, names = self.stack
        logits, extra, failed = [], [], {}
        views = self.tta_views() if tta else self.spec.views
        # the centre and mirror views from one decode of each image, where they come first and the engine allows
        paired = views[:2] == ["center", "flip"] and (cache if self.spec.kind == "head" else engines[0].mirrors())
        if not paired:
            both = []
        elif self.spec.kind == "head":
            both = extractor.features_views(paths, names, ("center", "flip"))
        else:
            both = engines[0].extract_views(paths, ("center", "flip"), [None, None], progress=extractor.verbose)
        for i, view in enumerate(views):
            if i < len(both):
                out = both[i]
            elif self.spec.kind == "head":
                out = extractor.features(paths, names, view, announce=False, cache=cache and view in ("center", "flip"))
            else:
                out = engines[0].extract(paths, progress=extractor.verbose, view=view)
            if self.spec.kind == "head":
                with torch.no_grad():
                    logits.append(model.eval()(torch.from_numpy(out.X)).numpy())
                extra.append(out.X)
            else:
                logits.append(out.X[:, :len(self.classes)])
                extra.append(out.X[:, len(self.classes):])
            failed = out.failed
        result = self.outputs(np.stack(logits), np.stack(extra))
        result.failed = failed
        return result


def labelling(spec: ModelSpec) -> tuple[list[float], list[float]] | None:
    """A model of several labels an image: each label's temperature and threshold (None: one class an image)."""
    return (spec.temperatures, spec.thresholds) if spec.multi_label else None


def _dense(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A head's Linear layers with ReLU between them (dropout is off in inference)."""
    for i, (weight, bias) in enumerate(layers):
        x = x @ weight.T + bias
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def run_about(saved: Any) -> dict[str, Any]:
    """What a run says about itself for ``GET /model`` and an export's sidecar: its model id (the first 12 hex of
    the model file's SHA-256), backbone, kind, when it was saved, and its held-out metrics."""
    config, spec, model = saved.config, saved.spec, saved.run_dir / MODEL_FILE
    metrics = {}
    try:  # metrics.json is a summary for people: one that is missing or odd leaves the metrics out
        require_regular(saved.run_dir / "metrics.json")
        recorded = json.loads((saved.run_dir / "metrics.json").read_text(encoding="utf-8"))
        for split, m in recorded.items():
            if isinstance(m, dict) and all(isinstance(m.get(k), int | float) and math.isfinite(m[k])
                                           for k in ("accuracy", "loss")):
                metrics[split] = {"accuracy": m["accuracy"], "loss": m["loss"]}
    except (OSError, ValueError, AttributeError):
        pass
    saved_at = config.get("saved") if isinstance(config.get("saved"), str) else \
        datetime.datetime.fromtimestamp(model.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return {"model_id": file_sha256(model)[:12], "run": saved.run_dir.name,
            "backbone": spec.backbone.backbone if spec.backbone and spec.kind != "scratch" else spec.arch,
            "kind": spec.kind, "trained": saved_at, "metrics": metrics}
