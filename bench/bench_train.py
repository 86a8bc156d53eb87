"""Wall time of `tlearn train` (mode features) on the shared datasets, with a cold and then a warm feature cache.

Usage: python bench/bench_train.py [--datasets ../shared/datasets] [--backbone efficientnet_lite0]

Each run is the real command in a subprocess; its peak RSS comes from wait4(). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def machine() -> str:
    """The first line of every benchmark table here: processor, cores, torch and whether CUDA is there."""
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}\n")


def run_command(cmd: list[str], log: Path) -> tuple[float, str, float]:
    """Run ``cmd`` with its output in ``log``: (wall seconds, the output, peak RSS in MB); exit on failure."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves to get its peak RSS
    wall = time.perf_counter() - start
    output = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return wall, output, usage.ru_maxrss / 1024


def run_train(data: Path, out: Path, cache: Path, backbone: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "tlearn.cli", "train", str(data), "--mode", "features", "--backbone", backbone,
           "--out", str(out), "--cache-dir", str(cache), *extra]
    wall, stderr, rss_mb = run_command(cmd, out.with_suffix(".log"))
    # the centre view's lines, one per split; a run that found everything cached prints none
    lines = re.findall(r"features of \S+: (\d+) images, (\d+) from cache, (\d+) extracted(?: \(([\d.]+) img/s\))?,"
                       r" \d+ skipped, ([\d.]+) s", stderr)
    images, extracted = sum(int(m[0]) for m in lines), sum(int(m[2]) for m in lines)
    seconds = sum(float(m[4]) for m in lines if int(m[2]))
    metrics = json.loads((out / "metrics.json").read_text())
    split = "test" if "test" in metrics else "validation"
    epochs = [float(r) for r in re.findall(r"epoch \d+/\d+: .*, ([\d.]+) img/s\)", stderr)]
    return {"images": images or None, "extracted": extracted,
            "img_s": extracted / seconds if extracted and seconds else None, "wall": wall,
            "split": split, "accuracy": metrics[split]["accuracy"], "rss_mb": rss_mb,
            "epoch_img_s": sum(epochs) / len(epochs) if epochs else None}


def read_split(run: Path) -> list[str]:
    return (run / "split.csv").read_text().splitlines()[1:]


FROZEN_EPOCHS = 3
FROZEN_ROWS = {"PyTorch fp32 (`--runtime torch --precision fp32`)": ["--runtime", "torch", "--precision", "fp32"],
               "ONNX Runtime fp32 (default)": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    print(machine())
    print("| dataset | cache | images | extracted | extraction img/s | wall s | accuracy | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("hymenoptera", "oxford17_flowers"):
            cache = Path(tmp) / f"cache-{name}"
            for label in ("cold", "warm"):
                r = run_train(args.datasets / name, Path(tmp) / f"{name}-{label}", cache, args.backbone)
                r["images"] = r["images"] or len(read_split(Path(tmp) / f"{name}-{label}"))
                rate = f"{r['img_s']:.1f}" if r["img_s"] else "-"
                print(f"| {name} | {label} | {r['images']} | {r['extracted']} | {rate} | {r['wall']:.1f} | "
                      f"{r['accuracy']:.4f} ({r['split']}) | {r['rss_mb']:.0f} |", flush=True)
        print(f"\nMode frozen (the book's augmentation, {FROZEN_EPOCHS} epochs) on hymenoptera, warm feature cache:\n")
        print("| frozen base runs in | epoch img/s | wall s | accuracy |")
        print("|---|---|---|---|")
        cache = Path(tmp) / "cache-hymenoptera"
        for label, extra in FROZEN_ROWS.items():
            r = run_train(args.datasets / "hymenoptera", Path(tmp) / f"frozen-{len(extra)}", cache, args.backbone,
                          *extra, "--mode", "frozen", "--epochs", str(FROZEN_EPOCHS))
            print(f"| {label} | {r['epoch_img_s']:.1f} | {r['wall']:.1f} | {r['accuracy']:.4f} ({r['split']}) |",
                  flush=True)


if __name__ == "__main__":
    main()
