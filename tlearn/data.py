"""Folder of images, or a label file → labelled samples in train / validation / test.

Three layouts are understood:
- class folders: ``DATA/<class>/...``; tlearn makes a stratified, seeded split and writes it as a manifest;
- split folders: ``DATA/train/<class>/``, ``DATA/validation/`` or ``DATA/val/``, and optionally ``DATA/test/``.
  When there is no validation folder, ``val`` of each class in ``train/`` is held out for validation.
- a label file (``labelfile.py``): split as class folders are, by the same seeded order of the paths relative to
  its base, so a CSV and the same photos in class folders get the same split; its split column, where it has
  one, is honoured as split folders are.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tlearn import labelfile
from tlearn.config import DataConfig, TlearnError
from tlearn.fileio import atomic_write_csv, csv_text, open_regular, special_kind
from tlearn.labelfile import IMAGE_EXTENSIONS
from tlearn.samples import SPLITS, ImageFolder, Sample, Skipped, check_nonempty, relative, split_classes

SYSTEM_FILES = {"Thumbs.db", "desktop.ini"}  # besides hidden (dot) files such as .DS_Store
_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


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
    from_file = config.label_file or labelfile.is_label_file(config.path)
    root = data_root(config).resolve()
    if not root.is_dir():
        raise TlearnError(f"data folder {root if from_file else config.path} does not exist or is not a folder")
    if config.split_manifest:
        data = read_manifest(Path(config.split_manifest), root)
    elif from_file:
        data = labelfile.scan(config)
    elif split_dirs := _find_split_dirs(root):
        data = _scan_split_folders(root, split_dirs, config)
    else:
        skipped: list[Skipped] = []
        by_class = _class_folders(root, skipped)
        _check_classes(root, by_class)
        data = split_classes(root, by_class, config, skipped)
    check_nonempty(data)
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
        data = split_classes(root, train, DataConfig(path=str(root), val=config.val, test=0, seed=config.seed),
                              skipped)
        data.layout = f"split folders (validation held out from {split_dirs['train'].name}/)"
    else:
        samples = [Sample(p, classes.index(c), "train") for c in classes for p in train[c]]
        data = ImageFolder(root, classes, samples, skipped, layout="split folders")
    for split in ("validation", "test"):
        for c, paths in listed.get(split, {}).items():
            data.samples += [Sample(p, classes.index(c), split) for p in paths]
    return data


def scan_labelled(data: Path | str | DataConfig, classes: list[str], multi_label: bool = False) -> ImageFolder:
    """Images to evaluate a trained model on, all in split "test": a folder of class sub-folders, or a split
    folder, whose test/ (else validation/) is used; or a label file (a ``DataConfig`` says how to read it), whose
    test rows (else validation rows, else all) are used. The classes must be among the model's ``classes``."""
    config = data if isinstance(data, DataConfig) else DataConfig(path=str(data))
    if config.label_file or labelfile.is_label_file(config.path):
        return labelfile.labelled(config, classes, multi_label)
    if multi_label:
        raise TlearnError(f"{config.path}: class folders give one class an image; evaluate a model of several labels "
                          "an image on a label file")
    path = config.path
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


def data_root(config: DataConfig) -> Path:
    """The folder the data lies in: DATA, or the base of a label file's paths (nothing may be written there)."""
    if config.label_file or labelfile.is_label_file(config.path):
        return labelfile.located(config)[1]
    return Path(config.path).expanduser()


def data_name(config: DataConfig) -> str:
    """A short name of the data: the folder's, or the label file's without its extension."""
    path = Path(config.label_file or config.path).expanduser().resolve()
    return path.stem if path.is_file() else path.name


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
    """``path,class,split`` rows; multi-label: ``path,labels,split``, the labels a JSON list."""
    if data.multi_label:
        atomic_write_csv(path, ["path", "labels", "split"], ([relative(s.path, data.root), json.dumps(
            [data.classes[k] for k in s.labels], ensure_ascii=False), s.split] for s in data.samples))
        return
    atomic_write_csv(path, ["path", "class", "split"],
                     ([relative(s.path, data.root), data.classes[s.label], s.split] for s in data.samples))


