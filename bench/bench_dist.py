"""One process against N data-parallel processes (`tlearn train --devices N`), side by side, on one dataset.

Rows: mode `features` with an empty feature cache (the sharded extraction), and mode `finetune` for a fixed
number of epochs. Each row is one whole command in its own cache folder: wall time, the training images per
second the run logged, and the validation and test accuracy it wrote. On a CPU the N processes share the cores
(gloo), so this shows the overhead and the equivalence of the results; the speed-up is for GPUs.

    python bench/bench_dist.py DATA [--devices 1,2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(data: str, mode: str, devices: int, epochs: int, tmp: Path) -> dict:
    out = tmp / f"{mode}-{devices}"
    cmd = [sys.executable, "-m", "tlearn", "train", data, "--mode", mode, "--devices", str(devices), "--out",
           str(out), "--cache-dir", str(tmp / f"cache-{mode}-{devices}"), "--seed", "0"]
    if mode == "finetune":
        cmd += ["--epochs", str(epochs), "--unfreeze", "1", "--batch-size", "32"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    rates = [float(r) for r in re.findall(r"epoch \d+/\d+: .*?([0-9.]+) img/s\)", done.stderr)]  # training
    metrics = json.loads((out / "metrics.json").read_text())
    return {"mode": mode, "devices": devices, "wall": wall, "img_s": rates[-1] if rates else None,
            "val": metrics["validation"]["accuracy"], "test": metrics.get("test", {}).get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("features", "finetune"):
            for n in map(int, args.devices.split(",")):
                rows.append(run(args.data, mode, n, args.epochs, Path(tmp)))
                print(rows[-1], file=sys.stderr)
    print(f"\n`tlearn train {args.data}`, {os.cpu_count()} cores, no GPU\n")
    print("| mode | processes | wall s | training images/s (last epoch) | validation accuracy | test accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        test = "-" if r["test"] is None else f"{r['test']:.4f}"
        rate = "-" if r["img_s"] is None else f"{r['img_s']:.1f}"
        print(f"| {r['mode']} | {r['devices']} | {r['wall']:.1f} | {rate} | {r['val']:.4f} | {test} |")


if __name__ == "__main__":
    main()
