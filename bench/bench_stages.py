"""Where one image's extraction time goes, stage by stage, on one core: hashing, decoding, resizing and
normalising, and the base's forward pass (ONNX Runtime, one thread, batches of 8, as one lane runs it).

Usage: python bench/bench_stages.py [--data ../shared/datasets/oxford17_flowers] [--images 200]

Then the forward pass alone at the extraction's settings: one session with 1 and 2 threads, and two lanes of one
thread each at once (what `tlearn train` runs on 2 cores). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import machine

from tlearn.backbones import load_backbone
from tlearn.config import BackboneConfig
from tlearn.fileio import file_sha256
from tlearn.graph import session
from tlearn.images import eval_transform, load_image
from tlearn.runtime import export_onnx


def rate(run, x: np.ndarray, batches: int = 12) -> float:
    run(x)
    start = time.perf_counter()
    for _ in range(batches):
        run(x)
    return batches * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers")
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted(args.data.rglob("*.jpg"))[:args.images]
    bb = load_backbone(BackboneConfig())
    transform, path = eval_transform(bb.preprocessing), str(export_onnx(bb))
    seconds = {"SHA-256 of the file (cache key)": 0.0, "decode (Pillow, to RGB)": 0.0,
               "resize the crop + normalise": 0.0}
    images = []
    for p in paths:
        t0 = time.perf_counter()
        file_sha256(p)
        t1 = time.perf_counter()
        image = load_image(p)
        t2 = time.perf_counter()
        images.append(transform(image).numpy())
        t3 = time.perf_counter()
        for key, s in zip(seconds, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            seconds[key] += s
    x = np.stack(images[:8])
    one = session(path, 1, inter_threads=1)
    seconds["forward pass (1 thread, batch 8)"] = len(paths) / rate(lambda a: one.run(None, {"image": a}), x)
    print(machine())
    print(f"| stage, one core | ms per image ({len(paths)} photos of {args.data.name}) |\n|---|---|")
    for key, s in seconds.items():
        print(f"| {key} | {1000 * s / len(paths):.2f} |")
    total = sum(seconds.values()) / len(paths)
    print(f"| all, one core | {1000 * total:.2f} (so {2 / total:.0f} img/s at most on 2 cores, one view) |")
    print("\n| forward pass alone, batch 8 | img/s |\n|---|---|")
    two = session(path, 2, inter_threads=1)
    print(f"| one session, 2 threads | {rate(lambda a: two.run(None, {'image': a}), x):.0f} |")
    lanes, results = [session(path, 1, inter_threads=1) for _ in range(2)], []
    threads = [threading.Thread(target=lambda s=s: results.append(rate(lambda a: s.run(None, {"image": a}), x)))
               for s in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"| two lanes of one thread at once (tlearn's setting on 2 cores) | {sum(results):.0f} |")


if __name__ == "__main__":
    main()
