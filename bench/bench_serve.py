"""Load test of `tlearn serve`: latency alone, then N concurrent clients, for each runtime; loopback only.

For each runtime the server is started as its own process (`tlearn serve RUN --runtime R` on 127.0.0.1), then:
1. one client sends ``--single`` requests of one image, one after another: latency p50/p95/p99 with no other load;
2. ``--clients`` clients send ``--requests`` requests in all, as fast as the answers come: throughput in images/s,
   latency percentiles and errors.
Each request is one real photo (JPEG), cycled from the folder given. The clients run on the same 2 cores as the
server, so the numbers include their cost. Latency is measured by the client, from sending to the whole answer.

    python bench/bench_serve.py RUN PHOTOS [--runtimes auto,onnx,torch] [--clients 8] [--requests 1000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def client(port: int, bodies: list[tuple[bytes, str]], count: int, latencies: list[float], errors: list[str],
           lock: threading.Lock, offset: int = 0) -> None:
    """Send ``count`` requests on one keep-alive connection, recording each one's latency or error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(count):
        body, kind = bodies[(offset + i) % len(bodies)]
        start = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
            response = conn.getresponse()
            answer = response.read()
            ok = response.status == 200 and json.loads(answer)["results"][0]["predictions"]
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            ok, answer = False, str(e).encode()
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        elapsed = time.perf_counter() - start
        with lock:
            (latencies.append(elapsed) if ok else errors.append(answer[:200].decode(errors="replace")))
    conn.close()


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if len(latencies) < 2:
        return (latencies[0] * 1000,) * 3 if latencies else (float("nan"),) * 3
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return q[49] * 1000, q[94] * 1000, q[98] * 1000


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    share = [requests // clients + (i < requests % clients) for i in range(clients)]
    threads = [threading.Thread(target=client, args=(port, bodies, n, latencies, errors, lock, 97 * i))
               for i, n in enumerate(share)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    p50, p95, p99 = percentiles(latencies)
    return {"clients": clients, "requests": requests, "errors": len(errors), "images_per_s": len(latencies) / wall,
            "p50": p50, "p95": p95, "p99": p99, "first_error": errors[0] if errors else ""}


def start_server(run: str, runtime: str, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tlearn", "serve", run, "--port", str(port), "--runtime", runtime, *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stdout.read()}") from None
            time.sleep(0.3)
    raise SystemExit("the server did not start within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("photos", type=Path)
    parser.add_argument("--runtimes", default="auto,onnx,torch")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200)
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:64]
    bodies = [multipart(p) for p in photos]
    rows = []
    for runtime in args.runtimes.split(","):
        port = free_port()
        server = start_server(args.run, runtime, port)
        try:
            load(port, bodies, 1, 20)  # warm-up
            single = load(port, bodies, 1, args.single)
            many = load(port, bodies, args.clients, args.requests)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        rows.append((runtime, single, many))
        if single["first_error"] or many["first_error"]:
            print(f"{runtime}: first error: {single['first_error'] or many['first_error']}", file=sys.stderr)
    print(f"\n`tlearn serve {args.run}`: {len(photos)} JPEGs from {args.photos}, one image per request, "
          f"{os.cpu_count()} cores shared by the server and the clients\n")
    print("| runtime | 1 client: p50 / p95 / p99 ms | errors | "
          f"{args.clients} clients: images/s | p50 / p95 / p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for runtime, s, m in rows:
        print(f"| {runtime} | {s['p50']:.1f} / {s['p95']:.1f} / {s['p99']:.1f} | {s['errors']} of {s['requests']} | "
              f"{m['images_per_s']:.1f} | {m['p50']:.1f} / {m['p95']:.1f} / {m['p99']:.1f} | "
              f"{m['errors']} of {m['requests']} |")


if __name__ == "__main__":
    main()
