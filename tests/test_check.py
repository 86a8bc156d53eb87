"""`tlearn check` on a generated corpus of bad and odd files, and training on a folder that mixes them in."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import TINY, make_folder, make_image
from tlearn import ImageClassifier
from tlearn.check import check, near_pairs
from tlearn.cli import main
from tlearn.config import DataConfig


def photo(size: tuple[int, int] = (96, 80), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def build_corpus(root: Path) -> dict[str, str]:
    """Odd and bad files among good ones in root/red and root/blue; returns {file name: expected finding}."""
    make_folder(root, per_class=8)
    red, blue = root / "red", root / "blue"
    expected = {}

    def put(name: str, kind: str, data: bytes | None = None, image: Image.Image | None = None, **save) -> Path:
        path = red / name
        if image is not None:
            image.save(path, **save)
        else:
            path.write_bytes(data or b"")
        expected[name] = kind
        return path

    put("empty.jpg", "empty", b"")
    put("page.jpg", "undecodable", b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    put("noise.png", "undecodable", bytes(np.random.default_rng(1).integers(0, 255, 600, dtype=np.uint8)))
    buf = io.BytesIO()
    photo((300, 300)).save(buf, format="JPEG")
    put("cut.jpg", "truncated", buf.getvalue()[: len(buf.getvalue()) // 2])
    put("png_named.jpg", "format-mismatch", image=photo(seed=2), format="PNG")
    put("webp_named.png", "format-mismatch", image=photo(seed=3), format="WEBP")
    put("bmp_named.jpg", "format-mismatch", image=photo(seed=4), format="BMP")
    put("grey.png", "grayscale", image=photo(seed=5).convert("L"))
    put("print.jpg", "cmyk", image=photo(seed=6).convert("CMYK"))
    put("deep.png", "high-bit-depth", image=Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)))
    pal = photo(seed=7).convert("P")
    pal.info["transparency"] = 0
    put("palette.png", "transparency", image=pal, transparency=0)
    put("alpha.png", "transparency", image=photo(seed=8).convert("RGBA"))
    frames = [photo(seed=s) for s in (9, 10)]
    put("anim.gif", "animated", image=frames[0], save_all=True, append_images=frames[1:])
    put("anim.webp", "animated", image=frames[0], save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 8
    put("rotated.jpg", "exif-rotated", image=photo(seed=11), exif=exif)
    put("tiny.png", "small", image=photo((16, 16), seed=12))
    put("banner.png", "aspect", image=photo((400, 40), seed=13))
    put("bomb.png", "bomb", image=Image.new("1", (10_000, 9_000)))
    placeholder = Image.new("RGB", (300, 300), (238, 238, 238))
    ImageDraw.Draw(placeholder).text((60, 140), "WE'RE SORRY, THIS IMAGE COULD NOT BE FOUND", fill=(80, 80, 80))
    put("imageNotFound.gif", "low-information", image=placeholder)
    put("notes.txt", "not-an-image", b"a note")
    put(".DS_Store", "hidden", b"\0\0\0\1Bud1")
    put("Thumbs.db", "hidden", b"\xd0\xcf\x11\xe0")
    os.symlink(red / "missing.jpg", red / "dangling.jpg")
    expected["dangling.jpg"] = "broken-link"
    os.symlink(red / "loop_b.jpg", red / "loop_a.jpg")
    os.symlink(red / "loop_a.jpg", red / "loop_b.jpg")
    expected["loop_a.jpg"] = expected["loop_b.jpg"] = "link-loop"
    bad_name = os.fsencode(red) + b"/caf\xe9.png"
    with open(bad_name, "wb") as f:
        photo(seed=14).save(f, format="PNG")
    expected[os.fsdecode(b"caf\xe9.png")] = "odd-name"
    put(" leading space.png", "odd-name", image=photo(seed=15))
    # Same-class copies: "duplicate" when tlearn's split puts both in one split, "leakage" when it does not.
    (red / "copy.png").write_bytes((red / "red_000.png").read_bytes())
    expected["copy.png"] = "duplicate|leakage"
    (blue / "mislabelled.png").write_bytes((red / "red_001.png").read_bytes())
    expected["mislabelled.png"] = "conflicting-labels"
    Image.open(red / "red_002.png").resize((44, 37)).save(red / "resized.jpg", quality=90)
    expected["resized.jpg"] = "duplicate|leakage"  # near: resized and recompressed
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("messy") / "photos"
    return root, build_corpus(root)


def test_check_reports_every_kind_of_problem(corpus) -> None:
    root, expected = corpus
    assert len({k for kind in expected.values() for k in kind.split("|")}) >= 20
    start = time.monotonic()
    report = check(DataConfig(path=str(root)), min_size=32, progress=False)
    assert time.monotonic() - start < 60, "no hang, bombs refused quickly"
    kinds: dict[str, set[str]] = {}
    for f in report.findings:
        for path in filter(None, (f.path, f.other)):  # a pair's finding counts for both files
            kinds.setdefault(Path(path).name, set()).add(f.kind)
    for name, kind in expected.items():
        assert set(kind.split("|")) & kinds.get(name, set()), f"{name}: expected {kind}, got {kinds.get(name)}"
    twins = {"red_000.png", "red_001.png", "red_002.png"}  # the originals of the copies above
    good = [n for n in kinds if n.startswith(("red_0", "blue_0")) and n not in twins]
    assert not good, f"clean images were flagged: {good}"
    assert {f.kind for f in report.blocking()} >= {"empty", "undecodable", "truncated", "bomb", "conflicting-labels"}
    assert "a text or HTML file" in next(f.detail for f in report.findings if f.path.endswith("page.jpg"))


def test_leakage_finds_every_copied_test_image(tmp_path: Path) -> None:
    make_folder(tmp_path / "d" / "train", per_class=10)
    make_folder(tmp_path / "d" / "val", per_class=4, seed=1)
    make_folder(tmp_path / "d" / "test", per_class=4, seed=2)
    copied = []
    for i, src in enumerate(sorted((tmp_path / "d" / "test").rglob("*.png"))[::2]):
        dest = tmp_path / "d" / "train" / src.parent.name / f"renamed_{i}.png"
        dest.write_bytes(src.read_bytes())
        copied.append(dest)
    report = check(DataConfig(path=str(tmp_path / "d")), progress=False)
    leaks = {Path(f.path) for f in report.findings if f.kind == "leakage"} | \
            {Path(f.other) for f in report.findings if f.kind == "leakage"}
    assert set(copied) <= leaks
    assert sum(f.kind == "leakage" for f in report.findings) == len(copied)


def test_near_pairs_by_bands_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**62, 40)]
    hashes = {Path(f"{i}"): h for i, h in enumerate(base)}
    for i, h in enumerate(base[:20]):  # near copies with 1..6 flipped bits
        flips = rng.choice(64, size=1 + i % 6, replace=False)
        hashes[Path(f"near{i}")] = h ^ sum(1 << int(b) for b in flips)
    brute = sorted((min(a, b), max(a, b), (ha ^ hb).bit_count()) for a, ha in hashes.items()
                   for b, hb in hashes.items() if a < b and (ha ^ hb).bit_count() <= 4)
    assert near_pairs(hashes, 4) == brute
    assert len(brute) >= 10


def test_check_cli_json_strict_and_fix_report(corpus, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, _ = corpus
    code = main(["check", str(root), "--json", "--strict", "--fix-report", str(tmp_path / "q.csv")])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 2 and "blocking finding" in err
    assert report["blocking"] > 0 and report["summary"]["format-mismatch"] == 3
    quarantine = (tmp_path / "q.csv").read_text(errors="surrogateescape")
    assert quarantine.startswith("path,reason") and "page.jpg" in quarantine and "copy.png" in quarantine
    assert (root / "red" / "page.jpg").exists(), "nothing is moved"


def test_check_cli_clean_folder_passes_strict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for c, name in enumerate(("blue", "red")):
        for i in range(6):
            make_image(tmp_path / "d" / name / f"{i}.jpg", (40 + 150 * c, 90, 200 - 150 * c), c * 100 + i, (256, 240))
    assert main(["check", str(tmp_path / "d"), "--strict"]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_train_on_a_messy_folder_completes_and_lists_what_it_skipped(corpus, tmp_path: Path) -> None:
    root, expected = corpus
    clf = ImageClassifier(**TINY, mode="features", epochs=5, verbose=False, workers=0)
    clf.fit(root, out=tmp_path / "run")
    skipped = (tmp_path / "run" / "skipped.csv").read_text(errors="surrogateescape")
    for name, kind in expected.items():
        if kind in ("empty", "undecodable", "truncated", "bomb", "broken-link", "link-loop", "hidden",
                    "not-an-image"):
            assert name in skipped, f"{name} ({kind}) should be listed as skipped"
    assert "refused" in skipped  # the bomb, from its header
    used = {Path(p).name for p in (tmp_path / "run" / "split.csv").read_text(errors="surrogateescape").split()}
    assert any("png_named.jpg" in u for u in used), "a PNG named .jpg is read as the PNG it is"


def test_real_image_decodes_even_with_a_wrong_extension(tmp_path: Path) -> None:
    from tlearn.images import load_image

    make_image(tmp_path / "x.png", (200, 10, 10), 0)
    (tmp_path / "x.png").rename(tmp_path / "x.jpg")
    assert load_image(tmp_path / "x.jpg").getpixel((0, 0))[0] > 100


def test_train_warns_about_leakage_and_records_it(tmp_path: Path) -> None:
    make_folder(tmp_path / "d" / "train", per_class=8)
    make_folder(tmp_path / "d" / "val", per_class=3, seed=1)
    leaked = tmp_path / "d" / "val" / "red" / "red_000.png"
    (tmp_path / "d" / "train" / "red" / "also_in_val.png").write_bytes(leaked.read_bytes())
    clf = ImageClassifier(**TINY, mode="features", epochs=3, verbose=False, workers=0)
    clf.fit(tmp_path / "d", out=tmp_path / "run")
    findings = json.loads((tmp_path / "run" / "check.json").read_text())["findings"]
    pairs = [(f["kind"], {Path(f["path"]).name, Path(f["other"]).name}) for f in findings]
    assert pairs == [("leakage", {"red_000.png", "also_in_val.png"})]


def test_unreadable_files_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root here, where chmod 000 does not stop reads, so the permission error is injected."""
    import errno

    import tlearn.check as check_module

    path = make_image(tmp_path / "locked.png", (10, 200, 10), 0)
    real = check_module.file_sha256

    def locked(p):
        if Path(p).name == "locked.png":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(p)

    monkeypatch.setattr(check_module, "file_sha256", locked)
    findings, info = check_module.inspect_file(path)
    assert [(f.kind, f.detail) for f in findings] == [("unreadable", "cannot read: Permission denied")]
    assert not info.usable
