"""A trained run → the whole classifier as one ONNX graph with a JSON sidecar, checked against PyTorch on real
images before it is written.

The graph, which any ONNX runtime can run without tlearn:
- inputs: ``image`` (``image_0``, ``image_1``, ... when bases of different input sizes are concatenated), each a
  float32 NCHW batch with a dynamic batch axis, preprocessed as the sidecar's ``inputs[i].preprocessing`` says
  (timm's evaluation transform: resize, centre crop, ``(pixels / 255 - mean) / std``);
- outputs: ``logits`` (B, C), averaged over the views the run predicts with (the centre crop and, where it was
  trained so, its mirror image, which the graph makes itself), ``probabilities``, softmax(logits / T) with
  the run's calibrated temperature T, and, for a run with a novelty scorer, ``novelty`` (B,): above the sidecar's
  ``novelty.threshold`` an image is unlike the training data (``tlearn.novelty``);
- several labels an image: ``probabilities`` are independent sigmoids, sigmoid(logits / T_k) with each label's
  temperature T_k, and ``labels`` (B, C) is 1.0 where a label's probability reaches its threshold (the sidecar
  lists both, ``temperatures`` and ``thresholds``).

``--int8`` quantizes the graph with ONNX Runtime's static quantization (QDQ, per-channel 7-bit weights,
activations calibrated on training images) and is never the default: it changes some answers (see
BENCHMARKS.md), so the export measures both and prints the two accuracies side by side.

>>> result = export("runs/demo", "runs/demo.onnx")        # doctest: +SKIP
>>> result.parity < 1e-4                                   # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlearn import __version__, graph
from tlearn.artifact import ModelSpec
from tlearn.config import DataConfig, InferenceConfig, RuntimeConfig, TlearnError
from tlearn.data import Sample, recorded_split, scan_labelled
from tlearn.extractor import Loaded, load_run
from tlearn.fileio import atomic_path, atomic_write_text
from tlearn.graph import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, read_sidecar, sidecar_path
from tlearn.images import ImageDecodeError, eval_transform, load_image
from tlearn.multilabel import decide, targets
from tlearn.novelty import graph_module
from tlearn.predictor import run_about
from tlearn.runtime import Pooled

log = logging.getLogger("tlearn")
PARITY_LIMIT = 1e-4  # max |probability difference| between PyTorch and ONNX Runtime (fp32)
NOVELTY_LIMIT = 0.01  # max |novelty difference| between them: a hundredth of a standard deviation
AGREEMENT_GOAL = 0.995  # int8: share of images whose top-1 class is the fp32 graph's
PARITY_IMAGES = 64  # images run through both PyTorch and ONNX Runtime
MAX_EVAL_IMAGES = 1000  # images the accuracies and speeds are measured on
CALIBRATION_IMAGES = 64  # training images that calibrate int8 activations


class WholeClassifier(nn.Module):
    """The saved classifier as one module: one image batch per input → (logits, probabilities).

    A head on frozen bases concatenates each base's pooled features (``slots[i]`` says which input base i reads);
    a fine-tuned or scratch network is the ``head`` itself, on input 0."""

    def __init__(self, bases: list[nn.Module], slots: list[int], head: nn.Module, mirror: bool,
                 temperature: float | torch.Tensor, novelty: nn.Module | None = None,
                 thresholds: torch.Tensor | None = None):
        super().__init__()
        self.bases, self.slots, self.head = nn.ModuleList(bases), slots, head
        self.mirror, self.temperature, self.novelty = mirror, temperature, novelty
        self.thresholds = thresholds  # several labels an image: (C,), with a temperature a label

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.mirror:  # the centre crop and its mirror image in one pass: (B, 3, H, W) -> (2B, 3, H, W)
            images = tuple(torch.cat([x, x.flip(-1)]) for x in images)
        if self.bases:  # (B, F_i) each, concatenated
            f = torch.cat([base(images[s]) for base, s in zip(self.bases, self.slots, strict=True)], 1)
            z = self.head(f)  # (B, C)
        else:  # a whole network: the features its last layer takes, then its logits
            f = self.head.embed(images[0])
            z = self.head.classify(f)
        if self.mirror:  # (2B, C) -> (B, C): the mean of the two views
            z, f = z.reshape(2, -1, z.shape[1]).mean(0), f.reshape(2, -1, f.shape[1]).mean(0)
        if self.thresholds is None:
            out = (z, torch.softmax(z / self.temperature, 1))
        else:  # a sigmoid a label
            out = (z, torch.sigmoid(z / self.temperature))
        if self.novelty is not None:
            out = (*out, self.novelty(f, z))
        if self.thresholds is not None:  # the labels given at their thresholds
            out = (*out, (out[1] >= self.thresholds).float())
        return out


@dataclass
class ExportResult:
    """What ``export`` wrote and measured."""

    path: Path
    sidecar: Path
    precision: str
    parity: float  # max |Δ probability| between PyTorch and ONNX Runtime fp32 on ``parity_images`` images
    parity_images: int
    real_images: bool  # False: no labelled images were found, so parity was checked on noise only
    split: str = ""  # what the accuracies were measured on
    evaluated: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)  # fp32 (and int8): ``measure``
    measure: str = "accuracy"  # several labels an image: "micro F1", at the thresholds
    speed: dict[str, float] = field(default_factory=dict)  # images per second in ONNX Runtime, batch 8
    agreement: float | None = None  # int8: share of images with the fp32 graph's top-1 class (or labels given)


def whole_classifier(run: Loaded) -> tuple[WholeClassifier, list[dict[str, Any]]]:
    """A loaded run's module for export (a CPU fp32 copy) and the preprocessing of each of its inputs."""
    spec = run.spec
    if not set(spec.views) <= {"center", "flip"}:
        raise TlearnError(f"this run predicts with views {spec.views}; an export holds the centre crop and its mirror")

    def cpu_copy(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).float().cpu().to(memory_format=torch.contiguous_format).eval()

    novelty = None if run.novelty is None else graph_module(run.novelty)
    temperature: float | torch.Tensor = spec.temperature
    thresholds = None
    if spec.multi_label:
        temperature = torch.tensor(spec.temperatures, dtype=torch.float32)
        thresholds = torch.tensor(spec.thresholds, dtype=torch.float32)

    if spec.kind == "head":
        bases = [run.extractor.base(name) for name in run.names]
        inputs: list[dict[str, Any]] = []
        for bb in bases:
            if bb.preprocessing not in inputs:
                inputs.append(bb.preprocessing)
        module = WholeClassifier([Pooled(cpu_copy(bb.model)) for bb in bases],
                                 [inputs.index(bb.preprocessing) for bb in bases], cpu_copy(run.model),
                                 "flip" in spec.views, temperature, novelty, thresholds)
        return module.eval(), inputs
    return WholeClassifier([], [], cpu_copy(run.model), "flip" in spec.views, temperature, novelty,
                           thresholds).eval(), [spec.preprocessing]


