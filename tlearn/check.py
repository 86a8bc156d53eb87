"""Data-quality pass over an image folder: every file gets a verdict, with the reason.

Per file: unreadable or undecodable files, extension/format mismatches, modes that get converted, EXIF rotation,
images too small for the backbone or with extreme aspect ratios, decompression bombs (refused from the header,
before any pixel is decoded), non-image, hidden and oddly named files, broken links and link loops. Across files:
exact duplicates (content hash) and near duplicates (a 64-bit difference hash), within a class, across classes
(conflicting labels) and across splits (train/test leakage). Per class: counts per split and imbalance.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlearn import labelfile
from tlearn.config import DataConfig, TlearnError
from tlearn.data import ImageFolder, Skipped, list_images, scan
from tlearn.fileio import file_sha256, special_kind
from tlearn.images import decode, open_image
from tlearn.samples import images_of, missing_labels

GROUPED = 5  # findings of one kind past which the details show them as one line with examples
LOW_COLOURS = 64  # in a 64x64 thumbnail, a photo has hundreds to thousands of distinct colours
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP",
           ".tif": "TIFF", ".tiff": "TIFF"}
ERROR, WARNING, INFO = "error", "warning", "info"
BLOCKING = {"bad-row", "undecodable", "truncated", "empty", "unreadable", "bomb", "broken-link", "link-loop",
            "special-file", "leakage", "conflicting-labels", "dataset"}


@dataclass
class Finding:
    """One observation about a file (or a pair of files, with ``other``)."""

    kind: str
    severity: str
    path: str
    detail: str
    other: str = ""


@dataclass
class FileInfo:
    path: Path
    sha256: str = ""
    dhash: int | None = None
    usable: bool = False


@dataclass
class Report:
    root: Path
    layout: str = ""
    classes: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    split_images: dict[str, int] | None = None  # several labels an image: the images of each split
    files: int = 0
    images: int = 0
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was looked at beyond the files (e.g. the mislabel search)

    def summary(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.findings).most_common())

    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in BLOCKING]

    def _repr_html_(self) -> str:  # in a notebook: the summary, the counts and the first findings as tables
        from tlearn.display import report_html, safely

        return safely(report_html, self)

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "layout": self.layout, "classes": self.classes, "counts": self.counts,
                "files": self.files, "images": self.images, "summary": self.summary(),
                "blocking": len(self.blocking()), "notes": self.notes, "findings": [asdict(f) for f in self.findings]}


def inspect_file(path: Path, min_size: int = 0) -> tuple[list[Finding], FileInfo]:
    """Look at one file: header first (format, size, mode), then a full decode. Never raises."""
    info, out = FileInfo(path), []
    name, where = path.name, str(path)

    def note(kind: str, severity: str, detail: str) -> None:
        out.append(Finding(kind, severity, where, detail))

    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        note("odd-name", WARNING, "the file name is not valid UTF-8; other tools may not open it")
    if name != name.strip() or any(ord(c) < 32 for c in name):
        note("odd-name", WARNING, "the file name has control characters or leading/trailing spaces")
    try:
        st = path.stat()
    except OSError as e:
        kind = "link-loop" if e.errno == errno.ELOOP else "broken-link" if path.is_symlink() else "unreadable"
        note(kind, ERROR, {"link-loop": "symbolic link loop", "broken-link": "broken symbolic link"}.get(
            kind, f"cannot read: {e.strerror}"))
        return out, info
    special = special_kind(st.st_mode)
    if special:
        note("special-file", ERROR, f"{special}, not a regular file; it is never opened (reading it could block "
             "forever)")
        return out, info
    if st.st_size == 0:
        note("empty", ERROR, "zero-byte file")
        return out, info
    try:
        info.sha256 = file_sha256(path)
    except OSError as e:
        note("unreadable", ERROR, f"cannot read: {e.strerror}")
        return out, info
    return out + _inspect_pixels(path, min_size, info), info


def _inspect_pixels(path: Path, min_size: int, info: FileInfo) -> list[Finding]:
    out: list[Finding] = []
    where = str(path)

    def note(kind: str, severity: str, detail: str) -> None:
        out.append(Finding(kind, severity, where, detail))

    try:
        with open_image(path) as im:  # a decompression bomb is refused here, from its header
            expected = FORMATS.get(path.suffix.lower())
            if expected and im.format and im.format != expected and not (expected == "JPEG" and im.format == "MPO"):
                note("format-mismatch", WARNING, f"a {im.format} file named {path.suffix}; it is read as {im.format}")
            w, h = im.size
            if min_size and min(w, h) < min_size:
                note("small", WARNING, f"{w}x{h}, smaller than the {min_size} px input; it is upscaled")
            if max(w, h) > 3 * min(w, h):
                note("aspect", WARNING, f"{w}x{h}: an aspect ratio over 3:1; the centre crop loses most of it")
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reading every byte
            upright = decode(im, lambda kind, detail: note(kind, INFO, detail))  # the training decoder
        small = upright.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
        thumb = upright.resize((64, 64), Image.Resampling.NEAREST)
        colours = len(np.unique(np.asarray(thumb).reshape(-1, 3), axis=0))
        if colours < LOW_COLOURS:
            note("low-information", WARNING, f"only {colours} distinct colours: a placeholder (\"image not found\"), "
                 "a blank or a drawing rather than a photo?")
        px = np.asarray(small, dtype=np.int16)
        bits = (px[:, 1:] > px[:, :-1]).flatten()
        info.dhash = int("".join("1" if b else "0" for b in bits), 2)
        info.usable = True
    except Image.DecompressionBombError as e:
        note("bomb", ERROR, f"{e}: a decompression bomb, refused without decoding")
    except Image.UnidentifiedImageError:
        head = path.read_bytes()[:512]
        text = head.strip().startswith(b"<") or (bool(head) and all(32 <= b < 127 or b in b"\r\n\t" for b in head))
        note("undecodable", ERROR, "a text or HTML file, not an image" if text else "not an image Pillow can read")
    except (OSError, SyntaxError, ValueError) as e:
        kind = "truncated" if "truncated" in str(e).lower() or "broken data" in str(e).lower() else "undecodable"
        note(kind, ERROR, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return out


def _walk(root: Path) -> tuple[list[Path], list[Finding]]:
    """Every candidate image under ``root``; other files (hidden, non-image, dangling links) become findings."""
    skipped: list[Skipped] = []
    paths = list_images(root, skipped)
    severity = {"broken-link": ERROR, "link-loop": ERROR, "special-file": ERROR}
    return paths, [Finding(s.kind, severity.get(s.kind, INFO), str(s.path), f"{s.reason}; ignored") for s in skipped]


def near_pairs(hashes: dict[Path, int], threshold: int) -> list[tuple[Path, Path, int]]:
    """Pairs whose 64-bit hashes differ in at most ``threshold`` bits.

    Two such hashes agree exactly on at least one of ``threshold + 1`` bands (pigeonhole), so only files that
    share a band are compared, instead of every pair.
    """
    bands = threshold + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    buckets: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for p, h in hashes.items():
        for b in range(bands):
            buckets[(b, (h >> int(edges[b])) & ((1 << int(edges[b + 1] - edges[b])) - 1))].append(p)
    found: dict[tuple[Path, Path], int] = {}
    for members in buckets.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                d = (hashes[a] ^ hashes[b]).bit_count()
                if d <= threshold:
                    found[(min(a, b), max(a, b))] = d
    return sorted((a, b, d) for (a, b), d in found.items())


def check(config: DataConfig, min_size: int = 0, near_threshold: int = 4, progress: bool = True) -> Report:
    """Inspect every file under ``config.path``; see the module docstring for what is looked at.

    >>> report = check(DataConfig(path="examples/ants_bees"))   # doctest: +SKIP
    >>> report.summary()                                        # doctest: +SKIP
    {}
    """
    from tlearn.progress import tqdm

    if config.label_file or labelfile.is_label_file(config.path):  # the files its rows name, and its bad rows
        table = labelfile.read(config)
        report = Report(table.base)
        paths = list(dict.fromkeys(r.path for r in table.rows))
        report.findings = [Finding("bad-row", ERROR, str(p.path or table.file),
                                   f"line {p.line} of {table.file.name}: {p.reason}") for p in table.problems]
        config = dataclasses.replace(config, skip_bad_rows=True)  # the split below, of the rows read here
    else:
        root = Path(config.path).expanduser().resolve()
        if not root.is_dir():
            raise TlearnError(f"data folder {config.path} does not exist or is not a folder")
        report = Report(root)
        paths, report.findings = _walk(root)
    report.files = len(paths) + len(report.findings)  # candidate images + the entries set aside
    label: dict[Path, tuple[str, str]] = {}  # path -> (class, split)
    try:
        data = scan(config)
        report.layout, report.classes, report.counts = data.layout, data.classes, data.counts()
        report.split_images = images_of(data)
        label = labelled_as(data)
        report.findings += [Finding("label-split", WARNING, name, line) for name, line in missing_labels(data)]
    except TlearnError as e:
        report.findings.append(Finding("dataset", ERROR, str(report.root), str(e)))
    infos = []
    for p in tqdm(paths, unit="file", desc="checking", leave=False, disable=not progress or None):
        found, info = inspect_file(p, min_size)
        report.findings += found
        infos.append(info)
    report.images = sum(i.usable for i in infos)
    report.findings += _duplicates(infos, label, near_threshold)
    report.findings += _balance(report.counts, report.split_images is not None)
    report.findings += _small_classes(report.counts)
    return report


def quick_check(data: ImageFolder) -> list[Finding]:
    """The checks `tlearn train` runs on its split: exact duplicates by content hash, within a class, across
    classes (conflicting labels) and across splits (leakage). Undecodable files are found by training itself."""
    label = labelled_as(data)
    infos = []
    for path in label:
        try:
            infos.append(FileInfo(path, sha256=file_sha256(path)))
        except OSError:
            pass  # unreadable: reported when the file is decoded
    return _duplicates(infos, label, threshold=-1)


def labelled_as(data: ImageFolder) -> dict[Path, tuple[str, str]]:
    """``{path: (its label(s), its split)}``; several labels are joined with ';'."""
    return {s.path: (";".join(data.classes[k] for k in s.targets), s.split) for s in data.samples}


def _duplicates(infos: list[FileInfo], label: dict[Path, tuple[str, str]], threshold: int) -> list[Finding]:
    by_content: dict[str, list[Path]] = defaultdict(list)
    for i in infos:
        if i.sha256:
            by_content[i.sha256].append(i.path)
    pairs = [(group[0], other, "exact duplicate") for group in by_content.values() for other in group[1:]]
    same = {(min(a, b), max(a, b)) for a, b, _ in pairs}
    hashes = {i.path: i.dhash for i in infos if i.dhash is not None}
    if threshold >= 0:
        pairs += [(a, b, f"near duplicate (hash distance {d})") for a, b, d in near_pairs(hashes, threshold)
                  if (a, b) not in same]
    out = []
    for a, b, what in pairs:
        (ca, sa), (cb, sb) = label.get(a, (a.parent.name, "?")), label.get(b, (b.parent.name, "?"))
        if ca != cb:
            out.append(Finding("conflicting-labels", ERROR, str(b), f"{what} of {a}, labelled {ca} there and {cb} "
                               "here", str(a)))
        elif sa != sb:
            out.append(Finding("leakage", ERROR, str(b), f"{what} of {a}: the same picture in {sa} and {sb}", str(a)))
        else:
            out.append(Finding("duplicate", WARNING, str(b), f"{what} of {a} (both {ca}, {sa})", str(a)))
    return out


def _balance(counts: dict[str, dict[str, int]], multi_label: bool = False) -> list[Finding]:
    how = ("each label is its own two-class problem, with a threshold of its own" if multi_label else
           "the loss is reweighted (--class-weight auto)")
    out = []
    for split, per_class in counts.items():
        biggest, smallest = max(per_class, key=per_class.get), min(per_class, key=per_class.get)
        if per_class[biggest] > 1.5 * max(per_class[smallest], 1):
            out.append(Finding("imbalance", WARNING, split, f"{split}: {biggest} has {per_class[biggest]} images, "
                               f"{smallest} {per_class[smallest]}; {how}"))
    return out


def _small_classes(counts: dict[str, dict[str, int]]) -> list[Finding]:
    """Classes with a single training image: training still works, but the head search cannot hold one of them out
    to choose the head's settings or to stop early on, and ``--labels`` cannot predict it from the others."""
    return [Finding("small-class", WARNING, name, f"class {name} has {n} training image: too few for the head "
                    "search to hold one out (it is only fitted on); add images to it (tens per class is a good start)")
            for name, n in counts.get("train", {}).items() if n < 2]


