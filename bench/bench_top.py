"""Fine-tuning the top stage on cached activations against features only and against --mode finetune.

Usage: python bench/bench_top.py [--datasets ../shared/datasets] [--names hymenoptera,oxford17_flowers]
                                 [--epochs 6] [--finetune-epochs 3]

Per dataset, from an empty cache folder, one after another in one process:
- features: the head search on the frozen base's cached features (both views), as mode auto's first step;
- top: the top stage and the head trained on cached activations for --epochs epochs from that head (every epoch
  run, the best kept on the validation loss after temperature scaling), at tlearn's learning rates, and again with
  the head at the full --lr, which shows why the head moves at ``top.HEAD_LR``;
- finetune: the real `tlearn train --mode finetune --epochs N` command in a subprocess.
Seconds per epoch are training and validation; the one pass that caches activations with the features is timed
apart. Test accuracy is on the test split where there is one (Oxford-17), through the cached test activations
for the top rows. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import machine, run_command  # bench/ is the script's folder, so it is on the path

from tlearn.calibrate import calibrated_loss
from tlearn.config import AugmentConfig, BackboneConfig, DataConfig, RuntimeConfig, TrainConfig
from tlearn.data import scan
from tlearn.extractor import Extractor
from tlearn.models import split_top
from tlearn.recipes import top
from tlearn.recipes.features import probe_features
from tlearn.recipes.job import Job, head_views
from tlearn.recipes.plan import Clock, choose

BASE = "efficientnet_lite0"


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def cached_rows(data: Path, cache: Path, epochs: int) -> list[dict]:
    config = TrainConfig(mode="auto")
    runtime = RuntimeConfig(cache_dir=str(cache))
    folder = scan(DataConfig(path=str(data)))
    ex = Extractor(BackboneConfig(BASE), config, runtime, verbose=False)
    job = Job(folder, choose(len(folder.split("train")), len(folder.classes), config), config, AugmentConfig(),
              runtime, ex, Clock(None), [BASE], progress=False)
    start = time.perf_counter()
    ex.features_views([s.path for split in ("train", "validation") for s in folder.split(split)], [BASE],
                      head_views(job), top=True)
    pass_s = time.perf_counter() - start
    probe = probe_features(job, [BASE])[0]
    y_val = np.array([s.label for s in folder.split("validation")])
    test = folder.split("test")
    y_test = np.array([s.label for s in test])
    rows = [{"row": "features (head search, both views)", "seconds": probe.seconds, "epoch_s": None,
             "val": probe.val_accuracy, "cal": calibrated_loss(probe.val_logits, y_val),
             "test": accuracy(probe.head(torch.from_numpy(ex.features([s.path for s in test]).X)).detach().numpy(),
                              y_test) if test else None, "note": f"one pass with activations: {pass_s:.1f} s"}]
    (test_acts,), _ = ex.tops([s.path for s in test], BASE, ("center",)) if test else ((None,), {})
    for label, head_lr in ((f"top, head at {top.HEAD_LR:g} x lr", top.HEAD_LR), ("top, head at the full lr", 1.0)):
        top.HEAD_LR = head_lr
        history = copy.deepcopy(probe.history)
        start = time.perf_counter()
        every = dataclasses.replace(job, train=dataclasses.replace(config, patience=epochs))  # no early stop
        tuned, score = top.finetune_top(every, probe.head, history, math.inf, None, epochs=epochs)
        seconds = time.perf_counter() - start
        ran = [i for i, s in enumerate(history.stage) if s == top.STAGE]
        best = history.best_epoch - 1
        test_acc = None
        if test:
            _, _, stage = split_top(tuned.model.base)
            with torch.no_grad():
                test_acc = accuracy(top.TopHead(stage, tuned.model.head)(torch.from_numpy(test_acts)).numpy(), y_test)
        rows.append({"row": label, "seconds": seconds, "epoch_s": seconds / len(ran),
                     "val": history.history["val_accuracy"][best], "cal": score, "test": test_acc,
                     "note": f"kept epoch {best - ran[0] + 1} of {len(ran)}; val accuracy by epoch "
                             + " ".join(f"{history.history['val_accuracy'][i]:.3f}" for i in ran)})
    top.HEAD_LR = 0.3
    return rows


def finetune_row(data: Path, out: Path, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "tlearn.cli", "train", str(data), "--mode", "finetune", "--epochs", str(epochs),
           "--out", str(out), "--cache-dir", str(out.with_name(out.name + "-cache"))]
    wall, output, _ = run_command(cmd, out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    epoch_s = [float(s) for s in re.findall(r"finetune epoch \d+/\d+: .*?, ([\d.]+) s, [\d.]+ img/s\)", output)]
    return {"row": f"--mode finetune --epochs {epochs} (whole command)", "seconds": wall,
            "epoch_s": sum(epoch_s) / len(epoch_s) if epoch_s else None,
            "val": metrics["validation"]["accuracy"], "cal": metrics["validation"].get("loss"),
            "test": metrics["test"]["accuracy"] if "test" in metrics else None,
            "note": "val loss at the run's own temperature"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--names", default="hymenoptera,oxford17_flowers")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine())
    print("| dataset | model | seconds | s / epoch | val accuracy | val loss, calibrated | test accuracy | notes |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names.split(","):
            rows = cached_rows(args.datasets / name, Path(tmp) / f"{name}-cache", args.epochs)
            if args.finetune_epochs:
                rows.append(finetune_row(args.datasets / name, Path(tmp) / f"{name}-finetune", args.finetune_epochs))
            for r in rows:
                cells = [name, r["row"], f"{r['seconds']:.1f}", "-" if r["epoch_s"] is None else f"{r['epoch_s']:.1f}",
                         f"{r['val']:.4f}", "-" if r["cal"] is None else f"{r['cal']:.4f}",
                         "-" if r["test"] is None else f"{r['test']:.4f}", r["note"]]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
