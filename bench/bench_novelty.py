"""Which novelty score tells images unlike the training data apart: every candidate, side by side.

Two settings on the shared datasets, each split by tlearn (70/15/15, seed 0) in a temporary folder of links:
- **far**: ants vs bees (hymenoptera, all images), shown the Oxford-17 flowers (test/, 272 photos);
- **near**: twelve Oxford-17 species (train/ + test/), shown the other five (400 photos).
A head is chosen on the training split's cached features (tlearn's own search, before any refit). Each score is
computed for the test split (in distribution) and the other photos; the threshold is the 98th percentile of the
validation split's scores, as `tlearn train --accept 0.98` sets it. Columns: AUROC (test vs other), and the
shares of other and of test images above the threshold.

    python bench/bench_novelty.py [--datasets ../shared/datasets] [--accept 0.98]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlearn.calibrate import calibrated
from tlearn.config import BackboneConfig, DataConfig, RuntimeConfig, TrainConfig
from tlearn.data import IMAGE_EXTENSIONS, scan
from tlearn.extractor import Extractor
from tlearn.novelty import cap_rows, energy, fit, knn_distance, normalised, sample_rows
from tlearn.recipes.heads import Split, choose_head, describe

NEAR_OTHER = ("snowdrop", "sunflower", "tigerlily", "tulip", "windflower")


def link_folder(dest: Path, classes: dict[str, list[Path]]) -> Path:
    """A folder of class sub-folders holding links to the given images."""
    for name, files in classes.items():
        (dest / name).mkdir(parents=True)
        for i, f in enumerate(files):
            (dest / name / f"{i:04d}{f.suffix}").symlink_to(f)
    return dest


def images(*folders: Path) -> list[Path]:
    return sorted(p for d in folders for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def made_up(dest: Path, n: int = 200, seed: int = 0) -> list[Path]:
    """``n`` pictures that are not photographs, of the kinds people upload by mistake: text pages, charts, flat
    colours with sensor-like noise, gradients and checkerboards (PNG, 400 x 300)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageDraw

    from tlearn.plots import font

    rng, out = np.random.default_rng(seed), []
    dest.mkdir(parents=True)
    words = "the of and to in is that for it as was with be by on not he this are or his from at which".split()
    for i in range(n):
        kind, path = i % 5, dest / f"{i:04d}.png"
        if kind == 0:  # a page of text
            img = Image.new("RGB", (400, 300), tuple(int(v) for v in rng.integers(225, 256, 3)))
            draw = ImageDraw.Draw(img)
            for line in range(12):
                draw.text((12, 10 + 23 * line), " ".join(rng.choice(words, 9)), fill=(20, 20, 20), font=font(15))
        elif kind == 1:  # a chart
            fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
            (ax.plot if i % 2 else ax.bar)(range(12), rng.normal(size=12).cumsum())
            ax.set_title(" ".join(rng.choice(words, 3)))
            fig.savefig(path)
            plt.close(fig)
            out.append(path)
            continue
        elif kind == 2:  # a flat colour, with noise
            colour = rng.integers(0, 256, 3)
            img = Image.fromarray(np.clip(colour + rng.normal(0, 6, (300, 400, 3)), 0, 255).astype(np.uint8))
        elif kind == 3:  # a gradient
            t = np.linspace(0, 1, 400)[None, :, None]
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = Image.fromarray(np.repeat(a + (b - a) * t, 300, 0).astype(np.uint8))
        else:  # a checkerboard
            cell = int(rng.integers(10, 60))
            board = ((np.arange(300)[:, None] // cell + np.arange(400)[None] // cell) % 2).astype(np.uint8)
            img = Image.fromarray(np.stack([board * int(v) for v in rng.integers(60, 256, 3)], 2))
        img.save(path)
        out.append(path)
    return out


def auroc(inside: np.ndarray, other: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(other))], np.r_[inside, other]))


