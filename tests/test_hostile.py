"""Hostile inputs (issue: no hang, no traceback, no lost file, nothing injected).

- The hostile corpus (``tests/hostile_corpus.py``): every case through the real CLI, in a child process with
  time and memory limits (slow: a child process per case).
- A fuzz test of the one validated reading of a run folder: mutated configs and headers end in a loaded model or
  a TlearnError, quickly and within bounded memory.
- A property-based test of the CLI across the flag space: exit 0, or exit 2 and one line; never a traceback.
- The run folder's own rules: claims, staged writes put back after a kill, the CSV and terminal helpers.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import hostile_corpus as corpus
from tests.conftest import TINY, make_folder
from tlearn import cli
from tlearn.api import ImageClassifier
from tlearn.artifact import MODEL_FILE, NOVELTY_TENSOR, read_run
from tlearn.config import TlearnError
from tlearn.fileio import UMASK, atomic_write_csv, read_csv_rows, safe_name
from tlearn.predictor import Predictor
from tlearn.report import printable
from tlearn.run import claim_out, staged

CASES = corpus.cases()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> corpus.World:
    return corpus.build_world(tmp_path_factory.mktemp("hostile"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}: {c.name}" for c in CASES])
def test_the_hostile_corpus(world: corpus.World, case: corpus.Case) -> None:
    problem = corpus.run_case(world, case)
    assert problem is None, problem


def test_the_corpus_covers_every_kind_the_issue_names() -> None:
    kinds = {c.kind for c in CASES}
    assert kinds == {"hang", "traceback", "silently-wrong", "lost-data", "injection", "small", "beyond"}
    assert len(CASES) >= 50 and len({c.name for c in CASES}) == len(CASES)


# --- one validated reading of a run folder ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    os.environ["TLEARN_CACHE_DIR"] = str(root / "cache")
    clf = ImageClassifier(**TINY, mode="features", head="dense", hidden=8, verbose=False, workers=0, epochs=3)
    clf.fit(make_folder(root / "photos", per_class=6), out=root / "run")
    return root / "run"


def _mutate(config: dict, path: list, value: object) -> dict:
    """``config`` with the value at ``path`` (keys and indices, as far as they go) replaced by ``value``."""
    node = config
    for key in path[:-1]:
        nxt = node.get(key) if isinstance(node, dict) else node[key % len(node)] if node and isinstance(key, int) \
            else None  # a name does not index a list: the path ends there
        if not isinstance(nxt, dict | list):
            break
        node = nxt
    if isinstance(node, dict):
        node[path[-1] if isinstance(path[-1], str) else next(iter(node), "x")] = value
    elif node:
        node[path[-1] % len(node) if isinstance(path[-1], int) else 0] = value
    return config


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
keys = st.sampled_from(["model", "classes", "kind", "arch", "preprocessing", "input_size", "mean", "std",
                        "crop_pct", "interpolation", "num_features", "hidden", "dropout", "temperature", "views",
                        "bases", "identity", "backbone", "train", "lr", "decision", "data_summary", "counts",
                        "format_version", "params", "augment", "data"])


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=st.lists(keys | st.integers(0, 5), min_size=1, max_size=4), value=json_values,
       dtype=st.sampled_from([None, np.float16, np.float64, np.int64]), drop=st.booleans())
def test_a_mutated_run_loads_or_is_one_clear_error(trained_run: Path, tmp_path_factory: pytest.TempPathFactory,
                                                   path: list, value: object, dtype: type | None,
                                                   drop: bool) -> None:
    from safetensors.numpy import load_file, save_file

    folder = tmp_path_factory.mktemp("mutant")
    shutil.copytree(trained_run, folder, dirs_exist_ok=True)
    config = _mutate(json.loads((trained_run / "config.json").read_text()), path, value)
    tensors = load_file(str(trained_run / MODEL_FILE))
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    if drop:
        tensors.pop(sorted(tensors)[-1])
    text = json.dumps(config, allow_nan=True)
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "tlearn-model", "config": text})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Predictor.load(folder, verbose=False, workers=0)
        ImageClassifier.load(folder, verbose=False, workers=0)
    except TlearnError as e:
        assert str(e) and "\n" not in str(e).strip()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KB: under 1 GB more


def test_the_run_reading_checks_every_tensor_before_anything_is_allocated(trained_run: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    run = read_run(trained_run)
    assert run.spec.hidden == 8 and set(run.header) == {"1.weight", "1.bias", "4.weight", "4.bias", NOVELTY_TENSOR}
    folder = tmp_path / "wide"
    shutil.copytree(trained_run, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["classes"] = [f"c{i}" for i in range(90_000)]  # in range, but not what the tensors hold
    save_file(load_file(str(folder / MODEL_FILE)), str(folder / MODEL_FILE),
              metadata={"format": "tlearn-model", "config": json.dumps(config)})
    with pytest.raises(TlearnError, match=r"tensor 4\.weight has shape \(2, 8\) but the config .* needs \(90000, 8\)"):
        read_run(folder)


# --- the CLI across the flag space ------------------------------------------------------------------------


HOSTILE_VALUES = ["nan", "inf", "-inf", "-1", "0", "1e308", "²", "١", "abc", "", "1,inf", " 3", "0x10", "1e-30",
                  "999999999999", "cuda:abc", "all", "\x1b[31m", "../x", "0.5,nan"]
FLAGS = [a.option_strings[0] for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions
         if a.option_strings and a.option_strings[0].startswith("--") and a.nargs is None
         and a.option_strings[0] not in ("--help", "--out", "--resume", "--cache-dir", "--split-manifest",
                                          "--weights", "--backbone", "--time-budget", "--tensorboard", "--device")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.tuples(st.sampled_from(FLAGS), st.sampled_from(HOSTILE_VALUES)), min_size=1, max_size=3))
def test_the_cli_across_the_flag_space_ends_in_exit_0_or_one_line_and_exit_2(
        tmp_path_factory: pytest.TempPathFactory, flags: list[tuple[str, str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path_factory.mktemp("flags")
    data = make_folder(root / "photos", per_class=6)
    argv = ["train", str(data), "--backbone", "test_efficientnet", "--no-pretrained", "--mode", "features",
            "--out", str(root / "run"), "--time-budget", "20s", "--workers", "0"]
    for flag, value in flags:
        argv += [f"{flag}={value}"]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusal: a usage line and one error line
        rc = e.code
    err = capsys.readouterr().err
    assert rc in (0, 2), (argv, err)
    assert "Traceback" not in err
    if rc == 2:  # one error line, followed only by the list of problems when there are several
        lines = err.strip().splitlines()
        at = [i for i, line in enumerate(lines) if line.startswith("tlearn train: error:")]
        assert len(at) == 1 and all(line.startswith("  - ") for line in lines[at[0] + 1:]), err


# --- the run folder ---------------------------------------------------------------------------------------


def test_out_is_claimed_before_any_work(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("mine")
    with pytest.raises(TlearnError, match="is not an earlier tlearn run"):
        claim_out(mine, data)
    assert claim_out(mine, data, overwrite=True) == mine
    with pytest.raises(TlearnError, match="inside the data folder"):
        claim_out(data / "blue" / "run", data)
    with pytest.raises(TlearnError, match="holds the data folder"):
        claim_out(tmp_path, data)
    assert claim_out(tmp_path / "new", data) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert claim_out(tmp_path / "empty", data) == tmp_path / "empty"


def test_a_staged_write_is_all_or_nothing_and_a_killed_one_is_put_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "split.csv").write_text("path,class,split\n")  # an earlier run
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError), staged(out) as stage:
        (stage / "model.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "split.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with staged(out) as stage:
        (stage / "model.safetensors").write_text("whole")
        (stage / "config.json").write_text('{"format": "tlearn-model"}')
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]  # split went
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~UMASK)
    # killed between its two renames: the old run stands aside under a dead process's id, and is put back
    os.rename(out, tmp_path / ".run.tlearn-old-999999999-x")
    claim_out(out)
    assert (out / "model.safetensors").read_text() == "whole" and (out / "notes.txt").is_file()


def test_csv_cells_cannot_start_formulas_and_round_trip(tmp_path: Path) -> None:
    cells = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "'quoted", "-0.5", "plain"]
    atomic_write_csv(tmp_path / "a.csv", ["cell"], [[c] for c in cells])
    with open(tmp_path / "a.csv", newline="") as f:
        written = [row[0] for row in csv.reader(f)][1:]
    assert all(not c.startswith(("=", "+", "@", "\t", "\r")) for c in written)
    assert written[cells.index("-0.5")] == "-0.5" and written[cells.index("-2+3")] == "'-2+3"
    assert [r["cell"] for r in read_csv_rows(tmp_path / "a.csv")] == cells


def test_printable_escapes_every_control_character() -> None:
    assert printable("a\x1b]0;x\x07b\nc\u202ed") == "a\\x1b]0;x\\x07b\\nc\\u202ed"
    assert printable("line\n", keep="\n") == "line\n"
    buf = io.StringIO()
    from tlearn.report import EscapingStream

    EscapingStream(buf).write("red \x1b[31m\n")
    assert buf.getvalue() == "red \\x1b[31m\n"


def test_names_become_one_safe_path_component() -> None:
    assert safe_name("../../../escaped-features") == "escaped-features"
    assert safe_name("efficientnet_lite0-features") == "efficientnet_lite0-features"
    assert "/" not in safe_name("a/b\\c\x00d") and not safe_name("..x").startswith(".")
    with pytest.raises(TlearnError):
        safe_name("../..")


def test_a_bug_is_one_line_and_exit_70_and_a_closed_pipe_is_quiet(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> None:
        raise ValueError("something tlearn did not expect")

    monkeypatch.delenv("TLEARN_DEBUG")
    monkeypatch.setattr("tlearn.backbones.describe", broken)
    assert cli.main(["backbones"]) == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: ValueError: something tlearn did not expect" in err[0]
    import subprocess
    import sys

    piped = subprocess.run(f"{sys.executable} -m tlearn.cli backbones | head -c 5", shell=True, capture_output=True,
                           env={k: v for k, v in os.environ.items() if k != "TLEARN_DEBUG"})
    assert piped.stderr == b"" and len(piped.stdout) == 5
