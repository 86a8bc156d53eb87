"""Label files as input (labelfile.py): CSV, TSV and JSON Lines read into the same samples and split as class
folders, paths resolved and refused, bad rows named, and every verb that takes a data folder taking a file."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import HYMENOPTERA, SHARED, TINY, make_folder, needs
from tests.test_cli import TINY_FLAGS, cli
from tlearn import ImageClassifier, TlearnError
from tlearn.check import check
from tlearn.config import DataConfig
from tlearn.data import materialise_split, scan, scan_labelled, write_manifest
from tlearn.images import load_image
from tlearn.labelfile import read
from tlearn.labels import given_as
from tlearn.predictor import Predictor
from tlearn.serve.app import create_app


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def as_csv(folder: Path, name: str = "labels.csv", header: tuple[str, str] = ("filename", "class")) -> Path:
    """The class folders of ``folder`` as a label file beside them (paths relative to ``folder``)."""
    rows = [[p.relative_to(folder).as_posix(), p.parent.name] for p in sorted(folder.glob("*/*.png"))]
    return write_csv(folder / name, list(header), rows)


def triples(data) -> list[tuple[str, str, str]]:
    return sorted((str(s.path), data.classes[s.label], s.split) for s in data.samples)


def test_a_csv_of_the_class_folders_gives_the_same_split_for_every_seed(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "photos", per_class=14)
    file = as_csv(folder)
    for seed in (0, 1, 7):
        by_folder = scan(DataConfig(path=str(folder), seed=seed))
        by_file = scan(DataConfig(path=str(file), seed=seed))
        assert triples(by_file) == triples(by_folder) and by_file.classes == by_folder.classes
        assert by_file.layout == "label file labels.csv"
        assert (given_as(by_file), given_as(by_folder)) == ("labelled", "in folder")  # as mislabels are said
    assert triples(scan(DataConfig(path=str(file), seed=0))) != triples(scan(DataConfig(path=str(file), seed=1)))


def test_tsv_and_json_lines_with_other_column_names_and_kaggle_ids(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "photos", per_class=8)
    flat = tmp_path / "images"
    flat.mkdir()
    rows = []
    for i, p in enumerate(sorted(folder.glob("*/*.png"))):
        (flat / f"{i:04d}.png").write_bytes(p.read_bytes())
        rows.append({"id": f"{i:04d}", "tags": p.parent.name})
    tsv = write_csv(tmp_path / "train.tsv", ["id", "tags"], [[r["id"], r["tags"]] for r in rows], "\t")
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"image": r["id"], "class": r["tags"], "note": 1}) + "\n" for r in rows))
    a = scan(DataConfig(label_file=str(tsv), images=str(flat)))
    b = scan(DataConfig(path=str(jsonl), images=str(flat)))
    assert triples(a) == triples(b) and len(a.samples) == 16 and a.samples[0].path.suffix == ".png"
    named = write_csv(tmp_path / "named.csv", ["f", "y"], [[r["id"], r["tags"]] for r in rows])
    with pytest.raises(TlearnError, match=r"has no path column .*its columns are f, y\); name it with --path-column"):
        scan(DataConfig(path=str(named), images=str(flat)))
    c = scan(DataConfig(path=str(named), images=str(flat), path_column="f", label_column="y"))
    assert triples(c) == triples(a)
    with pytest.raises(TlearnError, match="--label-column 'z' is not a column of"):
        scan(DataConfig(path=str(named), images=str(flat), path_column="f", label_column="z"))


def test_a_split_column_is_honoured_and_validation_held_out_where_it_has_none(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "photos", per_class=10)
    paths = sorted(folder.glob("*/*.png"))
    rows = [[p.relative_to(folder).as_posix(), p.parent.name, "test" if i % 5 == 0 else "train"]
            for i, p in enumerate(paths)]
    data = scan(DataConfig(path=str(write_csv(folder / "s.csv", ["path", "label", "split"], rows))))
    tests = {str(folder / r[0]) for r in rows if r[2] == "test"}
    assert {str(s.path) for s in data.split("test")} == tests
    assert data.split("validation") and not {str(s.path) for s in data.split("validation")} & tests
    rows[1][2] = rows[11][2] = "val"  # one of each class
    data = scan(DataConfig(path=str(write_csv(folder / "v.csv", ["path", "label", "split"], rows))))
    assert [s.path.name for s in data.split("validation")] == ["blue_001.png", "red_001.png"]


def test_bad_rows_are_named_one_line_and_skipped_only_when_asked(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "photos", per_class=8)
    good = [[p.relative_to(folder).as_posix(), p.parent.name] for p in sorted(folder.glob("*/*.png"))]
    outside = tmp_path / "outside.png"
    outside.write_bytes(next(folder.glob("red/*.png")).read_bytes())
    bad = [["red/missing.png", "red"], ["../outside.png", "red"], ["blue/blue_000.png", ""],
           ["blue/blue_001.png", "bl\x07ue"], ["blue/blue_002.png", "red"]]
    file = write_csv(folder / "bad.csv", ["path", "label"], good + bad)
    assert "blue/blue_002.png has several rows with different labels" in read(DataConfig(path=str(file))).why
    table = read(DataConfig(path=str(file), multi_label=False))  # then rows that disagree are a bad row
    reasons = [p.reason for p in table.problems]
    assert [p.line for p in table.problems] == [18, 19, 20, 21, 22]
    assert "no file" in reasons[0] and "leads outside" in reasons[1] and "empty label" in reasons[2]
    assert "control characters" in reasons[3]
    assert reasons[4] == "blue/blue_002.png is given another label on line 4"  # both of its rows are left out
    assert len(table.rows) == 15 and "blue_002.png" not in {r.path.name for r in table.rows}
    with pytest.raises(TlearnError) as err:
        scan(DataConfig(path=str(file), multi_label=False))
    assert str(err.value).startswith(f"{file.resolve()}, line 18: no file") and "(5 bad rows in all)" in str(err.value)
    assert "--skip-bad-rows" in str(err.value) and "\n" not in str(err.value)
    data = scan(DataConfig(path=str(file), multi_label=False, skip_bad_rows=True))
    assert len(data.samples) == 15 and sorted(s.kind for s in data.skipped) == ["bad-row"] * 5
    absolute = write_csv(folder / "abs.csv", ["path", "label"], [*good, [str(outside), "red"]])
    assert outside in {s.path for s in scan(DataConfig(path=str(absolute))).samples}  # absolute paths are allowed


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"), (b"path,label\n", "has no rows below its header"), (b"\xff\xfe,x\n", "is not UTF-8 text"),
    (b'path,label\n"a.png,red\n', "unreadable CSV"), (b"path,label\na.png\n", "1 cells where the header has 2")])
def test_a_broken_file_is_one_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    make_folder(tmp_path, per_class=2)
    (tmp_path / "f.csv").write_bytes(content)
    with pytest.raises(TlearnError, match=message):
        scan(DataConfig(path=str(tmp_path / "f.csv")))


def test_several_labels_an_image_are_detected_and_said(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "photos", per_class=4)
    paths = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("*/*.png"))]
    joined = write_csv(folder / "j.csv", ["path", "tags"], [[p, "red;blue"] for p in paths])
    table = read(DataConfig(path=str(joined)))
    assert table.multi_label and "joins several labels with ';'" in table.why
    assert table.rows[0].labels == ("blue", "red")
    repeated = write_csv(folder / "r.csv", ["path", "label"], [[paths[0], "red"], [paths[0], "blue"]]
                         + [[p, "red"] for p in paths[1:]])
    table = read(DataConfig(path=str(repeated)))
    assert table.multi_label and "several rows with different labels (lines 2 and 3)" in table.why
    assert table.rows[0].labels == ("blue", "red") and len(table.rows) == len(paths)
    listed = folder / "l.jsonl"
    listed.write_text("".join(json.dumps({"path": p, "labels": ["a", "b"] if i else ["a"]}) + "\n"
                              for i, p in enumerate(paths)))
    assert "gives several labels in a list" in read(DataConfig(path=str(listed))).why
    assert read(DataConfig(path=str(joined), label_delimiter="+")).multi_label is False
    assert not read(DataConfig(path=str(joined), multi_label=False)).multi_label


def tagged(root: Path, n: int = 120, seed: int = 0) -> Path:
    """``n`` images with 1 to 3 of five tags each, and one image with a sixth tag, 'rare', as a label file."""
    folder = make_folder(root, per_class=n // 2)
    rng = random.Random(seed)
    rows = [[p.relative_to(folder).as_posix(), ";".join(rng.sample(TAGS, rng.randint(1, 3)))]
            for p in sorted(folder.glob("*/*.png"))]
    rows[0][1] += ";rare"
    return write_csv(folder / "tags.csv", ["image", "tags"], rows)


TAGS = ["sky", "sea", "dog", "cat", "tree"]


def test_a_multi_label_split_keeps_each_labels_share_in_every_split(tmp_path: Path) -> None:
    file = tagged(tmp_path / "photos")
    data = scan(DataConfig(path=str(file)))
    assert data.multi_label and data.classes == sorted([*TAGS, "rare"]) and "iterative stratification" in data.layout
    assert all(s.label == -1 and s.labels == tuple(sorted(s.labels)) for s in data.samples)
    counts = data.counts()
    sizes = {split: len(data.split(split)) for split in counts}
    assert sum(sizes.values()) == 120 and abs(sizes["validation"] - 18) <= 2 and abs(sizes["test"] - 18) <= 2
    for tag in TAGS:  # each tag's share within 3 images of 70/15/15
        total = sum(counts[split][tag] for split in counts)
        assert abs(counts["validation"][tag] - 0.15 * total) <= 3 and abs(counts["test"][tag] - 0.15 * total) <= 3
    assert counts["train"]["rare"] == 1  # the rarest label is placed first, where it is most wanted
    again = scan(DataConfig(path=str(file)))
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in data.samples]
    other = scan(DataConfig(path=str(file), seed=1))
    assert [s.split for s in other.samples] != [s.split for s in data.samples]

    manifest = tmp_path / "split.csv"
    write_manifest(data, manifest)
    back = scan(DataConfig(path=str(file), split_manifest=str(manifest)))
    assert back.multi_label and triples_multi(back) == triples_multi(data)
    written = tmp_path / "with_split.csv"
    materialise_split(DataConfig(path=str(file)), written)
    assert triples_multi(scan(DataConfig(path=str(written)))) == triples_multi(data)
    with pytest.raises(TlearnError, match="class folders cannot hold; write the split as a label file"):
        materialise_split(DataConfig(path=str(file)), tmp_path / "folders")


def triples_multi(data) -> list[tuple[str, tuple[str, ...], str]]:
    return sorted((str(s.path), tuple(data.classes[k] for k in s.targets), s.split) for s in data.samples)


def test_check_reads_a_multi_label_file(tmp_path: Path) -> None:
    file = tagged(tmp_path / "photos", n=40)
    report = check(DataConfig(path=str(file)), progress=False)
    assert report.images == 40 and "multi-label" in report.layout
    assert {f.detail for f in report.findings if f.kind == "label-split"} == {
        "label 'rare' has no image in the validation split (1 in train)",
        "label 'rare' has no image in the test split (1 in train)"}


def test_a_multi_label_file_trains_a_head_a_label_and_predicts_every_label_at_its_threshold(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = tagged(tmp_path / "photos", n=60)
    code, out, err = cli("train", file, *TINY_FLAGS, "--workers", "0", "--out", tmp_path / "run", capsys=capsys)
    assert code == 0, err
    assert "mean average precision" in out and "exact match" in out
    run = tmp_path / "run"
    assert {"pr_curves.png", "report.html", "predictions.csv", "metrics.json"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert {"mean_average_precision", "micro_f1", "macro_f1", "exact_match", "per_label"} <= set(metrics)
    assert set(metrics["per_label"]["sky"]) == {"precision", "recall", "f1", "average_precision", "support",
                                                "threshold", "temperature"}
    page = (run / "report.html").read_text()
    assert "Labels most often missed or added" in page and "Largest losses" in page and "pr_curves" in page
    assert "training images per class as the model sees them" in page  # the sample grid, by label
    assert cli("report", run, capsys=capsys)[0] == 0  # rebuilt from the run's files
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["multi_label"] and len(config["model"]["thresholds"]) == 6
    assert config["decision"]["mode"] == "features" and config["decision"]["reason"].startswith("auto: kept")
    clf = ImageClassifier.load(run, verbose=False)
    photo = next((tmp_path / "photos" / "red").glob("*.png"))
    result = clf.predict([photo], top_k=2)[0]
    thresholds = dict(zip(clf.classes, config["model"]["thresholds"], strict=True))
    assert len(result["predictions"]) == 2 and all(p["probability"] >= thresholds[p["class"]]
                                                   for p in result["labels"])
    everything = clf.predict([photo], top_k=6)[0]["predictions"]
    assert {p["class"] for p in result["labels"]} == {p["class"] for p in everything
                                                      if p["probability"] >= thresholds[p["class"]]}
    code, out, _ = cli("evaluate", run, file, "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["images"] == 60
    served = TestClient(create_app(Predictor.load(run, verbose=False))).post(
        "/predict", files={"files": ("p.png", photo.read_bytes(), "image/png")}).json()["results"][0]
    assert [p["class"] for p in served["labels"]] == [p["class"] for p in result["labels"]]
    code, _, err = cli("compare", file, "--models", "small-cnn,logreg-pixels", "--out", tmp_path / "cmp",
                       capsys=capsys)
    assert code == 2 and "logreg-pixels takes one class an image" in err and not (tmp_path / "cmp").exists()
    code, _, err = cli("check", file, "--outliers", capsys=capsys)
    assert code == 2 and "drop --outliers (--labels searches such data)" in err


def test_train_evaluate_check_split_and_export_take_a_label_file(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    folder = make_folder(tmp_path / "photos", per_class=12)
    file = as_csv(folder)
    by_folder = ImageClassifier(mode="features", verbose=False, workers=0, **TINY)
    by_folder.fit(folder, out=tmp_path / "a")
    code, out, _ = cli("train", file, *TINY_FLAGS, "--mode", "features", "--workers", "0", "--out", tmp_path / "b",
                       capsys=capsys)
    assert code == 0
    by_file = ImageClassifier.load(tmp_path / "b", verbose=False)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == by_folder.metrics  # the same run
    assert by_file.spec == by_folder.spec
    assert (tmp_path / "b" / "split.csv").read_text() == (tmp_path / "a" / "split.csv").read_text()

    code, out, _ = cli("evaluate", tmp_path / "b", file, "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["split"] == str(file)
    assert json.loads(out)["accuracy"] == by_file.evaluate(folder)["accuracy"]
    unknown = write_csv(tmp_path / "u.csv", ["path", "label"], [[str(next(folder.glob("red/*.png"))), "green"]])
    assert "label(s) 'green' in" in cli("evaluate", tmp_path / "b", unknown, capsys=capsys)[2]
    assert len(scan_labelled(unknown, ["green", "red"]).samples) == 1

    report = check(DataConfig(path=str(file)))
    assert report.images == 24 and report.layout == "label file labels.csv" and not report.blocking()
    dest = tmp_path / "split.csv"
    materialise_split(DataConfig(path=str(file)), dest)
    assert triples(scan(DataConfig(path=str(dest)))) == triples(scan(DataConfig(path=str(folder))))
    assert "(its split column)" in scan(DataConfig(path=str(dest))).layout
    code, out, _ = cli("export", tmp_path / "b", "--out", tmp_path / "m.onnx", "--data", file, capsys=capsys)
    assert code == 0 and f"on 24 images of {file}" in out


def test_no_run_is_written_beside_the_images_a_label_file_names(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    folder = make_folder(tmp_path / "photos", per_class=6)
    file = as_csv(folder, name="labels.csv")
    code, _, err = cli("train", file, *TINY_FLAGS, "--out", folder / "run", capsys=capsys)
    assert code == 2 and "is inside the data folder" in err and not (folder / "run").exists()
    code, _, err = cli("train", file, "--label-file", file, capsys=capsys)
    assert code == 2 and "give the label file once" in err


@pytest.mark.slow
@needs(HYMENOPTERA)
@pytest.mark.parametrize("name", ["hymenoptera", "oxford17_flowers"])
def test_the_shared_sets_as_label_files_give_the_folders_split(name: str, tmp_path: Path) -> None:
    """Each shared set's split folders written as a CSV with a split column, elsewhere, its paths relative to
    --images: the same samples in the same splits (Oxford-17 has no validation folder: the same images are held
    out of train)."""
    root = SHARED / name
    by_folder = scan(DataConfig(path=str(root)))
    rows = [[s.path.relative_to(root.resolve()).as_posix(), by_folder.classes[s.label],
             "train" if s.path.relative_to(root.resolve()).parts[0] == "train" else s.split]
            for s in by_folder.samples]
    file = write_csv(tmp_path / "labels.csv", ["path", "label", "split"], rows)
    by_file = scan(DataConfig(path=str(file), images=str(root)))
    assert triples(by_file) == triples(by_folder) and len(by_file.samples) == len(by_folder.samples)


def test_every_mode_trains_several_labels_an_image_and_exports_explains_and_compares_them(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """frozen and finetune on binary cross-entropy, a scratch CNN; the export's sigmoid probabilities and labels at
    the thresholds; a heatmap a label; compare ranked by mean average precision."""
    import onnxruntime as ort

    file = tagged(tmp_path / "photos", n=60)
    photos = sorted((tmp_path / "photos").glob("*/*.png"))[:4]
    for mode in ("frozen", "finetune"):
        clf = ImageClassifier(**TINY, mode=mode, epochs=2, head_epochs=2, workers=0, verbose=False)
        history = clf.fit(file, out=tmp_path / mode)
        assert history.history["val_loss"] and clf.spec.multi_label and clf.spec.kind == (
            "head" if mode == "frozen" else "finetuned")
        assert {"mean_average_precision", "micro_f1", "per_label"} <= set(clf.metrics["test"])
        results = clf.predict(photos, top_k=2)
        assert all(len(r["predictions"]) == 2 and "labels" in r and "unknown" in r for r in results)
        assert clf.novelty is not None and not clf.novelty.with_energy  # the distance alone: no softmax energy
    run = tmp_path / "finetune"
    code, out, err = cli("export", run, "--out", tmp_path / "m.onnx", capsys=capsys)
    assert code == 0 and "micro F1" in out, err
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["multi_label"] and card["thresholds"] == json.loads((run / "config.json").read_text())[
        "model"]["thresholds"] and {"labels", "novelty"} <= set(card["outputs"])
    by_run, by_graph = Predictor.load(run, verbose=False), Predictor.load(tmp_path / "m.onnx")
    ours, graphs = by_run.predict(photos, top_k=6), by_graph.predict(photos, top_k=6)
    for a, b in zip(ours, graphs, strict=True):
        assert [p["class"] for p in a["labels"]] == [p["class"] for p in b["labels"]]
        assert abs(a["novelty"] - b["novelty"]) < 0.01
        assert max(abs(x["probability"] - y["probability"]) for x, y in
                   zip(a["predictions"], b["predictions"], strict=True)) < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = by_run.prepare([load_image(photos[0])])[0]
    proba, given = session.run(["probabilities", "labels"], {"image": batch[0]})
    assert proba.shape == (1, 6) and not np.allclose(proba.sum(1), 1)  # a sigmoid a label, not a softmax
    assert given[0].tolist() == (proba[0] >= np.array(card["thresholds"])).astype(float).tolist()

    clf = ImageClassifier.load(run, verbose=False)
    sky, dog = (clf.explain(photos[:1], class_name=name)[0] for name in ("sky", "dog"))
    assert sky["class"] == "sky" and dog["class"] == "dog" and "labels" in sky
    assert sky["heatmap"].shape == dog["heatmap"].shape and not np.allclose(sky["heatmap"], dog["heatmap"])

    code, out, err = cli("compare", file, *TINY_FLAGS, "--models", "small-cnn,test_efficientnet:features",
                         "--epochs", "1", "--workers", "0", "--out", tmp_path / "cmp", capsys=capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert "mean_average_precision" in rows[0] and "ranked by it" in out
    assert [float(r["mean_average_precision"]) for r in rows] == sorted(
        (float(r["mean_average_precision"]) for r in rows), reverse=True)
    code, _, err = cli("train", file, "--mode", "scratch", "--model", "logreg-pixels", "--out", tmp_path / "px",
                       capsys=capsys)
    assert code == 2 and "logreg-pixels takes one class an image" in err and not (tmp_path / "px").exists()
