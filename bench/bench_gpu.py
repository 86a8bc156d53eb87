"""The CUDA paths timed on one dataset, as one table: extraction, modes frozen and finetune, export and serve.

Usage: python bench/bench_gpu.py [--data ../shared/datasets/oxford17_flowers] [--epochs 2] [--requests 200]

Each training row is the real command in a subprocess with ``--device cuda`` and its own empty cache folder:
- features: extraction of every split's views with the base under autocast on the GPU (img/s from the log);
- frozen, finetune: ``--epochs`` epochs on augmented images (training img/s from the log), then evaluation;
- export: the fine-tuned run to one ONNX graph, checked against PyTorch;
- serve: `tlearn serve RUN --device cuda --runtime torch`, then one client sending ``--requests`` photos one after
  another (latency p50/p95) and 8 clients at once (images/s).
Wall time is the whole command. Exits with a message on a machine without CUDA. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_serve import free_port, load, multipart, start_server
from bench_train import machine, run_command

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "oxford17_flowers"


def train(data: Path, out: Path, mode: str, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "tlearn.cli", "train", str(data), "--mode", mode, "--device", "cuda",
           "--out", str(out), "--cache-dir", str(out.with_name(out.name + "-cache"))]
    if mode != "features":
        cmd += ["--epochs", str(epochs)]
    wall, output, _ = run_command(cmd, out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    extracted = [float(r) for r in re.findall(r"extracted \(([\d.]+) img/s\)", output)]
    epochs_s = [float(r) for r in re.findall(r"epoch \d+/\d+: .*, ([\d.]+) img/s\)", output)]
    rate = max(extracted, default=None) if mode == "features" else (sum(epochs_s) / len(epochs_s) if epochs_s
                                                                     else None)
    split = "test" if "test" in metrics else "validation"
    return {"wall": wall, "rate": rate, "what": f"{split} accuracy {metrics[split]['accuracy']:.4f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: bench_gpu.py times the CUDA paths")
    print(machine() + f"GPU: {torch.cuda.get_device_name(0)}\n")
    print("| step | wall s | img/s | result |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for mode in ("features", "frozen", "finetune"):
            runs[mode] = Path(tmp) / mode
            r = train(args.data, runs[mode], mode, args.epochs)
            label = "features (extraction, cold cache)" if mode == "features" else f"{mode}, {args.epochs} epochs"
            rate = "-" if r["rate"] is None else f"{r['rate']:.0f}"
            print(f"| {label} | {r['wall']:.1f} | {rate} | {r['what']} |", flush=True)
        onnx = Path(tmp) / "finetuned.onnx"
        wall, _, _ = run_command([sys.executable, "-m", "tlearn.cli", "export", str(runs["finetune"]), "--out",
                                  str(onnx)], Path(tmp) / "export.log")
        print(f"| export (fine-tuned, checked against PyTorch) | {wall:.1f} | - | {onnx.stat().st_size / 1e6:.1f} MB |")
        photos = sorted(args.data.rglob("*.jpg"))[:32]
        bodies = [multipart(p) for p in photos]
        port = free_port()
        start = time.perf_counter()
        server = start_server(str(runs["finetune"]), "torch", port, "--device", "cuda")
        ready = time.perf_counter() - start
        try:
            one = load(port, bodies, 1, args.requests)
            many = load(port, bodies, 8, args.requests)
        finally:
            server.terminate()
            server.wait(30)
        print(f"| serve, 1 client (ready in {ready:.1f} s) | - | {one['images_per_s']:.0f} | p50 {one['p50']:.1f} "
              f"ms, p95 {one['p95']:.1f} ms, {one['errors']} errors |")
        print(f"| serve, 8 clients | - | {many['images_per_s']:.0f} | p50 {many['p50']:.1f} ms, p95 "
              f"{many['p95']:.1f} ms, {many['errors']} errors |")


if __name__ == "__main__":
    main()