def format_report(report: Report, details: int = 50) -> str:
    """The summary table, class counts, then the first ``details`` findings (errors first)."""
    from tlearn.report import format_counts, printable, table

    lines = [f"{printable(report.root)}: {report.files} files, {report.images} readable images"
             + (f", {len(report.classes)} classes ({report.layout})" if report.classes else "")]
    summary = report.summary()
    if summary:
        severity = {f.kind: f.severity for f in report.findings}
        rows = [[kind, n, severity[kind], "yes" if kind in BLOCKING else ""] for kind, n in summary.items()]
        lines += ["", table(rows, ["finding", "files", "severity", "blocking"])]
    else:
        lines.append("no problems found")
    if report.counts:
        lines += ["", format_counts(report.counts, report.split_images)]
    if report.notes:
        lines += ["", *(printable(n) for n in report.notes)]
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    # suspected mislabels and outliers keep their order, most suspicious first
    ranked = sorted(report.findings, key=lambda f: (order[f.severity], f.kind,
                                                    "" if f.kind in ("mislabel", "outlier") else f.path))
    shown = [_detail(group, report.root) for _, group in itertools.groupby(ranked, key=lambda f: f.kind)]
    shown = [line for group in shown for line in group]
    if shown:
        lines += ["", "details:", *shown[:details]]
        if len(shown) > details:
            lines.append(f"  ... and {len(shown) - details} more (--json lists them all)")
    return "\n".join(lines)


