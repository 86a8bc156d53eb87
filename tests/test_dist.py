"""Data-parallel training on PyTorch's own engine, with 2 CPU processes (gloo) started by the real launcher:
disjoint shards that cover the data, sharded extraction that fills the cache exactly once, one set of artifacts,
the same result as one process, and a killed process that fails the run cleanly for --resume to continue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HYMENOPTERA, make_folder, needs
from tlearn import dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TINY_FLAGS = ["--backbone", "test_efficientnet", "--no-pretrained", "--workers", "0"]


def _launch(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_shards_are_disjoint_and_cover_the_items(monkeypatch: pytest.MonkeyPatch) -> None:
    items = list(range(11))
    parts = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "3")
        parts.append(dist.shard(items))
    assert sorted(x for p in parts for x in p) == items and sum(map(len, parts)) == len(items)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.shard(items) == items and not dist.active() and dist.all_sum([1.5, 2]) == [1.5, 2.0]


def test_each_process_trains_and_evaluates_on_its_own_share(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=16, classes=("blue", "green", "red"))
    out = tmp_path / "out"
    out.mkdir()
    done = _launch(str(WORKER), "shards", str(data), str(out), env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _ranks(out)
    assert (a["world"], b["world"]) == (2, 2)
    for epoch in range(2):
        mine, theirs = set(a["train"][epoch]["paths"]), set(b["train"][epoch]["paths"])
        assert not mine & theirs and mine | theirs == set(a["all_train"])  # disjoint, and together all of it
        assert all(size <= 4 for size in a["train"][epoch]["batch_sizes"])  # --batch-size 8 is the effective batch
    assert a["train"][0]["paths"] != a["train"][1]["paths"]  # reshuffled each epoch
    assert not set(a["validation"]) & set(b["validation"])
    assert set(a["validation"]) | set(b["validation"]) == set(a["all_validation"])


def test_sharded_extraction_fills_the_cache_exactly_once(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=9, classes=("blue", "green", "red"))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "TLEARN_CACHE_DIR": str(tmp_path / "cache")}
    done = _launch(str(WORKER), "extract", str(data), str(out), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _ranks(out)
    every = {str(p) for p in data.rglob("*.png")}
    assert not set(a["extracted"]) & set(b["extracted"]), "no image was extracted twice"
    assert set(a["extracted"]) | set(b["extracted"]) == every
    assert a["rows"] == b["rows"] == a["cached_after"] == len(every)  # then both read all of it from the cache
    assert a["checksum"] == pytest.approx(b["checksum"])
    assert len(list((tmp_path / "cache" / "features").rglob("*.npy"))) == len(every)


def test_the_feature_cache_takes_concurrent_writers_of_the_same_entries(tmp_path: Path) -> None:
    done = _launch(str(WORKER), "race", str(tmp_path), str(tmp_path), env=dict(os.environ), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(r["intact"] for r in _ranks(tmp_path))
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and ".tmp" in p.name]  # no leftovers


def test_processes_with_uneven_batches_finish_the_epoch_together(tmp_path: Path) -> None:
    done = _launch(str(WORKER), "uneven", str(tmp_path), str(tmp_path), env=dict(os.environ), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _ranks(tmp_path)
    assert a["loss"] == pytest.approx(b["loss"]) and a["weight"] == pytest.approx(b["weight"])  # in sync


def _train(data: Path, out: Path, *extra: str, devices: int = 2) -> list[str]:
    return [sys.executable, "-m", "tlearn", "train", str(data), *TINY_FLAGS, "--batch-size", "8", "--out", str(out),
            "--devices", str(devices), *extra]


def test_devices_2_writes_one_run_like_one_process(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=16, classes=("blue", "green", "red"))
    env = {**os.environ, "TLEARN_CACHE_DIR": str(tmp_path / "cache")}
    flags = ["--mode", "finetune", "--epochs", "2", "--head-epochs", "3", "--lr", "0.01"]
    one = subprocess.run(_train(data, tmp_path / "runs" / "one", *flags, devices=1), env=env, capture_output=True,
                         text=True, timeout=600)
    two = subprocess.run(_train(data, tmp_path / "runs" / "two", *flags), env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "training on 2 CPU processes (gloo)" in two.stderr and two.stdout.count("run written to") == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one", "two"]  # no stray folders
    assert sorted(p.name for p in (tmp_path / "runs" / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "runs" / "one").iterdir())
    h1 = (tmp_path / "runs" / "one" / "history.csv").read_text().splitlines()
    h2 = (tmp_path / "runs" / "two" / "history.csv").read_text().splitlines()
    assert len(h1) == len(h2) and h1[:4] == h2[:4]  # the head stage on cached features is the same computation
    m1 = json.loads((tmp_path / "runs" / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())
    assert abs(m1["validation"]["loss"] - m2["validation"]["loss"]) < 0.1


def test_devices_refuses_mode_auto_before_starting_processes(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=4)
    done = subprocess.run(_train(data, tmp_path / "run"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "choose --mode" in done.stderr and not (tmp_path / "run").exists()


def test_a_killed_process_fails_the_run_cleanly_and_resume_continues(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=24, classes=("blue", "green", "red"))
    env = {**os.environ, "TLEARN_CACHE_DIR": str(tmp_path / "cache")}
    flags = ["--mode", "scratch", "--model", "small-cnn", "--epochs", "8", "--patience", "100"]
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(data, out, *flags), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = out / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "an epoch finished"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(sorted(workers, key=int)[-1]), signal.SIGKILL)  # the second process
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("tlearn train: error: training process") and "SIGKILL" in last and "--resume" in last
    assert "Traceback" not in err
    assert checkpoint.exists() and not (out / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:  # each process's own random state, for --resume
        assert {"rng.torch.rank0", "rng.torch.rank1", "rng.generator.rank1"} <= set(f.keys())
    resumed = subprocess.run(_train(data, tmp_path / "ignored", *flags, "--resume", str(out)), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and (out / "model.safetensors").exists() and not checkpoint.exists()
    assert len((out / "history.csv").read_text().splitlines()) == 1 + 8  # header + every epoch, once


@pytest.mark.slow
@needs(HYMENOPTERA)
def test_finetune_on_real_photos_with_2_processes_matches_one(tmp_path: Path) -> None:
    """The acceptance check: a real fine-tuning run on 2 processes reaches the single-process accuracy."""
    import shutil

    data = tmp_path / "ants_bees"
    for split in ("train", "val"):
        for c in ("ants", "bees"):
            (data / split / c).mkdir(parents=True)
            for f in sorted((HYMENOPTERA / split / c).glob("*.jpg"))[:30]:
                shutil.copy(f, data / split / c / f.name)
    env = {**os.environ, "TLEARN_CACHE_DIR": str(tmp_path / "cache")}
    flags = ["--mode", "finetune", "--epochs", "2", "--unfreeze", "1", "--batch-size", "16", "--workers", "0"]
    results = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "tlearn", "train", str(data), *flags, "--out", str(tmp_path / f"run{n}"),
               "--devices", str(n)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        results[n] = json.loads((tmp_path / f"run{n}" / "metrics.json").read_text())["validation"]
    assert results[1]["accuracy"] > 0.8
    assert abs(results[1]["accuracy"] - results[2]["accuracy"]) <= 0.1  # within noise on 60 photos
