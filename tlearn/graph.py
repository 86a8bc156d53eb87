"""ONNX graphs: a PyTorch module written as one, checked against PyTorch before it is kept, and ONNX Runtime
sessions opened on them, quiet and with their threads set. Every ONNX graph tlearn writes or runs goes through
here: the bases' exports (``runtime``), the whole classifier (``export``) and the predictor's sessions.

Nothing here imports torch or onnxruntime until it is used, so the predictor can open a session without torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlearn.config import TlearnError
from tlearn.fileio import ONNX_OPSET, atomic_path

CPU = ["CPUExecutionProvider"]


def session(path: str | Path, threads: int | None = None, *, inter_threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU of the graph at ``path``. Its own log is kept to errors (it would note
    each constant it prunes from an exported graph on the terminal, bypassing tlearn's output), and idle threads
    sleep instead of spinning. ``threads``: its intra-op threads (default: ONNX Runtime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
