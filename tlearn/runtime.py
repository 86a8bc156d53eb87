"""How a frozen network runs over a folder of images on this machine: the engine (PyTorch or ONNX Runtime), its
precision, and how many lanes feed it.

``--runtime auto`` and ``--precision auto`` pick per machine:

- on a CUDA device: PyTorch, channels-last, bf16 (or fp16) autocast, big batches, decoding in parallel lanes;
- on a CPU: ONNX Runtime in fp32, which on the 2-core reference machine is as fast as PyTorch's bf16 autocast
  and exact (features agree with PyTorch's fp32 ones to about 1e-5), with one single-threaded lane per core;
- on a CPU without onnxruntime (or if the export fails): PyTorch with bf16 autocast where the CPU has native bf16
  instructions (AVX512-BF16 or AMX), else fp32.

Batches are small on a CPU (8): the activations of a batch then stay in the cache, which is about twice as fast as
batch 32. BENCHMARKS.md has the measurements behind each choice.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlearn import graph
from tlearn.backbones import Backbone
from tlearn.config import RuntimeConfig, TlearnError, TrainConfig
from tlearn.features import FeatureCache, Features, cpu_cores, extract, extract_views
from tlearn.fileio import onnx_export_path
from tlearn.images import crop_resize_fits, eval_transform
from tlearn.models import TopSplit, split_top
from tlearn.train import Precision, resolve_precision

log = logging.getLogger("tlearn")


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (x86 AVX512-BF16 or AMX), where bf16 autocast pays."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def onnxruntime_available() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except ValueError:  # a module entry without a spec (e.g. blocked with sys.modules["onnxruntime"] = None)
        return False


_THREADS = threading.Lock()  # held while PyTorch's process-wide thread count is set for one extraction


@dataclass
class Engine:
    """A frozen network as a batch function, and how to feed it: ``extract(paths)`` decodes, preprocesses and
    runs ``lanes`` batches of ``batch_size`` at a time."""

    forward: Callable[[torch.Tensor], torch.Tensor | np.ndarray]
    preprocessing: dict
    dim: int
    runtime: str  # torch | onnx
    precision: str  # fp32 | bf16 | fp16
    device: torch.device
    lanes: int
    batch_size: int
    threads: int  # intra-op threads per lane (CPU)
    reason: str = ""

    def describe(self) -> str:
        where = "CPU" if self.device.type == "cpu" else str(self.device)
        return (f"{self.runtime} {self.precision} on {where}, {self.lanes} lane(s) x batch {self.batch_size}"
                + (f" ({self.reason})" if self.reason else ""))

    def extract(self, paths: Sequence[Path], cache: FeatureCache | None = None, progress: bool = True,
                view: str = "center") -> Features:
        """Outputs for ``paths`` in one of ``features.VIEWS`` (the centre crop by default); ``cache`` must hold
        that view's entries."""
        if cache is not None and cache.view != view:
            raise ValueError(f"a cache of view {cache.view!r} cannot hold view {view!r}")
        with self._threads():
            return extract(paths, self.forward, transform=eval_transform(self.preprocessing, view), dim=self.dim,
                           cache=cache, batch_size=self.batch_size, lanes=self.lanes, progress=progress)

    def mirrors(self) -> bool:
        """Whether the mirror view can be the centre view's tensor flipped (``features.extract_mirrored``): the
        preprocessing resamples the crop first and flips after, so the two are the same pixels."""
        return crop_resize_fits(self.preprocessing)

    def extract_views(self, paths: Sequence[Path], views: tuple[str, ...], caches: list[FeatureCache | None],
                      tops: list[FeatureCache | None] | None = None, progress: bool = True) -> list[Features]:
        """Outputs for ``paths`` in each of ``views``, into ``caches`` (one per view, or None). The centre and mirror
        views are one pass where ``mirrors()`` (each image decoded once, its mirror the tensor flipped); else a pass
        a view. With ``tops`` (one per view), this is a ``top_engine``, whose forward also gives the top stage's
        input, and those go to ``tops``."""
        tops = tops or [None] * len(views)
        with self._threads():
            if views == ("center", "flip") and self.mirrors():
                return extract_views(paths, self.forward, transform=eval_transform(self.preprocessing), dim=self.dim,
                                     caches=caches, flips=[False, True], tops=tops, batch_size=self.batch_size,
                                     lanes=self.lanes, progress=progress)
            return [extract_views(paths, self.forward, transform=eval_transform(self.preprocessing, view),
                                  dim=self.dim, caches=[cache], flips=[False], tops=[top], batch_size=self.batch_size,
                                  lanes=self.lanes, progress=progress)[0]
                    for view, cache, top in zip(views, caches, tops, strict=True)]

    def rate(self, paths: Sequence[Path]) -> float:
        """Measured images per second of decoding and the forward pass on (a few of) ``paths``, without the
        cache: one warm-up batch, then two batches per lane."""
        n = 2 * self.batch_size * self.lanes
        self.extract(paths[:self.batch_size], progress=False)
        sample = list(paths[self.batch_size:self.batch_size + n]) or list(paths[:n])
        feats = self.extract(sample, progress=False)
        return max(feats.extracted, 1) / max(feats.seconds, 1e-3)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """PyTorch's intra-op threads per lane while extracting (lanes x threads = cores), restored after. The
        setting is process-wide, so extractions on the CPU with PyTorch take turns (each uses every core already):
        two at once would each restore what the other set."""
        if self.runtime != "torch" or self.device.type != "cpu":
            yield
            return
        with _THREADS:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(before)


