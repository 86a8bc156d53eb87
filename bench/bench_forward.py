"""The frozen base's forward pass alone, per runtime and batch size: why tlearn uses batch 8 on a CPU.

Usage: python bench/bench_forward.py [--backbone efficientnet_lite0] [--images 192] [--compile] [--openvino]
                                     [--rows torch,channels-last,bf16,onnx]

Random 224-px input, all cores in one call (no decoding, no lanes), best of 3 passes over ``--images`` images.
``--compile`` adds torch.compile rows at batch 8 with their compile time. ``--openvino`` adds OpenVINO's CPU
runtime on the same ONNX export (where the ``openvino`` package is installed), and the largest difference of its
features from PyTorch's fp32 ones. Prints a Markdown table of img/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())  # time torch.compile's first call cold

import torch

from tlearn.backbones import load_backbone
from tlearn.config import BackboneConfig, RuntimeConfig, TrainConfig
from tlearn.runtime import base_engine, export_onnx

BATCHES = (1, 4, 8, 16, 32, 64)


def rate(forward, x: torch.Tensor, images: int) -> float:
    forward(x)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(max(1, images // len(x))):
            forward(x)
        best = min(best, time.perf_counter() - start)
    return max(1, images // len(x)) * len(x) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (needs a C++ compiler)")
    parser.add_argument("--openvino", action="store_true", help="also time OpenVINO on the ONNX export")
    parser.add_argument("--rows", default="torch,channels-last,bf16,onnx",
                        help="which of the runtime rows to time (comma-separated)")
    args = parser.parse_args()
    bb = load_backbone(BackboneConfig(backbone=args.backbone))
    cores = os.cpu_count()
    rows = {"torch fp32, NCHW": ("torch", "fp32", torch.contiguous_format),
            "torch fp32, channels-last": ("torch", "fp32", torch.channels_last),
            "torch bf16 autocast, channels-last": ("torch", "bf16", torch.channels_last),
            "ONNX Runtime fp32": ("onnx", "fp32", torch.contiguous_format)}
    keys = dict(zip(("torch", "channels-last", "bf16", "onnx"), rows, strict=True))
    rows = {keys[k]: rows[keys[k]] for k in args.rows.split(",") if k}
    print(f"{args.backbone}, forward pass only, {cores} threads; {platform.machine()}, torch {torch.__version__}\n")
    print("| runtime | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for name, (runtime, precision, layout) in rows.items():
        engine = base_engine(bb, TrainConfig(precision=precision), RuntimeConfig(runtime=runtime, workers=1))
        bb.model.to(memory_format=layout)
        forward = engine.forward
        if runtime == "torch" and layout == torch.contiguous_format:
            def forward(x):  # the plain eager model, as the tutorials run it
                return bb.features(x)
        rates = []
        with torch.inference_mode():
            torch.set_num_threads(cores)
            for b in BATCHES:
                x = torch.randn(b, *bb.preprocessing["input_size"])
                rates.append(rate(forward, x, args.images))
        print(f"| {name} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)
    if args.openvino:
        import openvino

        compiled = openvino.Core().compile_model(str(export_onnx(bb)), "CPU", {"INFERENCE_NUM_THREADS": cores})
        request = compiled.create_infer_request()

        def forward(x):
            return request.infer({0: x.numpy()})[0]

        rates = [rate(forward, torch.randn(b, *bb.preprocessing["input_size"]), args.images) for b in BATCHES]
        print(f"| OpenVINO {openvino.__version__} fp32 | " + " | ".join(f"{r:.0f}" for r in rates) + " |")
        x = torch.randn(8, *bb.preprocessing["input_size"])
        with torch.inference_mode():
            expected = bb.features(x.contiguous()).numpy()
        print(f"\nOpenVINO against PyTorch fp32, batch 8: largest difference {abs(forward(x) - expected).max():.2e}")
    if args.compile:
        print("\n| torch.compile, channels-last, batch 8 | first call s | img/s |\n|---|---|---|")
        bb.model.to(memory_format=torch.channels_last)
        x = torch.randn(8, *bb.preprocessing["input_size"]).contiguous(memory_format=torch.channels_last)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            compiled = torch.compile(bb.features)
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
                start = time.perf_counter()
                compiled(x)
                first = time.perf_counter() - start
                print(f"| {precision} | {first:.1f} | {rate(compiled, x, args.images):.0f} |", flush=True)


if __name__ == "__main__":
    main()
