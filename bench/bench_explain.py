"""Grad-CAM on real photos: does the heatmap point at the ant, and what does it cost next to a plain prediction?

Trains a features head and a fine-tuned run on hymenoptera's train/ (split by tlearn into train, validation and
test), then pastes each of the first 20 ant photos of val/ (never trained on) onto one half of a grey square
canvas, left and right in turn, and explains each composite for the class 'ants'. It reports:
- the heatmap's mass on the ant's half (0.5 would be no better than chance) and the pointing game (how often the
  heatmap's maximum lies on that half);
- the time of one explanation against one plain prediction of the same image (``tlearn predict``'s predictor,
  warm, one image per call, median of 20), side by side in this run.

    python bench/bench_explain.py ../shared/datasets/hymenoptera [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlearn.api import ImageClassifier
from tlearn.images import load_image
from tlearn.predictor import Predictor

SIDE = 448  # the canvas; the ant photo fills one 224 x 448 half, aspect kept


def composites(photos: list[Path], out: Path) -> list[tuple[Path, int]]:
    """Each photo on a grey canvas's left (0) or right (1) half, alternately."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i, photo in enumerate(photos):
        image = load_image(photo)
        image.thumbnail((SIDE // 2, SIDE))
        canvas = Image.new("RGB", (SIDE, SIDE), (128, 128, 128))
        half = i % 2
        canvas.paste(image, (half * SIDE // 2 + (SIDE // 2 - image.width) // 2, (SIDE - image.height) // 2))
        path = out / f"{photo.stem}-{'left' if half == 0 else 'right'}.png"
        canvas.save(path)
        made.append((path, half))
    return made


def timed(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(run: Path, images: list[tuple[Path, int]]) -> tuple:
    """The pointing game of ``run`` on ``images`` (composite, ant's half), then its timings."""
    clf = ImageClassifier.load(run, verbose=False)
    explainer = clf.explainer()
    paths = [p for p, _ in images]
    results = list(explainer.explain(paths, class_name="ants"))
    mass, hits = [], 0
    for (_, half), r in zip(images, results, strict=True):
        heat = r["heatmap"]
        middle = heat.shape[1] // 2
        on_ant = heat[:, :middle] if half == 0 else heat[:, middle:]
        mass.append(on_ant.sum() / max(heat.sum(), 1e-12))
        hits += (np.unravel_index(heat.argmax(), heat.shape)[1] < middle) == (half == 0)
    predicted = sum(r["predictions"][0]["class"] == "ants" for r in results)
    predictor = Predictor.load(run, verbose=False)
    plain = statistics.median(timed(functools.partial(predictor.predict, [p]), 3) for p in paths)
    explained = statistics.median(timed(lambda p=p: list(explainer.explain([p])), 3) for p in paths)
    batch_plain = timed(functools.partial(predictor.predict, paths), 2) / len(paths)
    batch_explained = timed(lambda: list(explainer.explain(paths)), 2) / len(paths)
    return (clf.spec.views, predictor.backend, np.mean(mass), np.min(mass), hits, predicted, plain, explained,
            batch_plain, batch_explained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="hymenoptera: train/ and val/, each with ants/ and bees/")
    parser.add_argument("--work", type=Path, help="folder for the runs and composites (default: a temporary one)")
    parser.add_argument("--modes", default="features,finetune")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-explain-"))
    images = composites(sorted((args.data / "val" / "ants").glob("*.jpg"))[:20], work / "composites")
    rows = []
    for mode in args.modes.split(","):
        run = work / mode
        if not (run / "model.safetensors").is_file():
            start = time.perf_counter()
            ImageClassifier(mode=mode, verbose=False).fit(args.data / "train", out=run)
            print(f"trained {mode} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows.append((mode, *measure(run, images)))
    print(f"\nGrad-CAM on {len(images)} ant photos pasted on one half of a grey {SIDE} px canvas "
          "(hymenoptera val/ants, never trained on); class 'ants'\n")
    print("| run | views | predict backend | mass on the ant's half (mean) | (lowest) | pointing game | predicted "
          "ants | predict, 1 image | explain, 1 image | ratio | predict, per image of 20 | explain, per image of 20 "
          "| ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, views, backend, mean, low, hits, predicted, plain, explained, bp, be in rows:
        print(f"| {mode} | {'+'.join(views)} | {backend} | {mean:.3f} | {low:.3f} | {hits}/{len(images)} | "
              f"{predicted}/{len(images)} | {plain * 1e3:.1f} ms | {explained * 1e3:.1f} ms | {explained / plain:.2f}x "
              f"| {bp * 1e3:.1f} ms | {be * 1e3:.1f} ms | {be / bp:.2f}x |")
    print(f"\nruns and composites in {work}")


if __name__ == "__main__":
    main()