def _lanes(device: torch.device, runtime: RuntimeConfig) -> tuple[int, int, int]:
    """(lanes, batch size, threads per lane). On a CPU one lane per core, each single-threaded, batch 8; on a GPU
    up to 8 decoding lanes feeding batches of 64."""
    cores = cpu_cores()
    if device.type == "cpu":
        lanes = max(1, runtime.workers if runtime.workers is not None else cores)
        return lanes, runtime.extract_batch_size or 8, max(1, cores // lanes)
    lanes = max(1, runtime.workers if runtime.workers is not None else min(cores, 8))
    return lanes, runtime.extract_batch_size or 64, torch.get_num_threads()


def net_engine(net: nn.Module, preprocessing: dict, dim: int, run: Precision, runtime: RuntimeConfig) -> Engine:
    """A whole network (a fine-tuned base + head, a scratch model, a base with its ImageNet head) in PyTorch."""
    net = net.to(run.device, memory_format=torch.channels_last).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with run.autocast():
            return net(run.prepare(x))

    lanes, batch_size, threads = _lanes(run.device, runtime)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run.dtype]
    return Engine(forward, preprocessing, dim, "torch", precision, run.device, lanes, batch_size, threads)


def base_engine(bb: Backbone, train: TrainConfig, runtime: RuntimeConfig, top: bool = False) -> Engine:
    """The frozen pretrained base as a feature extractor, in the runtime and precision the flags ask for, or the
    fastest exact one for this machine (see the module docstring). With ``top``, its forward gives (features,
    what enters the top stage) from one pass (``models.split_top``; the base must have a split)."""
    device = resolve_precision(train.device, "fp32").device
    want, precision = runtime.runtime, train.precision
    if want == "onnx" and device.type != "cpu":
        raise TlearnError(f"--runtime onnx runs on the CPU; with --device {train.device} use --runtime torch or auto")
    if want == "onnx" and precision in ("bf16", "fp16"):
        raise TlearnError(f"--runtime onnx runs the base in fp32; for --precision {precision} use --runtime torch")
    if want != "torch" and device.type == "cpu" and precision in ("auto", "fp32"):
        reason = "auto: exact and fastest on CPUs" if want == "auto" else ""
        if want == "onnx" or onnxruntime_available():
            try:
                return _onnx_engine(bb, runtime, reason, top)
            except TlearnError as e:
                if want == "onnx":
                    raise
                log.warning(f"{e}; running the base in PyTorch instead")
        else:
            log.info("onnxruntime is not installed: the base runs in PyTorch")
    if precision == "auto" and device.type == "cpu":
        precision = "bf16" if cpu_has_bf16() else "fp32"
    run = resolve_precision(train.device, precision)
    engine = net_engine(top_split(bb) if top else Pooled(bb.model), bb.preprocessing, bb.num_features, run, runtime)
    if train.precision == "auto" and device.type == "cpu":
        engine.reason = "auto: this CPU has native bf16" if precision == "bf16" else "auto: no native bf16 here"
    return engine


def top_split(bb: Backbone) -> TopSplit:
    """The base as (features, top-stage input) from one pass; a TlearnError names the base if it has no split."""
    split = split_top(bb.model)
    if split is None:
        raise TlearnError(f"{bb.name} ({bb.arch}) has no known top stage to fine-tune on cached activations "
                          "(EfficientNets and ResNets do)")
    return TopSplit(split[1], split[2])


