"""Data safety: atomic writes under failure, and decoding arbitrary bytes."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlearn.check import inspect_file
from tlearn.config import TlearnError
from tlearn.fileio import atomic_path, atomic_write_text
from tlearn.images import ImageDecodeError, load_image


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "first")
    atomic_write_text(tmp_path / "a.txt", "second")
    assert (tmp_path / "a.txt").read_text() == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_path(tmp_path / "b.bin") as tmp:  # a writer that replaces the file with a private one
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert leftovers(tmp_path) == []


def test_a_failure_mid_write_keeps_the_old_file_and_no_partial_one(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "model.bin", "complete")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "model.bin") as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "model.bin").read_text() == "complete"
    assert leftovers(tmp_path) == []


def test_disk_full_gives_a_clear_error_and_leaves_nothing_behind(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    atomic_write_text(tmp_path / "metrics.json", "{}")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TlearnError, match=r"cannot write .*metrics.json: No space left on device; check the free"):
        atomic_write_text(tmp_path / "metrics.json", '{"accuracy": 1}')
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


def test_unwritable_folder_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(TlearnError, match=r"cannot write .*x.json: Permission denied; choose a writable folder"):
        atomic_write_text(tmp_path / "x.json", "{}")
    assert not (tmp_path / "x.json").exists()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".jpg", ".png", ".gif", ".webp", ".bmp", ".tif"]))
def test_arbitrary_bytes_never_raise_anything_but_the_documented_skip(tmp_path: Path, data: bytes,
                                                                      suffix: str) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        image = load_image(path)
        assert image.mode == "RGB"
    except ImageDecodeError as e:
        assert str(e)
    findings, info = inspect_file(path)
    assert info.usable or any(f.severity == "error" for f in findings)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=2000), flip=st.integers(min_value=0, max_value=2000))
def test_damaged_real_images_are_skipped_with_a_reason(tmp_path: Path, cut: int, flip: int) -> None:
    from tests.conftest import make_image

    good = make_image(tmp_path / "good.jpg", (120, 40, 200), 0, size=(64, 48)).read_bytes()
    damaged = bytearray(good[: max(cut, 1)] if cut < len(good) else good)
    if flip < len(damaged):
        damaged[flip] ^= 0xFF
    path = tmp_path / "damaged.jpg"
    path.write_bytes(bytes(damaged))
    try:
        load_image(path)
    except ImageDecodeError as e:
        assert str(e)
    inspect_file(path)


SAVER = """
import sys, torch
from tlearn import ImageClassifier
clf = ImageClassifier.load(sys.argv[1], verbose=False)
base = {k: v.clone() for k, v in clf.model.state_dict().items()}
i = 0
while True:
    i += 1
    with torch.no_grad():
        for k, v in clf.model.state_dict().items():
            v.copy_(base[k] + i)
    clf.save(sys.argv[1])
    print(i, flush=True)
"""


def test_kill_during_save_always_leaves_the_last_complete_model(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from tests.conftest import TINY, make_folder
    from tlearn import ImageClassifier

    run = tmp_path / "run"
    clf = ImageClassifier(**TINY, mode="features", epochs=2, verbose=False, workers=0)
    clf.fit(make_folder(tmp_path / "photos", per_class=6), out=run)
    base = {k: v.clone() for k, v in clf.model.state_dict().items()}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    seen = set()
    for delay in (0.05, 0.2, 0.35, 0.5, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run)], env=env, stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # at least one save finished: the loop is running
        assert first.strip().isdigit()
        time.sleep(delay)
        proc.kill()
        proc.wait()
        loaded = ImageClassifier.load(run, verbose=False)
        shifts = {round(float((v - base[k]).mean()), 3) for k, v in loaded.model.state_dict().items()}
        assert len(shifts) == 1, f"tensors from different saves were mixed: {shifts}"
        seen |= shifts
    assert len(seen) >= 2, "the kills landed at different points"
