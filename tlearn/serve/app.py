"""The web service: a FastAPI app around one loaded ``Predictor``.

- ``POST /predict``: one or more images as multipart ``files`` (or ``file``, or ``image``) → each one's top-k
  classes, the model id and the server's latency. A request larger than ``max_upload_bytes`` gets 413, bytes
  that are not an image 415, an image that cannot be decoded (truncated, or a decompression bomb) 422; each
  names the file.
- ``GET /metrics``: Prometheus' text format (``tlearn.serve.metrics``).
- ``GET /health``, ``GET /model`` (classes, backbone, metrics, when it was trained), ``GET /`` (the page, with no
  external assets), and the OpenAPI docs at ``/docs``, whose assets come from the swagger-ui-bundle package, so
  they work offline too.

The model is loaded once. Decoding and inference run in Starlette's thread pool (ONNX Runtime and PyTorch
release the GIL), so the event loop keeps accepting requests; concurrent requests are gathered into one batch
per model call by ``Batcher``, which also bounds the queue (503 and ``Retry-After`` beyond it). API keys, the
time limit and the access log are the middleware of ``tlearn.serve.guard``. An error response never carries a
traceback: the server's log has it.
"""
# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, which name local values.


import asyncio
import io
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from tlearn import __version__
from tlearn.evaluate import novelty_fields
from tlearn.images import ImageDecodeError, load_image
from tlearn.predictor import Outputs, Predictor
from tlearn.serve.guard import Observe, RequireKey, TimeLimit
from tlearn.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("tlearn")
MAX_UPLOAD_BYTES = 20 << 20  # one request: all its files and the multipart framing
MAX_FILES = 32  # images in one request
MAX_FILENAME = 255  # characters of an uploaded file's name echoed back
Prepared = list[list[np.ndarray]]  # per view, one (B, 3, H, W) batch per model input


