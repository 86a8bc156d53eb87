"""Trainable networks: a pretrained base with a new head, and the from-scratch baselines.

A ``Classifier`` keeps its base in inference mode at all times, so BatchNorm statistics of the pretrained base
are never updated (the mistake Keras users keep hitting), whether its weights are frozen or fine-tuned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tlearn.config import TlearnError


def make_head(num_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.2) -> nn.Sequential:
    """Dropout + Linear, or with ``hidden`` > 0: Dropout + Linear + ReLU + Dropout + Linear (the Keras tutorials'
    ``Dense(256, relu)`` head)."""
    if hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, hidden), nn.ReLU(),
                             nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))


class Classifier(nn.Module):
    """Images → logits through a timm base and a head. (B, 3, H, W) -> (B, F) -> (B, C)."""

    def __init__(self, base: nn.Module, head: nn.Module):
        super().__init__()
        self.base, self.head = base, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The base's pooled features, which the head takes: (B, 3, H, W) -> (B, F)."""
        return self.base.forward_head(self.base.forward_features(x), pre_logits=True)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        self.base.eval()  # pretrained BatchNorm statistics and stochastic depth stay as they are
        return self


class Embedded(nn.Module):
    """A whole network's logits and the features its last layer (a fine-tuned base's head) takes, side by side:
    (B, 3, H, W) -> (B, C + F). The novelty score needs both, from one pass."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net.embed(x)
        return torch.cat([self.net.classify(z).float(), z.float()], 1)


def embed_width(net: nn.Module) -> int:
    """How many features ``net.embed`` gives: the input width of the layer that takes them."""
    last = net.head if isinstance(net, Classifier) else net.linear if isinstance(net, PixelLinear) else \
        net.classifier[-1]
    first = next(m for m in last.modules() if isinstance(m, nn.Linear))
    return first.in_features


def stages(model: nn.Module) -> list[list[str]]:
    """Parameter names of the base grouped by its own reduction stages (timm's ``feature_info``), stem first.

    Stage i holds every parameter registered after stage i-1's module and up to the end of stage i's module;
    anything after the last stage module (e.g. EfficientNet's conv_head) joins the last stage. The classifier
    is left out.
    """
    names = [n for n, _ in model.named_modules()]
    position = {n: i for i, n in enumerate(names)}
    ends = []
    for info in model.feature_info:
        prefix = info["module"]
        ends.append(max(i for n, i in position.items() if n == prefix or n.startswith(prefix + ".")))
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    groups: list[list[str]] = [[] for _ in ends]
    for name, _ in model.named_parameters():
        if name.startswith(classifier + "."):
            continue
        owner = position[name.rsplit(".", 1)[0]] if "." in name else 0
        stage = next((i for i, end in enumerate(ends) if owner <= end), len(ends) - 1)
        groups[stage].append(name)
    return [g for g in groups if g]


def unfreeze_groups(model: nn.Module, unfreeze: str, lr: float, lr_mults: tuple[float, float]) -> list[dict]:
    """Make the top ``unfreeze`` stages trainable and return their optimizer groups: the top stage at
    ``lr * lr_mults[0]``, deeper unfrozen stages at ``lr * lr_mults[1]``; the rest stays frozen."""
    groups = stages(model)
    n = len(groups) if unfreeze == "all" else min(int(unfreeze), len(groups))
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    out = []
    for depth, names in enumerate(reversed(groups[-n:])):
        for name in names:
            params[name].requires_grad_(True)
        out.append({"params": [params[name] for name in names], "lr": lr * lr_mults[0 if depth == 0 else 1],
                    "name": f"base stage {len(groups) - depth}/{len(groups)}"})
    return out


class TopStage(nn.Module):
    """The top of a pretrained base: what enters its last stage -> pooled features, (B, C, H, W) -> (B, F). It
    holds the base's own modules, so training it trains the base. Like ``Classifier``'s base it stays in inference
    mode (BatchNorm statistics frozen) even while it learns."""

    def __init__(self, modules: list[nn.Module], pool: nn.Module):
        super().__init__()
        self.stage, self.pool = nn.Sequential(*modules), pool

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage(a))

    def train(self, mode: bool = True) -> TopStage:
        return super().train(False)


class TopSplit(nn.Module):
    """A base's pooled features and what enters its top stage, from one pass: (B, 3, H, W) -> ((B, F), (B, C, H,
    W)). The features are the base's own (``lower`` then ``top`` is ``forward_features`` then the pooling)."""

    def __init__(self, lower: nn.Module, top: TopStage):
        super().__init__()
        self.lower, self.top = lower, top

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lower(x)
        return self.top(a), a


