"""A whole `tlearn train --mode features` against the whole tutorial-style script, side by side on new JPEGs.

Usage: python bench/bench_command.py [--data ../shared/datasets/oxford17_flowers] [--images 600]

Builds a folder of N distinct JPEG files (bench_scaling.build), then runs each as a whole process, Python start-up
and imports included: bench/tutorial_features.py; `tlearn train DATA --mode features --out RUN` with an empty
cache folder (the one-time ONNX export of the base included); the same with only that export in the cache (as on
any machine after its first run: every image is new); the same command again (warm); and with
--no-horizontal-flip (the centre view only, no mirror images) on new images. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bench_scaling import build
from bench_train import machine, run_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers")
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    print(machine())
    print(f"{args.images} distinct JPEGs from {args.data.name}\n")
    print("| command | wall s | vs tutorial | peak RSS MB | test accuracy |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(args.data, tmp / "data", args.images)
        wall, out, rss = run_command([sys.executable, str(here / "tutorial_features.py"), str(tmp / "data"),
                                      str(tmp / "tutorial")], tmp / "tutorial.log")
        reference, accuracy = wall, float(re.search(r"test accuracy ([\d.]+)", out)[1])
        print(f"| tutorial-style script (bench/tutorial_features.py) | {wall:.1f} | 1.00x | {rss:.0f} | "
              f"{accuracy:.4f} |", flush=True)
        train = [sys.executable, "-m", "tlearn.cli", "train", str(tmp / "data"), "--mode", "features"]
        cases = [("`tlearn train --mode features`, empty cache folder (ONNX export included)", "cold", []),
                 ("`tlearn train --mode features`, new images (the ONNX export cached)", "new", []),
                 ("`tlearn train --mode features` again (warm)", "new", []),
                 ("`tlearn train --mode features --no-horizontal-flip`, new images (no mirror views)", "plain",
                  ["--no-horizontal-flip"])]
        for label, cache, extra in cases:
            if cache != "cold" and not (tmp / cache).exists():  # the one-time export only, no features
                (tmp / cache).mkdir()
                for part in ("onnx", "bases"):
                    shutil.copytree(tmp / "cold" / part, tmp / cache / part)
            run = tmp / f"run-{len(list(tmp.glob('run-*')))}"
            wall, _, rss = run_command([*train, *extra, "--out", str(run), "--cache-dir", str(tmp / cache)],
                                       run.with_suffix(".log"))
            accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
            print(f"| {label} | {wall:.1f} | {reference / wall:.2f}x | {rss:.0f} | {accuracy:.4f} |", flush=True)


if __name__ == "__main__":
    main()
