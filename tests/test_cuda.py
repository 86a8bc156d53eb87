"""The CUDA paths, run where a CUDA device is (bench/gpu_check.sh runs them with its timings); skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import HYMENOPTERA, TINY, make_folder, needs
from tlearn.api import ImageClassifier
from tlearn.config import BackboneConfig, RuntimeConfig, TrainConfig
from tlearn.extractor import Extractor

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]
FAST = {"verbose": False, "workers": 2, "batch_size": 8}


@needs(HYMENOPTERA)
def test_extraction_on_the_gpu_agrees_with_the_exact_cpu_features(tmp_path: Path) -> None:
    """bf16 autocast on the GPU against ONNX Runtime's fp32 on the CPU, on real photos: the same features to
    bf16's precision (cosine similarity), so cached features from either serve the same heads."""
    paths = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:32]
    runtime = RuntimeConfig(cache_dir=str(tmp_path / "cache"))
    gpu = Extractor(BackboneConfig(), TrainConfig(device="cuda"), runtime, verbose=False)
    cpu = Extractor(BackboneConfig(), TrainConfig(device="cpu"), runtime, verbose=False)
    assert gpu.engine().device.type == "cuda" and gpu.engine().precision in ("bf16", "fp16")
    a, b = gpu.features(paths, cache=False).X, cpu.features(paths, cache=False).X
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_fine_tuning_on_the_gpu_saves_a_model_the_cpu_loads(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=12)
    clf = ImageClassifier(**TINY, **FAST, mode="finetune", epochs=2, device="cuda")
    clf.fit(data, out=tmp_path / "run")
    assert next(clf.model.parameters()).device.type == "cpu"  # a trained model comes back on the CPU
    images = [data / "red", data / "blue"]
    on_gpu = clf.predict(images, top_k=1)
    on_cpu = ImageClassifier.load(tmp_path / "run", verbose=False, device="cpu").predict(images, top_k=1)
    assert [r["predictions"][0]["class"] for r in on_gpu] == [r["predictions"][0]["class"] for r in on_cpu]


def test_the_device_placement_check_passes_on_the_gpu(tmp_path: Path) -> None:
    """Every training loop with the check armed (tests/conftest.py): frozen, on the GPU, end to end."""
    data = make_folder(tmp_path / "photos", per_class=12)
    history = ImageClassifier(**TINY, **FAST, mode="frozen", epochs=1, device="cuda").fit(data)
    assert np.isfinite(history.history["loss"]).all()
