"""The centre and mirror views' features: one pass a view against one pass for both (each image decoded and
resized once, its mirror the preprocessed pixels flipped), side by side, each from an empty cache folder.

    python bench/bench_views.py [--data ../shared/datasets/oxford17_flowers] [--images 600] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlearn.config import BackboneConfig, RuntimeConfig, TrainConfig
from tlearn.extractor import Extractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    paths = sorted(args.data.rglob("*.jpg"))[:args.images]
    rows = []
    for _ in range(args.repeats):
        for how in ("a pass a view", "one pass, both views"):
            with tempfile.TemporaryDirectory() as tmp:
                ex = Extractor(BackboneConfig(), TrainConfig(), RuntimeConfig(cache_dir=tmp), verbose=False)
                ex.engine()  # the base's ONNX export, made once per machine, is not timed
                start = time.perf_counter()
                if how == "a pass a view":
                    ex.features(paths, None, "center", announce=False)
                    middle = time.perf_counter()
                    ex.features(paths, None, "flip", announce=False)
                else:
                    ex.features_views(paths, None, ("center", "flip"))
                    middle = None
                seconds = time.perf_counter() - start
                one = f"{middle - start:.1f}" if middle else "-"
                rows.append((how, seconds, one, len(paths) / seconds))
    print(f"\n{len(paths)} JPEGs from {args.data.name}, efficientnet_lite0, {ex.engine().describe()}\n")
    print("| extraction | both views, s | centre view alone, s | images/s (both views) |")
    print("|---|---|---|---|")
    for how, seconds, one, rate in rows:
        print(f"| {how} | {seconds:.1f} | {one} | {rate:.0f} |")


if __name__ == "__main__":
    main()
