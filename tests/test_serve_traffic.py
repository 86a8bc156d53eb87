"""`tlearn serve` for real traffic: API keys, the bounded queue (503 at once), the time limit (504, work dropped,
slow clients cut off), Prometheus metrics, the access log, and the refusal to listen beyond loopback without a
key. The app in-process through TestClient, and a real uvicorn server where timing or sockets matter."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.test_serve import _free_port, png, predictor, run  # noqa: F401 - the module's fixtures, shared
from tlearn.cli import main
from tlearn.config import TlearnError
from tlearn.predictor import Outputs, Predictor
from tlearn.serve.app import create_app
from tlearn.serve.guard import read_keys

KEY = "test-key-0123456789abcdef"
OTHER = "rotated-key-9876543210fedcba"
PHOTO = {"files": ("a.png", png(), "image/png")}


@pytest.fixture
def locked(predictor: Predictor) -> TestClient:  # noqa: F811
    return TestClient(create_app(predictor, keys=[KEY, OTHER]), raise_server_exceptions=False)


def test_every_route_but_the_page_and_health_needs_a_key(locked: TestClient) -> None:
    assert locked.get("/").status_code == 200 and locked.get("/health").status_code == 200
    assert locked.get("/docs-assets/swagger-ui.css").status_code == 200
    for method, route in [("get", "/model"), ("get", "/metrics"), ("get", "/docs"), ("get", "/openapi.json"),
                          ("post", "/predict"), ("get", "/no-such-route")]:
        answer = getattr(locked, method)(route)
        assert answer.status_code == 401, route
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer KEY" in answer.json()["detail"] and KEY not in answer.text
    for headers in [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {OTHER}"}, {"X-API-Key": KEY}]:
        assert locked.get("/model", headers=headers).status_code == 200
        answer = locked.post("/predict", files=PHOTO, headers=headers)
        assert answer.status_code == 200 and answer.json()["results"][0]["predictions"]
    assert locked.get("/metrics", headers={"X-API-Key": KEY}).text.startswith("# HELP")


@pytest.mark.parametrize("given", ["", "wrong", KEY[:-1], KEY[:-1] + "X", KEY + "X", "X" + KEY[1:], KEY.upper(),
                                   f"{KEY} {OTHER}"])
def test_a_missing_or_wrong_key_gets_401_in_one_line(locked: TestClient, given: str) -> None:
    answer = locked.post("/predict", files=PHOTO, headers={"Authorization": f"Bearer {given}"})
    assert answer.status_code == 401
    assert "\n" not in answer.json()["detail"] and KEY not in answer.text and "results" not in answer.text


def test_a_key_in_the_query_string_is_refused_even_when_right(locked: TestClient) -> None:
    for query in [f"api_key={KEY}", f"key={KEY}", f"token={KEY}", f"API_KEY={KEY}"]:
        answer = locked.post(f"/predict?{query}", files=PHOTO, headers={"X-API-Key": KEY})
        assert answer.status_code == 401 and "in the URL is refused" in answer.json()["detail"]
        assert KEY not in answer.text


def test_keys_are_read_one_a_line_and_weak_or_missing_ones_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# two keys, so that one can be rotated\n{KEY}\n\n  {OTHER}  \n")
    keys.chmod(0o600)
    assert read_keys(keys, {}) == [KEY, OTHER]
    assert read_keys(keys, {"TLEARN_API_KEY": "from-the-environment-123"})[-1] == "from-the-environment-123"
    assert read_keys(None, {}) == []
    (tmp_path / "empty").write_text("# none yet\n")
    for path, words in [(tmp_path / "empty", "holds no key"), (tmp_path / "missing", "cannot read it")]:
        with pytest.raises(TlearnError, match=words):
            read_keys(path, {})
    (tmp_path / "weak").write_text("secret\n")
    with pytest.raises(TlearnError, match="line 1 of --api-key-file .* too weak"):
        read_keys(tmp_path / "weak", {})
    (tmp_path / "later").write_text(f"# rotated keys\n\n{KEY}\nsecret\n")
    with pytest.raises(TlearnError, match="line 4 of --api-key-file .* too weak"):  # the file's own line number
        read_keys(tmp_path / "later", {})
    with pytest.raises(TlearnError, match="TLEARN_API_KEY is too weak"):
        read_keys(None, {"TLEARN_API_KEY": "short"})


def test_listening_beyond_loopback_needs_a_key_or_no_auth(run: tuple[Path, Path], tmp_path: Path,  # noqa: F811
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLEARN_API_KEY", raising=False)
    assert main(["serve", str(run[0]), "--host", "0.0.0.0", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reachable from the network" in err and "--api-key-file" in err and "--no-auth" in err
    keys = tmp_path / "keys"
    keys.write_text(KEY)
    assert main(["serve", str(run[0]), "--api-key-file", str(keys), "--no-auth"]) == 2
    assert "drop one or the other" in capsys.readouterr().err
    assert main(["serve", str(run[0]), "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


def _slow(predictor: Predictor, monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[int]:  # noqa: F811
    """Make each model call take ``seconds``; the list records the size of each call."""
    calls: list[int] = []
    real = predictor.run

    def slow(prepared: list[list[np.ndarray]]) -> Outputs:
        calls.append(len(prepared[0][0]))
        time.sleep(seconds)
        return real(prepared)

    monkeypatch.setattr(predictor, "run", slow)
    return calls


@contextlib.contextmanager
def uvicorn_server(app: object) -> Iterator[str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_burst_beyond_the_queue_gets_503_at_once_and_the_rest_200(predictor: Predictor,  # noqa: F811
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _slow(predictor, monkeypatch, 0.3)
    answers: list[tuple[int, float, str | None]] = []
    with uvicorn_server(create_app(predictor, max_queue=4)) as url:
        def ask() -> None:
            start = time.perf_counter()
            r = httpx.post(f"{url}/predict", files=PHOTO, timeout=30)
            answers.append((r.status_code, time.perf_counter() - start, r.headers.get("retry-after")))

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        metrics = httpx.get(f"{url}/metrics").text
    codes = sorted(code for code, _, _ in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 4, codes
    busy = [(seconds, after) for code, seconds, after in answers if code == 503]
    assert all(seconds < 1.0 and after.isdigit() and int(after) >= 1 for seconds, after in busy)  # not queued
    assert f'tlearn_rejected_total{{reason="busy"}} {float(len(busy))}' in metrics
    assert "tlearn_queue_images 0.0" in metrics  # every admitted image counted out again


def test_a_request_over_the_time_limit_gets_504_and_its_work_is_dropped(predictor: Predictor,  # noqa: F811
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _slow(predictor, monkeypatch, 1.0)
    with uvicorn_server(create_app(predictor, timeout=0.5, max_queue=100)) as url:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{url}/predict", files=PHOTO, timeout=30).status_code)) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # the first one is in the model, the others wait behind it
        for t in threads:
            t.join(30)
        time.sleep(1.2)  # time for any work left to run
        assert results == [504, 504, 504]
        assert len(calls) == 1  # the two that waited were dropped from the queue, never run
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_client_sending_one_byte_a_second_is_cut_off_and_others_are_answered(
        predictor: Predictor) -> None:  # noqa: F811
    with uvicorn_server(create_app(predictor, timeout=1.5)) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port))
        body = b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n" + png()
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: " + str(len(body) + 8).encode() + b"\r\n\r\n")
        start, answer = time.perf_counter(), b""
        slow.settimeout(0.01)
        for byte in body[:40]:  # one byte a second, at most 40 s
            slow.sendall(bytes([byte]))
            assert httpx.post(f"{url}/predict", files=PHOTO, timeout=5).status_code == 200  # others are answered
            with contextlib.suppress(TimeoutError):
                answer += slow.recv(4096)
            if answer:
                break
            time.sleep(1)
        slow.close()
    assert answer.startswith(b"HTTP/1.1 504") and b"--timeout" in answer
    assert time.perf_counter() - start < 5


def test_metrics_count_requests_by_route_and_status_with_latency_batches_and_model(
        predictor: Predictor) -> None:  # noqa: F811
    client = TestClient(create_app(predictor), raise_server_exceptions=False)
    for _ in range(3):
        client.post("/predict", files=PHOTO)
    client.post("/predict", files={"files": ("notes.txt", b"not a photo", "text/plain")})
    client.get("/health")
    client.get("/no-such-route-123")
    text = client.get("/metrics").text
    assert 'tlearn_requests_total{route="/predict",status="200"} 3.0' in text
    assert 'tlearn_requests_total{route="/predict",status="415"} 1.0' in text
    assert 'tlearn_requests_total{route="other",status="404"} 1.0' in text and "no-such-route" not in text
    assert 'tlearn_request_seconds_count{route="/predict"} 4.0' in text
    assert "tlearn_batch_images_count 3.0" in text and 'tlearn_batch_images_bucket{le="1.0"} 3.0' in text
    model_id = predictor.about["model_id"]
    assert f'tlearn_model_info{{backbone="{predictor.about["backbone"]}",model_id="{model_id}"' in text


def test_one_access_log_line_a_request_without_names_unless_asked(predictor: Predictor,  # noqa: F811
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    for names in (False, True):
        caplog.clear()
        client = TestClient(create_app(predictor, keys=[KEY], log_names=names), raise_server_exceptions=False)
        with caplog.at_level(logging.INFO, logger="tlearn.access"):
            client.post("/predict", files={"files": ("holiday-photo.png", png(), "image/png"),
                                           "file": ("second.png", png(), "image/png")},
                        headers={"Authorization": f"Bearer {KEY}"})
            client.get("/model", headers={"X-API-Key": "wrong-key-wrong-key"})
        lines = [r.getMessage() for r in caplog.records if r.name == "tlearn.access"]
        assert len(lines) == 2
        assert " POST /predict 200 2 images " in lines[0] and lines[0].endswith(
            ' ms ["holiday-photo.png", "second.png"]' if names else " ms")
        assert " GET /model 401 0 images " in lines[1]
        assert all(KEY not in line and "wrong-key" not in line for line in lines)


@pytest.mark.slow
def test_processes_share_one_port_and_the_metrics_add_up(run: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    import os
    import signal
    import subprocess
    import sys

    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tlearn", "serve", str(run[0]), "--port", str(port),
                               "--processes", "2", "--api-key-file", str(keys)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url, auth = f"http://127.0.0.1:{port}", {"X-API-Key": KEY}
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert server.poll() is None
            time.sleep(0.1)
        answers = [httpx.post(f"{url}/predict", files=PHOTO, headers=auth, timeout=30) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6
        assert len({a.json()["results"][0]["predictions"][0]["probability"] for a in answers}) == 1
        text = httpx.get(f"{url}/metrics", headers=auth, timeout=10).text
        assert 'tlearn_requests_total{route="/predict",status="200"} 6.0' in text  # both processes' requests
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    assert "2 processes" in output and output.count(" POST /predict 200 1 images ") == 6 and KEY not in output