def export(run_dir: str | Path, out: str | Path | None = None, *, int8: bool = False,
           data: str | Path | DataConfig | None = None,
           overwrite: bool = False, weights: str | None = None, cache_dir: str | None = None,
           measure: bool = True) -> ExportResult:
    """Write the run's classifier to ``out`` (default: beside the run, ``RUN.onnx`` or ``RUN-int8.onnx``) and its
    sidecar (``out`` with ``.json``), after checking the graph against PyTorch. The accuracies are measured on
    ``data`` (a labelled folder, or a label file as a ``DataConfig`` reads it) or else the run's own test split
    (validation where it has none); ``measure=False`` checks parity only."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}{'-int8' if int8 else ''}.onnx"
    _claim(out, overwrite)
    run = load_run(run_dir, InferenceConfig(weights=weights, device="cpu", precision="fp32"),
                   RuntimeConfig(cache_dir=cache_dir), verbose=False)
    module, inputs = whole_classifier(run)
    names = ["image"] if len(inputs) == 1 else [f"image_{i}" for i in range(len(inputs))]
    evaluation, calibration, split = _real_images(run, data)
    if int8 and not evaluation:
        raise TlearnError("--int8 needs real images to calibrate and to measure its accuracy: pass --data FOLDER "
                          "(class sub-folders), or export where the run's data folder is")
    pictures, labels = _decode(evaluation[:MAX_EVAL_IMAGES if measure else PARITY_IMAGES], run.spec)
    arrays = _batches(pictures, inputs) if pictures else \
        [[np.random.default_rng(0).normal(size=(4, *pp["input_size"])).astype(np.float32) for pp in inputs]]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        outputs = ["logits", "probabilities"] + (["novelty"] if module.novelty is not None else []) + \
            (["labels"] if run.spec.multi_label else [])
        graph.write(module, [torch.from_numpy(x) for x in arrays[0]], fp32, names, outputs)
        session = graph.session(fp32)
        (parity, novelty), checked = _parity(module, session, names, outputs, arrays)
        if not (parity < PARITY_LIMIT and novelty < NOVELTY_LIMIT):
            raise TlearnError(f"the ONNX graph's probabilities differ from PyTorch's by up to {parity:.2g} (limit "
                              f"{PARITY_LIMIT:g}), and its novelty scores by up to {novelty:.2g} (limit "
                              f"{NOVELTY_LIMIT:g}), on {checked} images; nothing was written")
        result = ExportResult(out, sidecar_path(out), "int8" if int8 else "fp32", parity, checked, bool(pictures))
        if pictures and measure:
            result.split, result.evaluated = split, len(labels)
            reference = _measure(session, names, arrays, labels, "fp32", result, run.spec.thresholds)
        written = fp32
        if int8:
            written = int8_path = Path(tmp) / "int8.onnx"
            _quantize(fp32, int8_path, names, _batches(_decode(calibration, run.spec)[0], inputs))
            quantized = _measure(graph.session(int8_path), names, arrays, labels, "int8", result,
                                 run.spec.thresholds)
            result.agreement = float((_decided(quantized, run.spec.thresholds) == _decided(
                reference, run.spec.thresholds)).all(1).mean())
        with atomic_path(out) as target:
            Path(target).write_bytes(written.read_bytes())
    atomic_write_text(result.sidecar, json.dumps(_card(run, inputs, names, result), indent=2) + "\n")
    return result


def _claim(out: Path, overwrite: bool) -> None:
    """``out`` may be new, or an earlier export (its sidecar says so), or --overwrite is given."""
    if out.suffix.lower() != ".onnx":
        raise TlearnError(f"--out {out} must end in .onnx (the sidecar goes beside it as {sidecar_path(out).name})")
    if out.is_dir():
        raise TlearnError(f"--out {out} is a folder; give a file name ending in .onnx")
    taken = [p for p in (out, sidecar_path(out)) if p.exists() or p.is_symlink()]
    if not taken or overwrite:
        return
    try:
        read_sidecar(sidecar_path(out))
    except TlearnError:
        raise TlearnError(f"{taken[0]} exists and is not a tlearn export; choose another --out, or pass --overwrite "
                          "to replace it") from None


def _real_images(run: Loaded, data: str | Path | DataConfig | None) -> tuple[list[Sample], list[Sample], str]:
    """(images to check and measure on, training images to calibrate int8 with, what the first are)."""
    if data is not None:
        labelled = scan_labelled(data, run.spec.classes, run.spec.multi_label)
        for s in labelled.skipped:
            log.warning(f"skipped {s.path}: {s.reason}")
        samples = labelled.samples
        shown = data.label_file or data.path if isinstance(data, DataConfig) else str(data)
        return samples, samples[:: max(1, len(samples) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES], shown
    try:
        folder = recorded_split(run.run_dir, run.config)
    except TlearnError as e:
        log.warning(f"no real images to check the export on ({e}); pass --data FOLDER for a check on photos")
        return [], [], ""
    train = folder.split("train")
    split = "test" if folder.split("test") else "validation"  # a head may be refit on validation: test is unseen
    return folder.split(split), train[:: max(1, len(train) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES], split


def _decode(samples: list[Sample], spec: ModelSpec) -> tuple[list[Any], np.ndarray]:
    """The pictures that decode, and their classes (N,), or their 0/1 targets (N, C) for several labels an image."""
    pictures, kept = [], []
    for s in samples:
        try:
            pictures.append(load_image(s.path))
            kept.append(s)
        except ImageDecodeError:
            continue  # an unreadable image is no evidence either way
    if spec.multi_label:
        return pictures, targets([s.labels for s in kept], len(spec.classes))
    return pictures, np.array([s.label for s in kept])


def _decided(proba: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
    """The classes (N, 1) of softmax probabilities, or the labels given (N, C) at their ``thresholds``."""
    return proba.argmax(1)[:, None] if thresholds is None else decide(proba, np.array(thresholds))


def _batches(pictures: list[Any], inputs: list[dict[str, Any]], size: int = 8) -> list[list[np.ndarray]]:
    """Pictures → batches of ``size``, each one array per input, preprocessed as prediction does."""
    steps = [eval_transform(pp, array=True) for pp in inputs]
    return [[np.stack([t(p) for p in pictures[i:i + size]]) for t in steps] for i in range(0, len(pictures), size)]


def _parity(module: WholeClassifier, session: Any, names: list[str], outputs: list[str],
            arrays: list[list[np.ndarray]]) -> tuple[tuple[float, float], int]:
    """Max |Δ probability| and |Δ novelty| (0 without a scorer) between the module in PyTorch fp32 and the graph
    (whose ``outputs`` the module gives in order), on up to PARITY_IMAGES images."""
    worst, n = np.zeros(2), 0
    with torch.inference_mode():
        for batch in arrays:
            if n >= PARITY_IMAGES:
                break
            expected = dict(zip(outputs, (t.numpy() for t in module(*(torch.from_numpy(x) for x in batch))),
                                strict=True))
            got = dict(zip(outputs, session.run(outputs, dict(zip(names, batch, strict=True))), strict=True))
            worst = np.maximum(worst, [float(np.abs(expected[k] - got[k]).max()) if k in outputs else 0.0
                                       for k in ("probabilities", "novelty")])
            n += len(batch[0])
    return (float(worst[0]), float(worst[1])), n


def _measure(session: Any, names: list[str], arrays: list[list[np.ndarray]], labels: np.ndarray, precision: str,
             result: ExportResult, thresholds: list[float] | None = None) -> np.ndarray:
    """The graph's probabilities on every batch; its accuracy (several labels an image: micro F1 at the
    ``thresholds``) and images per second go into ``result``."""
    session.run(["probabilities"], dict(zip(names, arrays[0], strict=True)))  # warm-up
    start = time.perf_counter()
    proba = np.concatenate([session.run(["probabilities"], dict(zip(names, b, strict=True)))[0] for b in arrays])
    result.speed[precision] = len(proba) / (time.perf_counter() - start)
    if thresholds is None:
        result.accuracy[precision] = float((proba.argmax(1) == labels).mean())
    else:
        decided = _decided(proba, thresholds)
        hits = float((decided * labels).sum())
        result.measure = "micro F1"
        result.accuracy[precision] = 2 * hits / max(float(decided.sum() + labels.sum()), 1.0)
    return proba


def _quantize(fp32: Path, out: Path, names: list[str], calibration: list[list[np.ndarray]]) -> None:
    """ONNX Runtime's static int8 quantization: QDQ, per-channel weights, activations calibrated on ``calibration``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else dict(zip(names, batch, strict=True))

    ort.set_default_logger_severity(3)  # the quantizer's graph clean-up logs a line per constant it drops
    logging.disable(logging.WARNING)  # and it advises, on the root logger, a pre-processing step that did not help
    try:
        # reduce_range: 7-bit weights, so that the pairwise sums of u8 x s8 products in ONNX Runtime's int8
        # kernels cannot saturate; on the hymenoptera validation set it moved top-1 agreement with fp32 from
        # 98.7 % to 99.3 % (BENCHMARKS.md), and other calibrations (percentile, entropy) did not
        # move it
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    except Exception as e:
        raise TlearnError(f"int8 quantization failed: {type(e).__name__}: {str(e)[:300]}") from e
    finally:
        logging.disable(logging.NOTSET)  # the process's own logging comes back (tlearn's progress lines too)


