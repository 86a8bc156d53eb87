"""A label file → labelled rows: one image path and its label(s) per row, read and checked before anything else.

Formats, by the file's extension: CSV (``.csv``) and TSV (``.tsv``, ``.tab``) with a header row, and JSON Lines
(``.jsonl``, ``.ndjson``: one object per line). The path column is ``--path-column`` or the first of
``PATH_COLUMNS`` present; the label column ``--label-column`` or the first of ``LABEL_COLUMNS``; a ``split``
column (``train``, ``validation`` or ``val``, ``test``) is optional and honoured where present.

Paths: relative ones resolve against ``--images DIR`` when given, else the label file's folder, and may not lead
outside it; absolute ones are taken as they are. A path without an image extension (a Kaggle ``id``) is completed
with the first extension that names a file.

Several labels an image (multi-label): ``--multi-label``, or detected from the file: labels joined by a delimiter
(``--label-delimiter``, by default ``;`` or ``|``), a JSON list, or several rows for one path. What was decided,
and why, is returned with the rows.

Every bad row (a missing file, an empty or unreadable cell, a label with control characters, a path leading
outside the base, a split that is not one of the three, single-label rows for one path that disagree) is a
``Problem`` naming its row. ``read`` returns them all; the caller refuses the file unless told to skip them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlearn.config import DataConfig, TlearnError
from tlearn.fileio import csv_text, open_regular
from tlearn.samples import SPLITS, ImageFolder, Sample, Skipped, relative, split_classes, split_multi_label

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": "json", ".ndjson": "json"}
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path", "img", "id", "image_id")
LABEL_COLUMNS = ("label", "labels", "class", "classes", "tags", "tag", "category")
SPLIT_COLUMN = "split"
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
DELIMITERS = (";", "|")
BAD = "\0bad"  # the key of a record that could not be read, with the reason
MAX_BYTES = 1 << 30  # a label file larger than 1 GiB is refused before it is read


def is_label_file(path: str | Path) -> bool:
    """Whether ``path`` names a label file (by extension) rather than an image folder."""
    return Path(path).suffix.lower() in FORMATS and not Path(path).expanduser().is_dir()


@dataclass(frozen=True)
class Row:
    line: int  # the row's line in the file (the header is line 1 of a CSV)
    path: Path  # absolute, the file it names
    key: str  # the path as written, relative to the base (how the seeded split orders it)
    labels: tuple[str, ...]
    split: str | None


@dataclass(frozen=True)
class Problem:
    line: int
    reason: str
    path: Path | None = None  # the file the row names, where it names one


@dataclass
class LabelTable:
    """What a label file says: its rows, its bad rows, and whether it is multi-label (with the reason)."""

    file: Path
    base: Path
    columns: dict[str, str]  # {"path": ..., "label": ..., "split": ...} as named in the file
    rows: list[Row]
    problems: list[Problem] = field(default_factory=list)
    multi_label: bool = False
    why: str = ""

    def refuse_problems(self) -> None:
        """One line naming the first bad row, unless there are none."""
        if self.problems:
            first = self.problems[0]
            more = f" ({len(self.problems)} bad rows in all)" if len(self.problems) > 1 else ""
            raise TlearnError(f"{self.file}, line {first.line}: {first.reason}{more}. Fix the file, or pass "
                              "--skip-bad-rows to leave such rows out (each is then named in the log, and in a "
                              "run's skipped.csv)")


def located(config: DataConfig) -> tuple[Path, Path]:
    """(the label file, the folder its relative paths start from)."""
    file = Path(config.label_file or config.path).expanduser()
    return file, Path(config.images).expanduser() if config.images else file.parent


def read(config: DataConfig) -> LabelTable:
    """Read and check the label file of ``config`` (``label_file``, or ``path`` when it names one)."""
    file, base = located(config)
    if not file.is_file():
        raise TlearnError(f"label file {file} does not exist or is not a regular file")
    kind = FORMATS.get(file.suffix.lower())
    if kind is None:
        raise TlearnError(f"label file {file}: unknown format; name it .csv, .tsv or .jsonl")
    if not base.is_dir():
        raise TlearnError(f"--images {base} does not exist or is not a folder")
    base = base.resolve()
    records, columns = _records(file, kind, config)
    table = LabelTable(file.resolve(), base, columns, [])
    for line, cells in records:
        row = _row(line, cells, columns, base, table.problems)
        if row is not None:
            table.rows.append(row)
    if not table.rows and not table.problems:
        raise TlearnError(f"label file {file} has no rows below its header")
    table.multi_label, table.why = _decide(table, config)
    table.rows = _merge(table, config.label_delimiter)
    return table


def _records(file: Path, kind: str, config: DataConfig) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, str]]:
    """``[(line, {column: cell})]`` and the columns used, from a CSV/TSV or JSON Lines file."""
    with open_regular(file) as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise TlearnError(f"label file {file} is larger than 1 GiB; split it into smaller files")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write it, is not part of the header
    except UnicodeDecodeError as e:
        raise TlearnError(f"label file {file} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise TlearnError(f"label file {file} is empty; it needs a header row and one row per image")
    if kind == "json":
        records = []
        for line, text_line in enumerate(text.splitlines(), start=1):
            if not text_line.strip():
                continue
            try:
                obj = json.loads(text_line)
            except json.JSONDecodeError as e:
                obj = {BAD: f"not JSON ({e.msg} at column {e.colno})"}
            records.append((line, obj if isinstance(obj, dict) else {BAD: "not a JSON object"}))
        names = list(dict.fromkeys(k for _, r in records for k in r if k != BAD))
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=kind, strict=True)
        try:
            rows = [(reader.line_num, r) for r in reader]
        except csv.Error as e:
            raise TlearnError(f"label file {file}, line {reader.line_num}: unreadable CSV ({e}); quote cells "
                              "that hold the delimiter, a quote or a line break") from None
        header = [csv_text(c).strip() for c in rows[0][1]]
        names = header
        records = [(line, dict(zip(header, (csv_text(c) for c in r), strict=False)) if len(r) == len(header) else
                    {BAD: f"{len(r)} cells where the header has {len(header)}"})
                   for line, r in rows[1:] if any(c.strip() for c in r)]
    columns = {"path": _column(file, names, config.path_column, PATH_COLUMNS, "path", "--path-column"),
               "label": _column(file, names, config.label_column, LABEL_COLUMNS, "label", "--label-column")}
    split = next((n for n in names if n.lower() == SPLIT_COLUMN), None)
    if split:
        columns["split"] = split
    return records, columns


def _column(file: Path, names: list[str], given: str | None, known: tuple[str, ...], what: str, flag: str) -> str:
    if given:
        if given not in names:
            raise TlearnError(f"{flag} {given!r} is not a column of {file}; its columns are {', '.join(names)}")
        return given
    lower = {n.lower(): n for n in names}
    found = next((lower[k] for k in known if k in lower), None)
    if found is None:
        raise TlearnError(f"label file {file} has no {what} column (looked for {', '.join(known)}; its columns are "
                          f"{', '.join(names) or 'none'}); name it with {flag}")
    return found


def _row(line: int, cells: dict[str, Any], columns: dict[str, str], base: Path,
         problems: list[Problem]) -> Row | None:
    """One checked row, or None with its problem added."""
    def bad(reason: str, path: Path | None = None) -> None:
        problems.append(Problem(line, reason, path))

    if BAD in cells:
        return bad(cells[BAD])
    written, label, split = (cells.get(columns.get(k, "\0")) for k in ("path", "label", "split"))
    if not isinstance(written, str | int) or not str(written).strip():
        return bad(f"no path in column {columns['path']!r}")
    written = str(written).strip()
    shown = written if len(written) <= 120 else written[:60] + "..." + written[-40:]  # in messages
    if _has_control(written):
        return bad(f"the path {shown!r} holds control characters")
    labels = tuple(label) if isinstance(label, list) else (label,) if isinstance(label, str | int) else None
    if labels is None or not all(isinstance(x, str | int) for x in labels):
        return bad(f"no label in column {columns['label']!r} for {shown}")
    labels = tuple(str(x).strip() for x in labels)
    if not labels or not all(labels):
        return bad(f"an empty label for {shown}")
    if odd := next((x for x in labels if _has_control(x)), None):
        return bad(f"the label {odd!r} holds control characters")
    if "split" in columns:
        split = SPLIT_NAMES.get(str(split or "").strip().lower())
        if split is None:
            return bad(f"split {cells.get(columns['split'])!r} is not train, validation (or val) or test")
    path = Path(os.path.normpath(base / written))
    if not Path(written).is_absolute() and not path.is_relative_to(base):
        return bad(f"the path {shown!r} leads outside {base}; give paths inside it, or absolute paths")
    try:
        found = _existing(path)
    except OSError as e:  # a name too long, a folder that cannot be read
        return bad(f"cannot look up {shown!r}: {e.strerror or e}", path)
    if found is None:
        tried = "" if path.suffix.lower() in IMAGE_EXTENSIONS else f" (nor with {', '.join(IMAGE_EXTENSIONS)})"
        where = "" if Path(written).is_absolute() else f" under {base}"
        return bad(f"no file {shown}{tried}{where}", path)
    return Row(line, found, relative(found, base), labels, split)


def _existing(path: Path) -> Path | None:
    """``path`` if it is a file, else ``path`` with the first image extension that names a file."""
    if path.is_file():
        return path
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return None
    candidates = [path.with_name(path.name + ext) for e in IMAGE_EXTENSIONS for ext in (e, e.upper())]
    return next((p for p in candidates if p.is_file()), None)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _decide(table: LabelTable, config: DataConfig) -> tuple[bool, str]:
    """Multi-label or not, and why (said in the log)."""
    column = table.columns["label"]
    if config.multi_label is not None:
        return config.multi_label, f"{'--multi-label' if config.multi_label else '--no-multi-label'} given"
    if listed := next((r for r in table.rows if len(r.labels) > 1), None):
        return True, f"line {listed.line} gives several labels in a list"
    delimiters = (config.label_delimiter,) if config.label_delimiter else DELIMITERS
    for r in table.rows:
        if sep := next((d for d in delimiters if d in r.labels[0]), None):
            return True, f"column {column!r} joins several labels with {sep!r} (line {r.line}: {r.labels[0]!r})"
    seen: dict[Path, Row] = {}
    for r in table.rows:
        if r.path in seen and seen[r.path].labels != r.labels:
            return True, f"{r.key} has several rows with different labels (lines {seen[r.path].line} and {r.line})"
        seen.setdefault(r.path, r)
    return False, "one label per image"


def _merge(table: LabelTable, delimiter: str | None) -> list[Row]:
    """One row per image: labels split at the delimiter and joined across rows of one path (multi-label), or the
    first of identical rows (single-label; rows that disagree, on the label or the split, become problems)."""
    by_path: dict[Path, list[Row]] = defaultdict(list)
    for r in table.rows:
        labels = r.labels
        if table.multi_label:
            sep = delimiter or next((d for d in DELIMITERS if any(d in x for x in labels)), None)
            labels = tuple(x.strip() for label in labels for x in (label.split(sep) if sep else [label]) if x.strip())
        by_path[r.path].append(Row(r.line, r.path, r.key, labels, r.split))
    out = []
    for rows in by_path.values():
        first = rows[0]
        labels = tuple(sorted({x for r in rows for x in r.labels})) if table.multi_label else first.labels
        clash = next((r for r in rows[1:] if r.split != first.split or
                      (not table.multi_label and r.labels != first.labels)), None)
        if clash is not None:
            what = "split" if clash.split != first.split else "label"
            table.problems.append(Problem(clash.line, f"{first.key} is given another {what} on line {first.line}",
                                          first.path))
            continue
        if labels:
            out.append(Row(first.line, first.path, first.key, labels, first.split))
        else:
            table.problems.append(Problem(first.line, f"an empty label for {first.key}", first.path))
    table.problems.sort(key=lambda p: p.line)
    return out


# --- samples ------------------------------------------------------------------------------------------


def scan(config: DataConfig) -> ImageFolder:
    """A label file's rows as samples: its split column honoured, or split as class folders are (multi-label:
    by iterative stratification)."""
    table = read(config)
    if not config.skip_bad_rows:
        table.refuse_problems()
    skipped = _bad_rows(table)
    name = f"label file {table.file.name}"
    if table.multi_label:
        return _multi_label(table, config, skipped, name)
    if not any(r.split for r in table.rows):
        by_class = _grouped(r for r in table.rows)
        _two_labels(table.file, by_class, False)
        data = split_classes(table.base, by_class, config, skipped)
        data.layout = name
        return data
    listed = {split: _grouped(r for r in table.rows if r.split == split) for split in SPLITS}
    classes = sorted(listed["train"])
    _two_labels(table.file, listed["train"], True)
    extra = sorted({c for by_class in listed.values() for c in by_class} - set(classes))
    if extra:
        raise TlearnError(f"label(s) {', '.join(extra)} in {table.file} have no rows in split train; every class "
                          "needs training images")
    if not listed["validation"]:
        data = split_classes(table.base, listed["train"], DataConfig(path=str(table.base), val=config.val, test=0,
                                                                      seed=config.seed), skipped)
        data.layout = f"{name} (its split column; validation held out from train)"
    else:
        samples = [Sample(p, classes.index(c), "train") for c in classes for p in listed["train"][c]]
        data = ImageFolder(table.base, classes, samples, skipped, layout=f"{name} (its split column)")
    data.samples += [Sample(p, classes.index(c), split) for split in ("validation", "test")
                     for c, paths in sorted(listed[split].items()) for p in paths]
    return data


def _multi_label(table: LabelTable, config: DataConfig, skipped: list[Skipped], name: str) -> ImageFolder:
    classes = sorted({k for r in table.rows for k in r.labels})
    if len(classes) < 2:
        raise TlearnError(f"{table.file} gives every image the label {classes[0]!r}; a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    images = [(r.path, r.key, tuple(index[k] for k in r.labels)) for r in table.rows]
    if not any(r.split for r in table.rows):
        data = split_multi_label(table.base, images, classes, config, skipped)
        data.layout = f"{name} (multi-label: {table.why}; split by iterative stratification)"
        return data
    trained = {k for r in table.rows if r.split == "train" for k in r.labels}
    if set(classes) - trained:
        raise TlearnError(f"label(s) {', '.join(sorted(set(classes) - trained))} in {table.file} have no rows in split "
                          "train; every label needs training images")
    listed = [(img, r.split) for img, r in zip(images, table.rows, strict=True)]
    if not any(split == "validation" for _, split in listed):  # hold out validation from train, as for folders
        held = split_multi_label(table.base, [img for img, split in listed if split == "train"], classes,
                                 DataConfig(path=str(table.base), val=config.val, test=0, seed=config.seed), skipped)
        samples = held.samples + [Sample(p, -1, split, labels) for (p, _, labels), split in listed if split == "test"]
        layout = f"{name} (multi-label: {table.why}; its split column, validation held out from train)"
    else:
        samples = [Sample(p, -1, split, labels) for (p, _, labels), split in listed]
        layout = f"{name} (multi-label: {table.why}; its split column)"
    return ImageFolder(table.base, classes, samples, skipped, layout, multi_label=True)


def _bad_rows(table: LabelTable) -> list[Skipped]:
    return [Skipped(p.path or table.file, f"line {p.line} of {table.file.name}: {p.reason}", "bad-row")
            for p in table.problems]


def _two_labels(file: Path, by_class: dict[str, list[Path]], split_column: bool) -> None:
    if not by_class:
        raise TlearnError(f"{file} has no rows whose split is train; every class needs training images"
                          if split_column else f"{file} has no usable rows (see its bad rows)")
    if len(by_class) < 2:
        raise TlearnError(f"{file} gives every image the label {next(iter(by_class))!r}; a classifier needs at "
                          "least two labels")


def _grouped(rows: Iterable[Row]) -> dict[str, list[Path]]:
    by_class: dict[str, list[Path]] = {}
    for r in rows:
        by_class.setdefault(r.labels[0], []).append(r.path)
    return by_class


def labelled(config: DataConfig, classes: list[str], multi_label: bool = False) -> ImageFolder:
    """The rows of a label file to evaluate a model of ``classes`` on, all in split "test": its test rows, else
    its validation rows, else all. ``multi_label``: the model gives several labels an image (the file may give
    one or several); else each row must give one."""
    table = read(dataclasses.replace(config, multi_label=True) if multi_label else config)
    if not config.skip_bad_rows:
        table.refuse_problems()
    if table.multi_label and not multi_label:
        raise TlearnError(f"{table.file} gives several labels an image ({table.why}); this model has one class an "
                          "image. Pass --no-multi-label if each cell is one class")
    split = next((s for s in ("test", "validation") if any(r.split == s for r in table.rows)), None)
    rows = [r for r in table.rows if split is None or r.split == split]
    unknown = sorted({k for r in rows for k in r.labels} - set(classes))
    if unknown:
        raise TlearnError(f"label(s) {', '.join(map(repr, unknown[:5]))} in {table.file} are not classes of this "
                          f"model ({', '.join(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(r.path, -1, "test", tuple(index[k] for k in r.labels)) if multi_label else
               Sample(r.path, index[r.labels[0]], "test") for r in rows]
    return ImageFolder(table.base, list(classes), samples, _bad_rows(table), multi_label=multi_label,
                       layout=f"label file {table.file.name}" + (f" ({split} rows)" if split else ""))