class Busy(Exception):
    """The queue is full: the request is turned away at once, to retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"busy: retry after {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    """Admits requests up to a bounded queue, and gathers the prepared pictures of concurrent requests into one
    model call: while one batch runs, the next one fills.

    ``admit`` counts a request's images in (``Busy`` beyond ``max_queue`` images admitted and not yet answered;
    a request is always admitted into an empty queue, whatever its size) and ``release`` counts them out.
    Requests decode and preprocess their pictures on their own pool threads (``Predictor.prepare``), in parallel;
    ``submit`` queues them and returns a ``Future``, which one runner thread fulfils. One model call at a time
    uses every core (ONNX Runtime's and PyTorch's own threads), and batching amortises each call's fixed cost. A
    future cancelled before its batch starts (its request ran out of time) is dropped from the queue unrun."""

    def __init__(self, predictor: Predictor, max_batch: int = 8, max_queue: int | None = None,
                 metrics: Metrics | None = None):
        self.predictor, self.max_batch, self.max_queue, self.metrics = predictor, max_batch, max_queue, metrics
        self.lock = threading.Lock()  # guards everything below
        self.waiting: deque[tuple[Prepared, int, Future]] = deque()
        self.runner: threading.Thread | None = None  # started when work arrives, ends when none is left
        self.admitted = 0  # images admitted and not yet answered
        self.per_image = 0.05  # seconds of model time an image, updated as batches run (for Retry-After)

    def admit(self, n: int) -> None:
        with self.lock:
            if self.max_queue is not None and self.admitted and self.admitted + n > self.max_queue:
                if self.metrics:
                    self.metrics.rejected.labels("busy").inc()
                raise Busy(max(1, math.ceil(self.admitted * self.per_image)))
            self.admitted += n
        if self.metrics:
            self.metrics.queue.inc(n)

    def release(self, n: int) -> None:
        with self.lock:
            self.admitted -= n
        if self.metrics:
            self.metrics.queue.dec(n)

    def submit(self, prepared: Prepared) -> Future:
        """A future of the ``Outputs`` (logits, novelty) of ``prepared`` (``Predictor.prepare``'s output for B
        pictures)."""
        done: Future = Future()
        with self.lock:
            self.waiting.append((prepared, len(prepared[0][0]), done))
            if self.runner is None:
                self.runner = threading.Thread(target=self._run, name="tlearn-batcher", daemon=True)
                self.runner.start()
        return done

    def _run(self) -> None:
        while True:
            with self.lock:
                batch, size = [], 0
                while self.waiting and (not batch or size + self.waiting[0][1] <= self.max_batch):
                    prepared, n, done = self.waiting.popleft()
                    if done.set_running_or_notify_cancel():  # False: cancelled while it waited
                        batch.append((prepared, n, done))
                        size += n
                if not batch and not self.waiting:
                    self.runner = None
                    return
            if batch:
                self._run_batch(batch, size)

    def _run_batch(self, batch: list[tuple[Prepared, int, Future]], size: int) -> None:
        start = time.perf_counter()
        try:  # per view, per input: the requests' arrays one after another
            joined = [[np.concatenate(arrays) for arrays in zip(*per_view, strict=True)]
                      for per_view in zip(*(prepared for prepared, _, _ in batch), strict=True)]
            out = self.predictor.run(joined)
        except Exception as e:  # noqa: BLE001 - handed to each waiting request, which answers 500 without a trace
            for _, _, done in batch:
                done.set_exception(e)
            return
        self.per_image = 0.8 * self.per_image + 0.2 * (time.perf_counter() - start) / size
        if self.metrics:
            self.metrics.batch.observe(size)
        start = 0
        for _, n, done in batch:
            done.set_result(Outputs(out.logits[start:start + n], None,
                                    None if out.novelty is None else out.novelty[start:start + n]))
            start += n


class DeclaredSizeLimit:
    """Answers 413 with a message that says the limit, before reading a body whose Content-Length is over it.
    (A body sent without a length is cut off at the same limit by FastAPI's own ``max_body_size``.)"""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"0")
            if not declared.isdigit() or int(declared) > self.limit:
                response = JSONResponse({"detail": f"the request is over this server's limit of {self.limit:,} "
                                         "bytes (tlearn serve --max-upload-mb)"}, status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _prepare(predictor: Predictor, uploads: list[tuple[str, bytes]]) -> tuple[list[Image.Image | HTTPException],
                                                                             Prepared | None]:
    """Uploads → each one's picture, or the HTTP error that names it, and the model's input arrays for the
    pictures (None when there is none). Every file failing is the first one's error: a request with nothing to
    answer fails as a whole."""
    pictures = [_decode(name, data) for name, data in uploads]
    good = [p for p in pictures if not isinstance(p, HTTPException)]
    if not good:
        raise pictures[0]
    return pictures, predictor.prepare(good)


def _decode(name: str, data: bytes) -> Image.Image | HTTPException:
    """An upload's bytes → an RGB picture, or the HTTP error that names the file and says what is wrong."""
    try:
        return load_image(io.BytesIO(data))
    except ImageDecodeError as e:
        not_image = isinstance(e.__cause__, Image.UnidentifiedImageError) or not data
        return HTTPException(415 if not_image else 422, detail=f"{name}: {e}")


def create_app(predictor: Predictor, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_files: int = MAX_FILES,
               default_top_k: int = 5, unknown: bool = True, keys: list[str] | None = None,
               max_queue: int | None = None, timeout: float | None = None, log_names: bool = False) -> FastAPI:
    """The app serving ``predictor``; ``max_upload_bytes`` bounds one request's body. Each result carries its
    ``novelty`` and whether it is ``unknown`` where the model scores novelty, unless ``unknown`` is False.

    With ``keys``, every route but the page and ``/health`` needs one of them (``guard.RequireKey``). At most
    ``max_queue`` images wait in this process: a request beyond them gets 503 with ``Retry-After`` at once. A
    request not answered within ``timeout`` seconds gets 504 and its work is dropped. Each request is logged in
    one line (its file names too with ``log_names``) and counted in the metrics at ``/metrics``."""
    about = predictor.about
    metrics = Metrics(about, predictor.backend)
    app = FastAPI(title="tlearn", version=__version__, docs_url=None, redoc_url=None,
                  description=f"An image classifier trained with tlearn: {len(predictor.classes)} classes "
                              f"({about.get('backbone', 'unknown backbone')}, {about.get('kind', predictor.backend)})")
    batcher = Batcher(predictor, max_queue=max_queue, metrics=metrics)
    page = resources.files("tlearn.serve").joinpath("page.html").read_text(encoding="utf-8")
    most = len(predictor.classes)
    scored = unknown and predictor.threshold is not None

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception(f"{request.method} {request.url.path} failed")
        return JSONResponse({"detail": "internal error: the server's log has the details"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Whether the model is loaded and answering."""
        return {"status": "ok", "model_id": about.get("model_id")}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/model")
    def model() -> dict[str, Any]:
        """The served model: its classes, backbone, kind, held-out metrics and when it was trained."""
        return {**about, "classes": predictor.classes, "runtime": predictor.backend,
                "max_upload_bytes": max_upload_bytes, "max_files": max_files, "default_top_k": min(default_top_k, most),
                "novelty_threshold": predictor.threshold if scored else None}

    @app.post("/predict", max_body_size=max_upload_bytes, form_limits={"max_files": max_files})
    async def predict(request: Request,
                      files: Annotated[list[UploadFile] | None, File(description="one or more image files")] = None,
                      file: Annotated[list[UploadFile] | None, File(description="the same, as curl's examples "
                                                                     "name the field")] = None,
                      image: Annotated[list[UploadFile] | None, File(description="the same")] = None,
                      top_k: Annotated[int, Query(ge=1, description="classes per image (at most the model's "
                                                  "classes)")] = min(default_top_k, most)) -> dict[str, Any]:
        """Each uploaded image's top-k classes and their probabilities, most probable first, with its ``novelty``
        (higher: less like the training images) and whether it is ``unknown`` (above the model's threshold), where
        the model scores novelty. A file that cannot be read gets ``{"filename", "error", "status"}`` in its place,
        beside the others' results, as ``tlearn predict`` skips it; a request whose every file fails gets that
        file's status (415 or 422)."""
        start = time.perf_counter()
        top_k = min(top_k, most)  # as the CLI and the API cap it
        files = [*(files or []), *(file or []), *(image or [])]  # whichever field name the client used
        if not files:
            raise HTTPException(422, "no image in the request: send one or more as multipart form field 'files' "
                                     "(or 'file' or 'image'), e.g. curl -F files=@photo.jpg URL/predict")
        uploads = [((f.filename or f"file {i + 1}")[:MAX_FILENAME], await f.read()) for i, f in enumerate(files)]
        request.state.images, request.state.names = len(uploads), [name for name, _ in uploads]
        try:
            batcher.admit(len(uploads))
        except Busy as e:
            raise HTTPException(503, f"the server is busy ({batcher.max_queue} images queued, tlearn serve "
                                     f"--max-queue): retry after {e.retry_after} s",
                                headers={"Retry-After": str(e.retry_after)}) from None
        try:
            pictures, prepared = await run_in_threadpool(_prepare, predictor, uploads)
            out = await asyncio.wrap_future(batcher.submit(prepared))  # cancelled on a timeout: dropped unrun
        finally:
            batcher.release(len(uploads))
        proba, thresholds = iter(predictor.probabilities(out.logits)), predictor.thresholds
        novelty = iter(out.novelty if scored else [])
        results = []
        for (name, _), picture in zip(uploads, pictures, strict=True):
            if isinstance(picture, HTTPException):
                results.append({"filename": name, "error": picture.detail, "status": picture.status_code})
                continue
            p = next(proba)
            order = p.argsort()[::-1][:top_k]
            results.append({"filename": name, "width": picture.width, "height": picture.height,
                            "predictions": [{"class": predictor.classes[j], "probability": float(p[j])}
                                            for j in order]})
            if thresholds is not None:  # several labels an image: every label at its threshold
                results[-1]["labels"] = [{"class": predictor.classes[j], "probability": float(p[j])}
                                         for j in p.argsort()[::-1] if p[j] >= thresholds[j]]
            if scored:
                results[-1] |= novelty_fields(float(next(novelty)), predictor.threshold)
        return {"model_id": about.get("model_id"), "latency_ms": round(1000 * (time.perf_counter() - start), 2),
                "results": results}

    app.add_middleware(DeclaredSizeLimit, limit=max_upload_bytes)
    if timeout is not None:
        app.add_middleware(TimeLimit, seconds=timeout)
    if keys:
        app.add_middleware(RequireKey, keys=keys)
    app.add_middleware(Observe, metrics=metrics, names=log_names)  # the outermost: refusals are counted too
    swagger = resources.files("swagger_ui_bundle") / "vendor"
    assets = next(d for d in swagger.iterdir() if d.name.startswith("swagger-ui"))
    app.mount("/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tlearn API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    return app
