"""`tlearn export`: the whole classifier in one ONNX graph whose probabilities are PyTorch's, a sidecar that is
enough to use it without tlearn, and `tlearn predict` on the exported file giving the run's answers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests.conftest import HYMENOPTERA, TINY, make_folder, needs
from tlearn import ImageClassifier, TlearnError
from tlearn.cli import main
from tlearn.export import AGREEMENT_GOAL, PARITY_LIMIT, export
from tlearn.graph import sidecar_path
from tlearn.predictor import Predictor

FAST = {"verbose": False, "workers": 0, "batch_size": 8}
KINDS = {"head": {**TINY, "mode": "features", "head": "dense"},
         "finetuned": {**TINY, "mode": "finetune", "epochs": 1, "head_epochs": 1, "lr": 0.01},
         "scratch": {"mode": "scratch", "model": "small-cnn", "epochs": 1}}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("export") / "photos", per_class=10, classes=("blue", "green", "red"))


@pytest.fixture(scope="module")
def runs(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind, options in KINDS.items():
        folder = tmp_path_factory.mktemp(kind)
        ImageClassifier(**options, **FAST, cache_dir=str(folder / "cache")).fit(photos, out=folder / "run")
        out[kind] = folder / "run"
    return out


def _probabilities(results: list[dict], classes: list[str]) -> np.ndarray:
    rows = []
    for r in results:
        p = {x["class"]: x["probability"] for x in r["predictions"]}
        rows.append([p[c] for c in classes])
    return np.array(rows)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_export_gives_the_runs_probabilities_for_every_kind_of_run(kind: str, runs: dict[str, Path],
                                                                         photos: Path, tmp_path: Path) -> None:
    run = runs[kind]
    result = export(run, tmp_path / "model.onnx", cache_dir=str(run.parent / "cache"))
    assert result.parity < PARITY_LIMIT and result.real_images and result.parity_images > 0
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["format"] == "tlearn-onnx" and card["precision"] == "fp32" and card["source"]["kind"] == kind
    assert card["checks"]["parity"]["max_abs_probability_difference"] < PARITY_LIMIT
    assert set(card["checks"]["accuracy"]) == {"fp32"} and card["checks"]["measured_on"]["split"] == "test"

    images = [photos / "red", photos / "blue" / "blue_000.png"]
    clf = ImageClassifier.load(run, verbose=False, cache_dir=str(run.parent / "cache"), precision="fp32")
    expected = clf.predict(images, top_k=3)
    got = Predictor.load(tmp_path / "model.onnx").predict(images, top_k=3)
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    np.testing.assert_allclose(_probabilities(got, clf.classes), _probabilities(expected, clf.classes), atol=1e-4)


def test_the_sidecar_is_enough_to_run_the_graph_without_tlearn(runs: dict[str, Path], photos: Path,
                                                                tmp_path: Path) -> None:
    """Preprocess as the sidecar says, with torchvision, and run the graph in plain ONNX Runtime."""
    from torchvision import transforms

    run = runs["head"]
    export(run, tmp_path / "m.onnx", cache_dir=str(run.parent / "cache"))
    card = json.loads((tmp_path / "m.json").read_text())
    (spec,) = card["inputs"]
    pp = spec["preprocessing"]
    _, h, w = pp["input_size"]
    steps = transforms.Compose([
        transforms.Resize(int(h / pp["crop_pct"]), interpolation=getattr(transforms.InterpolationMode,
                                                                         pp["interpolation"].upper())),
        transforms.CenterCrop((h, w)), transforms.ToTensor(), transforms.Normalize(pp["mean"], pp["std"])])
    path = photos / "green" / "green_003.png"
    x = steps(Image.open(path).convert("RGB")).unsqueeze(0).numpy()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits, proba = session.run(["logits", "probabilities"], {spec["name"]: x})
    assert proba.shape == (1, len(card["classes"])) and np.isclose(proba.sum(), 1, atol=1e-5)
    ours = Predictor.load(tmp_path / "m.onnx").predict([path], top_k=1)[0]["predictions"][0]
    assert card["classes"][int(proba.argmax())] == ours["class"] == "green"
    assert abs(float(proba.max()) - ours["probability"]) < 0.02  # resizing libraries differ by a few 1/255
    exp = np.exp(logits / card["temperature"])
    np.testing.assert_allclose(proba, exp / exp.sum(1, keepdims=True), atol=1e-6)


def test_the_graph_has_a_dynamic_batch_axis(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["finetuned"]
    export(run, tmp_path / "m.onnx", cache_dir=str(run.parent / "cache"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (spec,) = json.loads((tmp_path / "m.json").read_text())["inputs"]
    for batch in (1, 5):
        x = np.random.default_rng(batch).normal(size=(batch, *spec["shape"][1:])).astype(np.float32)
        assert session.run(["probabilities"], {"image": x})[0].shape == (batch, 3)


def test_int8_is_measured_against_fp32_and_never_the_default(runs: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    run = runs["head"]
    assert main(["export", str(run), "--out", str(tmp_path / "q.onnx"), "--int8",
                 "--cache-dir", str(run.parent / "cache")]) == 0
    out = capsys.readouterr().out
    assert "fp32: accuracy" in out and "int8: accuracy" in out and "top-1 agrees with fp32" in out
    card = json.loads((tmp_path / "q.json").read_text())
    assert card["precision"] == "int8" and set(card["checks"]["accuracy"]) == {"fp32", "int8"}
    assert 0 <= card["checks"]["int8_top1_agreement"] <= 1
    assert logging.getLogger("tlearn").isEnabledFor(logging.INFO)  # the quantizer's silence ends with it
    assert main(["export", str(run), "--out", str(tmp_path / "plain.onnx"),
                 "--cache-dir", str(run.parent / "cache")]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["precision"] == "fp32"  # the default


def test_export_never_replaces_a_file_it_did_not_write(runs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    run = runs["scratch"]
    mine = tmp_path / "model.onnx"
    mine.write_bytes(b"the user's own model")
    assert main(["export", str(run), "--out", str(mine)]) == 2
    assert "not a tlearn export" in capsys.readouterr().err and mine.read_bytes() == b"the user's own model"
    (tmp_path / "notes.onnx").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "notes.txt")]) == 2  # not .onnx
    assert main(["export", str(run), "--out", str(mine), "--overwrite"]) == 0
    assert main(["export", str(run), "--out", str(mine)]) == 0  # an earlier export is replaced without asking
    assert json.loads(sidecar_path(mine).read_text())["format"] == "tlearn-onnx"


def test_a_damaged_or_mismatched_sidecar_is_one_clear_error(runs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    run = runs["head"]
    export(run, tmp_path / "m.onnx", cache_dir=str(run.parent / "cache"))
    card = json.loads((tmp_path / "m.json").read_text())
    image = str(run.parent / "x.png")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    cases = {"missing": None, "not json": "{", "other format": json.dumps({**card, "format": "x"}),
             "classes": json.dumps({**card, "classes": ["a"]}),
             "temperature": json.dumps({**card, "temperature": -1}),
             "inputs": json.dumps({**card, "inputs": [{**card["inputs"][0], "name": "pixels"}]}),
             "preprocessing": json.dumps({**card, "inputs": [{**card["inputs"][0], "preprocessing": {"mean": 1}}]})}
    for case, text in cases.items():
        target = tmp_path / case.replace(" ", "_") / "m.onnx"
        target.parent.mkdir()
        shutil.copy(tmp_path / "m.onnx", target)
        if text is not None:
            sidecar_path(target).write_text(text)
        assert main(["predict", str(target), image]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "m.json" in err[0], (case, err)
    with pytest.raises(TlearnError, match="needs the run folder"):
        Predictor.load(tmp_path / "m.onnx").predict([image], tta=True)


@pytest.mark.slow
@needs(HYMENOPTERA)
def test_a_real_run_exports_with_fp32_parity_and_int8_agreement(tmp_path: Path) -> None:
    """The acceptance check on real photos and real weights: fp32 within 1e-4 of PyTorch, and int8's top-1 the
    fp32 graph's on at least 99.5 % of a real validation set."""
    data = tmp_path / "ants_bees"
    for split in ("train", "val"):
        for c in ("ants", "bees"):
            files = sorted((HYMENOPTERA / split / c).glob("*.jpg"))[:40]
            (data / split / c).mkdir(parents=True)
            for f in files:
                shutil.copy(f, data / split / c / f.name)
    ImageClassifier(mode="features", head="logreg", verbose=False).fit(data, out=tmp_path / "run")
    fp32 = export(tmp_path / "run", tmp_path / "fp32.onnx")
    assert fp32.parity < PARITY_LIMIT and fp32.parity_images == 64 and fp32.evaluated == 80
    int8 = export(tmp_path / "run", tmp_path / "int8.onnx", int8=True)
    assert int8.agreement is not None and int8.agreement >= AGREEMENT_GOAL, int8
    assert int8.speed["int8"] > 0 and int8.accuracy["fp32"] == fp32.accuracy["fp32"]
