"""ONNX graphs: a PyTorch module written as one, checked against PyTorch before it is kept, and ONNX Runtime
sessions opened on them, quiet and with their threads set. Every ONNX graph tlearn writes or runs goes through
here: the bases' exports (``runtime``), the whole classifier (``export``) and the predictor's sessions. The
exported classifier's JSON sidecar is read and checked here too (``read_sidecar``).

Nothing here imports torch or onnxruntime until it is used, so the predictor can open a session without torch.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlearn.artifact import MAX_CLASS_NAME, MAX_CLASSES, MAX_CONFIG_BYTES, labelling_problems, preprocessing_problems
from tlearn.config import TlearnError
from tlearn.fileio import ONNX_OPSET, atomic_path, require_regular

CPU = ["CPUExecutionProvider"]
EXPORT_FORMAT = "tlearn-onnx"  # the sidecar of a classifier written by `tlearn export`
EXPORT_FORMAT_VERSION = 1


def sidecar_path(onnx_file: str | Path) -> Path:
    """The JSON file that describes an exported classifier: ``model.onnx`` → ``model.json``."""
    return Path(onnx_file).with_suffix(".json")


def session(path: str | Path, threads: int | None = None, *, inter_threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU of the graph at ``path``. Its own log is kept to errors (it would note
    each constant it prunes from an exported graph on the terminal, bypassing tlearn's output), and idle threads
    sleep instead of spinning. ``threads``: its intra-op threads (default: ``OMP_NUM_THREADS`` where it is set, as
    ``tlearn serve --processes`` and ``--devices`` set it to share the cores out, else ONNX Runtime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():  # a share of the cores, as for PyTorch
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is not None:
        options.intra_op_num_threads = threads
    if inter_threads is not None:
        options.inter_op_num_threads = inter_threads
    return ort.InferenceSession(str(path), options, providers=CPU)


def write(module: Any, example: Sequence[Any], path: Path, inputs: list[str], outputs: list[str],
          what: str = "this model") -> None:
    """``module`` (in eval mode, on the CPU) as an ONNX graph at ``path``, with a dynamic batch axis on every input
    and output; a module the exporter cannot trace is a TlearnError that names ``what``."""
    import torch

    dynamic = {name: {0: "batch"} for name in [*inputs, *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(module, tuple(example), str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=ONNX_OPSET, dynamo=False)
        except Exception as e:  # the exporter raises many kinds of errors for models it cannot trace
            raise TlearnError(f"cannot export {what} to ONNX: {type(e).__name__}: {str(e)[:300]}") from e


def largest_difference(graph: Any, expected: Sequence[np.ndarray], feeds: dict[str, np.ndarray],
                       outputs: list[str]) -> float:
    """The largest difference between a session's ``outputs`` on ``feeds`` and what PyTorch gave (``expected``),
    relative to the largest expected value where that is above 1."""
    got = graph.run(outputs, feeds)
    return max(float(np.abs(g - e).max() / max(1.0, np.abs(e).max())) for g, e in zip(got, expected, strict=True))


def export_checked(module: Any, example: Sequence[Any], path: Path, inputs: list[str], outputs: list[str],
                   what: str = "this model", tolerance: float = 1e-3) -> Path:
    """``write``, then the graph's outputs on ``example`` compared with the module's own: a graph that differs
    by ``tolerance`` or more is never kept. Written atomically, so a killed export leaves no graph."""
    import torch

    with torch.inference_mode():
        expected = module(*example)
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    with atomic_path(path) as tmp:
        write(module, example, Path(tmp), inputs, outputs, what)
        feeds = {name: x.numpy() for name, x in zip(inputs, example, strict=True)}
        try:
            error = largest_difference(session(tmp), expected, feeds, outputs)
        except Exception as e:
            raise TlearnError(f"the ONNX export of {what} cannot be run: {type(e).__name__}: {str(e)[:300]}") from e
        if not error < tolerance:
            raise TlearnError(f"the ONNX export of {what} differs from PyTorch by {error:.2g}")
    return path


def read_sidecar(path: Path) -> dict[str, Any]:
    """An exported classifier's JSON sidecar, checked: the format, the classes, each input's name and
    preprocessing, the temperature and the precision."""
    try:
        require_regular(path)
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise TlearnError(f"{path} is {path.stat().st_size:,} bytes, far more than a tlearn sidecar")
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TlearnError(f"{path} is missing: an exported model needs the JSON file `tlearn export` wrote beside "
                          "it") from e
    except (OSError, ValueError, RecursionError) as e:
        raise TlearnError(f"cannot read {path} ({e}); export the model again") from e
    if not isinstance(card, dict) or card.get("format") != EXPORT_FORMAT:
        raise TlearnError(f"{path} is not a tlearn export sidecar (no \"format\": \"{EXPORT_FORMAT}\")")
    if type(card.get("format_version")) is not int or card["format_version"] > EXPORT_FORMAT_VERSION:
        raise TlearnError(f"{path} was written by a newer tlearn (format {card.get('format_version')!r}); upgrade")
    problems = []
    classes, inputs, temperature = card.get("classes"), card.get("inputs"), card.get("temperature")
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES or len(set(map(str, classes))) != \
            len(classes) or not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in classes):
        problems.append(f"\"classes\" must list 2 to {MAX_CLASSES:,} distinct names")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 16:
        problems.append("\"inputs\" must list 1 to 16 inputs")
    else:
        for i, item in enumerate(inputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
                    not isinstance(item.get("preprocessing"), dict):
                problems.append(f"\"inputs\"[{i}] must be {{\"name\": ..., \"preprocessing\": {{...}}}}")
            else:
                problems += preprocessing_problems(item["preprocessing"], f"inputs[{i}].preprocessing")
    if type(temperature) not in (int, float) or not (math.isfinite(temperature) and temperature > 0):
        problems.append(f"\"temperature\" must be a positive number, not {temperature!r}")
    if card.get("multi_label"):
        problems += labelling_problems(card.get("temperatures"), card.get("thresholds"),
                                       len(classes) if isinstance(classes, list) else 0)
    if card.get("precision") not in ("fp32", "int8"):
        problems.append(f"\"precision\" must be fp32 or int8, not {card.get('precision')!r}")
    novelty = card.get("novelty", {"threshold": 0.0})
    if not isinstance(novelty, dict) or type(novelty.get("threshold")) not in (int, float) \
            or not math.isfinite(novelty["threshold"]):
        problems.append("\"novelty.threshold\" must be a finite number")
    if not isinstance(card.get("source", {}), dict):
        problems.append("\"source\" must be an object")
    if problems:
        raise TlearnError(f"{path}: " + "; ".join(problems[:5]) + "; export the model again")
    return card
