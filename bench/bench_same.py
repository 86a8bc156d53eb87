"""Same seed, same results? What a user sees of a training run, for comparing two versions of tlearn.

Usage: python bench/bench_same.py [--data ../shared/datasets/hymenoptera] [--json results.json]

Runs `tlearn train DATA --seed 0` in the modes `features`, `frozen --epochs 2`, `finetune --epochs 1` and `auto`,
each in its own process with one shared cache folder (so `auto` reuses the features the others extracted), and
prints, per mode: a hash of the split manifest, the mode auto kept and its steps, the chosen head, the
calibration temperature, and the validation and test metrics to 1e-6. Run it before and after a change and
compare the tables (or the --json files): a change that keeps behaviour keeps every cell, except auto's steps
where its plan, which depends on measured throughput, differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"features": ["--mode", "features"], "frozen --epochs 2": ["--mode", "frozen", "--epochs", "2"],
         "finetune --epochs 1": ["--mode", "finetune", "--epochs", "1"], "auto": ["--mode", "auto"]}


def summary(run: Path) -> dict:
    """What a user sees of a finished run, rounded to 1e-6."""
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    decision = config.get("decision", {})
    plan = decision.get("plan") or [{}]
    kept = [s for s in plan if s.get("status") == "kept"]
    out = {"split sha256": hashlib.sha256((run / "split.csv").read_bytes()).hexdigest()[:12],
           "mode": decision.get("mode"), "steps": "; ".join(f"{s.get('kind')}:{s.get('status')}" for s in plan),
           "head": (kept[-1] if kept else plan[0]).get("head", ""), "best epoch": config.get("best_epoch"),
           "temperature": round(config["model"]["temperature"], 6)}
    for split, m in metrics.items():
        out[f"{split} accuracy"] = round(m["accuracy"], 6)
        out[f"{split} loss"] = round(m["loss"], 6)
        out[f"{split} ECE"] = round(m["calibration"]["ece"], 6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in MODES.items():
            run = Path(tmp) / name.split()[0]
            cmd = [sys.executable, "-m", "tlearn", "train", str(args.data), *flags, "--seed", "0", "--out", str(run),
                   "--cache-dir", str(Path(tmp) / "cache")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            rows[name] = summary(run)
            print(f"{name}: done", file=sys.stderr, flush=True)
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("| | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r.get(k, "")) for r in rows.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
