"""JPEG files → pooled features: the tutorial-style pipeline against tlearn's, side by side on the same folder.

Usage: python bench/bench_extract.py [--data DIR ...] [--backbone efficientnet_lite0] [--rows torch-fp32,onnx-fp32]
                                    [--random-weights]

Each row runs in its own subprocess with an empty cache folder, so its peak RSS is its own. img/s and wall time
cover the extraction of every image; the one-time setup (the ONNX export and its check, cached per machine and
weights, or the int8 calibration) is timed apart. Accuracy: scikit-learn's
logistic regression fitted on the row's train-split features, scored on its validation/test split, so a faster
path that changed the features for the worse would show here (not with ``--random-weights``, which times a base
whose pretrained weights are not on this machine: the speed is the same, the accuracy means nothing and is left
out). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROWS = {
    "tutorial": "tutorial-style: PIL decode, timm's Resize(256) + CenterCrop(224), eager fp32 NCHW, batch 32, "
                "one thread of control",
    "torch-fp32": "tlearn, --runtime torch --precision fp32: one resampling, channels-last, a lane per core, batch 8",
    "torch-bf16": "tlearn, --runtime torch --precision bf16 (autocast)",
    "onnx-fp32": "tlearn default here (--runtime auto): ONNX Runtime fp32, a lane per core, batch 8",
    "onnx-int8": "not offered: ONNX Runtime int8 (static, per-channel, 64 calibration images)",
}


def tutorial(paths: list[Path], bb) -> Callable[[], np.ndarray]:
    """The reference, written plainly as the classic tutorials do it."""
    import timm.data
    import torch
    from PIL import Image

    transform = timm.data.create_transform(**bb.preprocessing, is_training=False)
    model = bb.model.to(memory_format=torch.contiguous_format)

    def run() -> np.ndarray:
        out = []
        for i in range(0, len(paths), 32):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + 32]])
            with torch.no_grad():
                out.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
        return np.concatenate(out)

    return run


def tlearn_path(paths: list[Path], bb, row: str) -> Callable[[], np.ndarray]:
    from tlearn.config import RuntimeConfig, TrainConfig
    from tlearn.runtime import base_engine

    name, precision = row.split("-")
    engine = base_engine(bb, TrainConfig(precision=precision), RuntimeConfig(runtime=name))
    assert (engine.runtime, engine.precision) == (name, precision), engine.describe()
    return lambda: engine.extract(paths, progress=False).X


def int8_path(paths: list[Path], bb, calibration: list[Path]) -> Callable[[], np.ndarray]:
    """Statically quantised ONNX model, calibrated on training images; run through the same lanes."""
    import tempfile

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from tlearn.config import RuntimeConfig, TrainConfig
    from tlearn.images import eval_transform, load_image
    from tlearn.runtime import base_engine, export_onnx

    transform = eval_transform(bb.preprocessing)
    batches = [torch.stack([transform(load_image(p)) for p in calibration[i:i + 8]]).numpy()
               for i in range(0, len(calibration), 8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": b} for b in batches])

        def get_next(self):
            return next(self.items, None)

    engine = base_engine(bb, TrainConfig(), RuntimeConfig(runtime="onnx"))
    with tempfile.TemporaryDirectory() as tmp:
        quantised = Path(tmp) / "int8.onnx"
        quantize_static(str(export_onnx(bb)), str(quantised), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = engine.threads
        session = ort.InferenceSession(str(quantised), options, providers=["CPUExecutionProvider"])
    engine.forward = lambda x: session.run(None, {"image": x.numpy()})[0]
    return lambda: engine.extract(paths, progress=False).X


def run_row(row: str, data: Path, backbone: str, out: Path, pretrained: bool) -> None:
    """Child process: extract every image of the split, write features and timing to ``out``."""
    from tlearn.backbones import load_backbone
    from tlearn.config import BackboneConfig, DataConfig
    from tlearn.data import scan

    folder = scan(DataConfig(path=str(data)))
    paths = [s.path for s in folder.samples]
    bb = load_backbone(BackboneConfig(backbone=backbone, pretrained=pretrained))
    start = time.perf_counter()
    if row == "onnx-int8":
        train = [s.path for s in folder.samples if s.split == "train"]
        run = int8_path(paths, bb, train[:: max(1, len(train) // 64)][:64])
    else:
        run = tutorial(paths, bb) if row == "tutorial" else tlearn_path(paths, bb, row)
    setup = time.perf_counter() - start  # once per machine and weights: the ONNX export (cached) or quantisation
    start = time.perf_counter()
    X = run()
    seconds = time.perf_counter() - start
    np.save(out.with_suffix(".npy"), X)
    out.write_text(json.dumps({"seconds": seconds, "setup": setup, "n": len(paths),
                               "labels": [s.label for s in folder.samples],
                               "splits": [s.split for s in folder.samples]}))


def accuracy(X: np.ndarray, labels: list[int], splits: list[str]) -> tuple[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y, s = np.array(labels), np.array(splits)
    split = "test" if (s == "test").any() else "validation"
    scaler = StandardScaler().fit(X[s == "train"])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(X[s == "train"]), y[s == "train"])
    return split, float(clf.score(scaler.transform(X[s == split]), y[s == split]))


def main() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, nargs="+",
                        default=[shared / "oxford17_flowers", shared / "hymenoptera"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    parser.add_argument("--random-weights", action="store_true", help="time a base without its pretrained weights")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        run_row(args.row, args.data[0], args.backbone, args.out, not args.random_weights)
        return
    import tempfile

    import torch

    rows = ["tutorial", *[r for r in args.rows.split(",") if r != "tutorial"]]
    print(f"{args.backbone}; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    for data in args.data:
        print(f"\n{data.name}\n")
        print("| pipeline | img/s | vs tutorial | wall s | one-time setup s | peak RSS MB | "
              "accuracy (logistic regression) |")
        print("|---|---|---|---|---|---|---|")
        rates: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for row in rows:
                out = Path(tmp) / f"{row}.json"
                env = {**os.environ, "TLEARN_CACHE_DIR": str(Path(tmp) / row)}  # ONNX export included, no cache
                proc = subprocess.Popen([sys.executable, __file__, "--row", row, "--data", str(data),
                                         "--backbone", args.backbone, "--out", str(out)]
                                        + ["--random-weights"] * args.random_weights, env=env)
                _, status, usage = os.wait4(proc.pid, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    raise SystemExit(f"row {row} failed on {data}")
                info = json.loads(out.read_text())
                split, acc = accuracy(np.load(out.with_suffix(".npy")), info["labels"], info["splits"])
                scored = "- (random weights)" if args.random_weights else f"{acc:.4f} ({split})"
                rates[row] = info["n"] / info["seconds"]
                print(f"| {ROWS[row]} | {rates[row]:.1f} | {rates[row] / rates['tutorial']:.2f}x | "
                      f"{info['seconds']:.1f} | {info['setup']:.1f} | {usage.ru_maxrss / 1024:.0f} | "
                      f"{scored} |", flush=True)


if __name__ == "__main__":
    main()
