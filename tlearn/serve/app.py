"""The web service: a FastAPI app around one loaded ``Predictor``.

- ``POST /predict``: one or more images as multipart ``files`` (or ``file``, or ``image``) → each one's top-k
  classes, the model id and the server's latency. A request larger than ``max_upload_bytes`` gets 413, bytes
  that are not an image 415, an image that cannot be decoded (truncated, or a decompression bomb) 422; each
  names the file.
- ``GET /health``, ``GET /model`` (classes, backbone, metrics, when it was trained), ``GET /`` (the page, with no
  external assets), and the OpenAPI docs at ``/docs``, whose assets come from the swagger-ui-bundle package, so
  they work offline too.

The model is loaded once. Decoding and inference run in Starlette's thread pool (ONNX Runtime and PyTorch
release the GIL), so the event loop keeps accepting requests; concurrent requests are gathered into one batch
per model call by ``Batcher``. An error response never carries a traceback: the server's log has it.
"""
# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, which name local values.


import io
import logging
import threading
import time
from concurrent.futures import Future
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from tlearn import __version__
from tlearn.evaluate import novelty_fields
from tlearn.images import ImageDecodeError, load_image
from tlearn.predictor import Outputs, Predictor

log = logging.getLogger("tlearn")
MAX_UPLOAD_BYTES = 20 << 20  # one request: all its files and the multipart framing
MAX_FILES = 32  # images in one request
MAX_FILENAME = 255  # characters of an uploaded file's name echoed back
Prepared = list[list[np.ndarray]]  # per view, one (B, 3, H, W) batch per model input


class Batcher:
    """Gathers the prepared pictures of concurrent requests into one model call: while one batch runs, the next
    one fills.

    Requests decode and preprocess their pictures on their own pool threads (``Predictor.prepare``), in parallel;
    ``submit`` then blocks until the model has run on them. One model call at a time uses every core (ONNX
    Runtime's and PyTorch's own threads), and batching amortises each call's fixed cost."""

    def __init__(self, predictor: Predictor, max_batch: int = 8):
        self.predictor, self.max_batch = predictor, max_batch  # 8: while one batch runs, the next requests decode
        self.lock = threading.Lock()  # guards ``waiting``
        self.running = threading.Lock()  # held by the thread that runs the model
        self.waiting: list[tuple[Prepared, int, Future]] = []

    def submit(self, prepared: Prepared) -> Outputs:
        """The ``Outputs`` (logits, novelty) of ``prepared`` (``Predictor.prepare``'s output for B pictures)."""
        done: Future = Future()
        with self.lock:
            self.waiting.append((prepared, len(prepared[0][0]), done))
        while not done.done():
            if self.running.acquire(timeout=0.05):  # whoever holds it runs everything waiting, this one included
                try:
                    self._run_waiting()
                finally:
                    self.running.release()
        return done.result()

    def _run_waiting(self) -> None:
        with self.lock:
            batch, size = [], 0
            while self.waiting and (not batch or size + self.waiting[0][1] <= self.max_batch):
                batch.append(self.waiting.pop(0))
                size += batch[-1][1]
        if not batch:
            return
        try:  # per view, per input: the requests' arrays one after another
            joined = [[np.concatenate(arrays) for arrays in zip(*per_view, strict=True)]
                      for per_view in zip(*(prepared for prepared, _, _ in batch), strict=True)]
            out = self.predictor.run(joined)
        except Exception as e:  # noqa: BLE001 - handed to each waiting request, which answers 500 without a trace
            for _, _, done in batch:
                done.set_exception(e)
            return
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
               default_top_k: int = 5, unknown: bool = True) -> FastAPI:
    """The app serving ``predictor``; ``max_upload_bytes`` bounds one request's body. Each result carries its
    ``novelty`` and whether it is ``unknown`` where the model scores novelty, unless ``unknown`` is False."""
    about = predictor.about
    app = FastAPI(title="tlearn", version=__version__, docs_url=None, redoc_url=None,
                  description=f"An image classifier trained with tlearn: {len(predictor.classes)} classes "
                              f"({about.get('backbone', 'unknown backbone')}, {about.get('kind', predictor.backend)})")
    batcher = Batcher(predictor)
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

    @app.get("/model")
    def model() -> dict[str, Any]:
        """The served model: its classes, backbone, kind, held-out metrics and when it was trained."""
        return {**about, "classes": predictor.classes, "runtime": predictor.backend,
                "max_upload_bytes": max_upload_bytes, "max_files": max_files, "default_top_k": min(default_top_k, most),
                "novelty_threshold": predictor.threshold if scored else None}

    @app.post("/predict", max_body_size=max_upload_bytes, form_limits={"max_files": max_files})
    async def predict(files: Annotated[list[UploadFile] | None, File(description="one or more image files")] = None,
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
        pictures, prepared = await run_in_threadpool(_prepare, predictor, uploads)
        out = await run_in_threadpool(batcher.submit, prepared)
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
