"""Inference only: a run folder → top-k probabilities, with the fewest imports that can do it.

For a head on frozen bases (modes features and auto, and frozen), on a CPU, when each base's ONNX export is in
this machine's cache (training put it there), prediction is decode → preprocess (``images.CropResize``) → ONNX
Runtime → the head in NumPy → softmax: no torch, no timm, no scikit-learn, so a single ``tlearn predict`` command
starts in about a second. Anything else (a fine-tuned or scratch network, a GPU, ``--runtime torch``, a base not
exported here) goes through ``ImageClassifier``, which loads the full stack; the results are the same.

>>> p = Predictor.load("runs/demo")                        # doctest: +SKIP
>>> p.predict(["ant.jpg"], top_k=2)                         # doctest: +SKIP
[{'path': 'ant.jpg', 'predictions': [{'class': 'ants', 'probability': 0.98}, ...]}]
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tlearn.artifact import MODEL_FILE, ModelSpec, read_run
from tlearn.data import expand_inputs
from tlearn.evaluate import top_classes
from tlearn.fileio import onnx_export_path
from tlearn.images import VIEWS, CropResize, ImageDecodeError, crop_resize_fits, load_image

log = logging.getLogger("tlearn")
BATCH = 8
TTA_VIEWS = list(VIEWS)  # CropResize's preprocessings have all six


def _no_gpu() -> bool:
    """True when this machine has no NVIDIA driver, so that mode auto would run on the CPU (checked without
    importing torch)."""
    return not Path("/proc/driver/nvidia/version").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


class Predictor:
    """A trained run for prediction. ``Predictor.load`` picks the fast ONNX path where it applies."""

    def __init__(self, spec: ModelSpec, sessions: list[Any], layers: list[tuple[np.ndarray, np.ndarray]]):
        self.spec, self.classes = spec, spec.classes
        self.sessions, self.layers = sessions, layers  # one ONNX session per base; the head's Linear layers
        self.crops = {view: [CropResize(b["identity"]["preprocessing"], *VIEWS[view]) for b in spec.bases]
                      for view in TTA_VIEWS}
        self.fallback: Any = None  # an ImageClassifier, where the fast path does not apply

    @classmethod
    def load(cls, run_dir: str | Path, *, weights: str | None = None, verbose: bool = True,
             **runtime_options: Any) -> Predictor:
        """The run at ``run_dir``; ``weights`` and ``runtime_options`` (cache_dir, runtime, workers, ...) as for
        ``ImageClassifier.load``."""
        run_dir = Path(run_dir)
        fast = cls._fast(run_dir, runtime_options)
        if fast is not None:
            return fast
        from tlearn.api import ImageClassifier  # the full stack

        clf = ImageClassifier.load(run_dir, weights=weights, verbose=verbose, **runtime_options)
        p = cls(clf.spec, [], [])
        p.fallback = clf
        return p

    @classmethod
    def _fast(cls, run_dir: Path, runtime: dict[str, Any]) -> Predictor | None:
        """The ONNX predictor, or None where it does not apply (see the module docstring)."""
        device, precision = runtime.get("device", "auto"), runtime.get("precision", "auto")
        on_cpu = device == "cpu" or (device == "auto" and _no_gpu())
        if runtime.get("runtime", "auto") == "torch" or not on_cpu or precision not in ("auto", "fp32") \
                or not importlib.util.find_spec("onnxruntime"):
            return None
        spec = read_run(run_dir).spec  # validated against the file's tensors: what follows can trust it
        if spec.kind != "head" or not spec.bases or \
                not all(crop_resize_fits(b["identity"]["preprocessing"]) for b in spec.bases):
            return None
        files = [onnx_export_path(runtime.get("cache_dir"), b["name"], b["identity"]) for b in spec.bases]
        if not all(f.is_file() for f in files):
            return None
        import onnxruntime as ort
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(run_dir / MODEL_FILE))
            sessions = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in files]
        except Exception:  # noqa: BLE001 - a damaged file: the full loader names it (or exports the base again)
            return None
        layers = [(tensors[f"{i}.weight"], tensors[f"{i}.bias"])
                  for i in sorted({int(k.split(".")[0]) for k in tensors})]
        if layers[0][0].shape[1] != spec.num_features or layers[-1][0].shape[0] != len(spec.classes):
            return None
        return cls(spec, sessions, layers)

    def _logits(self, paths: list[Path], views: list[str]) -> tuple[np.ndarray, dict[Path, str]]:
        """(N, C) logits averaged over ``views``; rows of unreadable files are zero and listed with the reason."""
        logits = np.zeros((len(paths), len(self.classes)), dtype=np.float32)
        failed: dict[Path, str] = {}
        for start in range(0, len(paths), BATCH):
            rows, images = [], []
            for i in range(start, min(start + BATCH, len(paths))):
                try:
                    images.append(load_image(paths[i]))
                    rows.append(i)
                except ImageDecodeError as e:
                    failed[paths[i]] = str(e)
            for view in views if images else []:
                parts = [session.run(None, {"image": np.stack([crop.array(im) for im in images])})[0]
                         for session, crop in zip(self.sessions, self.crops[view], strict=True)]
                logits[rows] += self._head(np.hstack(parts)) / len(views)  # (B, F) -> (B, C)
        return logits, failed

    def _head(self, x: np.ndarray) -> np.ndarray:
        """The head's Linear layers with ReLU between them (dropout is off in inference)."""
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x

    def predict(self, inputs: str | Path | Iterable[str | Path], top_k: int = 3, *, calibration: bool = True,
                tta: bool = False) -> list[dict[str, Any]]:
        """Top-k classes with probabilities for image files and the images in folders, in order, exactly as
        ``ImageClassifier.predict`` returns them."""
        if self.fallback is not None:
            return self.fallback.predict(inputs, top_k, calibration=calibration, tta=tta)
        paths = expand_inputs(inputs)
        if not paths:
            return []
        logits, failed = self._logits(paths, TTA_VIEWS if tta else self.spec.views)
        proba = softmax(logits, self.spec.temperature if calibration else 1.0)
        return top_classes(paths, failed, proba, self.classes, top_k)
