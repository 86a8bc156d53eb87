"""torchvision's SqueezeNet 1.1 and AlexNet as pretrained bases, with the interface tlearn uses of a timm model.

timm has neither. These adapters keep torchvision's module names (``features``, ``classifier``), so torchvision's
state-dict files load as they are, and add what tlearn calls on a timm base: ``forward_features`` (the last
convolutional feature map, which Grad-CAM weighs), ``forward_head(x, pre_logits=True)`` (the features a head is
trained on), ``get_classifier``, ``num_features``, ``pretrained_cfg`` (the preprocessing of torchvision's ImageNet
weights: resize 256, centre crop 224, bilinear) and ``feature_info`` (the stages that fine-tuning unfreezes).

- SqueezeNet 1.1: the features are the last Fire module's 512 maps, average-pooled (13x13 at 224 px).
- AlexNet: the features are fc7, the 4096 activations before the ImageNet classifier (the "DeCAF" features of
  the classic transfer-learning papers); its feature map for heatmaps is the last convolutional block's (256x6x6).

Weights: ``pretrained=True`` loads torchvision's ImageNet weights through its weight enums (downloaded once into
torch's hub cache; offline, a file already there is used), or ``file`` a local state dict of torchvision's layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHS = {"torchvision/squeezenet1_1": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
         "torchvision/alexnet": ("alexnet", "AlexNet_Weights")}
PREPROCESSING = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                 "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}


def is_arch(arch: str) -> bool:
    return arch in ARCHS


class TorchvisionBase(nn.Module):
    """A torchvision classifier with timm's base interface (see the module docstring)."""

    def __init__(self, arch: str):
        super().__init__()
        import torchvision.models as tvm

        net = getattr(tvm, ARCHS[arch][0])(weights=None)
        self.arch = arch
        self.features, self.classifier = net.features, net.classifier
        self.avgpool = getattr(net, "avgpool", None)
        squeeze = arch.endswith("squeezenet1_1")
        self.num_features = 512 if squeeze else 4096
        # the ImageNet classifier (left out of the base) and the modules that end each stage (for --unfreeze):
        # AlexNet's fc6 and fc7 are its last stage, its classifier only the final Linear
        self.pretrained_cfg = {**PREPROCESSING, "architecture": arch,
                               "classifier": "classifier" if squeeze else "classifier.6"}
        ends = ["features.2", "features.5", "features.8", "features.12"] if squeeze else \
            ["features.2", "features.5", "features.12", "classifier"]
        self.feature_info = [{"module": m, "num_chs": 0, "reduction": 0} for m in ends]
        self.default_cfg = self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.avgpool is None:  # SqueezeNet: its classifier is a 1x1 convolution and a global pool
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1) if pre_logits else \
                torch.flatten(self.classifier(x), 1)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier[:-1](x) if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier if self.avgpool is None else self.classifier[-1]


def create(arch: str, pretrained: bool = False, file: Path | None = None) -> TorchvisionBase:
    """The base with random weights, torchvision's ImageNet weights, or a local state dict of its layout."""
    model = TorchvisionBase(arch)
    if file is not None:
        model.load_state_dict(_read(file), strict=True)
    elif pretrained:
        import torchvision.models as tvm

        weights = getattr(tvm, ARCHS[arch][1]).IMAGENET1K_V1
        model.load_state_dict(weights.get_state_dict(progress=False), strict=True)
    return model


def weights_url(arch: str) -> str:
    import torchvision.models as tvm

    return getattr(tvm, ARCHS[arch][1]).IMAGENET1K_V1.url


def _read(file: Path) -> dict[str, Any]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)
