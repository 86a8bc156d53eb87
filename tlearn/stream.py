"""Batch prediction that streams to a file: ``tlearn predict RUN INPUTS --out predictions.csv`` (or ``.jsonl``, or
``.parquet`` where pyarrow is installed).

The file has one row an image, in input order: ``path``, ``status`` (ok or skipped) and ``reason``, then the top-k
``class_i`` and ``probability_i`` (6 decimals), ``labels`` for a model of several labels an image, and ``novelty``
and ``unknown`` where the model scores novelty. Rows are written a chunk at a time, each chunk in one write, so a
run killed halfway leaves its finished rows and never a half-written one (a torn last line is cut off when the
file is resumed). Nothing grows with the number of images but the list of their paths.

- ``resume`` continues the file: the paths already in it are not predicted again.
- Several processes (``--devices N``, ``torchrun``, ``accelerate launch``) each take every N-th image and write
  a part file of their own beside ``out``; rank 0 waits for the others' parts, then merges them into ``out`` in
  input order. Parts left by a killed run are read on ``resume``, whatever the number of processes was.
- A Parquet file is written as it goes into a JSON Lines file beside it, ``OUT.partial.jsonl``, and converted a
  row group at a time at the end (a Parquet file has no end until it is closed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlearn import dist
from tlearn.config import TlearnError
from tlearn.data import expand_inputs
from tlearn.evaluate import top_classes
from tlearn.fileio import claim_file, csv_cell
from tlearn.progress import tqdm

log = logging.getLogger("tlearn")
CHUNK = 256  # images predicted and written together (fewer model set-ups; a killed run loses at most this many)
FORMATS = (".csv", ".jsonl", ".parquet")
PARQUET_GROUP = 10_000  # rows a Parquet row group
MARK = b"tlearn predictions"  # a Parquet file's schema metadata under b"written_by"


def columns(top_k: int, labels: bool, scored: bool) -> list[str]:
    """The file's columns for ``top_k`` classes, with ``labels`` (several labels an image) and the novelty
    columns (``scored``)."""
    ranked = [name for i in range(1, top_k + 1) for name in (f"class_{i}", f"probability_{i}")]
    return ["path", "status", "reason", *ranked, *(["labels"] if labels else []),
            *(["novelty", "unknown"] if scored else [])]


def as_row(result: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``top_classes``' result for one image → its row (None where a column has no value)."""
    row: dict[str, Any] = dict.fromkeys(names)
    row |= {"path": result["path"], "status": "skipped" if "error" in result else "ok",
            "reason": result.get("error", "")}
    for i, p in enumerate(result.get("predictions", []), 1):
        row[f"class_{i}"], row[f"probability_{i}"] = p["class"], round(p["probability"], 6)
    if "labels" in names and "predictions" in result:
        row["labels"] = ";".join(p["class"] for p in result.get("labels", []))
    if "novelty" in result:
        row["novelty"], row["unknown"] = result["novelty"], result["unknown"]
    return row


# --- the formats -------------------------------------------------------------------------------------------


class Sink:
    """A file of rows: which paths it holds, and appending whole chunks of rows to it."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names

    def ours(self) -> bool:
        """Whether the file at ``path`` was written by ``tlearn predict --out``, whatever its columns."""
        head = self._first_line()
        return head is not None and self._names_of(head)[:4] == ["path", "status", "reason", "class_1"]

    def done(self, cut: bool = True) -> set[str]:
        """The paths already in the file (as written), after checking it has these columns. A torn last line,
        which a run killed mid-write can leave, is cut off with ``cut``, else passed over (a file another
        process is appending to)."""
        head = self._first_line()
        if head is None:
            return set()
        self._same_columns(self._names_of(head))
        with open(self.path, "rb+" if cut else "rb") as f:
            text = f.read()
            if cut:
                f.truncate(text.rfind(b"\n") + 1)
        return set(self._paths(text[:text.rfind(b"\n") + 1].decode("utf-8")))

    def append(self, rows: list[dict[str, Any]]) -> None:
        """The rows, in one write (a header first into a new file)."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        text = self._text(rows, header=new)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(text)

    def finish(self) -> None:
        """Called once every row is written."""

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def key(self, path: str) -> str:
        """``path`` as the file holds it."""
        return path

    def _same_columns(self, found: list[str]) -> None:
        if found != self.names:
            raise TlearnError(f"--resume: {self.path} has other columns ({', '.join(found[:6])}, ...) than this "
                              "prediction would write: use the same model and --top-k, or a new --out")

    # each format's own
    def _first_line(self) -> str | None:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return f.readline()

    def _names_of(self, head: str) -> list[str]:
        raise NotImplementedError

    def _paths(self, text: str) -> Iterator[str]:
        raise NotImplementedError

    def _text(self, rows: list[dict[str, Any]], header: bool) -> str:
        raise NotImplementedError