def _card(run: Loaded, inputs: list[dict[str, Any]], names: list[str], result: ExportResult) -> dict[str, Any]:
    """The sidecar: everything a program needs to feed the graph and read its outputs, and what was checked."""
    from tlearn.artifact import read_run

    def how(pp: dict[str, Any]) -> str:
        _, h, w = pp["input_size"]
        return (f"decode to RGB; resize the shorter side to floor({h} / crop_pct) with {pp['interpolation']} "
                f"filtering; crop the centre {h}x{w} ({pp.get('crop_mode', 'center')} crop mode); scale to "
                "[0, 1]; subtract mean and divide by std per channel; channels first")

    checks: dict[str, Any] = {"parity": {"max_abs_probability_difference": result.parity,
                                         "images": result.parity_images, "real_images": result.real_images}}
    if result.evaluated:
        checks["measured_on"] = {"split": result.split, "images": result.evaluated}
        checks[result.measure.replace(" ", "_").lower()] = {k: round(v, 4) for k, v in result.accuracy.items()}
        checks["images_per_second"] = {k: round(v, 1) for k, v in result.speed.items()}
    if result.agreement is not None:
        checks["int8_top1_agreement" if result.measure == "accuracy" else "int8_labels_agreement"] = \
            round(result.agreement, 4)
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "precision": result.precision,
            "classes": run.spec.classes,
            "inputs": [{"name": n, "shape": ["batch", *pp["input_size"]], "dtype": "float32", "layout": "NCHW",
                        "preprocessing": pp, "how": how(pp)} for n, pp in zip(names, inputs, strict=True)],
            "outputs": {"logits": "(batch, classes) float32, averaged over the views",
                        **({"probabilities": "(batch, classes) float32, sigmoid(logits / temperatures), a label "
                            "each", "labels": "(batch, classes) float32, 1 where a label's probability reaches "
                            "its threshold"} if run.spec.multi_label else
                           {"probabilities": "(batch, classes) float32, softmax(logits / temperature)"}),
                        **({"novelty": "(batch,) float32, higher: less like the training images; above "
                            "novelty.threshold: unknown"} if run.novelty is not None else {})},
            "temperature": run.spec.temperature, "views": run.spec.views,
            **({"multi_label": True, "temperatures": run.spec.temperatures, "thresholds": run.spec.thresholds}
               if run.spec.multi_label else {}),
            **({"novelty": {"threshold": run.novelty.threshold, "accept": run.novelty.accept,
                            "kind": run.novelty.kind}} if run.novelty is not None else {}),
            "source": {**run_about(read_run(run.run_dir)), "tlearn": __version__}, "checks": checks}


