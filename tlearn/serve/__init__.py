"""Serving a trained classifier over HTTP: ``tlearn serve RUN`` loads the model once and runs the FastAPI app of
``tlearn.serve.app`` under uvicorn, on loopback unless told otherwise.

>>> serve("runs/demo", port=8000)        # doctest: +SKIP
serving runs/demo at http://127.0.0.1:8000/ (API docs at http://127.0.0.1:8000/docs); Ctrl+C stops
"""

from __future__ import annotations

import errno
import importlib.metadata
import ipaddress
import logging
import socket
from pathlib import Path

from tlearn import __version__
from tlearn.artifact import MODEL_FILE, read_run
from tlearn.config import TlearnError
from tlearn.fileio import ONNX_OPSET, file_sha256, keyed_path
from tlearn.graph import sidecar_path
from tlearn.predictor import Predictor

log = logging.getLogger("tlearn")


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


def check_address(host: str, port: int) -> None:
    """Refuse, in a line, an address this machine cannot listen on; warn when it is reachable from the network."""
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
        loopback = ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning(f"listening on {host}: anyone who can reach this machine on port {port} can use the model")


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, runtime: str = "auto",
          device: str = "auto", weights: str | None = None, cache_dir: str | None = None,
          max_upload_mb: float = 20, top_k: int = 5, unknown: bool = True) -> None:
    """Load the model once, then serve it until interrupted."""
    import uvicorn

    from tlearn.serve.app import create_app

    if not 0 < max_upload_mb <= 4096:
        raise TlearnError(f"--max-upload-mb must be above 0 and at most 4096, not {max_upload_mb:g}")
    check_address(host, port)
    predictor = load_predictor(path, runtime, device=device, weights=weights, cache_dir=cache_dir)
    app = create_app(predictor, max_upload_bytes=int(max_upload_mb * (1 << 20)), default_top_k=top_k,
                     unknown=unknown)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {path} ({predictor.backend}, model {predictor.about.get('model_id')}) at http://{shown}:{port}/ "
          f"(API docs at http://{shown}:{port}/docs); Ctrl+C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
