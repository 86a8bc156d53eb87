"""What stands between the network and the model: API keys, the time limit of a request, and the record of each
request (one access-log line, and the Prometheus metrics of ``tlearn.serve.metrics``).

Each is a plain ASGI middleware around the FastAPI app, outermost first: ``Observe`` (so that refusals are
counted and logged too), ``RequireKey``, ``TimeLimit``.

- **Keys.** A request carries its key as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. The key is compared
  with each accepted key in constant time (their SHA-256 digests, so that neither the length nor a common prefix
  shows in the time taken), never logged and never echoed. A key in the URL's query string is refused, since
  URLs end up in logs and browser histories. ``/``, ``/health`` and the API docs' static assets stay open: a load
  balancer and the page, which asks for the key, need them.
- **Time limit.** A request not answered within ``timeout`` seconds gets 504 and its work is dropped: one still
  waiting for the model leaves the queue, and a client that sends its upload slowly is cut off.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from tlearn.config import TlearnError

access_log = logging.getLogger("tlearn.access")
OPEN = frozenset({"/", "/health", "/favicon.ico"})  # answered without a key
OPEN_PREFIXES = ("/docs-assets/",)  # the API docs' own JavaScript and CSS, public files
KEY_ENV = "TLEARN_API_KEY"
MIN_KEY_CHARS = 16
QUERY_KEYS = frozenset({"api_key", "apikey", "key", "token", "access_token"})
ROUTES = frozenset({"/", "/health", "/model", "/predict", "/metrics", "/docs", "/openapi.json"})


def read_keys(key_file: str | Path | None, environ: dict[str, str] | None = None) -> list[str]:
    """The accepted API keys: one a line of ``key_file`` (blank lines and ``#`` comments skipped; several keys let
    one be rotated without a restart of the clients), and the ``TLEARN_API_KEY`` environment variable's."""
    environ = os.environ if environ is None else environ
    found: list[tuple[str, str]] = []  # (where the key came from, the key)
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TlearnError(f"--api-key-file {key_file}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
        found = [(f"line {n} of --api-key-file {key_file}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                 if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise TlearnError(f"--api-key-file {key_file} holds no key: write one key a line, e.g. the output of "
                              "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            logging.getLogger("tlearn").warning(f"--api-key-file {key_file} can be read by other users of this "
                                                f"machine; chmod 600 {key_file}")
    if environ.get(KEY_ENV, "").strip():
        found.append((KEY_ENV, environ[KEY_ENV].strip()))
    for where, key in found:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() or not c.isprintable() for c in key):
            raise TlearnError(f"the API key in {where} is too weak or malformed: a key is at least {MIN_KEY_CHARS} "
                              "printable characters without spaces; make one with python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))'")
    return [key for _, key in found]


def _digest(text: bytes) -> bytes:
    return hashlib.sha256(text).digest()


async def _answer(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON ``{"detail": ...}`` response, sent as raw ASGI messages."""
    body = json.dumps({"detail": detail}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


class RequireKey:
    """401 for a request to anything but the open paths without one of ``keys``."""

    def __init__(self, app: Any, keys: list[str]):
        self.app, self.digests = app, [_digest(k.encode()) for k in keys]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        query = {k.lower() for k, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1"))}
        if query & QUERY_KEYS:
            return await _answer(send, 401, "an API key in the URL is refused (URLs are logged): send it as the "
                                            "header 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                 {"WWW-Authenticate": "Bearer"})
        if path in OPEN or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        bearer = headers.get(b"authorization", b"")
        if given is None and bearer[:7].lower() == b"bearer ":
            given = bearer[7:].strip()
        if given is None:
            return await _answer(send, 401, "this server needs an API key: send the header 'Authorization: Bearer "
                                            "KEY' or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
        presented = _digest(given)
        if not sum(hmac.compare_digest(presented, d) for d in self.digests):  # every key compared, whichever matches
            return await _answer(send, 401, "wrong API key", {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class TimeLimit:
    """504 for a request not answered within ``seconds``; cancelling it drops its work (a request waiting for
    the model leaves the queue; one still sending its upload is cut off)."""

    def __init__(self, app: Any, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            async with asyncio.timeout(self.seconds):
                await self.app(scope, receive, sending)
        except TimeoutError:
            if not started:
                await _answer(send, 504, f"the request took over this server's limit of {self.seconds:g} s "
                                         "(tlearn serve --timeout) and was dropped")


class Observe:
    """One access-log line a request (method, route, status, images, milliseconds; the uploaded file names only
    with ``names``) and the request's metrics. The route of an unknown path is logged and counted as "other", so
    that a scan of random URLs cannot grow the metrics without bound."""

    def __init__(self, app: Any, metrics: Any, names: bool = False):
        self.app, self.metrics, self.names = app, metrics, names

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        scope.setdefault("state", {})

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - start
            route = scope["path"] if scope["path"] in ROUTES else "other"
            state = scope["state"]
            images = state.get("images", 0)
            self.metrics.request(route, status, seconds)
            names = f" {json.dumps(state.get('names', []))}" if self.names and state.get("names") else ""
            when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            access_log.info(f"{when} {scope['method']} {route} {status} {images} images {1000 * seconds:.1f} ms"
                            f"{names}")