def read_manifest(path: Path, root: Path) -> ImageFolder:
    """Read a ``path,class,split`` (or multi-label ``path,labels,split``) manifest whose paths are relative to
    ``root``."""
    if not path.is_file():
        raise TlearnError(f"--split-manifest {path} does not exist or is not a regular file")
    with open_regular(path) as raw, open(raw.fileno(), newline="", encoding="utf-8", errors="surrogateescape",
                                         closefd=False) as f:
        rows = [[csv_text(cell) for cell in row] for row in csv.reader(f)]
    if not rows or rows[0] not in (["path", "class", "split"], ["path", "labels", "split"]):
        raise TlearnError(f"--split-manifest {path}: the first line must be 'path,class,split'")
    multi = rows[0][1] == "labels"
    entries = []
    for lineno, row in enumerate(rows[1:], start=2):
        labels = _manifest_labels(row[1]) if multi and len(row) == 3 else (row[1],) if len(row) == 3 else None
        if labels is None or row[2] not in SPLITS:
            raise TlearnError(f"{path}, line {lineno}: expected '{','.join(rows[0])}' with split one of "
                              f"{', '.join(SPLITS)}. Received: {','.join(row)}")
        entries.append((root / row[0], labels, row[2]))
    missing = [str(p) for p, _, _ in entries if not p.is_file()]
    if missing:
        raise TlearnError(f"{len(missing)} file(s) in --split-manifest {path} are not under {root}, e.g. "
                          f"{missing[0]}; pass the data folder the manifest was written for")
    classes = sorted({c for _, labels, _ in entries for c in labels})
    if len(classes) < 2:
        raise TlearnError(f"--split-manifest {path} names fewer than two classes")
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(p, -1, s, tuple(index[c] for c in labels)) if multi else Sample(p, index[labels[0]], s)
               for p, labels, s in entries]
    listed = {p for p, _, _ in entries}
    skipped: list[Skipped] = []
    unlisted = [p for c in _class_folders(root, skipped).values() for p in c if p not in listed]
    skipped = [Skipped(p, "not in the split manifest", "unlisted") for p in unlisted]
    return ImageFolder(root, classes, samples, skipped, layout=f"split manifest {path.name}", multi_label=multi)


def _manifest_labels(cell: str) -> tuple[str, ...] | None:
    try:
        labels = json.loads(cell)
    except json.JSONDecodeError:
        return None
    ok = isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)
    return tuple(sorted(set(labels))) if ok else None


def materialise_split(config: DataConfig, dest: Path) -> ImageFolder:
    """Write ``dest/{train,validation,test}/<class>/`` with hard links (or copies) of the images of ``config``; or,
    where ``dest`` names a ``.csv`` file, a label file of every image's path, label and split.

    The source is never modified. A folder ``dest`` must not exist yet, or be empty, and must not lie inside the
    source; a file ``dest`` must not exist yet. A label file's paths are relative to its own folder where they
    lie under it, else absolute.
    """
    from_file = bool(config.label_file or labelfile.is_label_file(config.path))
    src = data_root(config).resolve()
    dest = dest.expanduser().resolve()
    if dest.suffix.lower() == ".csv":
        if dest.exists() or dest.is_symlink():
            raise TlearnError(f"the destination {dest} already exists; choose a new file name")
        data = scan(config)
        sep = ";" if not any(";" in c for c in data.classes) else "|"
        atomic_write_csv(dest, ["path", "labels" if data.multi_label else "label", "split"],
                         ([relative(s.path, dest.parent), sep.join(data.classes[k] for k in s.targets), s.split]
                          for s in data.samples))
        return data
    if dest == src or src in dest.parents or dest in src.parents:
        raise TlearnError(f"the destination {dest} overlaps the source {src}; choose a folder outside it")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TlearnError(f"the destination {dest} already exists and is not empty; choose a new folder")
    if config.split_manifest or (not from_file and _find_split_dirs(src)):
        raise TlearnError(f"{src} is already split (train/ + validation/ or test/ folders, or a manifest); "
                          "`tlearn split` takes a folder with one sub-folder per class, or a label file")
    data = scan(config)
    if data.multi_label:
        raise TlearnError(f"{config.label_file or config.path} gives several labels an image, which class folders "
                          "cannot hold; write the split as a label file instead (DEST ending in .csv)")
    for s in data.samples:
        inside = Path(relative(s.path, data.root).lstrip("/")).parts  # a label file's path, or DATA/<class>/<...>
        target = dest.joinpath(s.split, data.classes[s.label], *(inside if from_file else inside[1:]))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(s.path, target)
        except OSError:  # another file system, or links not allowed: copy instead
            shutil.copy2(s.path, target)
    return data
