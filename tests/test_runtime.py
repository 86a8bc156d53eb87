"""Every path that runs the frozen base gives the features of PyTorch's fp32 eager model, within its tolerance:
the one-resampling preprocessing, ONNX Runtime, bf16 autocast, parallel lanes; and ``auto`` picks and falls back
as documented."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from tests.conftest import TINY, make_folder
from tlearn import runtime
from tlearn.backbones import load_backbone, preprocessing_of
from tlearn.config import BackboneConfig, RuntimeConfig, TlearnError, TrainConfig, validate
from tlearn.features import FeatureCache
from tlearn.images import CropResize, eval_transform, load_image
from tlearn.models import SCRATCH
from tlearn.runtime import base_engine, export_onnx

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ants_bees"
PHOTOS = sorted(EXAMPLE.rglob("*.jpg"))


@pytest.fixture(scope="module")
def lite0():
    return load_backbone(BackboneConfig("efficientnet_lite0"))


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneConfig(**TINY))


def engine(bb, runtime_name: str, precision: str = "auto", tmp: Path | None = None, **kw):
    return base_engine(bb, TrainConfig(precision=precision, device="cpu"),
                       RuntimeConfig(runtime=runtime_name, cache_dir=str(tmp) if tmp else None, **kw))


def eager_fp32(bb, paths: list[Path], transform) -> np.ndarray:
    """The reference: PyTorch fp32, NCHW, no lanes."""
    model = bb.model.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        x = torch.stack([transform(load_image(p)) for p in paths])
        out = bb.features(x).numpy()
    model.to(memory_format=torch.channels_last)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (640, 257), (120, 90)])
@pytest.mark.parametrize("preprocessing", ["efficientnet_lite0", "small-cnn"])
def test_one_resampling_matches_timms_resize_then_crop(size: tuple[int, int], preprocessing: str) -> None:
    from skimage import data

    pp = SCRATCH["small-cnn"].preprocessing() if preprocessing == "small-cnn" else preprocessing_of(preprocessing)
    image = Image.fromarray(data.chelsea()).resize(size)
    ours = eval_transform(pp)
    assert isinstance(ours, CropResize)
    got, want = ours(image), timm.data.create_transform(**pp, is_training=False)(image)
    assert got.shape == want.shape == (3, *pp["input_size"][1:])
    step = 1 / (255 * pp["std"][0])  # one grey level, after normalisation
    assert (got - want).abs().max() <= 2.01 * step
    assert (got - want).abs().mean() < 0.05 * step


def test_other_crop_modes_use_timms_transform() -> None:
    pp = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
          "crop_pct": 0.9, "crop_mode": "squash"}
    assert not isinstance(eval_transform(pp), CropResize)


def test_onnx_gives_pytorchs_fp32_features_on_real_photos(lite0, tmp_path: Path) -> None:
    e = engine(lite0, "onnx", tmp=tmp_path)
    assert (e.runtime, e.precision) == ("onnx", "fp32")
    got = e.extract(PHOTOS, progress=False)
    want = eager_fp32(lite0, PHOTOS, eval_transform(lite0.preprocessing))
    assert not got.failed
    np.testing.assert_allclose(got.X, want, atol=1e-3 * np.abs(want).max())
    imagenet = lite0.model.get_classifier()
    with torch.no_grad():
        assert torch.equal(imagenet(torch.from_numpy(got.X)).argmax(1), imagenet(torch.from_numpy(want)).argmax(1))


def test_fast_preprocessing_keeps_imagenet_predictions(lite0) -> None:
    ours = eager_fp32(lite0, PHOTOS, eval_transform(lite0.preprocessing))
    timms = eager_fp32(lite0, PHOTOS, timm.data.create_transform(**lite0.preprocessing, is_training=False))
    assert cosine(ours, timms).min() > 0.999
    imagenet = lite0.model.get_classifier()
    with torch.no_grad():
        assert torch.equal(imagenet(torch.from_numpy(ours)).argmax(1), imagenet(torch.from_numpy(timms)).argmax(1))


def test_bf16_features_predict_the_same_classes(lite0, tmp_path: Path) -> None:
    fp32 = engine(lite0, "torch", "fp32").extract(PHOTOS, progress=False).X
    bf16 = engine(lite0, "torch", "bf16").extract(PHOTOS, progress=False).X
    assert cosine(fp32, bf16).min() > 0.99
    labels = np.array([p.parent.name == "bees" for p in PHOTOS])
    train = np.arange(len(PHOTOS)) % 2 == 0
    head = LogisticRegression(max_iter=2000).fit(fp32[train], labels[train])
    assert (head.predict(bf16[~train]) == head.predict(fp32[~train])).all()
    assert (head.predict(fp32[~train]) == labels[~train]).mean() > 0.8


@pytest.mark.parametrize("name", ["torch", "onnx"])
def test_lanes_and_batch_sizes_change_nothing(tiny, tmp_path: Path, name: str) -> None:
    root = make_folder(tmp_path / "d", per_class=9)
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = sorted(root.rglob("*.png"))
    threads = torch.get_num_threads()
    one = engine(tiny, name, "fp32", tmp_path, workers=1, extract_batch_size=1).extract(paths, progress=False)
    many = engine(tiny, name, "fp32", tmp_path, workers=3, extract_batch_size=4).extract(paths, progress=False)
    np.testing.assert_allclose(one.X, many.X, rtol=1e-5, atol=1e-5)
    assert list(one.failed) == list(many.failed) == [root / "red" / "broken.png"]
    assert torch.get_num_threads() == threads  # lanes set it to 1 per lane while extracting, then restore it
    assert many.extracted == 18


def test_auto_runs_onnx_fp32_on_a_cpu_and_shares_the_fp32_cache(tiny, tmp_path: Path) -> None:
    paths = sorted(make_folder(tmp_path / "d", per_class=4).rglob("*.png"))
    auto = engine(tiny, "auto", tmp=tmp_path)
    assert (auto.runtime, auto.precision, auto.lanes, auto.batch_size) == ("onnx", "fp32", runtime.cpu_cores(), 8)
    torch_fp32 = engine(tiny, "torch", "fp32", tmp_path)
    torch_fp32.extract(paths, FeatureCache(tmp_path, tiny, torch_fp32.precision), progress=False)
    again = auto.extract(paths, FeatureCache(tmp_path, tiny, auto.precision), progress=False)
    assert again.cached == 8 and again.extracted == 0
    bf16 = engine(tiny, "torch", "bf16", tmp_path)
    assert FeatureCache(tmp_path, tiny, bf16.precision).dir != FeatureCache(tmp_path, tiny, "fp32").dir


@pytest.mark.parametrize("has_bf16", [True, False])
def test_without_onnxruntime_auto_uses_bf16_only_where_the_cpu_has_it(tiny, monkeypatch: pytest.MonkeyPatch,
                                                                      has_bf16: bool) -> None:
    monkeypatch.setattr(runtime, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    e = engine(tiny, "auto")
    assert (e.runtime, e.precision) == ("torch", "bf16" if has_bf16 else "fp32")
    assert engine(tiny, "auto", "fp32").precision == "fp32"


def test_a_failed_export_falls_back_under_auto_and_is_an_error_when_asked_for(
        tiny, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(bb, cache_dir=None):
        raise TlearnError("cannot export test_efficientnet to ONNX: RuntimeError: unsupported operator")

    monkeypatch.setattr(runtime, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="tlearn"):
        assert engine(tiny, "auto", "fp32").runtime == "torch"
    assert "unsupported operator; running the base in PyTorch instead" in caplog.text
    with pytest.raises(TlearnError, match="unsupported operator"):
        engine(tiny, "onnx")


def test_asking_for_onnx_without_onnxruntime_says_what_to_install(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(TlearnError, match="--runtime onnx needs onnxruntime .*pip install onnxruntime"):
        engine(tiny, "onnx")


def test_flags_that_cannot_work_together_are_refused(tiny) -> None:
    with pytest.raises(TlearnError, match="--runtime onnx runs the base in fp32; for --precision bf16 use --runtime"):
        engine(tiny, "onnx", "bf16")
    with pytest.raises(TlearnError, match="--runtime must be one of auto, torch, onnx"):
        validate(RuntimeConfig(runtime="tensorrt"))
    with pytest.raises(TlearnError, match="--extract-batch-size must be 0"):
        validate(RuntimeConfig(extract_batch_size=-1))


def test_export_is_cached_checked_and_leaves_the_live_model_alone(tiny, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = tiny.features(x)
    path = export_onnx(tiny, tmp_path)
    assert not tiny.model.training
    with torch.no_grad():
        assert torch.equal(before, tiny.features(x))
    stamp = path.stat().st_mtime_ns
    assert export_onnx(tiny, tmp_path) == path and path.stat().st_mtime_ns == stamp
    path.write_bytes(b"not a model")  # damaged in the cache: exported again when the first batch comes
    with caplog.at_level(logging.WARNING, logger="tlearn"):
        e = engine(tiny, "onnx", tmp=tmp_path)
        assert "exporting the base again" not in caplog.text  # the session opens with the first batch
        x = torch.randn(2, *tiny.preprocessing["input_size"])
        with torch.no_grad():
            np.testing.assert_allclose(e.forward(x), tiny.features(x).numpy(), atol=1e-4)
    assert "exporting the base again" in caplog.text
    assert e.runtime == "onnx" and path.stat().st_size > 1000


def test_predictions_leave_nothing_in_the_feature_cache(tmp_path: Path) -> None:
    from tlearn.api import ImageClassifier

    root = make_folder(tmp_path / "d", per_class=8)
    clf = ImageClassifier(**TINY, mode="features", epochs=3, verbose=False, cache_dir=str(tmp_path / "c"))
    clf.fit(root)
    entries = set((tmp_path / "c").rglob("*.npy"))
    fitted_on = len(clf.data.split("train")) + len(clf.data.split("validation"))
    assert len(entries) == 2 * fitted_on  # each training and validation image and its mirror image
    new = make_folder(tmp_path / "new", per_class=2, seed=7)
    assert len(clf.predict(new)) == 4
    assert set((tmp_path / "c").rglob("*.npy")) == entries
