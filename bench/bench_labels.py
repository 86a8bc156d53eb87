"""Planted label noise: move a share of a dataset's training photos into another class's folder (in a copy),
run `tlearn check --labels`'s search, and report how many suspects are planted errors (precision) and how many
planted errors are among the suspects (recall).

    python bench/bench_labels.py DATA [DATA ...] [--noise 0.05] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlearn.config import DataConfig
from tlearn.data import scan
from tlearn.labels import suspects


def plant(data: Path, dest: Path, noise: float, seed: int) -> tuple[set[str], int]:
    """Copy ``data`` to ``dest``, moving about ``noise`` of the training photos to a random other class."""
    folder, rng, planted = scan(DataConfig(path=str(data), seed=seed)), random.Random(seed), set()
    for s in folder.samples:
        label = folder.classes[s.label]
        if s.split == "train" and rng.random() < noise:
            label = rng.choice([c for c in folder.classes if c != label])
        parts = s.path.relative_to(folder.root).parts  # (split, class, name) or (class, name)
        target = dest.joinpath(*parts[:-2], label, parts[-1])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, target)
        if label != folder.classes[s.label]:
            planted.add(str(target))
    return planted, len(folder.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for data in args.data:
        with tempfile.TemporaryDirectory() as tmp:
            planted, n = plant(data, Path(tmp) / data.name, args.noise, args.seed)
            start = time.perf_counter()
            found = {f.path for f in suspects(DataConfig(path=str(Path(tmp) / data.name)), progress=False)}
            hits = len(found & planted)
            rows.append((data.name, n, len(planted), len(found), hits / max(len(found), 1),
                         hits / max(len(planted), 1), time.perf_counter() - start))
    print(f"\nplanted label noise: {args.noise:.0%} of the training photos moved to another class (seed {args.seed})\n")
    print("| dataset | images | planted | suspects | precision | recall | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, n, p, s, precision, recall, seconds in rows:
        print(f"| {name} | {n} | {p} | {s} | {precision:.3f} | {recall:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
