"""torchvision's SqueezeNet 1.1 and AlexNet as bases (tvbases.py): weights from a local file and from torch's hub
cache (never a live download), through the feature cache, every mode's network, export and heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from tests.conftest import make_folder
from tlearn.api import ImageClassifier
from tlearn.backbones import load_backbone
from tlearn.config import BackboneConfig, TlearnError
from tlearn.export import export
from tlearn.features import FeatureCache
from tlearn.runtime import Pooled
from tlearn.tvbases import create, weights_url

FAST = {"verbose": False, "workers": 0, "batch_size": 8}


@pytest.fixture(scope="module")
def squeezenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's SqueezeNet 1.1 state dict (random weights, torchvision's layout), as users download it."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("arch,width", [("torchvision/squeezenet1_1", 512), ("torchvision/alexnet", 4096)])
def test_the_adapters_give_torchvisions_logits_and_the_pre_logits_features(arch: str, width: int) -> None:
    torch.manual_seed(0)
    name = arch.split("/")[1]
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    ours = create(arch).eval()
    ours.load_state_dict(theirs.state_dict())  # the same module names: torchvision's files load as they are
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
        assert Pooled(ours)(x).shape == (2, width) and ours.num_features == width


def test_a_local_weights_file_is_the_base_and_its_identity(squeezenet_file: Path, tmp_path: Path) -> None:
    bb = load_backbone(BackboneConfig("squeezenet1_1", weights=str(squeezenet_file)), tmp_path)
    expected = torchvision.models.squeezenet1_1(weights=None)
    expected.load_state_dict(torch.load(squeezenet_file, weights_only=True))
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in bb.model.state_dict().items())
    assert bb.weights_id.startswith("sha256:") and bb.num_features == 512
    assert bb.preprocessing["input_size"] == [3, 224, 224] and bb.preprocessing["interpolation"] == "bilinear"
    wrong = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(TlearnError, match="does not fit architecture torchvision/squeezenet1_1"):
        _ = load_backbone(BackboneConfig("squeezenet1_1", weights=str(wrong)), tmp_path).model


def test_pretrained_weights_come_through_torchvisions_enum_from_the_hub_cache(
        squeezenet_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online path, run offline: the file is already where torch's hub cache keeps it, so nothing is
    downloaded; the base is identified by that file's SHA-256."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / Path(weights_url("torchvision/squeezenet1_1")).name).write_bytes(squeezenet_file.read_bytes())
    bb = load_backbone(BackboneConfig("squeezenet1_1"), tmp_path / "cache")
    assert bb.weights_source.startswith("torchvision https://") and bb.weights_id.startswith("sha256:")
    assert bb.weights_id == load_backbone(BackboneConfig("squeezenet1_1", weights=str(squeezenet_file)),
                                          tmp_path / "cache").weights_id
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(TlearnError, match="could not get torchvision's ImageNet weights for squeezenet1_1.*--weights"):
        load_backbone(BackboneConfig("squeezenet1_1"), tmp_path / "cache2")


def test_every_mode_export_and_heatmaps_run_on_squeezenet(squeezenet_file: Path, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=12)
    images = [data / "red", data / "blue"]
    for mode in ("features", "frozen", "finetune"):
        clf = ImageClassifier("squeezenet1_1", weights=str(squeezenet_file), mode=mode, epochs=1, head_epochs=1,
                              **FAST)
        clf.fit(data, out=tmp_path / mode)
        loaded = ImageClassifier.load(tmp_path / mode, verbose=False)
        got, before = loaded.predict(images, top_k=1), clf.predict(images, top_k=1)
        assert [r["predictions"][0]["class"] for r in got] == [r["predictions"][0]["class"] for r in before]
    assert loaded.spec.kind == "finetuned" and loaded.spec.arch == "torchvision/squeezenet1_1"
    result = export(tmp_path / "finetune", tmp_path / "sq.onnx")
    assert result.parity < 1e-4 and result.parity_images > 0
    heat = loaded.explain([next((data / "red").iterdir())])[0]["heatmap"]
    assert np.isfinite(heat).all() and heat.max() <= 1


def test_alexnet_is_a_base_through_the_cache_and_fine_tuning(tmp_path: Path) -> None:
    """The pretrained AlexNet (fc7 features, 4096 wide) beside the scratch ``--model alexnet``: its features are
    cached under its own key and its top stage (fc6, fc7) is what --unfreeze 1 trains."""
    torch.manual_seed(2)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    data = make_folder(tmp_path / "photos", per_class=8)
    cache = tmp_path / "cache"
    clf = ImageClassifier("alexnet", weights=str(weights), mode="features", cache_dir=str(cache), **FAST)
    clf.fit(data, out=tmp_path / "features")
    assert clf.spec.num_features == 4096
    assert len(list(FeatureCache(cache, clf.backbone).dir.rglob("*.npy"))) >= 16  # every photo, both views
    tuned = ImageClassifier("alexnet", weights=str(weights), mode="finetune", epochs=1, head_epochs=1,
                            unfreeze="1", cache_dir=str(cache), **FAST)
    tuned.fit(data, out=tmp_path / "finetune")
    loaded = ImageClassifier.load(tmp_path / "finetune", verbose=False)
    assert loaded.spec.kind == "finetuned" and loaded.spec.arch == "torchvision/alexnet"
    base = torchvision.models.alexnet(weights=None)
    base.load_state_dict(torch.load(weights, weights_only=True))
    params = loaded.model.base.state_dict()
    assert torch.equal(params["features.0.weight"], base.features[0].weight)  # below the top stage: frozen
    assert not torch.equal(params["classifier.4.weight"], base.classifier[4].weight)  # fc7: trained
