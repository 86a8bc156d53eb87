"""Fine-tuning the top stage on cached activations (recipes/top.py): the split, the one-pass cache, the trained
network, and mode auto's step."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tests.conftest import TINY, make_folder
from tlearn.api import ImageClassifier
from tlearn.calibrate import calibrated_loss
from tlearn.config import AugmentConfig, BackboneConfig, DataConfig, RuntimeConfig, TrainConfig
from tlearn.data import scan
from tlearn.extractor import Extractor
from tlearn.models import TopSplit, split_top
from tlearn.recipes import auto, plan
from tlearn.recipes.features import probe_features
from tlearn.recipes.job import Job
from tlearn.recipes.plan import Clock, choose
from tlearn.recipes.top import STAGE, TopHead, finetune_top, seconds_per_sample
from tlearn.runtime import Engine, Pooled

FAST = {"verbose": False, "workers": 0, "batch_size": 8}


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
def test_the_split_gives_the_bases_own_features(arch: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch).eval()
    name, lower, top = split_top(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, a = TopSplit(lower, top)(x)
        assert torch.equal(features, Pooled(model)(x))
        assert torch.equal(top(a), features)
    assert a.ndim == 4 and name in ("blocks.4", "layer4")
    assert split_top(timm.create_model("test_convnext")) is None  # no known split: auto offers no such step


def _job(data: Path, cache: Path, **train: object) -> Job:
    config = TrainConfig(**{"mode": "auto", "batch_size": 8, **train})
    runtime = RuntimeConfig(cache_dir=str(cache), workers=0)
    folder = scan(DataConfig(path=str(data), seed=0))
    decision = choose(len(folder.split("train")), len(folder.classes), config)
    extractor = Extractor(BackboneConfig(TINY["backbone"], pretrained=False), config, runtime, verbose=False)
    return Job(folder, decision, config, AugmentConfig(), runtime, extractor, Clock(None), [TINY["backbone"]],
               progress=False)


def test_one_pass_caches_the_features_and_what_enters_the_top_stage(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=6)
    (data / "red" / "broken.png").write_bytes(b"not an image")
    paths = sorted(p for p in data.rglob("*.png"))
    job = _job(data, tmp_path / "cache")
    ex = job.extractor
    centre, mirror = ex.features_views(paths, views=("center", "flip"), top=True)
    broken = data / "red" / "broken.png"
    assert set(centre.failed) == {broken} and centre.extracted == len(paths) - 1
    plain = Extractor(ex.backbone_config, job.train, RuntimeConfig(cache_dir=str(tmp_path / "other"), workers=0),
                      verbose=False)
    again = plain.features_views(paths, views=("center", "flip"))
    np.testing.assert_allclose(centre.X, again[0].X, atol=1e-5)  # the same features as the plain pass
    np.testing.assert_allclose(mirror.X, again[1].X, atol=1e-5)
    (a, a_flip), failed = ex.tops(paths, TINY["backbone"], ("center", "flip"))
    assert set(failed) == {broken} and a.dtype == np.float16 and a.shape[0] == len(paths)
    row = paths.index(broken)
    assert not a[row].any() and a[row - 1].any()
    assert ex.missing(paths, TINY["backbone"], "flip", top=True) == 1  # only the broken file
    # the activations are the lower stages' output for the image and its mirror image
    _, lower, _ = split_top(copy.deepcopy(ex.base().model).float().cpu())
    from tlearn.images import eval_transform, load_image

    x = eval_transform(ex.base().preprocessing)(load_image(paths[0]))[None]
    with torch.no_grad():
        np.testing.assert_allclose(a[0], lower(x)[0].numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(a_flip[0], lower(x.flip(-1))[0].numpy(), atol=2e-2, rtol=1e-2)
    assert ex.features_views(paths, views=("center", "flip"), top=True)[0].extracted == 0  # all cached now
    torn = next(ex.top_store(TINY["backbone"], "flip").dir.rglob("*.npy"))
    torn.write_bytes(torn.read_bytes()[:100])  # a damaged entry is made again, not an error
    assert ex.features_views(paths, views=("center", "flip"), top=True)[0].extracted == 1
    assert ex.tops(paths, TINY["backbone"], ("center", "flip"))[0][1].any()


def test_where_the_mirror_is_no_flip_of_the_centre_each_view_takes_its_own_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = sorted(make_folder(tmp_path / "photos", per_class=4).rglob("*.png"))
    one = _job(tmp_path / "photos", tmp_path / "one").extractor
    (a, a_flip), _ = one.tops(paths, TINY["backbone"], ("center", "flip"))
    monkeypatch.setattr(Engine, "mirrors", lambda self: False)
    apart = _job(tmp_path / "photos", tmp_path / "apart").extractor
    (b, b_flip), _ = apart.tops(paths, TINY["backbone"], ("center", "flip"))
    np.testing.assert_array_equal(a, b)  # the same pixels either way (CropResize), so the same activations
    np.testing.assert_array_equal(a_flip, b_flip)
    assert not np.array_equal(a, a_flip)


def test_the_fine_tuned_network_is_the_one_trained_on_the_cache(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=20)
    job = _job(data, tmp_path / "cache", epochs=2)
    assert seconds_per_sample(job)[0] > 0
    probe = probe_features(job, job.names)[0]
    tuned, logits, scores = finetune_top(job, probe.head, copy.deepcopy(probe.history), math.inf, (0, 0.0))
    assert tuned is not None and tuned.kind == "finetuned" and len(scores) == 2
    assert calibrated_loss(logits, np.array([s.label for s in job.data.split("validation")])) == min(scores)
    assert tuned.history.stage.count(STAGE) == 2
    pretrained, net = job.extractor.base().model.state_dict(), tuned.model
    changed = {k for k, v in net.base.state_dict().items() if not torch.equal(v, pretrained[k].to(v.device))}
    assert changed and all(k.startswith(("blocks.4", "conv_head", "bn2")) for k in changed)
    assert not any("running_" in k for k in changed)  # BatchNorm statistics stay frozen
    # the saved network on images gives what the top stage and head gave on the cached activations
    val = [s.path for s in job.data.split("validation")]
    (a,), _ = job.extractor.tops(val, job.names[0], ("center",))
    _, _, top = split_top(net.base)
    from tlearn.images import eval_transform, load_image

    x = torch.stack([eval_transform(tuned.preprocessing)(load_image(p)) for p in val])
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), TopHead(top, net.head)(torch.from_numpy(a)).numpy(), atol=1e-2)
    # nothing beats a bar of zero loss: no model, and the base given is untouched
    assert finetune_top(job, probe.head, copy.deepcopy(probe.history), 0.0, (0, 0.0))[0] is None
    assert all(torch.equal(v, pretrained[k]) for k, v in job.extractor.base().model.state_dict().items())


def test_auto_keeps_the_step_when_it_lowers_the_calibrated_loss(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With enough validation images to count (lowered here), auto fine-tunes the top stage on cached
    activations after the features step; made to look better, it is kept and saved as a fine-tuned network."""
    data = make_folder(tmp_path / "photos", per_class=20)
    monkeypatch.setattr(plan, "MIN_FINETUNE_EVIDENCE", 4)
    real = auto._losses
    monkeypatch.setattr(auto, "_losses", lambda step, logits, y: real(step, logits, y) + 10.0 * (
        step.kind == "features"))  # a poor first head
    clf = ImageClassifier(**TINY, **FAST, time_budget="none", epochs=2, auto_small=2)
    clf.fit(data, out=tmp_path / "run")
    decision = json.loads((tmp_path / "run" / "config.json").read_text())["decision"]
    steps = {s["kind"]: s for s in decision["plan"]}
    assert steps["top"]["status"] == "kept" and steps["top"]["epochs"] == 2
    assert steps["top"]["change"] < -9 and steps["top"]["noise"] < 1 and decision["mode"] == "finetune"
    assert clf.spec.kind == "finetuned"
    loaded = ImageClassifier.load(tmp_path / "run", verbose=False)
    images = [data / "red", data / "blue"]
    again, before = loaded.predict(images, top_k=2), clf.predict(images, top_k=2)
    assert [[p["class"] for p in r["predictions"]] for r in again] == \
        [[p["class"] for p in r["predictions"]] for r in before]
    assert [p["probability"] for r in again for p in r["predictions"]] == \
        pytest.approx([p["probability"] for r in before for p in r["predictions"]], abs=1e-5)  # float32 rounding


def test_auto_discards_the_step_when_it_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_folder(tmp_path / "photos", per_class=20)
    monkeypatch.setattr(plan, "MIN_FINETUNE_EVIDENCE", 4)
    real = auto._losses
    monkeypatch.setattr(auto, "_losses", lambda step, logits, y: real(step, logits, y) - 10.0 * (
        step.kind == "features"))  # unbeatable
    clf = ImageClassifier(**TINY, **FAST, time_budget="none", epochs=2, auto_small=2)
    clf.fit(data, out=tmp_path / "run")
    steps = {s["kind"]: s for s in clf.decision.plan}
    assert steps["top"]["status"] == "discarded" and steps["features"]["status"] == "kept"
    assert clf.spec.kind == "head" and clf.decision.mode == "features"
