"""`tlearn serve`: the REST API through FastAPI's TestClient (happy path, several files, every kind of bad
upload, wrong routes, no stack traces), request batching, an event loop that is never blocked, and the command's
own checks. The page in a real browser is in tests/test_browser.py."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import tiny_run
from tlearn.cli import main
from tlearn.predictor import Outputs, Predictor
from tlearn.serve import load_predictor
from tlearn.serve.app import Batcher, create_app

LIMIT = 300_000  # bytes per request in these tests


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("serve")
    return tiny_run(tmp)


@pytest.fixture(scope="module")
def predictor(run: tuple[Path, Path]) -> Predictor:
    return Predictor.load(run[0], cache_dir=str(run[0].parent / "cache"), verbose=False)


@pytest.fixture
def client(predictor: Predictor) -> TestClient:
    return TestClient(create_app(predictor, max_upload_bytes=LIMIT, max_files=4), raise_server_exceptions=False)


def png(colour: tuple[int, int, int] = (210, 40, 40), size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 20,000 x 20,000 pixels (400 megapixels)."""
    data = bytearray(png(size=(1, 1)))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", 20_000, 20_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_one_image_gives_the_predictors_answer_with_model_id_and_latency(client: TestClient, predictor: Predictor,
                                                                           run: tuple[Path, Path]) -> None:
    path = run[1] / "red" / "red_001.png"
    response = client.post("/predict", files={"files": (path.name, path.read_bytes(), "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["model_id"] == predictor.about["model_id"] and len(body["model_id"]) == 12
    assert body["latency_ms"] > 0
    (result,) = body["results"]
    assert result["filename"] == "red_001.png" and (result["width"], result["height"]) == (48, 40)
    expected = predictor.predict([path], top_k=2)[0]["predictions"]
    assert [p["class"] for p in result["predictions"]] == [p["class"] for p in expected] == ["red", "blue"]
    np.testing.assert_allclose([p["probability"] for p in result["predictions"]],
                               [p["probability"] for p in expected], atol=1e-6)


def test_several_files_come_back_in_order_and_top_k_is_honoured(client: TestClient) -> None:
    files = [("files", ("a.png", png((210, 40, 40)), "image/png")), ("files", ("b.png", png((30, 60, 200)),
                                                                                "image/png"))]
    body = client.post("/predict?top_k=1", files=files).json()
    assert [r["filename"] for r in body["results"]] == ["a.png", "b.png"]
    assert [r["predictions"][0]["class"] for r in body["results"]] == ["red", "blue"]
    assert all(len(r["predictions"]) == 1 for r in body["results"])
    capped = client.post("/predict?top_k=3", files=files)  # only 2 classes: capped, as the CLI and the API do
    assert capped.status_code == 200 and all(len(r["predictions"]) == 2 for r in capped.json()["results"])
    assert client.post("/predict?top_k=0", files=files).status_code == 422


@pytest.mark.parametrize("case, status, words", [
    ("oversize", 413, "over this server's limit of 300,000 bytes"),
    ("too many files", 400, "Maximum number of files is 4"),
    ("text", 415, "notes.txt: not a readable image"),
    ("empty", 415, "empty.jpg"),
    ("truncated jpeg", 422, "cut.jpg: truncated image file"),
    ("bomb", 422, "bomb.png: refused: too many pixels"),
])
def test_bad_uploads_get_a_clear_status_and_message(client: TestClient, case: str, status: int, words: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    files = {"oversize": [("files", ("big.png", b"\0" * (LIMIT + 1), "image/png"))],
             "too many files": [("files", (f"{i}.png", png(), "image/png")) for i in range(5)],
             "text": [("files", ("notes.txt", b"hello, not an image", "text/plain"))],
             "empty": [("files", ("empty.jpg", b"", "image/jpeg"))],
             "truncated jpeg": [("files", ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"))],
             "bomb": [("files", ("bomb.png", bomb(), "image/png"))]}[case]
    response = client.post("/predict", files=files)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in str(detail) and "Traceback" not in response.text


def test_wrong_method_route_or_form_get_http_errors(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405
    assert client.get("/nowhere").status_code == 404
    empty = client.post("/predict")  # no files
    assert empty.status_code == 422 and "multipart form field 'files' (or 'file' or 'image')" in empty.text
    assert client.post("/predict", data={"files": "not a file"}).status_code == 422


def test_the_image_may_come_as_files_file_or_image(client: TestClient) -> None:
    """The usual curl examples name the field ``file``; each name gives the same answer, and several fields in one
    request come back in the order files, file, image."""
    red, blue = ("red.png", png((210, 40, 40)), "image/png"), ("blue.png", png((30, 60, 200)), "image/png")
    answers = [client.post("/predict", files={name: red}).json()["results"] for name in ("files", "file", "image")]
    assert answers[0] == answers[1] == answers[2] and answers[0][0]["predictions"][0]["class"] == "red"
    both = client.post("/predict", files=[("image", blue), ("file", red)]).json()["results"]
    assert [r["filename"] for r in both] == ["red.png", "blue.png"]


def test_health_model_page_and_offline_docs(client: TestClient, predictor: Predictor) -> None:
    assert client.get("/health").json() == {"status": "ok", "model_id": predictor.about["model_id"]}
    model = client.get("/model").json()
    assert model["classes"] == ["blue", "red"] and model["kind"] == "head" and model["runtime"] == "onnx"
    assert set(model["metrics"]) == {"validation", "test"} and model["trained"].startswith("20")
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/predict" in page.text and "http://" not in page.text and "https://" not in page.text  # no assets
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_an_internal_error_is_a_500_without_a_traceback(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(prepared: object) -> None:
        raise RuntimeError("secret internals /home/user/model")

    monkeypatch.setattr(predictor, "run", broken)
    client = TestClient(create_app(predictor), raise_server_exceptions=False)
    response = client.post("/predict", files={"files": ("a.png", png(), "image/png")})
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text and "internal error" in response.text


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(predictor: Predictor,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = predictor.run

    def slow(prepared: list[list[np.ndarray]]) -> Outputs:
        sizes.append(len(prepared[0][0]))
        time.sleep(0.05)
        return real(prepared)

    monkeypatch.setattr(predictor, "run", slow)
    batcher = Batcher(predictor, max_batch=8)
    colours = [(210, 40, 40), (30, 60, 200)] * 6
    pictures = [Image.open(io.BytesIO(png(c))).convert("RGB") for c in colours]
    answers: list[Outputs | None] = [None] * len(pictures)

    def ask(i: int) -> None:
        answers[i] = batcher.submit(predictor.prepare([pictures[i]])).result()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(pictures))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(sizes) == len(pictures) and max(sizes) > 1 and max(sizes) <= 8  # batched, within the limit
    for picture, answer in zip(pictures, answers, strict=True):
        alone = real(predictor.prepare([picture]))
        np.testing.assert_allclose(answer.logits, alone.logits, atol=1e-5)
        np.testing.assert_allclose(answer.novelty, alone.novelty, atol=1e-4)  # each its own row, batched or not


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_slow_prediction_never_blocks_the_event_loop(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    real = predictor.run
    monkeypatch.setattr(predictor, "run", lambda prepared: (time.sleep(1.5), real(prepared))[1])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        slow = threading.Thread(target=lambda: httpx.post(f"{url}/predict", files={"files": ("a.png", png())},
                                                          timeout=10))
        slow.start()
        time.sleep(0.3)  # the prediction is now sleeping in the model call
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - start < 1.0  # answered while the prediction was still running
        slow.join(10)
    finally:
        server.should_exit = True
        thread.join(10)


def test_serve_command_refuses_bad_settings_in_one_line(run: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run[0]), "--port", str(port)]) == 2
        assert "in use" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nothing"), "--port", str(_free_port())]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", str(run[0]), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err
    assert main(["serve", str(run[0]), "--host", "no-such-host.invalid"]) == 2
    assert "--host" in capsys.readouterr().err


def test_runtime_onnx_serves_one_exported_graph_with_the_same_answers(run: tuple[Path, Path],
                                                                      predictor: Predictor) -> None:
    cache = str(run[0].parent / "cache")
    graph = load_predictor(run[0], "onnx", cache_dir=cache)
    assert graph.backend == "exported" and graph.about["model_id"] != predictor.about["model_id"]
    path = run[1] / "blue" / "blue_002.png"
    np.testing.assert_allclose([p["probability"] for p in graph.predict([path])[0]["predictions"]],
                               [p["probability"] for p in predictor.predict([path])[0]["predictions"]], atol=1e-4)
    again = load_predictor(run[0], "onnx", cache_dir=cache)  # exported once, then reused from the cache
    assert again.about["model_id"] == graph.about["model_id"]
    torch_backend = load_predictor(run[0], "torch", cache_dir=cache)
    assert torch_backend.backend == "torch"
    picture = Image.open(path).convert("RGB")
    np.testing.assert_allclose(torch_backend.logits([picture]), predictor.logits([picture]), atol=1e-4)


def test_a_body_without_a_length_is_cut_off_at_the_limit(client: TestClient) -> None:
    def chunks():  # sent chunked: the server cannot know the size before reading it
        yield b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(LIMIT // 10_000 + 2):
            yield b"\0" * 10_000
        yield b"\r\n--x--\r\n"

    response = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
