"""Serving a trained classifier over HTTP: ``tlearn serve RUN`` loads the model once and runs the FastAPI app of
``tlearn.serve.app`` under uvicorn, on loopback unless told otherwise; off loopback only with an API key, or
``--no-auth``. ``--processes N`` runs N server processes on one port (uvicorn's workers), each loading the model
once and using its share of the cores.

>>> serve(ServeOptions("runs/demo"), port=8000)        # doctest: +SKIP
serving runs/demo at http://127.0.0.1:8000/ (API docs at http://127.0.0.1:8000/docs); Ctrl+C stops
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.metadata
import ipaddress
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tlearn import __version__, report
from tlearn.artifact import MODEL_FILE, read_run
from tlearn.config import TlearnError
from tlearn.fileio import ONNX_OPSET, file_sha256, keyed_path
from tlearn.graph import sidecar_path
from tlearn.predictor import BATCH, Predictor
from tlearn.serve.guard import KEY_ENV, read_keys

log = logging.getLogger("tlearn")
OPTIONS_ENV = "TLEARN_SERVE_OPTIONS"  # the ServeOptions of the processes of --processes, as JSON
QUEUE_SECONDS = 3  # the default --max-queue: this much work


def load_predictor(path: str | Path, runtime: str = "auto", *, device: str = "auto", weights: str | None = None,
                   cache_dir: str | None = None) -> Predictor:
    """The model to serve. ``runtime`` auto is ``Predictor.load``'s choice; onnx serves the whole classifier as one
    ONNX graph (``tlearn export``'s, made once per model file and kept in the cache), whatever kind of run it is;
    torch runs the full PyTorch stack."""
    path = Path(path)
    if runtime != "onnx" or path.suffix.lower() == ".onnx":
        return Predictor.load(path, runtime=runtime, device=device, weights=weights, cache_dir=cache_dir,
                              verbose=False)
    if device not in ("auto", "cpu"):
        raise TlearnError(f"--runtime onnx runs on the CPU; with --device {device} use --runtime torch or auto")
    read_run(path)  # a damaged run is named before anything else is done
    key = [file_sha256(path / MODEL_FILE), __version__, importlib.metadata.version("torch"), ONNX_OPSET]
    graph = keyed_path(cache_dir, "served", key, ".onnx")
    if not graph.is_file() or not sidecar_path(graph).is_file():
        from tlearn.export import export

        log.info(f"exporting {path} to one ONNX graph (once; kept at {graph})")
        export(path, graph, overwrite=True, weights=weights, cache_dir=cache_dir, measure=False)
    return Predictor.exported(graph)


def check_address(host: str, port: int) -> bool:
    """Refuse, in a line, an address this machine cannot listen on; whether it is a loopback address (reachable
    from this machine only)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise TlearnError(f"--host {host}: not an address of this machine ({e.strerror})") from e
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            what = "is in use: choose another with --port" if e.errno == errno.EADDRINUSE else f"({e.strerror})"
            raise TlearnError(f"cannot listen on {host}:{port}: the port {what}") from e
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return False


def default_queue(predictor: Predictor, seconds: float = QUEUE_SECONDS) -> int:
    """Images the server may hold waiting: ``seconds`` of work, measured by running the model on a batch of
    grey pictures (which also warms it up, so that the first client does not pay for it)."""
    pictures = [Image.new("RGB", (256, 256), (128, 128, 128))] * BATCH
    predictor.run(predictor.prepare(pictures))  # the first call sets the runtime up
    start = time.perf_counter()
    predictor.run(predictor.prepare(pictures))
    per_image = (time.perf_counter() - start) / BATCH
    return max(BATCH, round(seconds / per_image))


@dataclass
class ServeOptions:
    """How ``tlearn serve`` serves a model; handed as JSON to each process of ``--processes``. API keys are not
    in it: each process reads them from ``api_key_file`` and ``TLEARN_API_KEY`` itself."""

    path: str
    runtime: str = "auto"
    device: str = "auto"
    weights: str | None = None
    cache_dir: str | None = None
    max_upload_mb: float = 20
    top_k: int = 5
    unknown: bool = True
    api_key_file: str | None = None
    max_queue: int | None = None  # None: QUEUE_SECONDS of work, measured at the start
    timeout: float = 30
    log_names: bool = False


def build_app(options: ServeOptions, predictor: Predictor | None = None) -> Any:
    """The app of ``options`` (loading the model unless ``predictor`` is given)."""
    from tlearn.serve.app import create_app

    if predictor is None:
        predictor = load_predictor(options.path, options.runtime, device=options.device, weights=options.weights,
                                   cache_dir=options.cache_dir)
    queue = options.max_queue or default_queue(predictor)
    log.info(f"at most {queue} images wait in this process (--max-queue); a request is answered within "
             f"{options.timeout:g} s (--timeout)")
    return create_app(predictor, max_upload_bytes=int(options.max_upload_mb * (1 << 20)), default_top_k=options.top_k,
                      unknown=options.unknown, keys=read_keys(options.api_key_file), max_queue=queue,
                      timeout=options.timeout, log_names=options.log_names)


def app_from_environment() -> Any:
    """The app of one process of ``tlearn serve --processes N`` (uvicorn's factory), from ``OPTIONS_ENV``."""
    report.enable_logging()
    return build_app(ServeOptions(**json.loads(os.environ[OPTIONS_ENV])))


def serve(options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000, processes: int = 1,
          no_auth: bool = False) -> None:
    """Load the model once (in each of ``processes`` processes, which share the port), then serve it until
    interrupted. Listening beyond this machine needs an API key, or ``no_auth`` to say it is meant to be open."""
    import uvicorn

    if not 0 < options.max_upload_mb <= 4096:
        raise TlearnError(f"--max-upload-mb must be above 0 and at most 4096, not {options.max_upload_mb:g}")
    if not 0 < options.timeout <= 3600:
        raise TlearnError(f"--timeout must be above 0 and at most 3600 seconds, not {options.timeout:g}")
    keys = read_keys(options.api_key_file)
    if keys and no_auth:
        raise TlearnError("--no-auth serves without a key, but a key was given (--api-key-file or TLEARN_API_KEY): "
                          "drop one or the other")
    if not check_address(host, port):
        if not keys and not no_auth:
            raise TlearnError(f"--host {host} is reachable from the network, and no API key was given: pass "
                              f"--api-key-file FILE (or set {KEY_ENV}) so that only your clients can use the model, "
                              "or --no-auth to serve it to anyone who can reach this machine")
        if no_auth:
            log.warning(f"listening on {host} with --no-auth: anyone who can reach this machine on port {port} can "
                        "use the model")
    predictor = load_predictor(options.path, options.runtime, device=options.device, weights=options.weights,
                               cache_dir=options.cache_dir)  # a bad run fails here, once; an export is made once
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {options.path} ({predictor.backend}, model {predictor.about.get('model_id')}) at "
          f"http://{shown}:{port}/ (API docs at http://{shown}:{port}/docs"
          f"{'; API key required' if keys else ''}{f'; {processes} processes' if processes > 1 else ''}); "
          "Ctrl+C stops", flush=True)
    if processes == 1:
        return uvicorn.run(build_app(options, predictor), host=host, port=port, log_level="warning")
    del predictor
    from tlearn.features import cpu_cores

    with tempfile.TemporaryDirectory(prefix="tlearn-metrics-") as shared:
        os.environ |= {OPTIONS_ENV: json.dumps(dataclasses.asdict(options)), "PROMETHEUS_MULTIPROC_DIR": shared,
                       "OMP_NUM_THREADS": str(max(1, cpu_cores() // processes))}  # the cores, shared out
        uvicorn.run("tlearn.serve:app_from_environment", factory=True, workers=processes, host=host, port=port,
                    log_level="warning")