def split_top(model: nn.Module) -> tuple[str, nn.Module, TopStage] | None:
    """A timm base split where its last stage begins: (the split's name, the lower part, the top stage), each
    made of the model's own modules; None for an architecture without a known split. EfficientNets (Lite
    included): the last block stage, conv_head and bn2; ResNets: layer4."""
    if all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
        lower = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:-1])
        return f"blocks.{len(model.blocks) - 1}", lower, TopStage([model.blocks[-1], model.conv_head, model.bn2],
                                                                   model.global_pool)
    if all(hasattr(model, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer3", "layer4", "global_pool")):
        lower = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2,
                              model.layer3)
        return "layer4", lower, TopStage([model.layer4], model.global_pool)
    return None


# --- from-scratch baselines -----------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Deep Learning with Python's convnet: four conv/max-pool blocks (32-64-128-128), dropout 0.5, dense 512.
    (B, 3, 150, 150) -> (B, C)."""

    def __init__(self, num_classes: int):
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128), (128, 128)):
            blocks += [nn.Conv2d(c_in, c_out, 3), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)  # 150 -> 148 -> 74 -> 72 -> 36 -> 34 -> 17 -> 15 -> 7
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(128 * 7 * 7, 512), nn.ReLU(),
                                        nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the last layer takes (the penultimate layer's output): (B, 3, H, W) -> (B, F)."""
        return self.classifier[:-1](self.features(x))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier[-1](z)


class AlexNet(nn.Module):
    """AlexNet at 227 px with BatchNorm on the input. (B, 3, 227, 227) -> (B, C)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.BatchNorm2d(3),
            nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(), nn.MaxPool2d(3, 2),            # 227 -> 55 -> 27
            nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),          # 27 -> 13
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),         # 13 -> 6
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the last layer takes (the penultimate layer's output): (B, 3, H, W) -> (B, F)."""
        return self.classifier[:-1](self.features(x))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier[-1](z)


class PixelLinear(nn.Module):
    """Logistic regression on downscaled pixels: (B, 3, 32, 32) -> (B, 3072) -> (B, C)."""

    def __init__(self, num_classes: int, size: int = 32):
        super().__init__()
        self.linear = nn.Linear(3 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels, which is what this model's only layer takes: (B, 3, 32, 32) -> (B, 3072)."""
        return x.flatten(1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


@dataclass(frozen=True)
class ScratchEntry:
    build: Callable[[int], nn.Module]
    size: int
    about: str

    def preprocessing(self) -> dict[str, Any]:
        """Plain [0, 1] pixels (Keras's ``rescale=1./255``), resized with the aspect ratio kept, centre-cropped."""
        return {"input_size": [3, self.size, self.size], "interpolation": "bilinear", "mean": [0.0, 0.0, 0.0],
                "std": [1.0, 1.0, 1.0], "crop_pct": 1.0, "crop_mode": "center"}


SCRATCH: dict[str, ScratchEntry] = {
    "small-cnn": ScratchEntry(SmallCNN, 150, "Deep Learning with Python's convnet, 150 px"),
    "alexnet": ScratchEntry(AlexNet, 227, "AlexNet with input BatchNorm, 227 px"),
    "logreg-pixels": ScratchEntry(PixelLinear, 32, "logistic regression on 32x32 pixels (scikit-learn)"),
}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def summary(model: nn.Module, input_size: list[int]) -> list[dict[str, Any]]:
    """Keras's ``model.summary()``: one row per top-level layer (and per block of a Sequential), in the order the
    forward pass runs them, with its output shape, parameter count and whether it trains. Layers the forward
    pass never runs (e.g. a timm base's own ImageNet classifier) are left out."""
    rows: dict[str, dict[str, Any]] = {}
    hooks = []

    def watch(name: str, module: nn.Module) -> None:
        params = list(module.parameters())

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else "-"
            rows.setdefault(name, {"layer": name, "type": type(module).__name__, "output": shape,
                                   "params": sum(p.numel() for p in params),
                                   "trainable": sum(p.numel() for p in params if p.requires_grad)})

        hooks.append(module.register_forward_hook(hook))

    def walk(prefix: str, module: nn.Module, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            container = isinstance(child, nn.Sequential | nn.ModuleList) and len(child) > 1 and depth < 2
            if container or (isinstance(module, Classifier) and child is module.base):
                walk(f"{full}.", child, depth + 1)
            else:
                watch(full, child)

    walk("", model, 0)
    # shapes only: the forward pass runs on the meta device, so it computes nothing and works wherever the
    # model's parts live (a base on the GPU and a head on the CPU included)
    meta = {name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(),
                                                                      *model.named_buffers()]}
    was_training = model.training
    try:
        with torch.no_grad():
            torch.func.functional_call(model.eval(), meta, (torch.zeros(1, *input_size, device="meta"),))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return list(rows.values())


def fold_logreg(X: np.ndarray, y: np.ndarray, num_classes: int, seed: int, balanced: bool = False) -> nn.Linear:
    """Fit scikit-learn's LogisticRegression (C=1) on standardised ``X`` and return the equivalent nn.Linear."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(max_iter=2000, random_state=seed, class_weight="balanced" if balanced else None)
    return logreg_linear(clf.fit(scaler.transform(X), y), num_classes, scaler)


def logreg_linear(clf: Any, num_classes: int, scaler: Any = None) -> nn.Linear:
    """A fitted scikit-learn LogisticRegression as the nn.Linear whose softmax is its ``predict_proba``: a binary
    one (a single logit z for class 1) as [0, z], since softmax([0, z]) == sigmoid(z); with ``scaler`` (a fitted
    StandardScaler), the standardisation folded into the weights. The one conversion tlearn has."""
    coef, bias = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, bias[0]])
    missing = sorted(set(range(num_classes)) - set(clf.classes_.tolist()))
    if missing:  # a check, not an assert: it must hold under python -O too
        raise TlearnError(f"classes {missing} (by index) have no image in the training split, so a logistic "
                          "regression cannot learn them: add images to those class folders, or lower --val/--test")
    if scaler is not None:  # (x - mean) / scale @ W.T + b  ==  x @ (W / scale).T + (b - W @ (mean / scale))
        coef = coef / scaler.scale_
        bias = bias - coef @ scaler.mean_
    linear = nn.Linear(coef.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(coef))
        linear.bias.copy_(torch.from_numpy(bias))
    return linear


Linear = tuple[np.ndarray, np.ndarray]  # (weights (C, F), biases (C,)) of one regression per label


def fit_ovr(X: np.ndarray, Y: np.ndarray, C: float, seed: int) -> Linear:
    """One L2-regularised logistic regression per label column of ``Y`` (0/1), all solved at once: the objective
    of scikit-learn's ``LogisticRegression(C)`` for each label (C x the summed log-loss + half the squared weights,
    the bias not penalised), divided by C x N and summed over labels, minimised by L-BFGS in float64. A constant
    column gets its smoothed log-odds and no weights."""
    n = len(Y)
    W, b = np.zeros((Y.shape[1], X.shape[1])), np.zeros(Y.shape[1])
    positives = Y.sum(0)
    varied = np.flatnonzero((positives > 0) & (positives < n))
    b[positives == 0], b[positives == n] = math.log(0.5 / (n + 0.5)), math.log((n + 0.5) / 0.5)
    if not len(varied):
        return W, b
    Xt, Yt = torch.from_numpy(np.asarray(X, dtype=np.float64)), torch.from_numpy(np.asarray(Y[:, varied], np.float64))
    weights = torch.zeros(len(varied), X.shape[1], dtype=torch.float64, requires_grad=True)
    rate = (Yt.mean(0) * n + 0.5) / (n + 1.0)
    bias = torch.log(rate / (1 - rate)).clone().requires_grad_(True)
    solver = torch.optim.LBFGS([weights, bias], lr=1.0, max_iter=1000, tolerance_grad=1e-7, tolerance_change=1e-12,
                               history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        solver.zero_grad()
        z = Xt @ weights.T + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, Yt, reduction="sum") / n \
            + (weights ** 2).sum() / (2 * C * n)
        loss.backward()
        return loss

    solver.step(objective)
    W[varied], b[varied] = weights.detach().numpy(), bias.detach().numpy()
    return W, b


def ovr_logits(linear: Linear, X: np.ndarray) -> np.ndarray:
    return X @ linear[0].T + linear[1]
