"""Folder scanning, splits, manifests, materialised splits and image decoding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_folder, make_image
from tlearn.config import DataConfig, TlearnError, validate
from tlearn.data import materialise_split, read_manifest, scan, scan_labelled, write_manifest
from tlearn.images import ImageDecodeError, load_image


def test_class_folders_get_a_stratified_seeded_split(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=20, classes=("blue", "green", "red"))
    data = scan(DataConfig(path=str(root)))
    assert data.classes == ["blue", "green", "red"]
    assert data.counts() == {s: dict.fromkeys(data.classes, n) for s, n in
                             (("train", 14), ("validation", 3), ("test", 3))}
    again = scan(DataConfig(path=str(root)))
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in data.samples]
    other = scan(DataConfig(path=str(root), seed=1))
    assert {s.path for s in other.split("test")} != {s.path for s in data.split("test")}


def test_adding_images_keeps_most_existing_assignments(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=40)
    before = {s.path: s.split for s in scan(DataConfig(path=str(root))).samples}
    make_image(root / "red" / "zz_new.png", (200, 0, 0), 99)
    after = {s.path: s.split for s in scan(DataConfig(path=str(root))).samples}
    moved = sum(before[p] != after[p] for p in before)
    assert moved <= 2


def test_every_class_reaches_every_split_even_when_small(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=3)
    data = scan(DataConfig(path=str(root)))
    assert all(n == 1 for split in ("validation", "test") for n in data.counts()[split].values())


def test_manifest_round_trip_and_reuse(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=10)
    data = scan(DataConfig(path=str(root), seed=3))
    write_manifest(data, tmp_path / "split.csv")
    assert (tmp_path / "split.csv").read_text().splitlines()[0] == "path,class,split"
    reused = scan(DataConfig(path=str(root), seed=0, split_manifest=str(tmp_path / "split.csv")))
    assert [(s.path, s.label, s.split) for s in reused.samples] == [(s.path, s.label, s.split) for s in data.samples]
    make_image(root / "red" / "late.png", (200, 0, 0), 5)
    reused = read_manifest(tmp_path / "split.csv", root)
    assert [(s.path.name, s.reason) for s in reused.skipped] == [("late.png", "not in the split manifest")]


def test_manifest_errors_name_the_file_and_line(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=4)
    bad = tmp_path / "m.csv"
    bad.write_text("path,class,split\nblue/blue_000.png,blue,training\n")
    with pytest.raises(TlearnError, match=r"m\.csv, line 2"):
        read_manifest(bad, root)
    bad.write_text("path,class,split\nblue/gone.png,blue,train\nred/red_000.png,red,train\n")
    with pytest.raises(TlearnError, match="gone.png"):
        read_manifest(bad, root)


@pytest.mark.parametrize("val_name", ["validation", "val", "VAL"])
def test_split_folders_are_honoured(tmp_path: Path, val_name: str) -> None:
    make_folder(tmp_path / "d" / "train", per_class=6)
    make_folder(tmp_path / "d" / val_name, per_class=2, seed=1)
    make_folder(tmp_path / "d" / "test", per_class=3, seed=2)
    data = scan(DataConfig(path=str(tmp_path / "d")))
    assert data.counts() == {"train": {"blue": 6, "red": 6}, "validation": {"blue": 2, "red": 2},
                             "test": {"blue": 3, "red": 3}}


def test_train_and_test_folders_hold_out_validation_from_train(tmp_path: Path) -> None:
    make_folder(tmp_path / "d" / "train", per_class=20)
    make_folder(tmp_path / "d" / "test", per_class=4, seed=2)
    data = scan(DataConfig(path=str(tmp_path / "d"), val=0.25))
    assert data.counts() == {"train": {"blue": 15, "red": 15}, "validation": {"blue": 5, "red": 5},
                             "test": {"blue": 4, "red": 4}}
    assert all("train" in s.path.parts for s in data.split("validation"))


def test_non_images_hidden_files_and_stray_files_are_listed_not_used(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=5)
    (root / "red" / "notes.txt").write_text("hello")
    (root / "red" / ".DS_Store").write_bytes(b"\0")
    (root / "README.md").write_text("about")
    os.symlink(root / "missing.png", root / "blue" / "dangling.png")
    data = scan(DataConfig(path=str(root)))
    reasons = {p.path.name: p.reason for p in data.skipped}
    assert reasons["notes.txt"].startswith("not an image extension")
    assert reasons[".DS_Store"] == "hidden or system file"
    assert reasons["README.md"] == "not inside a class sub-folder"
    assert reasons["dangling.png"] == "broken symbolic link"
    assert len(data.samples) == 10


def test_nested_folders_and_upper_case_extensions_are_found(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=5)
    make_image(root / "red" / "2024" / "trip" / "IMG_1.JPG", (200, 0, 0), 1)
    data = scan(DataConfig(path=str(root)))
    assert any(s.path.name == "IMG_1.JPG" for s in data.samples)


@pytest.mark.parametrize(("setup", "message"), [
    (lambda r: None, "does not exist"),
    (lambda r: (r / "a").mkdir(parents=True) or (r / "b").mkdir() or (r / "a" / "x.txt").write_text("."),
     r"no images found .* accepted extensions: \.jpg"),
    (lambda r: make_folder(r, per_class=4, classes=("red",)), "single class"),
    (lambda r: make_folder(r, per_class=4) and (r / "green").mkdir(), "green .* hold no images"),
    (lambda r: make_folder(r, per_class=2), "class 'blue' has 2 image"),
    (lambda r: r.mkdir() or make_image(r / "x.png", (0, 0, 0), 0), "no class sub-folders"),
])
def test_clear_errors(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(TlearnError, match=message):
        scan(DataConfig(path=str(root)))


def test_class_empty_in_a_split_folder_is_an_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "d" / "train", per_class=4)
    make_folder(tmp_path / "d" / "val", per_class=2, classes=("red",))
    with pytest.raises(TlearnError, match="blue have no usable images in the validation split"):
        scan(DataConfig(path=str(tmp_path / "d")))


def test_split_fractions_that_do_not_add_up_are_reported_together() -> None:
    with pytest.raises(TlearnError) as err:
        validate(DataConfig(path="x", val=0.6, test=0.5), DataConfig(path="", val=0))
    text = str(err.value)
    assert "--val and --test must add up to less than 1" in text
    assert "DATA is required" in text and "--val must be between 0 and 1" in text


def test_materialise_split_links_files_and_never_touches_the_source(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", per_class=10)
    before = sorted((p, p.stat().st_mtime_ns) for p in src.rglob("*"))
    data = materialise_split(DataConfig(path=str(src)), tmp_path / "out")
    assert sorted((p, p.stat().st_mtime_ns) for p in src.rglob("*")) == before
    rescanned = scan(DataConfig(path=str(tmp_path / "out")))
    assert rescanned.counts() == data.counts()
    assert rescanned.layout == "split folders"
    with pytest.raises(TlearnError, match="overlaps the source"):
        materialise_split(DataConfig(path=str(src)), src / "inside")
    with pytest.raises(TlearnError, match="not empty"):
        materialise_split(DataConfig(path=str(src)), tmp_path / "out")
    with pytest.raises(TlearnError, match="already split"):
        materialise_split(DataConfig(path=str(tmp_path / "out")), tmp_path / "again")


def test_evaluation_folder_must_use_known_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=3, classes=("green", "red"))
    assert len(scan_labelled(root, ["blue", "green", "red"]).samples) == 6
    with pytest.raises(TlearnError, match="green .* not classes of this model"):
        scan_labelled(root, ["blue", "red"])


# --- decoding -----------------------------------------------------------------------------------------


def test_decode_transparency_on_white_grayscale_and_16_bit(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.jpg")
    grey = load_image(tmp_path / "grey.jpg")
    assert grey.mode == "RGB" and abs(grey.getpixel((0, 0))[0] - 77) <= 2
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)


def test_decode_applies_exif_orientation(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_decode_takes_the_first_frame_of_an_animation(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, _, b = load_image(tmp_path / "anim.gif").getpixel((0, 0))
    assert r > 200 and b < 50


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "not a readable image"),
    (b"<html>404</html>", "not a readable image"),
    (None, "truncated"),
])
def test_undecodable_files_raise_with_a_reason(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    if content is None:
        make_image(tmp_path / "good.jpg", (0, 200, 0), 0, size=(200, 200))
        content = (tmp_path / "good.jpg").read_bytes()[:400]
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason):
        load_image(path)
