"""The feature cache: content-keyed, incremental, crash-safe; extraction reports undecodable files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, make_folder, make_image
from tlearn.backbones import load_backbone
from tlearn.config import BackboneConfig
from tlearn.features import FeatureCache, extract
from tlearn.fileio import atomic_write_text, default_cache_dir
from tlearn.images import eval_transform


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneConfig(**TINY))


def run(paths, bb, cache, **kw):
    return extract(paths, bb.features, transform=eval_transform(bb.preprocessing), dim=bb.num_features,
                   cache=cache, progress=False, **kw)


def images(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def test_second_run_extracts_nothing_and_matches(tmp_path: Path, tiny) -> None:
    paths = images(make_folder(tmp_path / "d", per_class=6))
    cache = FeatureCache(tmp_path / "c", tiny)
    first = run(paths, tiny, cache)
    second = run(paths, tiny, cache)
    assert (first.extracted, first.cached) == (12, 0)
    assert (second.extracted, second.cached) == (0, 12)
    np.testing.assert_array_equal(first.X, second.X)
    assert np.abs(first.X).sum(1).min() > 0
    np.testing.assert_allclose(first.X, run(paths, tiny, None).X, rtol=1e-5, atol=1e-6)


def test_cache_follows_content_not_names(tmp_path: Path, tiny) -> None:
    root = make_folder(tmp_path / "d", per_class=6)
    cache = FeatureCache(tmp_path / "c", tiny)
    before = run(images(root), tiny, cache)
    shutil.move(root / "red", root / "renamed_red")
    (root / "blue" / "blue_000.png").rename(root / "blue" / "moved.png")
    moved = run(images(root), tiny, cache)
    assert moved.extracted == 0
    make_image(root / "blue" / "blue_001.png", (0, 0, 255), 999)  # same name, new bytes
    changed = run(images(root), tiny, cache)
    assert changed.extracted == 1
    assert sorted(map(tuple, before.X.round(5))) != sorted(map(tuple, changed.X.round(5)))


def test_adding_images_extracts_only_those(tmp_path: Path, tiny) -> None:
    root = make_folder(tmp_path / "d", per_class=20)
    cache = FeatureCache(tmp_path / "c", tiny)
    run(images(root), tiny, cache)
    for i in range(10):
        make_image(root / "red" / f"new_{i}.png", (200, 30, 30), 5000 + i)
    again = run(images(root), tiny, cache)
    assert (again.extracted, again.cached) == (10, 40)


def test_duplicate_files_are_extracted_once(tmp_path: Path, tiny) -> None:
    root = make_folder(tmp_path / "d", per_class=3)
    shutil.copy(root / "red" / "red_000.png", root / "red" / "copy.png")
    feats = run(images(root), tiny, FeatureCache(tmp_path / "c", tiny))
    assert feats.extracted == 6
    i, j = images(root).index(root / "red" / "copy.png"), images(root).index(root / "red" / "red_000.png")
    np.testing.assert_array_equal(feats.X[i], feats.X[j])


def test_cache_key_includes_weights_and_preprocessing(tmp_path: Path, tiny) -> None:
    a = FeatureCache(tmp_path / "c", tiny)
    other = load_backbone(BackboneConfig(**TINY))
    other.preprocessing = {**other.preprocessing, "crop_pct": 0.5}
    b = FeatureCache(tmp_path / "c", other)
    other.weights_id = "sha256:other"
    c = FeatureCache(tmp_path / "c", other)
    d = FeatureCache(tmp_path / "c", tiny, numerics="bf16")
    assert len({a.dir, b.dir, c.dir, d.dir}) == 4


def test_damaged_entries_are_extracted_again(tmp_path: Path, tiny) -> None:
    paths = images(make_folder(tmp_path / "d", per_class=4))
    cache = FeatureCache(tmp_path / "c", tiny)
    clean = run(paths, tiny, cache)
    entries = sorted(cache.dir.rglob("*.npy"))
    entries[0].write_bytes(entries[0].read_bytes()[:60])  # truncated
    entries[1].write_bytes(b"garbage")
    again = run(paths, tiny, cache)
    assert again.extracted == 2
    np.testing.assert_array_equal(clean.X, again.X)


def test_entries_are_written_without_a_sync_each(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torn entry is made again (above), so a cache entry is renamed into place unsynced: the sync cost more
    than the write. Files that are not checked when read (a model, metrics) are still synced."""
    paths, cache, synced = images(make_folder(tmp_path / "d", per_class=3)), FeatureCache(tmp_path / "c", tiny), []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    assert run(paths, tiny, cache).extracted == len(paths) and synced == []
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert len(synced) == 1


