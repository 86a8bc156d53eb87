"""ImageClassifier end to end on tiny data: fit, evaluate, predict, save → load, damaged artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from tests.conftest import TINY, make_folder
from tlearn import ImageClassifier, TlearnError
from tlearn.artifact import CONFIG_FILE, MODEL_FILE

RUN_FILES = {"config.json", "model.safetensors", "metrics.json", "history.csv", "curves.png", "split.csv",
             "skipped.csv", "check.json", "predictions.csv", "report.html", "samples.png", "confusion.png",
             "top_losses.png", "correct.png", "reliability.png", "novelty.png", "outliers.csv", "outliers.png"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("api")
    data = make_folder(root / "photos", per_class=14, classes=("blue", "green", "red"))
    (data / "red" / "broken.jpg").write_text("<html>404</html>")
    clf = ImageClassifier(**TINY, cache_dir=str(root / "cache"), epochs=40, verbose=False)
    history = clf.fit(data, out=root / "run")
    return clf, history, data, root / "run"


def test_fit_writes_the_run_and_learns(trained) -> None:
    clf, history, data, run = trained
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert clf.classes == ["blue", "green", "red"]
    assert max(history.history["val_accuracy"]) == 1.0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"validation", "test"}
    assert metrics["test"]["accuracy"] == clf.evaluate()["accuracy"]
    assert {"accuracy", "loss", "per_class", "confusion_matrix"} <= set(metrics["test"])
    skipped = (run / "skipped.csv").read_text()
    assert "broken.jpg" in skipped and "not a readable image" in skipped
    manifest = (run / "split.csv").read_text().splitlines()
    assert manifest[0] == "path,class,split" and len(manifest) == 1 + 42  # the broken file is not in the split
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["model"]["classes"] == clf.classes and config["train"]["epochs"] == 40
    assert config["data"]["path"] == str(data) and config["backbone"]["backbone"] == "test_efficientnet"


def test_save_load_gives_identical_predictions(trained, tmp_path: Path) -> None:
    clf, _, data, run = trained
    images = [data / "red" / "red_000.png", data / "blue", data / "red" / "broken.jpg", tmp_path / "nope.png"]
    before = clf.predict(images, top_k=2)
    loaded = ImageClassifier.load(run, verbose=False)
    after = loaded.predict(images, top_k=2)
    assert [r["path"] for r in after] == [r["path"] for r in before]
    for a, b in zip(before, after, strict=True):
        assert a.keys() == b.keys()
        if "predictions" in a:
            assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
            np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                       [p["probability"] for p in b["predictions"]], rtol=1e-6)
    errors = {Path(r["path"]).name: r["error"] for r in after if "error" in r}
    assert set(errors) == {"broken.jpg", "nope.png"}
    assert after[0]["predictions"][0]["class"] == "red"
    assert loaded.evaluate() == clf.evaluate()


def test_evaluate_on_a_folder(trained, tmp_path: Path) -> None:
    clf, *_ = trained
    extra = make_folder(tmp_path / "more", per_class=4, classes=("green", "red"), seed=9)
    result = clf.evaluate(extra)
    assert result["n"] == 8 and result["accuracy"] >= 0.75
    assert result["per_class"]["blue"]["support"] == 0


def test_same_command_twice_gives_the_same_metrics(trained, tmp_path: Path) -> None:
    _, _, data, run = trained
    again = ImageClassifier(**TINY, epochs=40, verbose=False)
    again.fit(data, out=tmp_path / "run2")
    assert (tmp_path / "run2" / "metrics.json").read_text() == (run / "metrics.json").read_text()
    assert (tmp_path / "run2" / "history.csv").read_text() == (run / "history.csv").read_text()


def test_damaged_artifacts_give_clear_errors(trained, tmp_path: Path) -> None:
    from safetensors import safe_open

    _, _, _, run = trained

    def copy() -> Path:
        dest = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        dest.mkdir()
        for name in (MODEL_FILE, CONFIG_FILE):
            (dest / name).write_bytes((run / name).read_bytes())
        return dest

    def rewrite(d: Path, edit) -> None:
        """Save model.safetensors again with its embedded config edited."""
        with safe_open(str(d / MODEL_FILE), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        edit(config, tensors)
        save_file(tensors, d / MODEL_FILE, metadata={**meta, "config": json.dumps(config)})

    d = copy()
    (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:100])
    with pytest.raises(TlearnError, match="model.safetensors is damaged"):
        ImageClassifier.load(d)
    d = copy()
    rewrite(d, lambda config, tensors: config["model"]["classes"].append("purple"))
    with pytest.raises(TlearnError, match=r"needs \(4,"):
        ImageClassifier.load(d)
    d = copy()
    rewrite(d, lambda config, tensors: tensors.pop(next(iter(tensors))))
    with pytest.raises(TlearnError, match="missing"):
        ImageClassifier.load(d)
    d = copy()
    rewrite(d, lambda config, tensors: config.update(format="something-else"))
    with pytest.raises(TlearnError, match="not a tlearn model config"):
        ImageClassifier.load(d)
    with pytest.raises(TlearnError, match="model.safetensors is missing"):
        ImageClassifier.load(tmp_path)


def test_model_file_alone_is_a_complete_model(trained, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A save killed between the two files leaves config.json stale or broken; the model still loads, from the
    config stored inside model.safetensors, with a warning."""
    import logging

    monkeypatch.setattr(logging.getLogger("tlearn"), "propagate", True)  # the CLI's handler may have turned it off
    clf, _, data, run = trained
    (tmp_path / MODEL_FILE).write_bytes((run / MODEL_FILE).read_bytes())
    (tmp_path / CONFIG_FILE).write_text("{not json")
    loaded = ImageClassifier.load(tmp_path, verbose=False)
    assert "differs from the config saved inside model.safetensors" in caplog.text
    assert loaded.predict([data / "red" / "red_000.png"]) == clf.predict([data / "red" / "red_000.png"])
    (tmp_path / CONFIG_FILE).unlink()
    assert ImageClassifier.load(tmp_path, verbose=False).classes == clf.classes


