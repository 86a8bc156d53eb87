"""Does `tlearn train --mode features` stay in constant memory and linear time as the folder grows?

Usage: python bench/bench_scaling.py [--data ../shared/datasets/oxford17_flowers] [--sizes 500,2000,8000]

Builds class folders of N distinct JPEG files from the dataset's images; beyond its own count, each copy gets a
few unique bytes appended after the JPEG end marker, so its content hash (and cache entry) is new while decoders
see the same picture. Each size runs `tlearn train` cold in a subprocess (peak RSS from wait4). The copies leak
across splits, so accuracy means nothing here and is not shown. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from bench_train import run_train

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def build(source: Path, dest: Path, n: int) -> None:
    """``dest/<class>/`` with ``n`` distinct files cycled from ``source``'s class folders (any split)."""
    images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for i in range(n):
        src = images[i % len(images)]
        target = dest / src.parent.name / f"{i:06d}{src.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        target.write_bytes(data if i < len(images) else data + f"copy {i}".encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers")
    parser.add_argument("--sizes", default="500,2000,8000")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    print(f"{args.data.name} cycled, {args.backbone}; {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| images | extraction img/s | wall s | s per 1000 images | peak RSS MB |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.sizes.split(",")):
            folder = Path(tmp) / f"n{n}"
            build(args.data, folder, n)
            r = run_train(folder, Path(tmp) / f"run{n}", Path(tmp) / f"cache{n}", args.backbone)
            print(f"| {r['images']} | {r['img_s']:.1f} | {r['wall']:.1f} | {1000 * r['wall'] / n:.1f} | "
                  f"{r['rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
