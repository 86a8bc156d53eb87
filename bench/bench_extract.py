"""JPEG files → pooled features: the tutorial-style pipeline against tlearn's, side by side on the same folder.

Usage: python bench/bench_extract.py [--data ../shared/datasets/oxford17_flowers] [--backbone efficientnet_lite0]

Each row runs in its own subprocess (no feature cache), so its peak RSS is its own. Accuracy: scikit-learn's
logistic regression fitted on the row's train-split features, scored on its validation/test split, so a faster
path that changed the features for the worse would show here. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS = {
    "tutorial": "tutorial-style: PIL full decode, resize, centre crop, eager fp32 NCHW, batch 32, one process",
    "tlearn": "tlearn extract(): decoding workers, channels-last, batch 32",
    "tlearn-bf16": "the same with bf16 autocast (candidate, not a default yet)",
}


def tutorial(paths: list[Path], bb) -> np.ndarray:
    """The reference, written plainly as the classic tutorials do it."""
    import torch
    from PIL import Image

    from tlearn.features import eval_transform

    transform = eval_transform(bb.preprocessing)
    model = bb.model.to(memory_format=torch.contiguous_format)
    out = []
    for i in range(0, len(paths), 32):
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + 32]])
        with torch.no_grad():
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out)


def tlearn_path(paths: list[Path], bb, bf16: bool = False) -> np.ndarray:
    import torch

    from tlearn.features import eval_transform, extract
    from tlearn.train import Precision

    run = Precision(torch.device("cpu"), torch.bfloat16 if bf16 else None)
    bb.model.to(memory_format=torch.channels_last)
    def forward(x: torch.Tensor) -> torch.Tensor:
        with run.autocast():
            return bb.features(run.prepare(x))

    return extract(paths, forward, transform=eval_transform(bb.preprocessing), dim=bb.num_features,
                   progress=False).X


def run_row(row: str, data: Path, backbone: str, out: Path) -> None:
    """Child process: extract every image of the split, write features and timing to ``out``."""
    from tlearn.backbones import load_backbone
    from tlearn.config import BackboneConfig, DataConfig
    from tlearn.data import scan

    folder = scan(DataConfig(path=str(data)))
    paths = [s.path for s in folder.samples]
    bb = load_backbone(BackboneConfig(backbone=backbone))
    start = time.perf_counter()
    X = tutorial(paths, bb) if row == "tutorial" else tlearn_path(paths, bb, bf16=row == "tlearn-bf16")
    seconds = time.perf_counter() - start
    np.save(out.with_suffix(".npy"), X)
    out.write_text(json.dumps({"seconds": seconds, "n": len(paths), "labels": [s.label for s in folder.samples],
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        run_row(args.row, args.data, args.backbone, args.out)
        return
    import tempfile

    import torch

    print(f"{args.data.name}, {args.backbone}; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}\n")
    print("| pipeline | img/s | wall s | peak RSS MB | accuracy (logistic regression) |")
    print("|---|---|---|---|---|")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row, about in ROWS.items():
            out = Path(tmp) / f"{row}.json"
            proc = subprocess.Popen([sys.executable, __file__, "--row", row, "--data", str(args.data),
                                     "--backbone", args.backbone, "--out", str(out)])
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"row {row} failed")
            info = json.loads(out.read_text())
            split, acc = accuracy(np.load(out.with_suffix(".npy")), info["labels"], info["splits"])
            rates[row] = info["n"] / info["seconds"]
            print(f"| {about} | {rates[row]:.1f} | {info['seconds']:.1f} | {usage.ru_maxrss / 1024:.0f} | "
                  f"{acc:.4f} ({split}) |", flush=True)
    ratios = [f"{row} / tutorial: {rates[row] / rates['tutorial']:.2f}x" for row in ROWS if row != "tutorial"]
    print("\n" + ", ".join(ratios))


if __name__ == "__main__":
    main()
