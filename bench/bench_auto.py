"""Default `tlearn train` (mode auto) against each fixed mode, and a short --time-budget, on the shared datasets.

Usage: python bench/bench_auto.py [--datasets ../shared/datasets] [--names hymenoptera,oxford17_flowers]
                                  [--modes features,auto,frozen,finetune] [--budget 60s]

Each row is the real command in a subprocess with its own empty cache folder (cold: no features, no ONNX export),
run one after another in one process so the ratios are side by side. Wall time is the whole command, start-up,
evaluation and report included; peak RSS comes from wait4(). Validation accuracy is held out (for a head refit
on train + validation, the one fitted on train alone); test accuracy is on the test split where there is one.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--names", default="hymenoptera,oxford17_flowers")
    parser.add_argument("--modes", default="features,auto,frozen,finetune")
    parser.add_argument("--budget", default="60s", help="an extra default run with this --time-budget ('' for none)")
    args = parser.parse_args()
    print(machine())
    print("| dataset | command | wall s | x features | val accuracy | test accuracy | peak RSS MB | plan / result |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names.split(","):
            rows = [(m, [] if m == "auto" else ["--mode", m]) for m in args.modes.split(",")]
            if args.budget:
                rows.append((f"auto --time-budget {args.budget}", ["--time-budget", args.budget]))
            results = {}
            for label, flags in rows:
                results[label] = r = run(args.datasets / name, Path(tmp) / f"{name}-{len(results)}", *flags)
                base = results.get("features", {}).get("wall")
                ratio = f"{r['wall'] / base:.2f}" if base else "-"
                test = f"{r['test']:.4f}" if r["test"] is not None else "-"
                command = "tlearn train (default)" if label == "auto" else f"--mode {label}" \
                    if not label.startswith("auto") else label.replace("auto ", "")
                print(f"| {name} | {command} | {r['wall']:.1f} | {ratio} | {r['val']:.4f} | {test} | "
                      f"{r['rss_mb']:.0f} | {r['plan']} |", flush=True)


if __name__ == "__main__":
    main()
