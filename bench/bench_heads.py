"""Which features and which logistic regression: test accuracy on Oxford-17 of a head fitted on train + validation.

Usage: python bench/bench_heads.py [--data ../shared/datasets/oxford17_flowers] [--cache-dir DIR]

Features of EfficientNet-Lite0, Lite1 and Lite2 (centre crop and mirror image) come from tlearn's extraction
path and feature cache. Each row is one feature set; the columns are scikit-learn's LogisticRegression (C=1)
on standardised features, on the raw features, and on the raw features with the mirror images as extra training
rows and the two views' logits averaged at prediction. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tlearn.backbones import load_backbone
from tlearn.config import BackboneConfig, DataConfig, RuntimeConfig, TrainConfig
from tlearn.data import scan
from tlearn.features import FeatureCache
from tlearn.runtime import base_engine

SETS = [["efficientnet_lite0"], ["efficientnet_lite0", "efficientnet_lite2"],
        ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]]


def features(paths: list[Path], name: str, view: str, cache_dir: str | None) -> np.ndarray:
    bb = load_backbone(BackboneConfig(name))
    engine = base_engine(bb, TrainConfig(), RuntimeConfig(cache_dir=cache_dir))
    return engine.extract(paths, FeatureCache(cache_dir, bb, engine.precision, view), progress=False, view=view).X


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"
                                              / "oxford17_flowers"))
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    folder = scan(DataConfig(path=args.data))
    paths = [s.path for s in folder.samples]
    y = np.array([s.label for s in folder.samples])
    test = np.array([s.split == "test" for s in folder.samples])
    fit = ~test
    names = sorted({n for s in SETS for n in s})
    views = {(n, v): features(paths, n, v, args.cache_dir) for n in names for v in ("center", "flip")}
    print(f"{args.data}: fitted on {fit.sum()} train + validation images, scored on {test.sum()} test images\n")
    print("| features | standardised, C=1 | raw, C=1 | raw, C=1, + mirror images |")
    print("|---|---|---|---|")
    for s in SETS:
        X = np.hstack([views[n, "center"] for n in s])
        Xf = np.hstack([views[n, "flip"] for n in s])
        std = make_pipeline(StandardScaler(), LogisticRegression(C=1, max_iter=3000)).fit(X[fit], y[fit])
        raw = LogisticRegression(C=1, max_iter=3000).fit(X[fit], y[fit])
        both = LogisticRegression(C=1, max_iter=3000).fit(np.vstack([X[fit], Xf[fit]]), np.concatenate([y[fit]] * 2))
        mirrored = (both.decision_function(X[test]) + both.decision_function(Xf[test])).argmax(1)
        scores = [(std.predict(X[test]) == y[test]).mean(), (raw.predict(X[test]) == y[test]).mean(),
                  (mirrored == y[test]).mean()]
        print(f"| {' + '.join(n.replace('efficientnet_', '') for n in s)} | "
              + " | ".join(f"{100 * a:.2f} %" for a in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
