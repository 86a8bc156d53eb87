"""Reading data from a label file against scanning class folders: the same images, the time to a split.

    python bench/bench_labelfile.py [--images 10000 60000] [--seed 0]

For each size, a folder of that many files (hard links to the Oxford-17 photos, 17 class folders) is scanned as
class folders, then read from a CSV and a JSON Lines file of the same paths and labels, and from a multi-label CSV
of the same paths (1 to 3 of 20 tags each), split by iterative stratification. Each row is the median of three
runs; the split of the single-label files is checked to be the folder's. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlearn.config import DataConfig
from tlearn.data import scan

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers"


def build(root: Path, n: int, seed: int) -> tuple[Path, Path, Path]:
    """``n`` hard links in class folders under ``root``, and the label files of them."""
    photos = sorted(SHARED.glob("*/*/*.jpg"))
    rng = random.Random(seed)
    tags = [f"tag{k:02d}" for k in range(20)]
    rows, multi = [], []
    for i in range(n):
        src = photos[i % len(photos)]
        rel = Path(src.parent.name) / f"{i:06d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src, root / rel)
        rows.append((rel.as_posix(), src.parent.name))
        multi.append((rel.as_posix(), ";".join(rng.sample(tags, rng.randint(1, 3)))))
    single, lines, tagged = root / "labels.csv", root / "labels.jsonl", root / "tags.csv"
    for path, content in ((single, rows), (tagged, multi)):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *content])
    lines.write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows))
    return single, lines, tagged


def timed(config: DataConfig) -> tuple[float, object]:
    times, data = [], None
    for _ in range(3):
        start = time.perf_counter()
        data = scan(config)
        times.append(time.perf_counter() - start)
    return statistics.median(times), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 60_000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| images | layout | s to a split (median of 3) | x class folders |")
    print("|---|---|---|---|")
    for n in args.images:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "photos"
            single, lines, tagged = build(root, n, args.seed)
            folder_s, folder = timed(DataConfig(path=str(root)))
            print(f"| {n:,} | class folders | {folder_s:.2f} | 1.00 |", flush=True)
            expected = sorted((s.path, s.label, s.split) for s in folder.samples)
            for name, file in (("CSV", single), ("JSON Lines", lines), ("multi-label CSV", tagged)):
                seconds, data = timed(DataConfig(path=str(file)))
                if name != "multi-label CSV" and sorted((s.path, s.label, s.split) for s in data.samples) != expected:
                    raise SystemExit(f"{name}: not the folder's split")
                print(f"| {n:,} | {name} | {seconds:.2f} | {seconds / folder_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