def test_undecodable_files_are_reported_not_fatal(tmp_path: Path, tiny) -> None:
    root = make_folder(tmp_path / "d", per_class=3)
    (root / "red" / "fake.png").write_text("<html>not found</html>")
    (root / "red" / "empty.png").write_bytes(b"")
    paths = images(root)
    feats = run(paths, tiny, FeatureCache(tmp_path / "c", tiny))
    assert set(feats.failed) == {root / "red" / "fake.png", root / "red" / "empty.png"}
    assert all("not a readable image" in r for r in feats.failed.values())
    assert feats.extracted == 6
    assert not feats.X[paths.index(root / "red" / "fake.png")].any()


def test_parallel_lanes_give_the_same_features(tmp_path: Path, tiny) -> None:
    paths = images(make_folder(tmp_path / "d", per_class=8))
    (paths[0].parent / "bad.png").write_bytes(b"xx")
    paths = images(paths[0].parents[1])
    inline = run(paths, tiny, None, lanes=1, batch_size=4)
    pooled = run(paths, tiny, None, lanes=3, batch_size=3)
    np.testing.assert_allclose(inline.X, pooled.X, rtol=1e-5, atol=1e-6)
    assert inline.failed == pooled.failed


def test_cache_dir_defaults_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("TLEARN_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "tlearn"


KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tlearn.backbones import load_backbone
    from tlearn.config import BackboneConfig
    from tlearn.features import FeatureCache, extract
    from tlearn.images import eval_transform
    bb = load_backbone(BackboneConfig(backbone="test_efficientnet", pretrained=False))
    paths = sorted(Path(sys.argv[1]).rglob("*.png"))
    def slow(x):
        time.sleep(0.3)
        return bb.features(x)
    extract(paths, slow, transform=eval_transform(bb.preprocessing), dim=bb.num_features,
            cache=FeatureCache(sys.argv[2], bb), batch_size=2, lanes=1, progress=False)
""")


def test_kill_during_extraction_leaves_a_consistent_cache(tmp_path: Path, tiny) -> None:
    root = make_folder(tmp_path / "d", per_class=15)
    cache_root = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(root), str(cache_root)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    deadline = time.monotonic() + 60
    while len(list(cache_root.rglob("*.npy"))) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(cache_root.rglob("*.npy"))
    assert 6 <= len(done) < 30, "the kill should land mid-extraction"
    cache = FeatureCache(cache_root, tiny)
    assert all(np.load(p, allow_pickle=False).shape == (tiny.num_features,) for p in done)
    resumed = run(images(root), tiny, cache)
    assert resumed.extracted == 30 - len(done) and resumed.cached == len(done)
    np.testing.assert_allclose(resumed.X, run(images(root), tiny, None).X, rtol=1e-5, atol=1e-6)


def test_one_pass_of_both_views_gives_the_features_of_each_view_and_fills_both_caches(tmp_path: Path, tiny) -> None:
    from tlearn.features import extract_mirrored
    from tlearn.images import crop_resize_fits

    assert crop_resize_fits(tiny.preprocessing)  # the mirror view is then the centre view's pixels flipped
    paths = images(make_folder(tmp_path / "d", per_class=5))
    (tmp_path / "d" / "red" / "broken.png").write_bytes(b"not an image")
    paths.append(tmp_path / "d" / "red" / "broken.png")
    caches = FeatureCache(tmp_path / "c", tiny), FeatureCache(tmp_path / "c", tiny, view="flip")
    centre, mirror = extract_mirrored(paths, tiny.features, transform=eval_transform(tiny.preprocessing),
                                      dim=tiny.num_features, caches=caches, progress=False)
    for view, got in (("center", centre), ("flip", mirror)):
        alone = extract(paths, tiny.features, transform=eval_transform(tiny.preprocessing, view),
                        dim=tiny.num_features, progress=False)
        np.testing.assert_allclose(got.X, alone.X, rtol=1e-5, atol=1e-6)  # one decode, the same features
        assert set(got.failed) == {tmp_path / "d" / "red" / "broken.png"}
    assert not np.allclose(centre.X, mirror.X)
    again = [run(paths, tiny, cache) for cache in caches]  # both views are now in the cache
    assert [a.extracted for a in again] == [0, 0]
    np.testing.assert_array_equal(again[1].X, mirror.X)
