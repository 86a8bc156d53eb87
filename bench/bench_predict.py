"""Latency of predicting one image with a saved model, per runtime, and of the `tlearn predict` command.

Usage: python bench/bench_predict.py [--data examples/ants_bees] [--repeats 50]

Trains a head (mode features) on the data once, then loads the run per runtime and times
``ImageClassifier.predict(one_image)`` ``--repeats`` times after 3 warm-up calls: decoding, preprocessing, the
base, the head and the softmax; then the same for ``Predictor`` (ONNX Runtime and NumPy, no torch). The command
rows are one cold process each, Python start-up included: `tlearn predict RUN IMAGE` (the predictor), and the same
prediction through the full stack (``ImageClassifier.load(RUN).predict(IMAGE)``, what the command ran before).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tlearn.api import ImageClassifier
from tlearn.predictor import Predictor

VARIANTS = {"onnx fp32 (default here)": {"runtime": "auto"}, "torch fp32": {"runtime": "torch", "precision": "fp32"},
            "torch bf16": {"runtime": "torch", "precision": "bf16"}}


def row(label: str, model: ImageClassifier | Predictor, image: Path, repeats: int) -> str:
    """A table row: p50 and p90 latency of ``model.predict(image)`` over ``repeats`` calls after 3 warm-up calls."""
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        result = model.predict(image, top_k=1)
        times.append(1000 * (time.perf_counter() - start))
    top = result[0]["predictions"][0]
    return (f"| {label} | {np.percentile(times[3:], 50):.1f} | {np.percentile(times[3:], 90):.1f} | "
            f"{top['class']} {top['probability']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "ants_bees")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    image = sorted(args.data.rglob("*.jpg"))[0]
    print(f"{args.data.name}, one image ({image.name}); {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| path | p50 ms | p90 ms | prediction |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TLEARN_CACHE_DIR"] = str(Path(tmp) / "cache")
        run = Path(tmp) / "run"
        trained = ImageClassifier(mode="features", verbose=False)
        trained.fit(args.data)
        trained.save(run)
        for name, options in VARIANTS.items():
            clf = ImageClassifier.load(run, verbose=False, runtime=options["runtime"])
            clf.train_config.precision = options.get("precision", clf.train_config.precision)
            print(row(f"`ImageClassifier.predict`, {name}", clf, image, args.repeats), flush=True)
        predictor = Predictor.load(run, verbose=False)
        assert predictor.fallback is None, "the ONNX predictor should apply to a head on features"
        print(row("`Predictor.predict`, onnx fp32 + NumPy head", predictor, image, args.repeats), flush=True)
        full = f"from tlearn.api import ImageClassifier; ImageClassifier.load({str(run)!r}).predict({str(image)!r})"
        for label, cmd in (("`tlearn predict RUN IMAGE`, one cold command",
                            [sys.executable, "-m", "tlearn.cli", "predict", str(run), str(image)]),
                           ("the full stack (`ImageClassifier.load` + `predict`), one cold process",
                            [sys.executable, "-c", full])):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            print(f"| {label} | {1000 * (time.perf_counter() - start):.0f} | - | - |", flush=True)


if __name__ == "__main__":
    main()
