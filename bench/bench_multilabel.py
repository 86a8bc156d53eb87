"""A multi-label set from the shared photos, and the baseline that tlearn's multi-label training must beat.

    python bench/bench_multilabel.py [--mosaics 1200] [--out DIR] [--seed 0]

Builds 2x2 mosaics of Oxford-17 photos (each tile a photo of a species, 2 to 4 distinct species a mosaic, 448 x
448 JPEG), labelled with the species they contain, written with a label file ``tags.csv`` (``path,tags``, tags
joined by ';', and a split column). Oxford-17's test photos make the test mosaics; its training photos are
divided by species, four fifths for the training mosaics and one fifth for the validation mosaics; so no
validation or test mosaic shares a photo with a training one (mosaics of one split do share photos).

Then the plain baseline, on tlearn's own reading of the file and its cached Lite0 features (centre view): a
one-vs-rest logistic regression (C=1, scikit-learn) fitted on train, decisions at probability 0.5, and the same
regression with tlearn's per-label temperatures and F1-best thresholds fitted on validation; then the whole
``tlearn train tags.csv`` with ``--mode features``, with the default settings (mode auto) and with ``--mode
finetune``, on the same file and feature cache. Prints a Markdown table of test mean average precision, micro and
macro F1, exact match and binary cross-entropy, with the seconds of each, and the steps each run took; and how
many of 80 tags planted wrong the search for suspected label errors finds.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlearn import ImageClassifier
from tlearn.config import BackboneConfig, DataConfig, RuntimeConfig, TrainConfig
from tlearn.data import scan
from tlearn.extractor import Extractor
from tlearn.multilabel import fit_temperatures, fit_thresholds, metrics, sigmoid, targets

RUNS = (("--mode features", {"mode": "features"}), ("", {}), ("--mode finetune", {"mode": "finetune"}))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers"
TILE = 224


def build(out: Path, n: int, seed: int) -> Path:
    """``n`` mosaics under ``out`` and their label file; returns the label file."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (SHARED / "train").iterdir())
    photos = {"train": {}, "validation": {}, "test": {c: sorted((SHARED / "test" / c).glob("*.jpg")) for c in classes}}
    for c in classes:  # a fifth of each species' training photos make the validation mosaics, and only those
        pool = sorted((SHARED / "train" / c).glob("*.jpg"))
        rng.shuffle(pool)
        photos["validation"][c], photos["train"][c] = pool[: len(pool) // 5], pool[len(pool) // 5:]
    rows = []
    for i in range(n):
        split = "test" if i % 5 == 0 else "validation" if i % 5 == 1 else "train"  # 60/20/20
        species = rng.sample(classes, rng.randint(2, 4))
        tiles = [rng.choice(photos[split][c]) for c in species] + [None] * (4 - len(species))
        tiles = [t or rng.choice(photos[split][rng.choice(species)]) for t in tiles]  # a species again
        rng.shuffle(tiles)
        mosaic = Image.new("RGB", (2 * TILE, 2 * TILE))
        for k, photo in enumerate(tiles):
            with Image.open(photo) as im:
                tile = im.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR)
            mosaic.paste(tile, ((k % 2) * TILE, (k // 2) * TILE))
        name = f"{split}/{i:05d}.jpg"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        mosaic.save(out / name, quality=90)
        rows.append(f"{name},{';'.join(sorted(species))},{split}")
    (out / "tags.csv").write_text("path,tags,split\n" + "\n".join(rows) + "\n")
    return out / "tags.csv"


def ovr(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per label (C=1): (weights (C, F), biases (C,))."""
    from sklearn.linear_model import LogisticRegression

    W, b = np.zeros((Y.shape[1], X.shape[1])), np.zeros(Y.shape[1])
    for k in range(Y.shape[1]):
        clf = LogisticRegression(C=1.0, max_iter=3000).fit(X, Y[:, k])
        W[k], b[k] = clf.coef_[0], clf.intercept_[0]
    return W, b


def plant_and_search(X: dict[str, np.ndarray], Y: dict[str, np.ndarray], classes: list[str], seed: int,
                     planted: int = 80) -> tuple[set[int], list[int]]:
    """``planted`` wrong tags in the mosaics (half a tag dropped, half a tag added, each in its own mosaic), and
    the images tlearn's search suspects (``labels.mislabels`` as ``check --labels`` runs it), most suspicious
    first."""
    from tlearn.features import Features
    from tlearn.labels import mislabels

    features, given = np.vstack(list(X.values())), np.vstack(list(Y.values()))
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(given), planted, replace=False)
    for n, i in enumerate(rows):
        given[i, rng.choice(np.flatnonzero(given[i] == (n % 2 == 0)))] = n % 2 == 1
    paths = [Path(f"{i}") for i in range(len(given))]
    tags = [tuple(np.flatnonzero(row).tolist()) for row in given]
    found = mislabels(paths, tags, classes, Features(features), seed=seed, given="labelled")
    return set(rows.tolist()), [int(f.path) for f in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mosaics", type=int, default=1200)
    parser.add_argument("--out", type=Path, help="where to build the set (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "mosaics"
        start = time.perf_counter()
        file = out / "tags.csv" if (out / "tags.csv").is_file() else build(out, args.mosaics, args.seed)
        built = time.perf_counter() - start
        start = time.perf_counter()
        data = scan(DataConfig(path=str(file), seed=args.seed))
        read = time.perf_counter() - start
        extractor = Extractor(BackboneConfig(), TrainConfig(), RuntimeConfig(cache_dir=str(Path(tmp) / "cache")),
                              verbose=False)
        start = time.perf_counter()
        split = {s: data.split(s) for s in ("train", "validation", "test")}
        X = {s: extractor.features([x.path for x in v], announce=False).X for s, v in split.items()}
        Y = {s: targets([x.labels for x in v], len(data.classes)) for s, v in split.items()}
        extracted = time.perf_counter() - start
        start = time.perf_counter()
        W, b = ovr(X["train"], Y["train"])
        fitted = time.perf_counter() - start
        z = {s: X[s] @ W.T + b for s in X}
        plain = metrics(Y["test"], z["test"], data.classes, np.ones(len(data.classes)),
                        np.full(len(data.classes), 0.5))
        temperatures = fit_temperatures(Y["validation"], z["validation"])
        thresholds = fit_thresholds(Y["validation"], sigmoid(z["validation"] / temperatures))
        tuned = metrics(Y["test"], z["test"], data.classes, temperatures, thresholds)
        start = time.perf_counter()
        planted, flagged = plant_and_search(X, Y, data.classes, args.seed)
        searched = time.perf_counter() - start
        runs = {}
        for name, options in RUNS:
            start = time.perf_counter()
            clf = ImageClassifier(verbose=False, cache_dir=str(Path(tmp) / "cache"), seed=args.seed, **options)
            clf.fit(file, out=Path(tmp) / f"run-{len(runs)}")
            runs[name] = clf, time.perf_counter() - start
    sizes = ", ".join(f"{s} {len(v)}" for s, v in split.items())
    print(f"{len(data.samples)} mosaics of {len(data.classes)} species ({sizes}); {data.layout}")
    print(f"built {built:.1f} s, read {read:.2f} s, Lite0 features {extracted:.1f} s, {len(data.classes)} "
          f"regressions {fitted:.1f} s (the runs below reuse the cached centre views)\n")
    print("| model | test mAP | micro F1 | macro F1 | exact match | test BCE | seconds |")
    print("|---|---|---|---|---|---|---|")
    rows = [("baseline: one-vs-rest logistic regression on Lite0 centre features, C=1, thresholds 0.5", plain,
             fitted),
            ("the same, per-label temperatures and F1-best thresholds from validation", tuned, fitted)]
    rows += [(f"`tlearn train tags.csv{' ' + name if name else ''}`", clf.metrics["test"], seconds)
             for name, (clf, seconds) in runs.items()]
    for name, m, seconds in rows:
        print(f"| {name} | {m['mean_average_precision']:.4f} | {m['micro_f1']:.4f} | {m['macro_f1']:.4f} | "
              f"{m['exact_match']:.4f} | {m['loss']:.4f} | {seconds:.1f} |")
    found = [i for i in flagged if i in planted]
    top = flagged[:len(planted)]
    print(f"\nSuspected label errors (Lite0 centre features of all {sum(len(v) for v in X.values())} mosaics, "
          f"{len(planted)} tags planted wrong: half dropped, half added; {searched:.1f} s): {len(flagged)} images "
          f"suspected, {len(found)} of the {len(planted)} planted found; among the first {len(top)} suspects, "
          f"{sum(i in planted for i in top)} planted; among the first {len(top) // 2}, "
          f"{sum(i in planted for i in top[:len(top) // 2])}.")
    print()
    for name, (clf, _) in runs.items():
        print(f"- `{name or 'default'}`: {clf.decision.reason}")
        for step in clf.decision.plan:
            shown = {k: step[k] for k in ("head", "features", "epochs", "val_loss_calibrated", "change", "noise")
                     if k in step}
            print(f"  - {step['name']}: {step['status']}, {step['seconds']:.0f} s, {shown} {step['why']}")

if __name__ == "__main__":
    main()
