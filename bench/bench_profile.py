"""The fixed cost of a command: wall time of the everyday commands, and where a warm `tlearn train` spends its time.

Usage: python bench/bench_profile.py [--data examples/ants_bees] [--images N] [--against TREE]

With ``--images N``, the folder is N distinct JPEG files built from ``--data`` (bench_scaling.build). With
``--against TREE`` (another checkout of tlearn, e.g. ``git worktree add /tmp/before HEAD~1``), table 1 runs each
command with that tree's code and with this one's, alternately, 3 times each, and shows both medians side by side
and their ratio; each tree keeps its own cache folder, so "warm" means warm for both.

1. Wall time of `tlearn --help`, `tlearn check DATA`, `tlearn train DATA --mode features` with a cold and a warm
   feature cache, and a cold `tlearn predict RUN IMAGE`, each a fresh process (Python start-up included).
2. Import time of the heavy libraries in the warm `tlearn train` process (`python -X importtime`), cumulative.
3. A cProfile of the warm `tlearn train` in-process: the cumulative time of tlearn's own stages.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "timm", "torchvision", "sklearn", "scipy", "matplotlib", "onnxruntime", "onnx", "PIL", "numpy",
         "tlearn")
STAGES = ("tlearn/api.py:.*\\(fit\\)", "tlearn/recipes/__init__.py:.*\\(train\\)",
          "tlearn/recipes/features.py:.*\\(probe_splits\\)", "tlearn/recipes/heads.py:.*\\(choose_head\\)",
          "tlearn/recipes/heads.py:.*\\(refit\\)", "tlearn/extractor.py:.*\\(engine\\)",
          "tlearn/extractor.py:.*\\(base\\)", "tlearn/data.py:.*\\(scan\\)", "tlearn/check.py:.*\\(quick_check\\)",
          "tlearn/evaluate.py:.*\\(assess\\)", "tlearn/api.py:.*\\(save\\)",
          "tlearn/htmlreport.py:.*\\(build_report\\)", "tlearn/plots.py:.*\\(curves\\)")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stderr


def side_by_side(rows: list[tuple[str, list[str]]], run: Path, other: Path, tmp: Path, repeats: int = 3) -> None:
    """Each command with ``other``'s code and with this tree's, alternately, ``repeats`` times each: the medians."""
    import statistics

    trees = {"against": other.resolve(), "this": Path(__file__).resolve().parents[1]}
    envs = {name: {**os.environ, "PYTHONPATH": str(tree), "TLEARN_CACHE_DIR": str(tmp / f"cache-{name}")}
            for name, tree in trees.items()}
    print(f"against: {trees['against']}; this: {trees['this']} (medians of {repeats} alternating runs)\n")
    print("| command | against s | this s | this / against |")
    print("|---|---|---|---|")
    for label, cmd in rows:
        walls: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(repeats if "cold cache" not in label else 1):  # a cold cache is cold once
            for name in trees:
                own = [str(run.with_name(f"run-{name}")) if a == str(run) else a for a in cmd]
                walls[name].append(timed(own, envs[name])[0])
        a, b = (statistics.median(walls[name]) for name in trees)
        print(f"| `{label}` | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "ants_bees")
    parser.add_argument("--images", type=int, default=0, help="build a folder of this many distinct JPEGs from --data")
    parser.add_argument("--against", type=Path, help="another checkout of tlearn to time each command against")
    args = parser.parse_args()
    tlearn = [sys.executable, "-m", "tlearn.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            from bench_scaling import build

            build(args.data, Path(tmp) / f"{args.data.name}-{args.images}", args.images)
            args.data = Path(tmp) / f"{args.data.name}-{args.images}"
        env = {**os.environ, "TLEARN_CACHE_DIR": str(Path(tmp) / "cache")}
        run = Path(tmp) / "run"
        image = sorted(args.data.rglob("*.jpg"))[0]
        train = [*tlearn, "train", str(args.data), "--mode", "features", "--out", str(run)]
        rows = [("tlearn --help", [*tlearn, "--help"]), (f"tlearn check {args.data.name}", [*tlearn, "check",
                                                                                          str(args.data)]),
                ("tlearn train --mode features, cold cache", train),
                ("tlearn train --mode features, warm cache", train),
                ("tlearn predict RUN IMAGE, cold", [*tlearn, "predict", str(run), str(image)])]
        print(f"{args.data} ({sum(1 for _ in args.data.rglob('*.jpg'))} images)\n")
        if args.against:
            side_by_side(rows, run, args.against, Path(tmp))
            env["TLEARN_CACHE_DIR"] = str(Path(tmp) / "cache-this")  # warm for the sections below
        else:
            print("| command | wall s |")
            print("|---|---|")
            for label, cmd in rows:
                wall, _ = timed(cmd, env)
                print(f"| `{label}` | {wall:.2f} |", flush=True)

        _, log = timed([sys.executable, "-X", "importtime", *train[1:]], env)
        cumulative: dict[str, int] = {}
        for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", log):
            name, depth = m[3], len(m[2])
            if name in HEAVY and depth <= 12:  # the first import of each package, wherever it happened
                cumulative.setdefault(name, int(m[1]))
        print("\nImports in the warm `tlearn train` (cumulative, each package where it was first imported):\n")
        print("| package | ms |")
        print("|---|---|")
        for name, us in sorted(cumulative.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {us / 1000:.0f} |")

        from tlearn.cli import main as cli

        os.environ["TLEARN_CACHE_DIR"] = env["TLEARN_CACHE_DIR"]
        profile = cProfile.Profile()
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            profile.runcall(cli, train[3:])
        wall = time.perf_counter() - start
        stats = pstats.Stats(profile)
        print(f"\nStages of the warm `tlearn train` in-process under cProfile ({wall:.2f} s in all, imports included; "
              "cProfile slows Python code down), cumulative:\n")
        print("| stage | s |")
        print("|---|---|")
        for (file, line, fn), (_, _, _, cum, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3]):
            where = f"{file}:{line}({fn})"
            if any(re.search(p, where) for p in STAGES):
                print(f"| `{Path(file).parent.name}/{Path(file).name}:{fn}` | {cum:.2f} |")


if __name__ == "__main__":
    main()
