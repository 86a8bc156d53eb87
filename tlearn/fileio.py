"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A crash or kill at any moment leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tlearn.config import TlearnError

ONNX_OPSET = 17

_UMASK = os.umask(0o022)  # read the process umask (there is no getter) and put it back
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; when the block succeeds the file is synced and renamed
    onto ``path``, otherwise it is removed. Works with writers that only take a file name (matplotlib,
    safetensors)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.close(fd)
    except OSError as e:
        raise TlearnError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from e
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise TlearnError(f"cannot write {path}: {e.strerror or e}; check the free space and permissions") from e
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """UTF-8; file names that are not valid UTF-8 (surrogate escapes from os.walk) are written back as their
    original bytes, so they round-trip."""
    atomic_write_bytes(path, text.encode("utf-8", errors="surrogateescape"))


def atomic_write_csv(path: Path | str, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


_digests: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks. Remembered for the life of the process while the
    file's size, modification time and inode stay the same, so checking, extracting and evaluating the same
    folder read each file once."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def read_csv_rows(path: Path | str) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line, as dicts; [] when there is no such file. File names that are not
    valid UTF-8 round-trip (surrogateescape), as ``atomic_write_csv`` writes them."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def default_cache_dir() -> Path:
    """Where features and ONNX exports are cached: $TLEARN_CACHE_DIR or ~/.cache/tlearn."""
    return Path(os.environ.get("TLEARN_CACHE_DIR") or Path.home() / ".cache" / "tlearn").expanduser()


def identity_key(identity: dict[str, Any]) -> str:
    """A short stable hash of a backbone identity, used to namespace the feature cache and the ONNX exports."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def onnx_export_path(cache_dir: str | Path | None, name: str, identity: dict[str, Any]) -> Path:
    """Where the ONNX export of a base with this identity lives, for this machine's torch: training writes it
    (``runtime.export_onnx``) and the predictor reads it, without importing torch."""
    exporter = {"exporter": f"torch {importlib.metadata.version('torch')}", "opset": ONNX_OPSET}
    return Path(cache_dir or default_cache_dir()) / "onnx" / f"{name}-{identity_key({**identity, **exporter})}.onnx"
