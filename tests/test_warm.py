"""A warm re-run reuses what it computed before (file digests, the chosen head, figures, the model summary) and
imports only what it uses; what changed is computed again."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, make_folder
from tlearn import fileio, htmlreport, plots
from tlearn.api import ImageClassifier
from tlearn.config import TrainConfig
from tlearn.recipes import heads as probe
from tlearn.train import tensor_batches


def test_file_digests_are_remembered_across_processes_and_follow_changes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"first")
    digest = fileio.file_sha256(path)
    fileio._index.close()  # as a new process would start: nothing in memory, the index on disk
    monkeypatch.setattr(fileio, "_digests", {})

    def no_reading(*_args):
        raise AssertionError("the file was read again")

    with monkeypatch.context() as m:
        m.setattr(fileio.hashlib, "sha256", no_reading)
        assert fileio.file_sha256(path) == digest
    path.write_bytes(b"other")  # same size, new bytes: the change time moves, so it is read again
    assert fileio.file_sha256(path) != digest
    assert (Path(os.environ["TLEARN_CACHE_DIR"]) / "digests.sqlite").is_file()


def test_file_digests_without_a_writable_cache_still_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ro").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(tmp_path / "ro" / "cache"))
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    assert fileio.file_sha256(path) == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


def test_mirror_rows_are_gathered_without_copying_and_match_stacking() -> None:
    X, M = np.arange(12, dtype=np.float32).reshape(6, 2), -np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([0, 1, 0, 1, 0, 1])
    rows = np.array([1, 4, 5])
    got = [(x, t) for x, t in tensor_batches(X, y, 2, torch.Generator().manual_seed(0), M, rows)()]
    stacked = {(*tuple(r), int(t)) for r, t in zip(np.vstack([X[rows], M[rows]]), np.r_[y[rows], y[rows]],
                                                  strict=True)}
    assert {(*tuple(r), int(t)) for x, ts in got for r, t in zip(x.numpy(), ts, strict=True)} == stacked
    assert sum(len(t) for _, t in got) == 6


def test_large_training_sets_get_the_dense_head_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    X = (rng.normal(size=(60, 8)) + y[:, None]).astype(np.float32)
    train, val = probe.Split(X, X[:, ::-1].copy(), y), probe.Split(X[:20], X[:20, ::-1].copy(), y[:20])
    monkeypatch.setattr(probe, "LARGE_TRAIN", 50)
    chosen = probe.choose_head(train, val, 2, TrainConfig(head="auto", epochs=3))
    assert [c["head"] for c in chosen.candidates] == ["dense"]
    assert "dense head alone" in chosen.notes[0]
    forced = probe.choose_head(train, val, 2, TrainConfig(head="logreg", epochs=3))  # asked for: still tried
    assert forced.chosen["head"] == "logreg"


def fit(root: Path, out: Path, **options) -> ImageClassifier:
    clf = ImageClassifier(**TINY, mode="features", epochs=3, verbose=False, workers=0, **options)
    clf.fit(root, out=out)
    return clf


def test_a_rerun_takes_the_chosen_head_and_the_figures_from_the_cache(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    root = make_folder(tmp_path / "photos", per_class=12)
    first = fit(root, tmp_path / "one")

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("recomputed on an unchanged re-run")

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="tlearn"):
        for name in ("choose_head", "refit"):
            m.setattr(f"tlearn.recipes.features.{name}", must_not_run)
        for name in ("confusion", "curves", "reliability_diagram", "image_grid"):
            m.setattr(plots, name, must_not_run)
        m.setattr(htmlreport, "_summary_rows", must_not_run)
        m.setattr(htmlreport, "read_predictions_csv", must_not_run)  # the report is built from memory
        again = fit(root, tmp_path / "two")
    assert "as chosen before on the same images" in caplog.text
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert one == two
    for name in ("confusion.png", "samples.png", "top_losses.png", "curves.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first.spec.temperature == again.spec.temperature


def test_a_change_of_labels_or_settings_chooses_the_head_again(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    root = make_folder(tmp_path / "photos", per_class=12)
    fit(root, tmp_path / "one")
    with caplog.at_level(logging.INFO, logger="tlearn"):
        fit(root, tmp_path / "two", head="dense")
        assert "as chosen before" not in caplog.text
        (root / "red" / "red_000.png").rename(root / "blue" / "red_000.png")  # one label changes
        fit(root, tmp_path / "three")
        assert "as chosen before" not in caplog.text
        fit(root, tmp_path / "four")
        assert "as chosen before" in caplog.text


def test_a_remembered_head_still_skips_the_files_that_failed(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root / "train", per_class=10)
    make_folder(root / "validation", per_class=4, seed=1)
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a training image
    runs = [fit(root, tmp_path / name) for name in ("one", "two")]
    for clf in runs:
        assert [s.path.name for s in clf.data.skipped] == ["broken.png"]
    assert (tmp_path / "one" / "skipped.csv").read_text() == (tmp_path / "two" / "skipped.csv").read_text()


@pytest.mark.slow
def test_a_warm_train_imports_neither_timm_nor_the_solvers_nor_matplotlib(tmp_path: Path) -> None:
    """With the registry's offline base (a name outside the registry asks timm whether it exists)."""
    root = make_folder(tmp_path / "photos", per_class=12)
    cmd = ["train", str(root), "--mode", "features", "--backbone", "efficientnet_lite0", "--workers", "0"]
    modules = ("timm", "torchvision", "sklearn.linear_model", "matplotlib", "onnxruntime")
    script = ("import sys; from tlearn.cli import main; code = main(sys.argv[1:]); "
              f"print([m for m in {modules!r} if m in sys.modules]); sys.exit(code)")
    seen = []
    for run in ("one", "two"):
        proc = subprocess.run([sys.executable, "-c", script, *cmd, "--out", str(tmp_path / run)],
                              capture_output=True, text=True, env=os.environ.copy())
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen.append(proc.stdout.strip().splitlines()[-1])
    assert "timm" in seen[0] and "sklearn.linear_model" in seen[0]  # the first run does use them
    assert seen[1] == "[]"


def test_a_rerun_remembers_the_files_that_could_not_be_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The head remembered by the first run carries its undecodable training files, so an unchanged re-run
    takes the chosen and the refit head from the cache, and still leaves those files out and says so. (The list
    was once written after the files had been dropped from the data, so it was always empty: every re-run of such a
    folder missed the refit head's memo and computed it again.)"""
    root = tmp_path / "photos"
    make_folder(root / "train", per_class=10)
    make_folder(root / "validation", per_class=4, seed=1)
    broken = root / "train" / "red" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ImageClassifier(**TINY, mode="features", verbose=False).fit(root, out=tmp_path / "one")

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("recomputed on an unchanged re-run")

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="tlearn"):
        for name in ("choose_head", "refit", "probe_splits"):
            m.setattr(f"tlearn.recipes.features.{name}", must_not_run)
        again = ImageClassifier(**TINY, mode="features", verbose=False)
        again.fit(root, out=tmp_path / "two")
    assert f"skipped {broken}" in caplog.text and broken not in {s.path for s in again.data.samples}
    assert (tmp_path / "one" / "skipped.csv").read_text() == (tmp_path / "two" / "skipped.csv").read_text()