def setting(name: str, folder: Path, other: list[Path], ex: Extractor, accept: float) -> list[tuple]:
    data = scan(DataConfig(path=str(folder), seed=0))
    feats, ys, paths = {}, {}, {}
    for split in ("train", "validation", "test"):
        samples = data.split(split)
        f = ex.features([s.path for s in samples], announce=False)
        keep = [s.path not in f.failed for s in samples]
        feats[split], ys[split] = f.X[keep], np.array([s.label for s in samples])[keep]
        paths[split] = [s.path for s in samples if s.path not in f.failed]
    o = ex.features(other, announce=False)
    feats["other"] = o.X[[p not in o.failed for p in other]]
    train = Split(feats["train"], None, ys["train"])
    probe = choose_head(train, Split(feats["validation"], None, ys["validation"]), len(data.classes),
                        TrainConfig(head="logreg"))
    import torch

    with torch.no_grad():
        logits = {k: probe.head.eval()(torch.from_numpy(v)).numpy() for k, v in feats.items()}
    ref = normalised(feats["train"])
    start = time.perf_counter()
    scores: dict[str, dict[str, np.ndarray]] = {}

    def add(label: str, fn) -> None:
        scores[label] = {k: fn(feats[k], logits[k]) for k in ("validation", "test", "other")}

    add("max softmax (baseline)", lambda X, z: -calibrated(z, 1.0).max(1))
    add("energy, raw logits", lambda X, z: -np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) - z.max(1))
    add("energy", lambda X, z: energy(z))
    for k in (1, 5, 10, 20, 50):
        add(f"k-NN distance, k={k}", lambda X, z, k=k: knn_distance(ref, X, k))
    mean = feats["train"].mean(0)
    cref = normalised(feats["train"] - mean)
    add("k-NN distance, centred features, k=10", lambda X, z: knn_distance(cref, X - mean, 10))
    from sklearn.covariance import LedoitWolf

    means = np.stack([feats["train"][ys["train"] == c].mean(0) for c in np.unique(ys["train"])])
    precision = LedoitWolf().fit(feats["train"] - means[ys["train"]]).precision_
    add("Mahalanobis to the nearest class mean (shared covariance)", lambda X, z: np.stack(
        [np.einsum("nf,fg,ng->n", X - c, precision, X - c) for c in means], 1).min(1))

    def z(label: str) -> dict[str, np.ndarray]:
        v = scores[label]["validation"]
        return {k: (s - v.mean()) / v.std() for k, s in scores[label].items()}

    en, msp = z("energy"), z("max softmax (baseline)")
    for k in (1, 10):
        knn = z(f"k-NN distance, k={k}")
        for w in (0.5, 1.0, 2.0):
            scores[f"z(k-NN, k={k}) + {w:g} z(energy)"] = {s: knn[s] + w * en[s] for s in knn}
        scores[f"z(k-NN, k={k}) + z(max softmax)"] = {s: knn[s] + msp[s] for s in knn}
        scores[f"max(z(k-NN, k={k}), z(energy))"] = {s: np.maximum(knn[s], en[s]) for s in knn}
    for fraction in (0.5, 0.25, 0.1):  # what a smaller cap on the reference features costs
        rows = sample_rows(ys["train"], max(1, int(len(ref) * fraction)), 0)
        knn = {k: knn_distance(ref[rows], feats[k], 10) for k in ("validation", "test", "other")}
        v = knn["validation"]
        scores[f"max(z(k-NN, k=10), z(energy)), {fraction:.0%} of the training images"] = {
            s: np.maximum((knn[s] - v.mean()) / v.std(), en[s]) for s in knn}
    shipped = fit(feats["train"], ys["train"], feats["validation"], logits["validation"], accept)
    scores["shipped: tlearn.novelty.fit"] = {k: shipped.score(feats[k], logits[k]) for k in ("validation", "test",
                                                                                                "other")}
    seconds = time.perf_counter() - start
    flagged = [paths["test"][i].resolve().name for i in np.flatnonzero(scores["shipped: tlearn.novelty.fit"]["test"]
                                                                        > shipped.threshold)]
    rows = []
    for label, s in scores.items():
        threshold = np.quantile(s["validation"], accept)
        rows.append((name, label, auroc(s["test"], s["other"]), float((s["other"] > threshold).mean()),
                     float((s["test"] > threshold).mean())))
    print(f"{name}: {len(ys['train'])} train, {len(ys['validation'])} validation, {len(ys['test'])} test, "
          f"{len(feats['other'])} other; head {describe(probe.chosen)}; scores in {seconds:.1f} s; test images the "
          f"shipped score calls unknown: {', '.join(flagged) or 'none'}", file=sys.stderr)
    return rows


