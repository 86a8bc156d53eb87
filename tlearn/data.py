"""Folder of images → labelled samples in train / validation / test.

Two layouts are understood:
- class folders: ``DATA/<class>/...``; tlearn makes a stratified, seeded split and writes it as a manifest;
- split folders: ``DATA/train/<class>/``, ``DATA/validation/`` or ``DATA/val/``, and optionally ``DATA/test/``.
  When there is no validation folder, ``val`` of each class in ``train/`` is held out for validation.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tlearn.config import DataConfig, TlearnError
from tlearn.fileio import atomic_write_csv, csv_text, open_regular, special_kind

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
SYSTEM_FILES = {"Thumbs.db", "desktop.ini"}  # besides hidden (dot) files such as .DS_Store
SPLITS = ("train", "validation", "test")
_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    label: int
    split: str


@dataclass(frozen=True)
class Skipped:
    """A file left out, with the reason shown to the user and a short ``kind`` (e.g. 'hidden', 'link-loop')."""

    path: Path
    reason: str
    kind: str = "undecodable"


@dataclass
class ImageFolder:
    """A scanned image folder: sorted class names, labelled samples and the files left out, with reasons."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    layout: str = "class folders"

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: n}}`` for the splits that have samples."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            c = Counter(self.classes[s.label] for s in self.samples if s.split == split)
            if c:
                out[split] = {name: c.get(name, 0) for name in self.classes}
        return out

    def without(self, bad: dict[Path, str]) -> ImageFolder:
        """This folder without the samples whose files could not be decoded, which join ``skipped`` with the
        reason (a new value: this one is left as it is)."""
        if not bad:
            return self
        present = {s.path for s in self.samples}
        data = dataclasses.replace(self, samples=[s for s in self.samples if s.path not in bad],
                                   skipped=[*self.skipped, *(Skipped(p, r) for p, r in bad.items() if p in present)])
        _check_nonempty(data)
        return data


# --- scanning -----------------------------------------------------------------------------------------


def list_images(folder: Path, skipped: list[Skipped]) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted); other files go to ``skipped`` with a reason."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        skipped += [Skipped(Path(dirpath) / d, "hidden folder", "hidden") for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or name in SYSTEM_FILES:
                skipped.append(Skipped(path, "hidden or system file", "hidden"))
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(Skipped(path, f"not an image extension (accepted: {' '.join(IMAGE_EXTENSIONS)})",
                                       "not-an-image"))
            else:
                try:
                    special = special_kind(path.stat().st_mode)  # links followed: a link to /dev/zero is a device
                except OSError as e:
                    skipped.append(Skipped(path, "symbolic link loop", "link-loop") if e.errno == errno.ELOOP
                                   else Skipped(path, "broken symbolic link", "broken-link"))
                    continue
                if special:
                    skipped.append(Skipped(path, f"{special}, not a regular file; never opened", "special-file"))
                else:
                    found.append(path)
    return found


def _class_folders(folder: Path, skipped: list[Skipped]) -> dict[str, list[Path]]:
    """``{class: [image paths]}`` for the class sub-folders of ``folder``."""
    if not folder.is_dir():
        raise TlearnError(f"data folder {folder} does not exist or is not a folder")
    classes = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            classes[entry.name] = list_images(entry, skipped)
        else:
            skipped.append(Skipped(entry, "not inside a class sub-folder", "outside-classes"))
    return classes


def _find_split_dirs(root: Path) -> dict[str, Path]:
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    found = {}
    for split, names in _SPLIT_DIRS.items():
        present = [subdirs[n] for n in names if n in subdirs]
        if len(present) > 1:
            raise TlearnError(f"{root} has both {present[0].name}/ and {present[1].name}/; keep one validation folder")
        if present:
            found[split] = present[0]
    if "train" in found and len(found) > 1:
        return found
    return {}


def scan(config: DataConfig) -> ImageFolder:
    """Scan ``config.path`` and assign every image to a split.

    >>> data = scan(DataConfig(path="examples/ants_bees"))  # doctest: +SKIP
    >>> data.classes, len(data.split("train"))              # doctest: +SKIP
    (['ants', 'bees'], 56)
    """
    root = Path(config.path).expanduser().resolve()
    if not root.is_dir():
        raise TlearnError(f"data folder {config.path} does not exist or is not a folder")
    if config.split_manifest:
        data = read_manifest(Path(config.split_manifest), root)
    elif split_dirs := _find_split_dirs(root):
        data = _scan_split_folders(root, split_dirs, config)
    else:
        skipped: list[Skipped] = []
        by_class = _class_folders(root, skipped)
        _check_classes(root, by_class)
        data = _split_classes(root, by_class, config, skipped)
    _check_nonempty(data)
    return data


