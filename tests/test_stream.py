"""`tlearn predict RUN INPUTS --out FILE`: rows streamed in input order in CSV, JSON Lines and Parquet, equal to
the printed predictions; resuming a killed run (a torn last line, the parts of a killed group of processes);
`--from-list`; and what predict and check may write where."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_folder, tiny_run
from tlearn.cli import main
from tlearn.config import TlearnError
from tlearn.predictor import Predictor
from tlearn.stream import columns, predict_to_file


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("stream")
    model, data = tiny_run(tmp, per_class=12)
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return model, data


@pytest.fixture(scope="module")
def predictor(run: tuple[Path, Path]) -> Predictor:
    return Predictor.load(run[0], verbose=False)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_csv_has_a_header_and_a_row_an_image_in_input_order_equal_to_predict(run: tuple[Path, Path],
                                                                                  predictor: Predictor,
                                                                                  tmp_path: Path) -> None:
    data = run[1]
    paths = sorted(data.rglob("*.*"), reverse=True)  # an order of its own, not the folders'
    written = predict_to_file(predictor, paths, tmp_path / "p.csv", top_k=2, progress=False)
    assert (written.predicted, written.skipped) == (len(paths) - 1, 1)
    text = (tmp_path / "p.csv").read_bytes().decode()
    assert text.splitlines()[0] == ",".join(columns(2, False, True)) and text.endswith("\r\n")
    rows = _csv(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    expected = predictor.predict(paths, top_k=2)
    for row, want in zip(rows, expected, strict=True):
        if "error" in want:
            assert row["status"] == "skipped" and row["reason"] == want["error"] and row["class_1"] == ""
            continue
        assert row["status"] == "ok" and row["reason"] == ""
        assert [row["class_1"], row["class_2"]] == [p["class"] for p in want["predictions"]]
        assert len(row["probability_1"].split(".")[1]) == 6
        assert float(row["probability_1"]) == pytest.approx(want["predictions"][0]["probability"], abs=1e-6)
        assert row["unknown"] == str(want["unknown"]).lower()
        assert float(row["novelty"]) == pytest.approx(want["novelty"], abs=1e-4)


def test_jsonl_and_parquet_hold_the_same_rows_as_the_csv(run: tuple[Path, Path], predictor: Predictor,
                                                         tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install pyarrow)")
    paths = sorted(run[1].rglob("*.*"))
    for name in ("p.csv", "p.jsonl", "p.parquet"):
        predict_to_file(predictor, paths, tmp_path / name, top_k=2, progress=False)
    rows = _csv(tmp_path / "p.csv")
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert not (tmp_path / "p.parquet.partial.jsonl").exists()
    assert lines == table and len(lines) == len(rows)
    for row, line in zip(rows, lines, strict=True):
        assert row["path"] == line["path"] and row["class_1"] == (line["class_1"] or "")
        assert float(row["probability_2"] or 0) == pytest.approx(line["probability_2"] or 0, abs=1e-6)


@pytest.mark.parametrize("name", ["p.csv", "p.jsonl", "p.parquet"])
def test_a_killed_run_resumed_equals_an_uninterrupted_one(run: tuple[Path, Path], predictor: Predictor,
                                                          tmp_path: Path, name: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    if name.endswith("parquet"):
        pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    paths = sorted(run[1].rglob("*.*"))
    whole = tmp_path / "whole" / name
    whole.parent.mkdir()
    predict_to_file(predictor, paths, whole, top_k=2, progress=False)
    out = tmp_path / name
    shutil.copy(whole, out)
    growing = out.with_name(out.name + ".partial.jsonl") if name.endswith("parquet") else out
    if name.endswith("parquet"):  # killed before the end: its rows so far are in the JSON Lines file beside it
        predict_to_file(predictor, paths, out.with_suffix(".jsonl"), top_k=2, progress=False)
        out.unlink()
        out.with_suffix(".jsonl").rename(growing)
    lines = growing.read_bytes().splitlines(keepends=True)
    growing.write_bytes(b"".join(lines[:len(lines) // 2]) + lines[len(lines) // 2][:17])  # half, and a torn row
    with caplog.at_level("INFO", logger="tlearn"):
        written = predict_to_file(predictor, paths, out, top_k=2, resume=True, progress=False)
    done = len(lines) // 2 - (1 if name.endswith("csv") else 0)  # the CSV's first line is its header
    assert written.resumed == done and written.predicted + written.skipped == len(paths) - done
    assert f"{done:,} of {len(paths):,} images are already in it" in caplog.text
    assert out.read_bytes() == whole.read_bytes()
    again = predict_to_file(predictor, paths, out, top_k=2, resume=True, progress=False)
    assert again.predicted == 0 and out.read_bytes() == whole.read_bytes()
    with pytest.raises(TlearnError, match="other columns"):
        predict_to_file(predictor, paths, out, top_k=1, resume=True, progress=False)


def test_the_parts_of_a_killed_group_of_processes_are_merged_on_resume(run: tuple[Path, Path], predictor: Predictor,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    paths = sorted(run[1].rglob("*.*"))
    whole = tmp_path / "whole.csv"
    predict_to_file(predictor, paths, whole, top_k=2, progress=False)
    out = tmp_path / "p.csv"
    monkeypatch.setenv("RANK", "1")  # process 2 of 3 finished its share; the others were killed
    monkeypatch.setenv("WORLD_SIZE", "3")
    predict_to_file(predictor, paths, out, top_k=2, progress=False)
    assert not out.exists() and (tmp_path / "p.csv.part-1-of-3.jsonl").is_file()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    written = predict_to_file(predictor, paths, out, top_k=2, resume=True, progress=False)
    assert written.resumed == len(paths[1::3])
    assert out.read_bytes() == whole.read_bytes()  # in input order, though a third came from the old part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "whole.csv"]  # the parts are gone


def test_predict_out_from_a_list_with_a_chart_and_what_it_refuses(run: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    model, data = run
    listing = tmp_path / "lists" / "paths.txt"
    listing.parent.mkdir()
    listing.write_text(f"# blue first\n{data / 'blue' / 'blue_001.png'}\n\n../missing.png\n")
    out, chart = tmp_path / "p.csv", tmp_path / "chart.png"
    assert main(["predict", str(model), str(data / "red"), "--from-list", str(listing), "--out", str(out),
                 "--plot", str(chart)]) == 0
    err = capsys.readouterr().err
    assert f"written to {out}" in err and "skipped" in err and chart.is_file()
    rows = _csv(out)
    red = sorted((data / "red").iterdir())
    assert [r["path"] for r in rows] == [*map(str, red), str(data / "blue" / "blue_001.png"),
                                         str(tmp_path / "lists" / ".." / "missing.png")]
    assert rows[-1]["status"] == "skipped" and "no such file" in rows[-1]["reason"].lower()
    assert main(["predict", str(model), str(data), "--out", str(out)]) == 0  # replaces its own file
    capsys.readouterr()
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,notes\n")
    refusals = [
        (["--out", str(data / "blue" / "p.csv")], "inside the data folder"),
        (["--plot", str(data / "chart.png")], "inside the data folder"),
        (["--out", str(notes)], "was not written by tlearn"),
        (["--out", str(tmp_path / "p.txt")], ".csv, .jsonl or .parquet"),
        (["--resume"], "goes with --out"),
        (["--out", str(tmp_path / "p2.csv"), "--from-list", str(tmp_path / "none.txt")], "cannot read it"),
    ]
    for extra, words in refusals:
        assert main(["predict", str(model), str(data), *extra]) == 2, extra
        assert words in capsys.readouterr().err, extra
    assert notes.read_text() == "my,own,notes\n"  # never replaced without --overwrite
    assert main(["predict", str(model), str(data), "--out", str(notes), "--overwrite"]) == 0
    assert notes.read_text().startswith("path,status")
    foreign = tmp_path / "photo.png"
    foreign.write_bytes(chart.read_bytes()[:8] + b"not ours")
    assert main(["predict", str(model), str(data), "--plot", str(foreign)]) == 2
    assert "was not written by tlearn" in capsys.readouterr().err


def test_check_fix_report_is_refused_inside_the_data_and_over_a_file_not_its_own(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture
                                                                                 ) -> None:
    data = make_folder(tmp_path / "photos", per_class=3)
    assert main(["check", str(data), "--fix-report", str(data / "fix.csv")]) == 2
    assert "inside the data folder" in capsys.readouterr().err
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\n")
    assert main(["check", str(data), "--fix-report", str(notes)]) == 2
    assert "was not written by tlearn" in capsys.readouterr().err and notes.read_text() == "my,own\n"
    report = tmp_path / "fix.csv"
    assert main(["check", str(data), "--fix-report", str(report)]) in (0, 2)
    assert report.read_text().startswith("path,reason")
    assert main(["check", str(data), "--fix-report", str(report)]) in (0, 2)  # its own: replaced
    assert main(["check", str(data), "--fix-report", str(notes), "--overwrite"]) in (0, 2)
    assert notes.read_text().startswith("path,reason")


@pytest.mark.slow
def test_devices_two_writes_the_same_file_as_one_process(run: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = run
    for n in ("1", "2"):
        subprocess.run([sys.executable, "-m", "tlearn", "predict", str(model), str(data), "--out",
                        str(tmp_path / f"p{n}.csv"), "--devices", n], check=True, capture_output=True, timeout=300)
    assert (tmp_path / "p1.csv").read_bytes() == (tmp_path / "p2.csv").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if ".part-" in p.name]  # merged, and the parts removed