def small_folders(hym: Path, tmp: Path, ex: Extractor, accept: float, draws: int = 10) -> list[tuple]:
    """A few photos a class (4, 8, 16 and 32, drawn at random from all of hymenoptera's photos of the class, in
    ``draws`` draws, seeds 0, 1, ...): the share of the set's other photos called unknown, with the validation
    split alone setting the threshold (as for larger folders) and with the fallback that tlearn uses below
    ``MIN_VALIDATION`` validation images. Returns (photos a class, training, validation, label, shares)."""
    import torch

    import tlearn.novelty as novelty

    pools = {c: [p for p in images(hym / "train" / c, hym / "val" / c) if p.suffix != ".gif"] for c in ("ants", "bees")}
    shares: dict[tuple, list[float]] = {}
    for n in (4, 8, 16, 32):
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            order = {c: rng.permutation(len(v)) for c, v in pools.items()}
            folder = link_folder(tmp / f"small-{n}-{draw}", {c: [pools[c][i] for i in order[c][:n]] for c in pools})
            others = [pools[c][i] for c in pools for i in order[c][n:]]
            data = scan(DataConfig(path=str(folder), seed=draw))
            split = {s: data.split(s) for s in ("train", "validation")}
            X = {s: ex.features([x.path for x in v], announce=False).X for s, v in split.items()}
            y = {s: np.array([x.label for x in v]) for s, v in split.items()}
            probe = choose_head(Split(X["train"], None, y["train"]), Split(X["validation"], None, y["validation"]),
                                2, TrainConfig(head="logreg"))
            X["other"] = ex.features(others, announce=False).X
            with torch.no_grad():
                z = {s: probe.head.eval()(torch.from_numpy(v)).numpy() for s, v in X.items()}
            for label, least in (("validation alone", 0), ("shipped (fallback below 30)", novelty.MIN_VALIDATION)):
                saved, novelty.MIN_VALIDATION = novelty.MIN_VALIDATION, least
                try:
                    scorer = fit(X["train"], y["train"], X["validation"], z["validation"], accept)
                finally:
                    novelty.MIN_VALIDATION = saved
                key = (n, len(y["train"]), len(y["validation"]), label)
                shares.setdefault(key, []).append(float((scorer.score(X["other"], z["other"]) > scorer.threshold)
                                                        .mean()))
    return [(*key, v) for key, v in shares.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--accept", type=float, default=0.98)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    hym, flowers = args.datasets / "hymenoptera", args.datasets / "oxford17_flowers"
    species = sorted(p.name for p in (flowers / "train").iterdir() if p.is_dir())
    ex = Extractor(BackboneConfig(backbone=args.backbone), TrainConfig(), RuntimeConfig(), verbose=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        far = link_folder(Path(tmp) / "far", {c: images(hym / "train" / c, hym / "val" / c) for c in ("ants", "bees")})
        rows += setting("far: ants vs bees, shown 200 pictures that are not photos", far,
                        made_up(Path(tmp) / "made_up"), ex, args.accept)
        rows += setting("ants vs bees, shown Oxford-17 flowers", far, images(flowers / "test"), ex, args.accept)
        near = link_folder(Path(tmp) / "near", {c: images(flowers / "train" / c, flowers / "test" / c)
                                                for c in species if c not in NEAR_OTHER})
        rest = images(*(flowers / s / c for s in ("train", "test") for c in NEAR_OTHER))
        rows += setting("near: 12 Oxford-17 species, shown the other 5", near, rest, ex, args.accept)
        every = link_folder(Path(tmp) / "flowers", {c: images(flowers / "train" / c, flowers / "test" / c)
                                                    for c in species})
        rows += setting("17 Oxford-17 species, shown ants and bees", every, images(hym / "train", hym / "val"), ex,
                        args.accept)
        small = small_folders(hym, Path(tmp), ex, args.accept)
    print("\nsmall folders: the share of the set's other photos (genuine ants and bees) called unknown, over 10 "
          "random draws\n")
    print("| photos a class | training | validation | threshold set on | mean | lowest | highest |")
    print("|---|---|---|---|---|---|---|")
    for n, n_train, n_val, label, values in small:
        print(f"| {n} | {n_train} | {n_val} | {label} | {np.mean(values):.1%} | {min(values):.1%} | "
              f"{max(values):.1%} |")
    print("\n| reference rows (float16) | added to the model file | scoring cost per image (batch 8) |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    for rows_n in (278, 1000, cap_rows(1280)):
        X = rng.random((rows_n, 1280), dtype=np.float32)
        scorer = fit(X, np.zeros(rows_n, dtype=int), X[:50], rng.normal(size=(50, 2)), args.accept)
        batch, z = rng.random((8, 1280), dtype=np.float32), rng.normal(size=(8, 2))
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 1.0:
            scorer.score(batch, z)
            n += 8
        cost = 1e6 * (time.perf_counter() - start) / n
        print(f"| {rows_n} | {scorer.reference.nbytes / 2**20:.2f} MiB | {cost:.0f} µs |")
    print(f"\nnovelty scores on {args.backbone} features; threshold: the {args.accept:.0%} quantile of validation\n")
    print("| setting | score | AUROC | other flagged | test flagged |")
    print("|---|---|---|---|---|")
    for name, label, a, other, test in rows:
        print(f"| {name} | {label} | {a:.3f} | {other:.1%} | {test:.1%} |")


if __name__ == "__main__":
    main()
