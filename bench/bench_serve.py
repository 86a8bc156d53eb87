"""Load test of `tlearn serve`: latency alone, then N concurrent clients, for each runtime; loopback only.

For each runtime the server is started as its own process (`tlearn serve RUN --runtime R` on 127.0.0.1), then:
1. one client sends ``--single`` requests of one image, one after another: latency p50/p95/p99 with no other load;
2. ``--clients`` clients send ``--requests`` requests in all, as fast as the answers come: throughput in images/s,
   latency percentiles and errors.
Each request is one real photo (JPEG), cycled from the folder given. The clients run on the same 2 cores as the
server, so the numbers include their cost. Latency is measured by the client, from sending to the whole answer.

    python bench/bench_serve.py RUN PHOTOS [--runtimes auto,onnx,torch] [--clients 8] [--requests 1000]

With ``--traffic``, the measurements of a server for real traffic instead (the default runtime):
1. with an API key, ``--clients`` clients x ``--per-client`` requests: errors, and every answer against
   `tlearn predict --json` for the same photo (class order equal, probabilities within 1e-4);
2. bursts of 20 simultaneous clients against ``--max-queue 4``: the statuses, and the slowest 503;
3. latency p50/p99 with ``--processes 1`` and ``--processes 2`` under the same load;
4. security: no key, a wrong key, the key with one byte changed, the key in the query string, listening on
   0.0.0.0 without a key, and a client that sends its upload one byte a second (others are answered meanwhile;
   it is cut off at ``--timeout``).

    python bench/bench_serve.py RUN PHOTOS --traffic [--clients 8] [--per-client 500]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
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
           lock: threading.Lock, offset: int = 0, headers: dict[str, str] | None = None,
           answers: dict[int, list] | None = None) -> None:
    """Send ``count`` requests on one keep-alive connection, recording each one's latency or error (and, into
    ``answers``, each photo's predictions)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(count):
        body, kind = bodies[(offset + i) % len(bodies)]
        start = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body, headers={"Content-Type": kind, **(headers or {})})
            response = conn.getresponse()
            answer = response.read()
            ok = response.status == 200 and json.loads(answer)["results"][0]["predictions"]
            if ok and answers is not None:
                with lock:
                    answers.setdefault((offset + i) % len(bodies), []).append(ok)
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


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, requests: int,
         headers: dict[str, str] | None = None, answers: dict[int, list] | None = None) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    share = [requests // clients + (i < requests % clients) for i in range(clients)]
    threads = [threading.Thread(target=client, args=(port, bodies, n, latencies, errors, lock, 97 * i, headers,
                                                     answers))
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


def start_server(run: str, runtime: str, port: int, *extra: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tlearn", "serve", run, "--port", str(port), "--runtime", runtime, *extra]
    log = tempfile.NamedTemporaryFile("w+", prefix="tlearn-serve-", suffix=".log")  # the server's output
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,  # (a pipe nobody reads would
                              start_new_session=True, env=env)  # fill with access-log lines and stop the server)
    server.log = log
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited: {log.read()}") from None
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
    parser.add_argument("--traffic", action="store_true", help="measure keys, backpressure, processes, security")
    parser.add_argument("--per-client", type=int, default=500)
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:64]
    bodies = [multipart(p) for p in photos]
    if args.traffic:
        return traffic(args, photos, bodies)
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



@contextlib.contextmanager
def serving(run: str, *extra: str, env: dict[str, str] | None = None) -> Iterator[int]:
    port = free_port()
    server = start_server(run, "auto", port, *extra, env=env)
    try:
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def ask(port: int, body: bytes, kind: str, headers: dict[str, str] | None = None, path: str = "/predict"
        ) -> tuple[int, float, str]:
    """(status, seconds, answer) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": kind, **(headers or {})})
    response = conn.getresponse()
    answer = response.read().decode(errors="replace")
    conn.close()
    return response.status, time.perf_counter() - start, answer


def traffic(args: argparse.Namespace, photos: list[Path], bodies: list[tuple[bytes, str]]) -> None:
    import secrets

    key = secrets.token_urlsafe(32)
    keys = Path(tempfile.mkdtemp()) / "keys"
    keys.write_text(key + "\n")
    keys.chmod(0o600)
    auth = {"Authorization": f"Bearer {key}"}
    requests = args.clients * args.per_client
    expected = json.loads(subprocess.run([sys.executable, "-m", "tlearn", "predict", args.run, *map(str, photos),
                                          "--top-k", "5", "--json"], capture_output=True, text=True,
                                         check=True).stdout)
    print(f"\n`tlearn serve {args.run}` for real traffic: {len(photos)} JPEGs from {args.photos}, one image per "
          f"request, {os.cpu_count()} cores shared by the server and the clients\n")

    answers: dict[int, list] = {}
    with serving(args.run, "--api-key-file", str(keys)) as port:
        load(port, bodies, 1, 20, auth)  # warm-up
        keyed = load(port, bodies, args.clients, requests, auth, answers)
    worst, differ = 0.0, 0
    for i, got in answers.items():
        want = expected[i]["predictions"]
        for predictions in got:
            differ += [p["class"] for p in predictions] != [p["class"] for p in want]
            worst = max(worst, *(abs(p["probability"] - q["probability"]) for p, q in zip(predictions, want,
                                                                                          strict=True)))
    print(f"1. with a key, {args.clients} clients x {args.per_client} requests: {keyed['errors']} errors of "
          f"{requests}; {keyed['images_per_s']:.1f} images/s; answers against `tlearn predict`: {differ} with "
          f"another class order, largest probability difference {worst:.1e}")

    statuses: list[int] = []
    busy: list[float] = []
    with serving(args.run, "--max-queue", "4") as port:
        load(port, bodies, 1, 10)
        for burst in range(5):
            gate = threading.Barrier(20)
            got: list[tuple[int, float, str]] = []

            def one(i: int, gate: threading.Barrier = gate, got: list = got, burst: int = burst) -> None:
                gate.wait()
                got.append(ask(port, *bodies[(burst * 20 + i) % len(bodies)]))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            statuses += [status for status, _, _ in got]
            busy += [seconds for status, seconds, _ in got if status == 503]
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"2. 5 bursts of 20 clients against --max-queue 4: statuses {counts}; slowest 503 "
          f"{1000 * max(busy, default=float('nan')):.1f} ms, median 503 "
          f"{1000 * statistics.median(busy) if busy else float('nan'):.1f} ms")

    print(f"\n3. {args.clients} clients x {args.per_client} requests each:\n")
    print("| --processes | images/s | p50 / p95 / p99 ms | errors |\n|---|---|---|---|")
    for n in (1, 2):
        with serving(args.run, "--processes", str(n)) as port:
            load(port, bodies, args.clients, 40)  # warm-up of every process
            m = load(port, bodies, args.clients, requests)
        print(f"| {n} | {m['images_per_s']:.1f} | {m['p50']:.1f} / {m['p95']:.1f} / {m['p99']:.1f} | "
              f"{m['errors']} of {requests} |")

    print("\n4. security:\n")
    body, kind = bodies[0]
    changed = key[:10] + ("A" if key[10] != "A" else "B") + key[11:]
    with serving(args.run, "--api-key-file", str(keys), "--timeout", "5") as port:
        for what, headers, path in [("no key", {}, "/predict"), ("a wrong key", {"X-API-Key": "x" * 43}, "/predict"),
                                    ("the key, one byte changed", {"Authorization": f"Bearer {changed}"}, "/predict"),
                                    ("the key in the query string", {}, f"/predict?api_key={key}"),
                                    ("the right key", auth, "/predict")]:
            status, seconds, answer = ask(port, body, kind, headers, path)
            shown = json.loads(answer).get("detail", "results") if answer.startswith("{") else answer[:80]
            print(f"- {what}: {status} in {1000 * seconds:.1f} ms ({shown!s:.90})")
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: {kind}"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        slow.settimeout(0.05)
        start, reply, others = time.perf_counter(), b"", []
        for byte in body[:60]:
            slow.sendall(bytes([byte]))
            others.append(ask(port, body, kind, auth)[:2])
            with contextlib.suppress(TimeoutError):
                reply += slow.recv(4096)
            if reply:
                break
            time.sleep(max(0.0, 1 - others[-1][1]))
        first_line = reply.split(b"\r\n")[0].decode()
        print(f"- a client sending one byte a second: answered {first_line!r} after "
              f"{time.perf_counter() - start:.1f} s (--timeout 5); meanwhile {len(others)} other requests, "
              f"statuses {sorted({s for s, _ in others})}, slowest {1000 * max(t for _, t in others):.1f} ms")
        slow.close()
    refused = subprocess.run([sys.executable, "-m", "tlearn", "serve", args.run, "--host", "0.0.0.0", "--port",
                              str(free_port())], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "TLEARN_API_KEY"})
    print(f"- `tlearn serve RUN --host 0.0.0.0` without a key: exit status {refused.returncode}, "
          f"\"{refused.stderr.strip()}\"")


if __name__ == "__main__":
    main()
