"""The notebook of the whole workflow under a real Jupyter kernel, and what importing tlearn costs in one.

    python bench/bench_notebook.py [--before DIR] [--repeat 5]

1. Runs examples/transfer_learning.ipynb top to bottom with nbclient (a copy of the bundled photos in a temporary
   folder; a fresh kernel) and prints its wall time and each cell's.
2. In fresh kernels, times ``import tlearn`` and ``from tlearn import ImageClassifier`` (which imports torch), and
   says whether ipywidgets was imported by them; with ``--before DIR`` (a checkout
   of an earlier commit, e.g. ``git worktree add /tmp/before HEAD~1``), the same for that code, side by side. The
   median of ``--repeat`` kernels each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
PROBE = """import json, sys, time
sys.path.insert(0, {path!r})
start = time.perf_counter(); import tlearn; light = time.perf_counter() - start
start = time.perf_counter(); from tlearn import ImageClassifier; heavy = time.perf_counter() - start
print(json.dumps({{"import tlearn": light, "ImageClassifier": heavy, "where": tlearn.__file__,
                  "ipywidgets": "ipywidgets" in sys.modules}}))"""


def run_notebook() -> tuple[float, list[tuple[str, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "examples"
        shutil.copytree(ROOT / "examples" / "ants_bees", work / "ants_bees")
        nb = nbformat.read(ROOT / "examples" / "transfer_learning.ipynb", as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=True,
                       resources={"metadata": {"path": str(work)}}).execute()
        total = time.perf_counter() - start
    cells = []
    for c in nb.cells:
        timing = c.metadata.get("execution", {})
        if c.cell_type == "code" and timing:
            seconds = (_when(timing["shell.execute_reply"]) - _when(timing["iopub.execute_input"]))
            cells.append((c.source.splitlines()[0][:70], seconds))
    return total, cells


def _when(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def probe(path: Path) -> dict:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PROBE.format(path=str(path)))])
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    return json.loads(nb.cells[0].outputs[0]["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout of earlier code to compare the import with")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    total, cells = run_notebook()
    print(f"notebook: {total:.1f} s in all (kernel start included)\n\n| cell | s |\n|---|---|")
    for source, seconds in cells:
        print(f"| `{source}` | {seconds:.1f} |")
    trees = {"this tree": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    results = {name: [] for name in trees}
    for _ in range(args.repeat):  # interleaved, so that the machine's load falls on both alike
        for name, path in trees.items():
            results[name].append(probe(path))
    print(f"\nimporting in a fresh kernel (median of {args.repeat}):\n")
    print("| code | import tlearn (s) | + ImageClassifier (s) | ipywidgets imported |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        assert all(Path(r["where"]).is_relative_to(trees[name]) for r in rows), rows[0]["where"]
        print(f"| {name} | {statistics.median(r['import tlearn'] for r in rows):.3f} | "
              f"{statistics.median(r['ImageClassifier'] for r in rows):.2f} | {rows[0]['ipywidgets']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
