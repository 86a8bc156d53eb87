"""The labelled samples of a dataset, the files left out of it, and the seeded, stratified split of one label an
image: what every layout (class folders, split folders, a label file) is read into."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tlearn.config import DataConfig, TlearnError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    label: int  # the class; -1 for an image of a multi-label set, whose labels are ``labels``
    split: str
    labels: tuple[int, ...] = ()  # multi-label: every label the image has (sorted indices into the classes)

    @property
    def targets(self) -> tuple[int, ...]:
        """The labels of the image: one class, or several."""
        return self.labels if self.label < 0 else (self.label,)


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
    multi_label: bool = False  # several labels an image (``Sample.labels``), from a label file

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: n}}`` for the splits that have samples (multi-label: the images with each label)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            samples = [s for s in self.samples if s.split == split]
            c = Counter(self.classes[k] for s in samples for k in s.targets)
            if samples:
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
        check_nonempty(data)
        return data


def split_classes(root: Path, by_class: dict[str, list[Path]], config: DataConfig,
                   skipped: list[Skipped]) -> ImageFolder:
    """Stratified, seeded split of each class.

    Written here rather than with scikit-learn's ``train_test_split`` because every class must land in every
    split (sklearn does not guarantee it for small classes), the error must name the class, and an image's split
    should not change when other images are added: each class is ordered by a seeded hash of the file name.
    """
    classes = sorted(by_class)
    samples = []
    for label, name in enumerate(classes):
        paths = sorted(by_class[name], key=lambda p: _stable_key(config.seed, relative(p, root)))
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


def _stable_key(seed: int, relpath: str) -> str:
    return hashlib.sha256(f"{seed}:{relpath}".encode("utf-8", "surrogateescape")).hexdigest()


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX separators), or absolute where a label file named one outside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def check_nonempty(data: ImageFolder) -> None:
    """Every split that tlearn needs has images, and every class has some in each split (multi-label: in train)."""
    counts = data.counts()
    for split in ("train", "validation"):
        if split not in counts:
            raise TlearnError(f"no usable images in the {split} split of {data.root}")
    for split, per_class in counts.items():
        if data.multi_label and split != "train":
            continue  # a rare label may miss a split: said as a warning (``missing_labels``), not refused
        empty = [c for c, n in per_class.items() if n == 0]
        if empty:
            raise TlearnError(f"class(es) {', '.join(empty)} have no usable images in the {split} split of "
                              f"{data.root}; add images there (or see the skipped-files list)")


def images_of(data: ImageFolder) -> dict[str, int] | None:
    """Multi-label: the images of each split (its label counts add up to more); None for one class an image."""
    return {split: len(data.split(split)) for split in data.counts()} if data.multi_label else None


def missing_labels(data: ImageFolder) -> list[tuple[str, str]]:
    """Multi-label: ``(label, why)`` for each label that a split lacks, to warn with (its threshold and scores are
    then estimated without it there)."""
    counts = data.counts()
    return [(name, f"label {name!r} has no image in the {split} split ({counts['train'][name]} in train)")
            for split, per_class in counts.items() if split != "train" and data.multi_label
            for name, n in per_class.items() if n == 0]


def split_multi_label(root: Path, images: list[tuple[Path, str, tuple[int, ...]]], classes: list[str],
                      config: DataConfig, skipped: list[Skipped]) -> ImageFolder:
    """A seeded split of images with several labels each (``(path, key, labels)``) that keeps each label's share
    in every split: iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011). The rarest label is placed
    first, each of its images going to the split that most lacks that label (ties: the split that most lacks
    images, then train, validation, test). Images are visited in the seeded order of their keys, so the split is
    reproducible; unlike the single-label split, adding images can move others."""
    fractions = {"train": 1 - config.val - config.test, "validation": config.val, "test": config.test}
    splits = [s for s in SPLITS if fractions[s] > 0]
    order = sorted(range(len(images)), key=lambda i: _stable_key(config.seed, images[i][1]))
    total = Counter(k for _, _, labels in images for k in labels)
    want_images = {s: fractions[s] * len(images) for s in splits}
    want = {s: {k: fractions[s] * n for k, n in total.items()} for s in splits}
    assigned: dict[int, str] = {}
    left = Counter(total)
    while len(assigned) < len(images):
        label = min((k for k, n in left.items() if n > 0), key=lambda k: (left[k], k))
        for i in (i for i in order if i not in assigned and label in images[i][2]):
            split = max(splits, key=lambda s: (want[s][label], want_images[s], -splits.index(s)))
            assigned[i] = split
            want_images[split] -= 1
            for k in images[i][2]:
                want[split][k] -= 1
                left[k] -= 1
    samples = [Sample(path, -1, assigned[i], labels) for i, (path, _, labels) in enumerate(images)]
    return ImageFolder(root, classes, samples, skipped, multi_label=True)