class FrozenFeatures(nn.Module):
    """An engine's frozen base as a module without parameters, for training a head on augmented images (mode
    ``frozen``): (B, 3, H, W) -> (B, F) pooled features, no gradient, on the device of its input."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.engine.forward(x.cpu().contiguous() if self.engine.runtime == "onnx" else x)
        return torch.as_tensor(out, device=x.device).float()


class Pooled(nn.Module):
    """A timm model's pooled pre-logits features as its output (what the head is trained on)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class FeatureMap(nn.Module):
    """A timm model's last convolutional feature map as its output (what Grad-CAM weighs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def export_onnx(bb: Backbone, cache_dir: str | Path | None = None, output: str = "features") -> Path:
    """The base exported to ONNX once per weights identity and PyTorch version, under the cache folder, with its
    pooled ``features`` as output, or its last feature ``map``, or (``top``) the features and what enters its top
    stage.

    The export is checked against PyTorch's fp32 output on a random batch before it is kept, so a wrong graph is
    never used. It runs on a copy of the model: the exporter leaves the module it is given in training mode.
    """
    identity = bb.identity() if output == "features" else {**bb.identity(), "output": output}
    path = onnx_export_path(cache_dir, bb.name, identity)
    if path.exists():
        return path
    model = copy.deepcopy(bb.model).float().cpu().to(memory_format=torch.contiguous_format)
    if output == "top":
        split = split_top(model)
        if split is None:
            raise TlearnError(f"{bb.name} has no known top stage")
        module, outputs = TopSplit(split[1], split[2]).eval(), ["features", "top"]
    else:
        module, outputs = (Pooled if output == "features" else FeatureMap)(model).eval(), [output]
    x = torch.randn(2, *bb.preprocessing["input_size"], generator=torch.Generator().manual_seed(0))
    return graph.export_checked(module, (x,), path, ["image"], outputs, what=bb.name)


def _onnx_engine(bb: Backbone, runtime: RuntimeConfig, reason: str, top: bool = False) -> Engine:
    if not onnxruntime_available():
        raise TlearnError("--runtime onnx needs onnxruntime (it is not installed): pip install onnxruntime, or use "
                         "--runtime torch")
    lanes, batch_size, threads = _lanes(torch.device("cpu"), runtime)
    # exported once per machine and weights; after that only a path
    path = export_onnx(bb, runtime.cache_dir, "top") if top else export_onnx(bb, runtime.cache_dir)
    session = _Session(bb, runtime.cache_dir, path, threads, "top" if top else "features")
    return Engine(session.run, bb.preprocessing, bb.num_features, "onnx", "fp32", torch.device("cpu"), lanes,
                  batch_size, threads, reason)


def map_trunk(bb: Backbone, runtime: RuntimeConfig, device: torch.device
              ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The base's last feature map through ONNX Runtime, where extraction would run the base there too (on a CPU,
    with onnxruntime, ``--runtime`` not torch): about 2.5 times as fast as PyTorch on the reference CPU, which
    keeps a heatmap within a few times a prediction's cost. None: PyTorch runs it (``Explainer``'s default)."""
    if device.type != "cpu" or runtime.runtime == "torch" or not onnxruntime_available():
        return None
    try:
        path = export_onnx(bb, runtime.cache_dir, output="map")
    except TlearnError as e:
        log.info(f"{e}; PyTorch computes its feature maps")
        return None
    session = graph.session(path, threads=cpu_cores())  # one call at a time, for a few images: every core on it
    return lambda x: torch.from_numpy(session.run(None, {"image": x.cpu().numpy()})[0])


class _Session:
    """An ONNX Runtime session of the exported base, opened when the first batch comes (a run whose features
    are all cached never opens it), and exported again if the file on disk cannot be loaded."""

    def __init__(self, bb: Backbone, cache_dir: str | Path | None, path: Path, threads: int,
                 output: str = "features"):
        self.bb, self.cache_dir, self.path, self.threads, self.output = bb, cache_dir, path, threads, output
        self.session = None
        self.lock = threading.Lock()

    def _open(self) -> Any:
        try:
            return graph.session(self.path, self.threads, inter_threads=1)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
            log.warning(f"{self.path} cannot be loaded ({e}); exporting the base again")
            self.path.unlink(missing_ok=True)
            self.path = export_onnx(self.bb, self.cache_dir, self.output)
            return graph.session(self.path, self.threads, inter_threads=1)

    def run(self, x: torch.Tensor) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        with self.lock:  # lanes call this from several threads; the first opens the session
            if self.session is None:
                self.session = self._open()
        out = self.session.run(None, {"image": x.numpy()})
        return out[0] if self.output != "top" else (out[0], out[1])
