"""Default `tlearn train` (mode auto) against each fixed mode, and a short --time-budget, on the shared datasets.

Usage: python bench/bench_auto.py [--datasets ../shared/datasets] [--names hymenoptera,oxford17_flowers]
                                  [--modes features,auto,frozen,finetune] [--budget 60s] [--larger 5000]

``--larger N`` adds a folder of about N distinct images built from Oxford-17 (``variants``): several crops of
each photo, re-encoded, with every crop of one photo in the same split (70/15/15 per class), so that no test
image is a crop of a training photo.

Each row is the real command in a subprocess with its own empty cache folder (cold: no features, no ONNX export),
run one after another in one process so the ratios are side by side. Wall time is the whole command, start-up,
evaluation and report included; peak RSS comes from wait4(). Validation accuracy is held out (for a head refit
on train + validation, the one fitted on train alone); test accuracy is on the test split where there is one.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

from bench_train import machine, run_command  # bench/ is the script's folder, so it is on the path


def run(data: Path, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "tlearn.cli", "train", str(data), "--out", str(out), "--cache-dir",
           str(out.with_name(out.name + "-cache")), *flags]
    wall, _, rss_mb = run_command(cmd, out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    decision = config["decision"]
    kept = [s for s in decision.get("plan", []) if s["status"] == "kept"]
    if decision.get("plan") and len(decision["plan"]) > 1:
        plan = "; ".join(f"{s['kind']} {s['status']}" for s in decision["plan"])
        plan += f" -> {config['backbone']['backbone']}" + (f", {kept[-1]['head']}" if kept and "head" in kept[-1]
                                                            else "")
    else:
        plan = decision["mode"] + (f", {kept[-1]['head']}" if kept and "head" in kept[-1] else "")
    return {"wall": wall, "val": metrics["validation"]["accuracy"],
            "test": metrics["test"]["accuracy"] if "test" in metrics else None, "rss_mb": rss_mb,
            "plan": plan}


def variants(source: Path, dest: Path, n: int, seed: int = 0) -> Path:
    """``dest/{train,validation,test}/<class>/``: about ``n`` distinct JPEGs, ``ceil(n / photos)`` crops of 85 %
    of each photo's sides (the centre, then the corners), every crop of a photo in the photo's split."""
    from PIL import Image

    photos = sorted(p for p in source.rglob("*.jpg"))
    per = math.ceil(n / len(photos))
    spots = [(0.5, 0.5), (0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0), (0.5, 1), (0, 0.5), (1, 0.5)][:per]
    by_class: dict[str, list[Path]] = {}
    for p in photos:
        by_class.setdefault(p.parent.name, []).append(p)
    rng = random.Random(seed)
    for name, members in sorted(by_class.items()):
        rng.shuffle(members)
        cut = [round(len(members) * 0.7), round(len(members) * 0.85)]
        for i, photo in enumerate(members):
            split = "train" if i < cut[0] else "validation" if i < cut[1] else "test"
            with Image.open(photo) as im:
                im = im.convert("RGB")
                w, h = round(im.width * 0.85), round(im.height * 0.85)
                for j, (fx, fy) in enumerate(spots):
                    left, top = round((im.width - w) * fx), round((im.height - h) * fy)
                    out = dest / split / name / f"{photo.stem}-{j}.jpg"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    im.crop((left, top, left + w, top + h)).save(out, quality=90)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--names", default="hymenoptera,oxford17_flowers")
    parser.add_argument("--modes", default="features,auto,frozen,finetune")
    parser.add_argument("--budget", default="60s", help="an extra default run with this --time-budget ('' for none)")
    parser.add_argument("--larger", type=int, default=0, help="also a folder of about this many images (variants)")
    args = parser.parse_args()
    print(machine())
    print("| dataset | command | wall s | x features | val accuracy | test accuracy | peak RSS MB | plan / result |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: args.datasets / name for name in args.names.split(",") if name}
        if args.larger:
            built = variants(args.datasets / "oxford17_flowers", Path(tmp) / f"oxford17-x{args.larger}", args.larger)
            folders[f"{built.name} ({sum(1 for _ in built.rglob('*.jpg'))} images)"] = built
        for name, folder in folders.items():
            rows = [(m, [] if m == "auto" else ["--mode", m]) for m in args.modes.split(",")]
            if args.budget:
                rows.append((f"auto --time-budget {args.budget}", ["--time-budget", args.budget]))
            results = {}
            for label, flags in rows:
                results[label] = r = run(folder, Path(tmp) / f"{folder.name}-{len(results)}", *flags)
                base = results.get("features", {}).get("wall")
                ratio = f"{r['wall'] / base:.2f}" if base else "-"
                test = f"{r['test']:.4f}" if r["test"] is not None else "-"
                command = "tlearn train (default)" if label == "auto" else f"--mode {label}" \
                    if not label.startswith("auto") else label.replace("auto ", "")
                print(f"| {name} | {command} | {r['wall']:.1f} | {ratio} | {r['val']:.4f} | {test} | "
                      f"{r['rss_mb']:.0f} | {r['plan']} |", flush=True)


if __name__ == "__main__":
    main()
