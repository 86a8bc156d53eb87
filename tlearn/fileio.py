"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A crash or kill at any moment leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
import re
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tlearn.config import TlearnError

ONNX_OPSET = 17

UMASK = os.umask(0o022)  # read the process umask (there is no getter) and put it back
os.umask(UMASK)


_PARTIAL = re.compile(r"^\..+\.[^.]+\.tmp$")


def is_partial(name: str) -> bool:
    """Whether a file name is one of ``atomic_path``'s temporary files (".NAME.XXXX.tmp"), which a killed write
    can leave behind."""
    return bool(_PARTIAL.match(name))


@contextlib.contextmanager
def atomic_path(path: Path | str, sync: bool = True) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; when the block succeeds the file is synced and renamed
    onto ``path``, otherwise it is removed. Works with writers that only take a file name (matplotlib,
    safetensors). ``sync=False`` skips the sync, for files that are checked when read and made again if torn
    (cache entries: the sync cost more than the entry's write)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        os.close(fd)
    except OSError as e:
        raise TlearnError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from e
    try:
        yield tmp
        with open(tmp, "rb") as f:
            if sync:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~UMASK)  # again: some writers (safetensors) replace the file, as 0600
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


# A cell that starts with one of these is run as a formula by spreadsheets (OWASP: CSV injection); "'" is there
# so that the quote tlearn adds can always be taken off again.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet will show as text: one that could start a formula gets a leading "'" (which
    spreadsheets display as nothing), unless it is a plain number such as -0.5. ``csv_text`` undoes it."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_STARTS):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def csv_text(cell: str) -> str:
    """The text ``csv_cell`` was given."""
    return cell[1:] if cell.startswith("'") else cell


def atomic_write_csv(path: Path | str, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A CSV file whose text cells cannot start a spreadsheet formula (``csv_cell``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")  # RFC 4180, which also quotes a name holding "\r"
    writer.writerow(header)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    atomic_write_text(path, buf.getvalue())


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


class NotRegularFile(OSError):
    """A path that is a FIFO, socket, device or folder where a file was expected: reading it could block forever
    or never end, so it is refused, never opened."""


def special_kind(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO (named pipe)", "a character device", ...), from its ``st_mode``;
    None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), "not a regular file")


def _refuse_special(mode: int) -> None:
    kind = special_kind(mode)
    if kind:
        raise NotRegularFile(f"{kind}, not a regular file; it is never opened")


def require_regular(path: Path | str) -> os.stat_result:
    """``os.stat`` of a regular file (links followed); ``NotRegularFile`` for anything else."""
    st = os.stat(path)
    _refuse_special(st.st_mode)
    return st


def open_regular(path: Path | str) -> io.BufferedReader:
    """Open a regular file for reading, refusing anything else without blocking: the open is non-blocking, so a
    FIFO with no writer cannot hang it, and the check is on the opened descriptor, so the file cannot be swapped
    for a FIFO or a device in between."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        _refuse_special(os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class DigestIndex:
    """File digests remembered across commands, in ``digests.sqlite`` under the cache folder: a file whose path,
    size, modification and change times, inode and device are all unchanged is not read again (the test ``git``
    makes of its index). Any problem with the index file only costs the saving: digests are then computed."""

    def __init__(self) -> None:
        self.db: sqlite3.Connection | None = None
        self.folder: Path | None = None  # the cache folder the index was opened (or failed to open) in
        self.pending = 0
        self.lock = threading.Lock()

    def _open(self) -> sqlite3.Connection | None:
        folder = default_cache_dir()
        if self.folder != folder:  # first use, after close(), or $TLEARN_CACHE_DIR changed: the index follows it
            self.close()
            self.folder = folder
            with contextlib.suppress(OSError, sqlite3.Error):
                folder.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(folder / "digests.sqlite", timeout=5, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS digests (stat BLOB PRIMARY KEY, sha256 TEXT NOT NULL)")
                self.db = db
        return self.db

    def get(self, key: str) -> str | None:
        with self.lock, contextlib.suppress(sqlite3.Error):
            db = self._open()
            row = db.execute("SELECT sha256 FROM digests WHERE stat = ?", (_blob(key),)).fetchone() if db else None
            return row[0] if row else None
        return None

    def put(self, key: str, digest: str) -> None:
        with self.lock, contextlib.suppress(sqlite3.Error):
            db = self._open()
            if db is not None:
                db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?)", (_blob(key), digest))
                self.pending += 1
                if self.pending >= 1000:  # one commit per thousand new files (and at exit)
                    db.commit()
                    self.pending = 0

    def close(self) -> None:
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.commit()
                self.db.close()
        self.db, self.pending, self.folder = None, 0, None


def _blob(key: str) -> bytes:
    return key.encode("utf-8", errors="surrogateescape")  # file names need not be valid UTF-8


_index = DigestIndex()
atexit.register(_index.close)
_digests: dict[str, str] = {}  # this process's memo, oldest first
MEMO_ENTRIES = 100_000  # at most (about 20 MB); the oldest are forgotten first, so a long-lived server stays flat


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks. Remembered while the file's path, size, times, inode
    and device stay the same: for the life of the process and, in the cache folder's index, across commands. So
    checking, extracting and evaluating a folder read each file once, and a warm re-run reads none."""
    path = os.path.abspath(path)
    st = require_regular(path)
    key = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}:{path}"
    if key not in _digests:
        digest = _index.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open_regular(path) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digest = h.hexdigest()
            _index.put(key, digest)
        while len(_digests) >= MEMO_ENTRIES:
            del _digests[next(iter(_digests))]
        _digests[key] = digest
    return _digests[key]