class CsvSink(Sink):
    """RFC 4180 CSV with a header row; text cells that could start a spreadsheet formula get a leading "'"."""

    def _names_of(self, head: str) -> list[str]:
        return next(csv.reader([head]), [])

    def _paths(self, text: str) -> Iterator[str]:
        reader = csv.reader(io.StringIO(text))
        next(reader, None)
        return (row[0] for row in reader if row)

    def _text(self, rows: list[dict[str, Any]], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        if header:
            writer.writerow(self.names)
        for row in rows:
            writer.writerow(["" if v is None else f"{v:.6f}" if isinstance(v, float) and k.startswith("prob")
                             else str(v).lower() if isinstance(v, bool) else csv_cell(v) for k, v in row.items()])
        return buffer.getvalue()

    def key(self, path: str) -> str:
        return csv_cell(path)  # as written


class JsonlSink(Sink):
    """One JSON object a line, every column in each."""

    def _names_of(self, head: str) -> list[str]:
        try:
            record = json.loads(head)
        except json.JSONDecodeError:
            return []
        return list(record) if isinstance(record, dict) else []

    def _paths(self, text: str) -> Iterator[str]:
        return (json.loads(line)["path"] for line in text.splitlines() if line.strip())

    def _text(self, rows: list[dict[str, Any]], header: bool) -> str:
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    def rows(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    yield json.loads(line)


class ParquetSink(Sink):
    """Apache Parquet (pyarrow): rows go to ``OUT.partial.jsonl`` as they come, and into ``OUT`` at the end,
    a row group at a time; a Parquet file already there (``resume``) is carried over first."""

    def __init__(self, path: Path, names: list[str]):
        super().__init__(path, names)
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise TlearnError(f"--out {path}: writing Parquet needs pyarrow (pip install pyarrow, or "
                              "pip install 'tlearn[parquet]'); or write .csv or .jsonl") from e
        self.staging = JsonlSink(path.with_name(path.name + ".partial.jsonl"), names)

    def ours(self) -> bool:
        import pyarrow.parquet as pq

        try:
            return (pq.read_schema(self.path).metadata or {}).get(b"written_by") == MARK
        except Exception:  # noqa: BLE001 - not a Parquet file at all
            return False

    def done(self, cut: bool = True) -> set[str]:
        import pyarrow.parquet as pq

        paths = self.staging.done(cut)
        if self.path.is_file():
            self._same_columns(pq.read_schema(self.path).names)
            paths |= set(pq.read_table(self.path, columns=["path"]).column("path").to_pylist())
        return paths

    def append(self, rows: list[dict[str, Any]]) -> None:
        self.staging.append(rows)

    def finish(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from tlearn.fileio import atomic_path

        if self.path.is_file() and not self.staging.path.is_file():  # nothing new
            return
        types = {"path": pa.string(), "status": pa.string(), "reason": pa.string(), "labels": pa.string(),
                 "novelty": pa.float64(), "unknown": pa.bool_()}
        schema = pa.schema([(n, types.get(n, pa.float64() if n.startswith("prob") else pa.string()))
                            for n in self.names], metadata={b"written_by": MARK})
        with atomic_path(self.path) as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                if self.path.is_file():  # an earlier file's rows first (resume)
                    for batch in pq.ParquetFile(self.path).iter_batches(PARQUET_GROUP):
                        writer.write_batch(batch.cast(schema))
                group: list[dict[str, Any]] = []
                for row in self.staging.rows():
                    group.append(row)
                    if len(group) == PARQUET_GROUP:
                        writer.write_table(pa.Table.from_pylist(group, schema))
                        group = []
                if group:
                    writer.write_table(pa.Table.from_pylist(group, schema))
        self.staging.remove()

    def remove(self) -> None:
        self.staging.remove()
        super().remove()


def sink(path: Path, names: list[str]) -> Sink:
    """The sink for ``path``'s format (from its suffix)."""
    kinds = {".csv": CsvSink, ".jsonl": JsonlSink, ".parquet": ParquetSink}
    if path.suffix.lower() not in kinds:
        raise TlearnError(f"--out {path}: write predictions to a .csv, .jsonl or .parquet file")
    return kinds[path.suffix.lower()](path, names)


def listed(listing: Path) -> list[str]:
    """``--from-list``: the paths in a text file, one a line, relative ones from the file's folder."""
    try:
        lines = listing.expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TlearnError(f"--from-list {listing}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    base = listing.expanduser().parent
    paths = [str(base / line.strip()) if not Path(line.strip()).expanduser().is_absolute() else line.strip()
             for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise TlearnError(f"--from-list {listing} lists no path: write one image path a line")
    return paths


def claim_outputs(out: str | None, plot: str | None, folders: list[str], *, overwrite: bool, resume: bool
                  ) -> dict[str, Path]:
    """``predict``'s ``--out`` and ``--plot``, checked before any work: outside the ``folders`` read, and
    replacing only what tlearn wrote unless ``overwrite``."""
    claimed = {}
    if plot and dist.is_main():
        claimed["plot"] = claim_file(plot, folders, overwrite=overwrite, flag="--plot", ours=_our_chart)
    if out:
        probe = sink(Path(out).expanduser(), [])
        claimed["out"] = claim_file(out, folders, overwrite=overwrite or resume, flag="--out",
                                    ours=lambda _: probe.ours())
    return claimed


def _our_chart(path: Path) -> bool:
    """Whether the PNG at ``path`` is a chart of ``predict --plot`` (its Software text says so)."""
    from tlearn.images import open_image

    try:
        with open_image(path) as image:
            return image.info.get("Software", "").startswith("tlearn")
    except (OSError, ValueError):  # not a picture at all, or not one PIL can read
        return False


# --- predicting ------------------------------------------------------------------------------------------------


@dataclass
class Written:
    """What ``predict_to_file`` did: images predicted now, skipped (unreadable) now, and already in the file."""

    out: Path
    predicted: int = 0
    skipped: int = 0
    resumed: int = 0
    seconds: float = 0.0
    first: list[dict[str, Any]] = field(default_factory=list)  # the first results, for a chart

    def summary(self) -> str:
        rate = self.predicted / self.seconds if self.seconds else 0
        again = f"; {self.resumed:,} were already there" if self.resumed else ""
        skipped = f", {self.skipped:,} skipped (unreadable: see the status and reason columns)" if self.skipped else ""
        return (f"predictions for {self.predicted:,} images written to {self.out} in {self.seconds:.1f} s "
                f"({rate:.1f} images/s){skipped}{again}")


def _parts(out: Path, names: list[str]) -> list[JsonlSink]:
    """The part files beside ``out`` of any earlier or current group of processes."""
    return [JsonlSink(p, names) for p in sorted(out.parent.glob(f"{out.name}.part-*-of-*.jsonl"))]


def _part(out: Path, rank: int, world: int, names: list[str]) -> JsonlSink:
    return JsonlSink(out.with_name(f"{out.name}.part-{rank}-of-{world}.jsonl"), names)


def _marker(part: JsonlSink) -> Path:
    """The file that says a process finished ``part``; it holds the launch's id."""
    return part.path.with_suffix(".done")


def predict_to_file(predictor: Any, inputs: str | Path | Iterable[str | Path], out: str | Path, *, top_k: int = 3,
                    calibration: bool = True, tta: bool = False, unknown: bool = True, resume: bool = False,
                    keep_first: int = 0, progress: bool = True) -> Written:
    """Predict every image of ``inputs`` (image files, and the images in folders) into ``out`` with ``predictor``
    (a ``Predictor``), a chunk at a time (see the module's text); in a group of processes, this process's share,
    which rank 0 then merges. The command checks ``out`` first (``claim_outputs``); ``resume`` continues it.

    >>> predict_to_file(Predictor.load("runs/demo"), ["archive/"], "predictions.csv")  # doctest: +SKIP"""
    start = time.perf_counter()
    paths, out = expand_inputs(inputs), Path(out).expanduser()
    scored = unknown and predictor.threshold is not None
    names = columns(min(top_k, len(predictor.classes)), predictor.thresholds is not None, scored)
    final = sink(out, names)
    rank, world = dist.rank(), dist.world_size()
    parts, writer = _parts(out, names), _part(out, rank, world, names)
    _marker(writer).unlink(missing_ok=True)
    in_final = final.done() if resume else set()
    done = set(in_final)
    if resume:
        for part in parts:  # the others' parts (being written now, or left by a killed run), and this one's own
            done |= part.done(cut=part.path == writer.path)
    else:
        writer.remove()
        if rank == 0:
            final.remove()
            for part in parts:  # another group's, left by a killed run
                if not part.path.name.endswith(f"-of-{world}.jsonl"):
                    part.remove()
        parts = []
    direct = world == 1 and not parts  # one process, no earlier parts: straight into ``out``
    writer = final if direct else writer
    key = final.key
    mine = [p for i, p in enumerate(paths) if i % world == rank]
    todo = [p for p in mine if key(str(p)) not in done]
    written = Written(out, resumed=len(mine) - len(todo))
    if written.resumed:
        log.info(f"resuming {out}: {written.resumed:,} of {len(mine):,} images are already in it; predicting the "
                 f"other {len(todo):,}")
    bar = tqdm(total=len(todo), unit="img", desc="predicting" + (f" (process {rank + 1} of {world})"
                                                                 if world > 1 else ""),
               disable=not progress, dynamic_ncols=True)
    for i in range(0, len(todo), CHUNK):
        chunk = todo[i:i + CHUNK]
        got = predictor.paths_outputs(chunk, tta)
        results = top_classes(chunk, got.failed, predictor.probabilities(got.logits, calibration),
                              predictor.classes, top_k, *((got.novelty, predictor.threshold) if scored else
                                                          (None, None)), labels=predictor.thresholds)
        writer.append([as_row(r, names) for r in results])
        written.predicted += len(chunk) - len(got.failed)
        written.skipped += len(got.failed)
        written.first += results[:max(0, keep_first - len(written.first))]
        bar.update(len(chunk))
    bar.close()
    if not direct:
        _marker(writer).write_text(_launch_id())  # this process's share is complete
        if rank != 0:
            written.seconds = time.perf_counter() - start
            return written
        written.predicted, written.skipped = _merge(final, paths, world, in_final if resume else None)
    final.finish()
    written.seconds = time.perf_counter() - start
    return written


def _launch_id() -> str:
    """The same for every process a launcher started together, and new for each launch."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "") + ":" + os.environ.get("MASTER_PORT", "")


def _merge(final: Sink, paths: list[Path], world: int, in_final: set[str] | None) -> tuple[int, int]:
    """Rank 0: wait for every process's part, then append the parts' rows to ``final`` in input order (those
    already in ``final`` left out), and remove the parts. Process r's part holds every world-th image from r, in
    order, so a fresh run's parts are read in turn; when resuming (``in_final``: the paths ``final`` held at the
    start) the parts, any group's, are read into memory first, keyed by path. Returns the rows appended that are
    predictions, and those that are skipped files."""
    out = final.path
    ours = [_part(out, r, world, final.names) for r in range(world)]
    markers = [_marker(p) for p in ours]
    while not all(m.is_file() and m.read_text() == _launch_id() for m in markers):  # the launcher stops every
        time.sleep(0.5)  # process if one fails
    resume = in_final is not None  # the paths ``final`` held at the start (nothing is written to it since)
    parts = _parts(out, final.names) if resume else ours
    if resume:
        rows: dict[str, dict[str, Any]] = {}
        for part in parts:
            for row in part.rows():
                rows.setdefault(row["path"], row)
        found: Iterator[dict[str, Any] | None] = (rows.get(str(p)) for p in paths)  # a path listed twice: twice
    else:
        readers = [part.rows() for part in ours]
        found = (next(readers[i % world]) for i in range(len(paths)))
    chunk: list[dict[str, Any]] = []
    counts = [0, 0]
    for p, row in zip(paths, found, strict=False):
        if row is None or (resume and final.key(str(p)) in in_final):
            continue
        chunk.append(row)
        counts[row["status"] != "ok"] += 1
        if len(chunk) == CHUNK * 16:
            final.append(chunk)
            chunk = []
    if chunk:
        final.append(chunk)
    for part in parts:
        part.remove()
    for m in out.parent.glob(f"{out.name}.part-*-of-*.done"):
        m.unlink()
    return counts[0], counts[1]