def _detail(group: Iterable[Finding], root: Path) -> list[str]:
    """The detail lines of one kind of finding: one a file, or, past ``GROUPED`` files (suspected mislabels and
    outliers apart, which are each worth a look), one line with the count and the first few as examples."""
    from tlearn.report import printable

    group = list(group)
    prefix = f"{root}{os.sep}"

    def one(f: Finding) -> str:
        return f"{printable(_short(f.path, root))}: {printable(f.detail.replace(prefix, ''))}"

    if len(group) <= GROUPED or group[0].kind in ("mislabel", "outlier"):
        return [f"  {f.severity:7} {f.kind}: {one(f)}" for f in group]
    more = ", ".join(printable(_short(f.path, root)) for f in group[1:3])
    return [f"  {group[0].severity:7} {group[0].kind}: {len(group)} files, e.g. {one(group[0])}; also {more}, ... "
            "(--json lists them all)"]


def _short(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def quarantine_rows(report: Report) -> list[tuple[str, str]]:
    """Files worth setting aside: unusable ones, the second file of each duplicate or conflicting pair, and the
    suspected mislabels (``--labels``), to look at before moving."""
    return [(f.path, f"{f.kind}: {f.detail}") for f in report.findings
            if (f.severity == ERROR and f.kind != "dataset") or f.kind in ("duplicate", "mislabel")]