def test_loading_with_different_backbone_weights_is_refused(trained) -> None:
    _, _, data, run = trained
    clf = ImageClassifier.load(run, verbose=False)
    assert clf.extractor.recorded == {"test_efficientnet": clf.spec.weights_id}  # checked against on first use
    clf.extractor.recorded = {"test_efficientnet": "sha256:something-else"}
    with pytest.raises(TlearnError, match="differ from the ones this model was trained with"):
        clf.predict([data / "red"])


def test_options_are_checked() -> None:
    with pytest.raises(TlearnError, match="unknown option.*epoch\\b"):
        ImageClassifier(epoch=3)
    with pytest.raises(TlearnError, match="--head must be one of auto, dense, logreg. Received: head='svm'"):
        ImageClassifier(head="svm")
    with pytest.raises(TlearnError, match="not trained yet"):
        ImageClassifier(**TINY).predict(["x.png"])


def test_logreg_head_runs_end_to_end(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=10)
    clf = ImageClassifier(**TINY, head="logreg", verbose=False)
    clf.fit(data, out=tmp_path / "run")
    loaded = ImageClassifier.load(tmp_path / "run", verbose=False)
    assert loaded.evaluate()["accuracy"] == clf.evaluate()["accuracy"] >= 0.5


def test_moved_backbone_weights_file_is_named_and_can_be_given_again(tmp_path: Path) -> None:
    import timm
    import torch

    torch.manual_seed(0)
    save_file(timm.create_model("test_efficientnet").state_dict(), tmp_path / "w.safetensors")
    data = make_folder(tmp_path / "photos", per_class=8)
    clf = ImageClassifier(backbone="test_efficientnet", weights=str(tmp_path / "w.safetensors"), verbose=False)
    clf.fit(data, out=tmp_path / "run")
    expected = clf.predict([data / "red"])
    (tmp_path / "w.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(TlearnError, match=r"trained with: --weights .*w\.safetensors does not exist"):
        ImageClassifier.load(tmp_path / "run", verbose=False).predict([data / "red"])
    moved = ImageClassifier.load(tmp_path / "run", weights=str(tmp_path / "moved.safetensors"), verbose=False)
    assert moved.predict([data / "red"]) == expected
    save_file({k: v + 1 for k, v in timm.create_model("test_efficientnet").state_dict().items()
               if v.is_floating_point()}, tmp_path / "other.safetensors")
    other = ImageClassifier.load(tmp_path / "run", weights=str(tmp_path / "other.safetensors"), verbose=False)
    with pytest.raises(TlearnError, match="differ from the ones this model was trained with"):
        other.predict([data / "red"])
