"""Batch prediction that streams: `tlearn predict RUN --from-list LIST --out FILE` over up to 100,000 image files.

The files are hard links (new names, no new bytes) to thumbnails of the photos given (160 px, so that the model,
not JPEG decoding, sets the pace), 1,000 a folder. Measured, each as its own `tlearn predict` process:
1. peak memory (the process's maximum resident set) at ``--small`` and at ``--images`` images: what grows;
2. a run over ``--images`` killed (SIGKILL) once about half its rows are on disk, then resumed with --resume:
   rows on disk at the kill, whether a torn row was left, and the resumed file against the uninterrupted one, row
   for row (path and classes equal, probabilities within 1e-4);
3. throughput with --devices 1 and --devices 2 over ``--small`` images, side by side.

    python bench/bench_batch.py RUN PHOTOS [--images 100000] [--small 10000] [--work /tmp/tlearn-batch]
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def make_files(photos: Path, work: Path, n: int) -> list[Path]:
    """``n`` image files under ``work/photos``: hard links to thumbnails of ``photos``' JPEGs."""
    thumbs = work / "thumbs"
    if not thumbs.is_dir():
        thumbs.mkdir(parents=True)
        for i, p in enumerate(sorted(photos.rglob("*.jpg"))):
            with Image.open(p) as image:
                image = image.convert("RGB")
                image.thumbnail((160, 160))
                image.save(thumbs / f"{i:04d}.jpg", quality=90)
    sources = sorted(thumbs.iterdir())
    paths = [work / "photos" / f"d{i // 1000:03d}" / f"{i:06d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(sources[i % len(sources)], path)
    return paths


def listing(work: Path, paths: list[Path]) -> Path:
    out = work / f"list{len(paths)}.txt"
    out.write_text("".join(f"{p}\n" for p in paths))
    return out


def predict(run: str, paths_file: Path, out: Path, *extra: str, kill_at: int | None = None
            ) -> tuple[float, int, int | None]:
    """(seconds, peak RSS in MB, rows on disk at the kill) of one `tlearn predict` process."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tlearn", "predict", run, "--from-list", str(paths_file), "--out", str(out), *extra]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    killed = None
    while kill_at is not None and process.poll() is None:
        time.sleep(0.5)
        rows = _lines(out) - 1
        if rows >= kill_at:
            os.killpg(process.pid, signal.SIGKILL)
            killed = _lines(out) - 1
            break
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if killed is None and status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {process.stderr.read()[-2000:]}")
    return seconds, round(usage.ru_maxrss / 1024), killed


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    """(rows, rows whose path or classes differ, largest probability difference)."""
    ra, rb = rows_of(a), rows_of(b)
    if len(ra) != len(rb):
        return max(len(ra), len(rb)), abs(len(ra) - len(rb)), float("nan")
    differ, worst = 0, 0.0
    for x, y in zip(ra, rb, strict=True):
        classes = [k for k in x if k == "path" or k.startswith("class_")]
        differ += any(x[k] != y[k] for k in classes)
        for k in (k for k in x if k.startswith("probability_") and x[k]):
            worst = max(worst, abs(float(x[k]) - float(y[k])))
    return len(ra), differ, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("photos", type=Path)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tlearn-batch"))
    parser.add_argument("--parts", default="memory,resume,processes", help="which of the three to measure")
    args = parser.parse_args()
    parts = args.parts.split(",")
    work = args.work
    paths = make_files(args.photos, work, args.images)
    small, large = listing(work, paths[:args.small]), listing(work, paths)
    print(f"\n`tlearn predict {args.run} --from-list LIST --out FILE.csv`, {os.cpu_count()} cores")
    if "memory" in parts:
        memory(args, work, small, large)
    if "resume" in parts:
        resume(args, work, large)
    if "processes" in parts:
        processes(args, work, small)


def memory(args: argparse.Namespace, work: Path, small: Path, large: Path) -> None:
    t_small, rss_small, _ = predict(args.run, small, work / "small.csv")
    t_large, rss_large, _ = predict(args.run, large, work / "whole.csv")
    print("\n| images | seconds | images/s | peak memory (MB) |\n|---|---|---|---|")
    for n, t, rss in ((args.small, t_small, rss_small), (args.images, t_large, rss_large)):
        print(f"| {n:,} | {t:.1f} | {n / t:.1f} | {rss} |")
    print(f"\npeak memory grew by {rss_large - rss_small} MB from {args.small:,} to {args.images:,} images")


def resume(args: argparse.Namespace, work: Path, large: Path) -> None:
    if not (work / "whole.csv").is_file():
        predict(args.run, large, work / "whole.csv")

    t_killed, _, on_disk = predict(args.run, large, work / "resumed.csv", kill_at=args.images // 2)
    torn = not (work / "resumed.csv").read_bytes().endswith(b"\n")
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "tlearn", "predict", args.run, "--from-list", str(large), "--out",
                             str(work / "resumed.csv"), "--resume"], capture_output=True, text=True)
    t_resumed = time.perf_counter() - start
    if status.returncode:
        raise SystemExit(status.stderr[-2000:])
    resumed_log = next((line for line in status.stderr.splitlines() if "resuming" in line), "")
    rows, differ, worst = compare(work / "whole.csv", work / "resumed.csv")
    print(f"\nkilled after {t_killed:.1f} s with {on_disk:,} rows on disk (torn last row: {'yes' if torn else 'no'});"
          f" resumed in {t_resumed:.1f} s: \"{resumed_log.strip()}\"")
    print(f"resumed against uninterrupted: {rows:,} rows, {differ} with another path or class, largest probability "
          f"difference {worst:.2e}")


def processes(args: argparse.Namespace, work: Path, small: Path) -> None:
    print("\n| processes | images | seconds | images/s |\n|---|---|---|---|")
    for n in (1, 2):
        t, _, _ = predict(args.run, small, work / f"devices{n}.csv", "--devices", str(n))
        print(f"| {n} | {args.small:,} | {t:.1f} | {args.small / t:.1f} |")
    rows, differ, worst = compare(work / "devices1.csv", work / "devices2.csv")
    same = (work / "devices1.csv").read_bytes() == (work / "devices2.csv").read_bytes()
    print(f"\n--devices 2 against --devices 1: {rows:,} rows, {differ} with another path or class, largest "
          f"probability difference {worst:.2e}; byte for byte the same: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