def read_csv_rows(path: Path | str) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line, as dicts; [] when there is no such file. File names that are not
    valid UTF-8 round-trip (surrogateescape), and so do cells that ``atomic_write_csv`` quoted against formulas."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [{k: csv_text(v) if isinstance(v, str) else v for k, v in row.items()} for row in csv.DictReader(f)]


def safe_name(text: str, limit: int = 100) -> str:
    """``text`` as one harmless file-name component: letters, digits and ``._+-`` kept, anything else (a slash,
    "..", a control character) turned into "-", no leading dot, at most ``limit`` characters."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).lstrip(".-")[:limit].rstrip(".")
    if not name:
        raise TlearnError(f"{text!r} gives no usable file name; use letters, digits, '.', '_', '+' or '-'")
    return name


def default_cache_dir() -> Path:
    """Where features and ONNX exports are cached: $TLEARN_CACHE_DIR or ~/.cache/tlearn."""
    return Path(os.environ.get("TLEARN_CACHE_DIR") or Path.home() / ".cache" / "tlearn").expanduser()


def identity_key(identity: dict[str, Any]) -> str:
    """A short stable hash of a backbone identity, used to namespace the feature cache and the ONNX exports."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """``json.dumps``'s fallback for ``keyed_path``: arrays by their bytes' digest, paths as text, dataclasses
    field by field."""
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):
        return [str(value.dtype), list(value.shape), hashlib.sha256(value.tobytes()).hexdigest()]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    raise TypeError(f"cannot key on {type(value).__name__}")


def keyed_path(cache_dir: str | Path | None, folder: str, inputs: Any, suffix: str) -> Path:
    """Where something computed from ``inputs`` alone (JSON-able values, numpy arrays, paths) is kept under the
    cache folder: the same inputs give the same file, so a warm re-run reuses it instead of computing again."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=_plain).encode()).hexdigest()[:32]
    return Path(cache_dir or default_cache_dir()) / folder / f"{digest}{suffix}"


def onnx_export_path(cache_dir: str | Path | None, name: str, identity: dict[str, Any]) -> Path:
    """Where the ONNX export of a base with this identity lives, for this machine's torch: training writes it
    (``runtime.export_onnx``) and the predictor reads it, without importing torch."""
    exporter = {"exporter": f"torch {importlib.metadata.version('torch')}", "opset": ONNX_OPSET}
    key = identity_key({**identity, **exporter})
    return Path(cache_dir or default_cache_dir()) / "onnx" / f"{safe_name(name)}-{key}.onnx"


def outside_data(out: Path, data_root: Path | str, flag: str, what: str) -> None:
    """Refuse ``out`` inside (or holding) the data folder ``data_root``: ``what`` would be read as data next time,
    and tlearn never writes into the user's data."""
    where, data = out.resolve(), Path(data_root).expanduser().resolve()
    if where == data or data in where.parents:
        raise TlearnError(f"{flag} {out} is inside the data folder {data_root}: {what} would be read as images next "
                          "time, and tlearn never writes into your data. Choose a place outside it")
    if where in data.parents:
        raise TlearnError(f"{flag} {out} holds the data folder {data_root}; choose a new place")


def claim_file(out: Path | str, data_roots: Sequence[Path | str], *, overwrite: bool, flag: str,
               ours: Callable[[Path], bool]) -> Path:
    """Check, before any work, that a file (``predict --out``, ``--plot``, ``check --fix-report``) may be written
    to ``out``: outside the data folders read, and, where something is there already, one that tlearn wrote
    (``ours``) or ``overwrite``. Makes its folder. Returns ``out``."""
    out = Path(out).expanduser()
    for root in data_roots:
        outside_data(out, root, flag, "the file")
    if out.is_dir():
        raise TlearnError(f"{flag} {out} is a folder; give a file name")
    if out.exists() and not overwrite and not ours(out):
        raise TlearnError(f"{flag} {out} exists and was not written by tlearn; choose a new file, or pass --overwrite "
                          "to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TlearnError(f"cannot create the folder of {flag} {out}: {e.strerror or e}") from e
    return out