def summary(result: ExportResult) -> str:
    """What ``tlearn export`` prints: the files, the parity check, and the accuracies and speeds side by side."""
    lines = [f"exported to {result.path} ({result.precision}) with its sidecar {result.sidecar}",
             f"parity with PyTorch: max |Δ probability| {result.parity:.1e} on {result.parity_images} "
             f"{'real images' if result.real_images else 'noise images (no labelled photos found)'} "
             f"(limit {PARITY_LIMIT:g})"]
    if result.evaluated:
        lines.append(f"on {result.evaluated} images of {result.split}:")
        for precision in result.accuracy:
            what = "top-1" if result.measure == "accuracy" else "the labels given"
            agree = f", {what} agrees with fp32 on {result.agreement:.1%}" if precision == "int8" else ""
            lines.append(f"  {precision}: {result.measure} {result.accuracy[precision]:.4f}, "
                         f"{result.speed[precision]:.0f} images/s (ONNX Runtime, batch 8){agree}")
        if result.agreement is not None and result.agreement < AGREEMENT_GOAL:
            lines.append(f"warning: int8 changes {'the top-1 class' if result.measure == 'accuracy' else 'the labels'}"
                         f" of {1 - result.agreement:.1%} of these images "
                         f"(goal: at most {1 - AGREEMENT_GOAL:.1%}); the fp32 export is the faithful one")
    return "\n".join(lines)