def _check_classes(folder: Path, by_class: dict[str, list[Path]]) -> None:
    if not by_class:
        raise TlearnError(f"{folder} has no class sub-folders: put the images of each class in a folder "
                          f"named after the class, e.g. {folder}/cats/ and {folder}/dogs/")
    if not any(by_class.values()):
        raise TlearnError(f"no images found under {folder}; accepted extensions: {' '.join(IMAGE_EXTENSIONS)}")
    if len(by_class) < 2:
        raise TlearnError(f"{folder} has a single class ({next(iter(by_class))}); a classifier needs at least "
                          "two class sub-folders")
    empty = [name for name, paths in by_class.items() if not paths]
    if empty:
        raise TlearnError(f"class folder(s) {', '.join(empty)} in {folder} hold no images "
                          f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")


def _scan_split_folders(root: Path, split_dirs: dict[str, Path], config: DataConfig) -> ImageFolder:
    skipped: list[Skipped] = []
    listed = {split: _class_folders(d, skipped) for split, d in split_dirs.items()}
    train = listed["train"]
    _check_classes(split_dirs["train"], train)
    classes = sorted(train)
    for split, by_class in listed.items():
        extra = sorted(set(by_class) - set(classes))
        if extra:
            raise TlearnError(f"class folder(s) {', '.join(extra)} in {split_dirs[split]} have no counterpart in "
                              f"{split_dirs['train']}; every class needs training images")
    for entry in sorted(root.iterdir()):
        if entry not in split_dirs.values() and not entry.name.startswith("."):
            skipped.append(Skipped(entry, "not a train/, validation/ (or val/) or test/ folder", "outside-classes"))
    if "validation" not in listed:  # e.g. train/ + test/: hold out part of train/ for validation
        data = _split_classes(root, train, DataConfig(path=str(root), val=config.val, test=0, seed=config.seed),
                              skipped)
        data.layout = f"split folders (validation held out from {split_dirs['train'].name}/)"
    else:
        samples = [Sample(p, classes.index(c), "train") for c in classes for p in train[c]]
        data = ImageFolder(root, classes, samples, skipped, layout="split folders")
    for split in ("validation", "test"):
        for c, paths in listed.get(split, {}).items():
            data.samples += [Sample(p, classes.index(c), split) for p in paths]
    return data


def _split_classes(root: Path, by_class: dict[str, list[Path]], config: DataConfig,
                   skipped: list[Skipped]) -> ImageFolder:
    """Stratified, seeded split of each class.

    Written here rather than with scikit-learn's ``train_test_split`` because every class must land in every
    split (sklearn does not guarantee it for small classes), the error must name the class, and an image's split
    should not change when other images are added: each class is ordered by a seeded hash of the file name.
    """
    classes = sorted(by_class)
    samples = []
    for label, name in enumerate(classes):
        paths = sorted(by_class[name], key=lambda p: _stable_key(config.seed, p.relative_to(root)))
        n = len(paths)
        n_test = max(1, round(n * config.test)) if config.test > 0 else 0
        n_val = max(1, round(n * config.val))
        if n - n_test - n_val < 1:
            need = 2 + (n_test > 0)
            splits = "train, validation and test" if n_test else "train and validation"
            raise TlearnError(f"class '{name}' has {n} image(s); it needs at least {need} so that {splits} each "
                              "get one: add images or lower --val/--test")
        for i, p in enumerate(paths):
            split = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
            samples.append(Sample(p, label, split))
    return ImageFolder(root, classes, samples, skipped, layout="class folders (split by tlearn)")


def _stable_key(seed: int, relpath: Path) -> str:
    return hashlib.sha256(f"{seed}:{relpath.as_posix()}".encode("utf-8", "surrogateescape")).hexdigest()


def _check_nonempty(data: ImageFolder) -> None:
    counts = data.counts()
    for split in ("train", "validation"):
        if split not in counts:
            raise TlearnError(f"no usable images in the {split} split of {data.root}")
    for split, per_class in counts.items():
        empty = [c for c, n in per_class.items() if n == 0]
        if empty:
            raise TlearnError(f"class(es) {', '.join(empty)} have no usable images in the {split} split of "
                              f"{data.root}; add images there (or see the skipped-files list)")


def scan_labelled(path: Path | str, classes: list[str]) -> ImageFolder:
    """Images to evaluate a trained model on, all in split "test": a folder of class sub-folders, or a split
    folder, whose test/ (else validation/) is used. Class folders must be among the model's ``classes``."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise TlearnError(f"evaluation folder {path} does not exist or is not a folder")
    split_dirs = _find_split_dirs(root)
    folder = split_dirs.get("test") or split_dirs.get("validation") or root
    skipped: list[Skipped] = []
    by_class = _class_folders(folder, skipped)
    unknown = sorted(set(by_class) - set(classes))
    if unknown:
        raise TlearnError(f"class folder(s) {', '.join(unknown)} in {folder} are not classes of this model "
                          f"({', '.join(classes)})")
    samples = [Sample(p, classes.index(c), "test") for c, paths in sorted(by_class.items()) for p in paths]
    if not samples:
        raise TlearnError(f"no images found under {folder}; accepted extensions: {' '.join(IMAGE_EXTENSIONS)}")
    return ImageFolder(root, list(classes), samples, skipped, layout=f"evaluation folder {folder.name}/")


def recorded_split(run_dir: Path | None, config: dict) -> ImageFolder:
    """The data split a saved run was trained on, from its split.csv and the data folder its config records (the
    folder must still be there)."""
    manifest = Path(run_dir) / "split.csv" if run_dir is not None else None
    summary = config.get("data_summary")
    if manifest is None or not manifest.is_file() or not isinstance(summary, dict) or \
            not isinstance(summary.get("root"), str):
        raise TlearnError("no data split is recorded with this model; pass the folder to evaluate on")
    return scan(DataConfig(path=summary["root"], split_manifest=str(manifest)))


def expand_inputs(inputs: Path | str | Iterable[Path | str]) -> list[Path]:
    """Image files, and the images inside folders, in the given order: one path, or any list, tuple or other
    iterable of them. Paths that do not exist are kept, so that the results line up with the inputs and the
    missing ones are reported in place."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, str | os.PathLike) else inputs:
        p = Path(item).expanduser()
        paths += list_images(p, []) if p.is_dir() else [p]
    return paths


# --- manifest -----------------------------------------------------------------------------------------


def write_manifest(data: ImageFolder, path: Path) -> None:
    atomic_write_csv(path, ["path", "class", "split"],
                     ([s.path.relative_to(data.root).as_posix(), data.classes[s.label], s.split] for s in data.samples))


def read_manifest(path: Path, root: Path) -> ImageFolder:
    """Read a ``path,class,split`` manifest whose paths are relative to ``root``."""
    if not path.is_file():
        raise TlearnError(f"--split-manifest {path} does not exist or is not a regular file")
    with open_regular(path) as raw, open(raw.fileno(), newline="", encoding="utf-8", errors="surrogateescape",
                                         closefd=False) as f:
        rows = [[csv_text(cell) for cell in row] for row in csv.reader(f)]
    if not rows or rows[0] != ["path", "class", "split"]:
        raise TlearnError(f"--split-manifest {path}: the first line must be 'path,class,split'")
    entries = []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 3 or row[2] not in SPLITS:
            raise TlearnError(f"{path}, line {lineno}: expected 'path,class,split' with split one of "
                              f"{', '.join(SPLITS)}. Received: {','.join(row)}")
        entries.append((root / row[0], row[1], row[2]))
    missing = [str(p) for p, _, _ in entries if not p.is_file()]
    if missing:
        raise TlearnError(f"{len(missing)} file(s) in --split-manifest {path} are not under {root}, e.g. "
                          f"{missing[0]}; pass the data folder the manifest was written for")
    classes = sorted({c for _, c, _ in entries})
    if len(classes) < 2:
        raise TlearnError(f"--split-manifest {path} names fewer than two classes")
    samples = [Sample(p, classes.index(c), s) for p, c, s in entries]
    listed = {p for p, _, _ in entries}
    skipped: list[Skipped] = []
    unlisted = [p for c in _class_folders(root, skipped).values() for p in c if p not in listed]
    skipped = [Skipped(p, "not in the split manifest", "unlisted") for p in unlisted]
    return ImageFolder(root, classes, samples, skipped, layout=f"split manifest {path.name}")


def materialise_split(config: DataConfig, dest: Path) -> ImageFolder:
    """Write ``dest/{train,validation,test}/<class>/`` with hard links (or copies) of the images in ``config.path``.

    The source folder is never modified. ``dest`` must not exist yet, or be empty, and must not lie inside the
    source.
    """
    src = Path(config.path).expanduser().resolve()
    dest = dest.expanduser().resolve()
    if dest == src or src in dest.parents or dest in src.parents:
        raise TlearnError(f"the destination {dest} overlaps the source {src}; choose a folder outside it")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TlearnError(f"the destination {dest} already exists and is not empty; choose a new folder")
    if config.split_manifest or _find_split_dirs(src):
        raise TlearnError(f"{src} is already split (train/ + validation/ or test/ folders, or a manifest); "
                          "`tlearn split` takes a folder with one sub-folder per class")
    data = scan(config)
    for s in data.samples:
        inside_class = s.path.relative_to(data.root).parts[1:]  # DATA/<class>/<...> -> <...>
        target = dest.joinpath(s.split, data.classes[s.label], *inside_class)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(s.path, target)
        except OSError:  # another file system, or links not allowed: copy instead
            shutil.copy2(s.path, target)
    return data
