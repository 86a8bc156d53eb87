"""Where the evidence lies: Grad-CAM heatmaps of a trained classifier's predictions, mapped back onto the photo.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the last convolutional feature map by the gradient of a
class's score, averaged over the map, sums the channels and keeps the positive part. The score here is the
class's probability, as in Deep Learning with Python's Grad-CAM (whose top layer is the softmax): its gradient
points where the gradient of the class's logit minus the others' (weighted by their probabilities) points, and
that margin is what tlearn differentiates, because it stays exact where the probability rounds to 1. A raw logit
would not do: with two classes, a head may put all the evidence in one logit and its negative in the other.
Where the head is one linear layer on globally pooled features, the gradient is that margin's weight row, so
Grad-CAM is CAM (Zhou et al., 2016) there; a dense head gets it through its hidden layer.

torchcam's ``GradCAM`` does the hooking and the weighting. Its dependencies (torch, NumPy, Pillow, matplotlib) are
tlearn's own, so it costs nothing to install; pytorch-grad-cam would bring OpenCV, SciPy, ttach and tqdm for the
same few lines.

Every kind of run is explained on its own last map: a head on a frozen base (features or frozen mode) and a
fine-tuned one on the base's, a scratch CNN on its last convolutional block's. A head on several concatenated
bases gets one map per base, each computed on that base's own input and summed once mapped back.

The maps are computed on exactly what prediction computes: each of the run's views (the centre crop, and its
mirror image where the head was trained on both; the mirrored map is mirrored back) of each base's own crop,
with the views' mean logits. Each map is then spread back over the crop's box in the original image, so the
heatmap has the photo's size and is zero outside what the model saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tlearn.artifact import ModelSpec, load_model, read_run
from tlearn.backbones import Backbone, load_recorded
from tlearn.calibrate import probabilities
from tlearn.config import RuntimeConfig, TlearnError
from tlearn.evaluate import top_classes
from tlearn.extractor import Extractor
from tlearn.images import VIEWS, ImageDecodeError, crop_box, eval_transform, load_image

CPU = torch.device("cpu")
BATCH = 8  # images per forward pass; their heatmaps have the photos' size, so they are made a few at a time


Trunk = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, K, h, w): images -> last feature map


@dataclass
class Part:
    """One convolutional trunk of a classifier: images -> its last feature map -> pooled features."""

    trunk: Trunk
    pool: Callable[[torch.Tensor], torch.Tensor]  # (B, K, h, w) -> (B, F), or what the head flattens itself
    preprocessing: dict[str, Any]


class Mapped(nn.Module):
    """The classifier with each part's last feature map passing through its own identity layer (``maps.i``), the
    layer torchcam hooks. The trunks run without autograd and the map is a fresh leaf, so the backward pass covers
    only the pooling and the head."""

    def __init__(self, parts: list[Part], head: nn.Module):
        super().__init__()
        self.parts, self.head = parts, head
        self.maps = nn.ModuleList(nn.Identity() for _ in parts)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for part, layer, x in zip(self.parts, self.maps, inputs, strict=True):
            with torch.no_grad():
                fmap = part.trunk(x)
            pooled.append(part.pool(layer(fmap.detach().float().requires_grad_())))
        features = pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)
        head_device = next(self.head.parameters()).device
        return self.head(features.to(head_device))  # (B, C) logits


def parts_of(spec: ModelSpec, model: nn.Module, bases: list[nn.Module], preprocessings: list[dict[str, Any]],
             trunks: list[Trunk | None] | None = None) -> tuple[list[Part], nn.Module]:
    """The parts and the head of a trained classifier: ``model`` is the head (kind 'head', on ``bases``, whose
    maps ``trunks`` may compute instead of PyTorch), the fine-tuned ``Classifier`` or the scratch network."""
    def timm_part(base: nn.Module, preprocessing: dict[str, Any], trunk: Trunk | None = None) -> Part:
        return Part(trunk or base.forward_features, lambda fmap: base.forward_head(fmap, pre_logits=True),
                    preprocessing)

    if spec.kind == "head":
        trunks = trunks or [None] * len(bases)
        return [timm_part(*part) for part in zip(bases, preprocessings, trunks, strict=True)], model
    if spec.kind == "finetuned":
        return [timm_part(model.base, spec.preprocessing)], model.head
    trunk = getattr(model, "features", None)
    if not isinstance(trunk, nn.Sequential) or not any(isinstance(m, nn.Conv2d) for m in trunk):
        raise TlearnError(f"a {spec.arch} run has no convolutional feature map to draw a heatmap from (it is a "
                          "linear model on pixels); explain a run of a pretrained base, small-cnn or alexnet")
    return [Part(trunk, lambda fmap: fmap, spec.preprocessing)], model.classifier


def spread(cells: int, lo: float, hi: float, pixels: int) -> np.ndarray:
    """(pixels, cells) bilinear weights that lay ``cells`` map cells spanning source pixels [lo, hi) back over a
    source axis of ``pixels`` pixels; pixels outside the span get nothing."""
    x = np.arange(pixels) + 0.5  # pixel centres
    u = np.clip((x - lo) / (hi - lo) * cells - 0.5, 0, cells - 1)  # in cell units, cell centres at 0, 1, ...
    i0 = np.floor(u).astype(int)
    i1, f = np.minimum(i0 + 1, cells - 1), (u - i0).astype(np.float32)
    weights = np.zeros((pixels, cells), np.float32)
    rows = np.arange(pixels)
    np.add.at(weights, (rows, i0), 1 - f)
    np.add.at(weights, (rows, i1), f)
    weights[(x < lo) | (x >= hi)] = 0
    return weights


def onto_image(cam: np.ndarray, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """A (h, w) map of the crop ``box`` (left, top, right, bottom) -> (height, width) over the whole image."""
    left, top, right, bottom = box
    return spread(cam.shape[0], top, bottom, height) @ cam @ spread(cam.shape[1], left, right, width).T


class Explainer:
    """Grad-CAM heatmaps of a trained classifier, in its own preprocessing, on the original images. The model is
    used where it is (its device, in float32); ``bases`` are the frozen bases of a head, with their preprocessings
    (default: those the run recorded).

    >>> explainer = Explainer(spec, model, bases)                  # doctest: +SKIP
    >>> result = next(explainer.explain([Path("bee.jpg")]))        # doctest: +SKIP
    >>> result["class"], result["heatmap"].shape                   # doctest: +SKIP
    ('bees', (375, 500))
    """

    def __init__(self, spec: ModelSpec, model: nn.Module, bases: list[nn.Module] | None = None,
                 preprocessings: list[dict[str, Any]] | None = None, trunks: list[Trunk | None] | None = None):
        self.spec, self.views = spec, spec.views
        # several labels an image: each label's temperature and threshold (None: one class an image)
        self.temperatures, self.thresholds = (None, None) if not spec.multi_label else \
            (np.array(spec.temperatures), np.array(spec.thresholds))
        preprocessings = preprocessings or [b["identity"]["preprocessing"] for b in spec.bases] or [spec.preprocessing]
        parts, head = parts_of(spec, model, bases or [], preprocessings, trunks)
        model.eval()  # as prediction runs it (AlexNet's BatchNorm, dropout); the trunks are not Mapped's modules
        self.net = Mapped(parts, head).eval()
        self.devices = [next(b.parameters()).device for b in (bases if spec.kind == "head" else [model])]

    def _inputs(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """One (N * V, 3, H, W) batch per part: each image in each of the run's views, image-major."""
        out = []
        for part, device in zip(self.net.parts, self.devices, strict=True):
            transforms = [eval_transform(part.preprocessing, view) for view in self.views]
            out.append(torch.stack([t(im) for im in images for t in transforms]).to(device))
        return out

    def heatmaps(self, images: list[Image.Image], class_index: int | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(N, C) logits (the views' mean, as prediction has them) and each image's heatmap: (height, width)
        floats in [0, 1], for class ``class_index`` or else the predicted class."""
        from torchcam.methods import GradCAM

        v = len(self.views)
        with GradCAM(self.net, [f"maps.{i}" for i in range(len(self.net.parts))]) as cam, torch.enable_grad():
            scores = self.net(self._inputs(images))  # (N * V, C): each view's logits
            logits = scores.reshape(len(images), v, -1).mean(1)  # (N, C), as prediction averages them
            wanted = np.full(len(images), class_index) if class_index is not None else probabilities(
                logits.detach().cpu().numpy(), self.spec.temperature, self.temperatures).argmax(1)
            wanted = torch.as_tensor(wanted, device=logits.device)
            if self.thresholds is None:
                margin = _margin(logits / self.spec.temperature, wanted)  # (N,)
            else:  # a label's own logit: the log-odds of its sigmoid, which the other labels do not enter
                margin = logits.gather(1, wanted[:, None])[:, 0]
            # one row per view, each 1 / V of its image's margin: the gradient reaches every view's map
            rows = (margin / v).repeat_interleave(v)[:, None]  # (N * V, 1)
            maps = [m.cpu().numpy() for m in cam([0] * len(rows), rows, normalized=False)]
        heats = []
        for n, image in enumerate(images):
            heat = np.zeros((image.height, image.width), np.float32)
            for part, part_maps in zip(self.net.parts, maps, strict=True):  # (N * V, h, w) each
                for j, view in enumerate(self.views):
                    position, mirrored = VIEWS[view]
                    fmap = part_maps[n * v + j][:, ::-1] if mirrored else part_maps[n * v + j]
                    box = crop_box(part.preprocessing, image.width, image.height, position)
                    heat += onto_image(np.ascontiguousarray(fmap), box, image.width, image.height) / v
            top = heat.max()
            heats.append(heat / top if top > 0 else heat)
        return logits.detach().cpu().numpy(), heats

    def explain(self, paths: list[Path], class_name: str | None = None, top_k: int = 3,
                calibration: bool = True, with_image: bool = False) -> Iterator[dict[str, Any]]:
        """Per image, in order: ``{"path", "class", "probability", "heatmap", "predictions"}`` (``predictions``:
        the top ``top_k`` classes; probabilities temperature-scaled unless ``calibration`` is False), or
        ``{"path", "error"}`` for a file that cannot be decoded. ``with_image`` adds the decoded ``image``."""
        classes = self.spec.classes
        if class_name is not None and class_name not in classes:
            raise TlearnError(f"--class {class_name!r} is not one of this run's classes: {', '.join(classes)}")
        wanted = None if class_name is None else classes.index(class_name)
        for start in range(0, len(paths), BATCH):
            decoded, failed = {}, {}
            for path in paths[start:start + BATCH]:
                try:
                    decoded[path] = load_image(path)
                except ImageDecodeError as e:
                    failed[path] = str(e)
            if decoded:
                logits, heats = self.heatmaps(list(decoded.values()), wanted)
                proba = probabilities(logits, self.spec.temperature, self.temperatures, calibration)
            row_of = {path: i for i, path in enumerate(decoded)}  # rows of logits, heats and proba
            for path in paths[start:start + BATCH]:
                if path in failed:
                    yield {"path": str(path), "error": failed[path]}
                    continue
                i = row_of[path]
                (row,) = top_classes([path], {}, proba[i:i + 1], classes, top_k, labels=self.thresholds)
                k = int(proba[i].argmax()) if wanted is None else wanted
                yield {"path": str(path), "class": classes[k], "probability": float(proba[i, k]),
                       "heatmap": heats[i], **{key: v for key, v in row.items() if key != "path"},
                       **({"image": decoded[path]} if with_image else {})}


def run_explainer(run_dir: Path, model: nn.Module | None = None, base: Backbone | None = None,
                  cache_dir: str | Path | None = None) -> Explainer:
    """The explainer of a saved run: its model and, for a head, its frozen bases (with the weights the run
    recorded), each loaded from the run unless given, as the run writer gives them."""
    spec = read_run(run_dir).spec
    if model is None:
        _, model, _ = load_model(Path(run_dir))
    if spec.kind != "head":
        return Explainer(spec, model)
    names = spec.backbone.names()
    bases = [base] if base is not None and len(names) == 1 else \
        [load_recorded(spec.backbone, name, identity, cache_dir)
         for name, identity in zip(names, spec.weights_id.split("+"), strict=True)]
    return head_explainer(spec, model, bases, RuntimeConfig(cache_dir=str(cache_dir) if cache_dir else None),
                          bases[0].device or CPU)


def explainer_of(spec: ModelSpec, model: nn.Module, extractor: Extractor) -> Explainer:
    """The explainer of a model in memory: a whole network's own, or a head's on the frozen bases of its
    feature service."""
    if spec.kind != "head":
        return Explainer(spec, model)
    bases = [extractor.base(name) for name in extractor.names()]
    return head_explainer(spec, model, bases, extractor.runtime, extractor.run.device)


def head_explainer(spec: ModelSpec, head: nn.Module, bases: list[Backbone], runtime: RuntimeConfig,
                   device: torch.device = CPU) -> Explainer:
    """The explainer of a head on frozen ``bases`` (on ``device``): their maps come from ONNX Runtime where
    extraction would use it (``runtime.map_trunk``), else from PyTorch."""
    from tlearn.runtime import map_trunk

    return Explainer(spec, head, [b.model for b in bases], [b.preprocessing for b in bases],
                     [map_trunk(b, runtime, device) for b in bases])


def _margin(logits: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """(N, C), (N,) -> (N,): each row's logit of its wanted class minus the other classes' logits weighted by
    their softmax among themselves. Its gradient is that of the class's log-probability divided by 1 - p, so it
    points the same way and does not vanish when p rounds to 1."""
    own = F.one_hot(wanted, logits.shape[1]).bool()
    weights = torch.softmax(logits.detach().masked_fill(own, float("-inf")), 1)  # (N, C), 0 on the own class
    return logits[own] - (weights * logits).sum(1)
