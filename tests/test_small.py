"""Small folders, as people start with them: a handful of photos per class through every mode, and the rough
edges a new user meets on them (figures, check, explain, serve, messages)."""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HYMENOPTERA, TINY, make_folder, make_image, needs
from tests.test_cli import TINY_FLAGS, cli
from tlearn import ImageClassifier, TlearnError
from tlearn.config import TrainConfig
from tlearn.recipes.heads import Split, cv_logits, held, stop_split

MODES = {"auto": ["--mode", "auto"], "features": ["--mode", "features"],
         "frozen": ["--mode", "frozen", "--epochs", "1"], "finetune": ["--mode", "finetune", "--epochs", "1"],
         "scratch": ["--mode", "scratch", "--model", "small-cnn", "--epochs", "1"]}


def ten(root: Path) -> Path:
    """Two classes of 5 photos: split 3/1/1 per class."""
    return make_folder(root, per_class=5)


def one_of_three(root: Path) -> Path:
    """Two classes of 12 and one of exactly 3, the smallest the split accepts (1 train, 1 validation, 1 test)."""
    make_folder(root, per_class=12, classes=("blue", "green"))
    for i in range(3):
        make_image(root / "red" / f"red_{i}.png", (210, 40, 40), 900 + i)
    return root


def one_of_two(root: Path) -> Path:
    """Two classes of 8 and one of 2, trained with --test 0 as the split's error message suggests."""
    make_folder(root, per_class=8, classes=("blue", "green"))
    for i in range(2):
        make_image(root / "red" / f"red_{i}.png", (210, 40, 40), 700 + i)
    return root


FOLDERS = {"ten": (ten, []), "one of three": (one_of_three, []), "one of two, --test 0": (one_of_two, ["--test", "0"])}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("folder", FOLDERS)
def test_every_mode_finishes_on_small_folders(folder: str, mode: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tlearn.cli.START", time.perf_counter())  # the budget counts from this command's start
    make, flags = FOLDERS[folder]
    data = make(tmp_path / "photos")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli("train", data, *TINY_FLAGS, *MODES[mode], *flags, "--workers", "0",
                             "--out", tmp_path / "run", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "model.safetensors").is_file() and "run written to" in out
    raw = [f"{w.category.__name__}: {w.message}" for w in caught if "sklearn" in w.filename]
    assert not raw, raw  # no library warning reaches the user raw


def test_a_spent_time_budget_still_trains_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tlearn_log: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("tlearn.cli.START", time.perf_counter() - 30)  # 30 s spent before training starts
    data = make_folder(tmp_path / "photos", per_class=6)
    code, _, _ = cli("train", data, *TINY_FLAGS, *MODES["scratch"], "--workers", "0", "--time-budget", "5",
                     "--out", tmp_path / "run", capsys=capsys)
    assert code == 0 and "training one epoch anyway" in tlearn_log.text
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 2  # the header and one epoch


def test_a_class_with_one_training_image_is_fitted_on_and_never_held_out() -> None:
    y = np.array([0] * 10 + [1] * 10 + [2])
    fit_rows, stop_rows, note = stop_split(y, seed=0)
    assert 20 in fit_rows and 20 not in stop_rows
    assert set(y[stop_rows]) == {0, 1} and sorted(np.concatenate([fit_rows, stop_rows])) == list(range(21))
    assert "single training image" in note

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(21, 8)) + y[:, None]).astype(np.float32)
    (z,) = cv_logits(Split(X, None, y), False, (1.0,), 3, TrainConfig())
    assert held(z).tolist() == [True] * 20 + [False]  # the singleton's row has no out-of-fold logits


def test_the_usual_early_stopping_split_is_unchanged() -> None:
    from sklearn.model_selection import train_test_split

    y = np.repeat(np.arange(3), 20)
    fit_rows, stop_rows, note = stop_split(y, seed=5)
    a, b = train_test_split(np.arange(60), test_size=0.15, stratify=y, random_state=5)
    assert fit_rows.tolist() == a.tolist() and stop_rows.tolist() == b.tolist() and note == ""
    assert stop_split(np.arange(3), seed=0) is None  # no class with two images: nothing to hold out


def test_heads_on_features_when_no_class_has_two_training_images(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=3, classes=("blue", "green", "red"))
    for head in ("auto", "dense", "logreg"):
        clf = ImageClassifier(**TINY, mode="features", head=head, verbose=False, workers=0)
        clf.fit(data, out=tmp_path / head)
        chosen = json.loads((tmp_path / head / "config.json").read_text())["decision"]["plan"][0]["head"]
        assert chosen.startswith("dense" if head == "dense" else "logreg")


def test_check_warns_about_classes_too_small_for_the_head_search(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    data = one_of_three(tmp_path / "photos")
    code, out, _ = cli("check", data, "--json", capsys=capsys)
    found = [f for f in json.loads(out)["findings"] if f["kind"] == "small-class"]
    assert code == 0 and [f["path"] for f in found] == ["red"] and "1 training image" in found[0]["detail"]


def test_check_groups_repeated_findings_and_says_the_label_search_ran(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tlearn.labels.suspects", lambda *a, **k: [])  # the search itself: test_labels.py
    data = make_folder(tmp_path / "photos", per_class=12)  # 48x40 images: all smaller than 224 px
    code, out, _ = cli("check", data, "--labels", capsys=capsys)
    small = [line for line in out.splitlines() if line.strip().startswith("warning small:")]
    assert code == 0 and len(small) == 1, out
    assert "24 files, e.g." in small[0] and "smaller than" in small[0]
    assert "suspected mislabels (--labels): 0 found" in out
    code, out, _ = cli("check", data, "--json", capsys=capsys)
    assert sum(f["kind"] == "small" for f in json.loads(out)["findings"]) == 24  # the full list stays in --json


def test_figures_draw_non_ascii_class_names(tmp_path: Path) -> None:
    from PIL import Image

    from tlearn.plots import image_grid

    photo = np.full((40, 40, 3), 255, np.uint8)

    def caption(text: str) -> np.ndarray:
        image_grid([(photo, text)], tmp_path / "grid.png", cols=1)
        return np.asarray(Image.open(tmp_path / "grid.png").convert("L"))

    # a font without the glyph draws the same box for ê as for a code point no font has
    assert not np.array_equal(caption("forêt"), caption("for\U000f0000t"))
    assert not np.array_equal(caption("forêt"), caption("foret"))
    assert not np.array_equal(caption("лес"), caption("\U000f0000\U000f0000\U000f0000"))


def test_titles_fit_the_figure() -> None:
    from tlearn.plots import fit_text, font

    face = font(14)
    lines = fit_text("a_rather_long_photo_name.jpg: forêt 97.0%, désert 2.0%, plage 1.0%", face, 150, lines=2)
    assert len(lines) == 2 and all(face.getlength(line) <= 150 for line in lines) and lines[-1].endswith("…")


def test_explain_keeps_the_class_heatmap_beside_the_default_one(tmp_path: Path) -> None:
    from tlearn.plots import heatmap_path

    taken: set[Path] = set()
    default = heatmap_path(tmp_path, Path("bee.jpg"), taken)
    asked = heatmap_path(tmp_path, Path("bee.jpg"), taken, "forêt")
    assert default.name == "bee.heatmap.png" and asked.name == "bee.for-t.heatmap.png"
    assert heatmap_path(tmp_path, Path("日本.jpg"), taken).name == "image.heatmap.png"


def test_history_names_the_stage_of_the_best_epoch() -> None:
    from tlearn.train import History

    h = History()
    for stage in ["head"] * 11 + ["finetune"]:
        h.append(stage, loss=1, accuracy=0, val_loss=1, val_accuracy=0)
    h.best_epoch = 12
    assert h.best() == "finetune epoch 1 of 1, after 11 head epoch(s)"
    h.best_epoch = 4
    assert h.best() == "head epoch 4 of 11, then 1 finetune epoch(s)"


def test_compare_table_cells() -> None:
    from tlearn.compare import markdown

    row = {"model": "logreg-pixels", "split": "test", "accuracy": 0.5, "loss": 0.69, "train_seconds": 2.4,
           "trainable_params": 3074, "total_params": 3074, "epochs": ""}
    line = markdown([row], 0.5).splitlines()[2]
    assert line == "| logreg-pixels | test | 0.5000 | 0.6900 | 2.4 | 3,074 | 3,074 | – |"


def test_curves_of_one_epoch_have_whole_number_ticks() -> None:
    from tlearn.plots import _epoch_axis, figure

    fig = figure()
    ax = fig.subplots()
    ax.plot([1], [0.5], "o")
    _epoch_axis(ax, 1)
    fig.draw_without_rendering()
    assert ax.get_xlim() == (0.5, 1.5)
    assert all(float(t).is_integer() for t in ax.get_xticks() if 0.5 <= t <= 1.5)


def test_a_run_that_fails_after_the_split_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(job):
        raise TlearnError("stopped on purpose")

    monkeypatch.setattr("tlearn.api.run_recipe", boom)
    data = make_folder(tmp_path / "photos", per_class=6)
    with pytest.raises(TlearnError, match="on purpose"):
        ImageClassifier(**TINY, verbose=False).fit(data, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(TlearnError, match="on purpose"):
        ImageClassifier(**TINY, verbose=False).fit(data, out=tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())  # the user's folder stays


def test_messages_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture,
                                    tlearn_log: pytest.LogCaptureFixture) -> None:
    data = make_folder(tmp_path / "photos", per_class=6)
    code, _, err = cli("train", data, *TINY_FLAGS, "--resume", tmp_path / "nope", capsys=capsys)
    assert code == 2 and "no such folder" in err and "finished" not in err
    (tmp_path / "model.onnx").write_bytes(b"not really")
    with pytest.raises(TlearnError, match="exported ONNX graph.*Predictor.load"):
        ImageClassifier.load(tmp_path / "model.onnx")
    code, _, _ = cli("train", data, *TINY_FLAGS, "--mode", "features", "--out", tmp_path / "run", capsys=capsys)
    assert code == 0 and "  chosen: " in tlearn_log.text
    assert not [r for r in tlearn_log.records if r.getMessage().startswith("auto:")]  # this mode is not auto


def test_predict_says_it_used_test_time_augmentation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_folder(tmp_path / "photos", per_class=6)
    assert cli("train", data, *TINY_FLAGS, "--mode", "features", "--out", tmp_path / "run", capsys=capsys)[0] == 0
    code, _, err = cli("predict", tmp_path / "run", data / "red", "--tta", capsys=capsys)
    assert code == 0 and "with test-time augmentation" in err and "6 views" in err
    code, _, err = cli("predict", tmp_path / "run", data / "red", capsys=capsys)
    assert "test-time augmentation" not in err


def test_serve_answers_good_files_beside_a_bad_one(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    from tlearn.predictor import Predictor
    from tlearn.serve.app import create_app

    data = make_folder(tmp_path / "photos", per_class=6)
    ImageClassifier(**TINY, mode="features", verbose=False).fit(data, out=tmp_path / "run")
    client = TestClient(create_app(Predictor.load(tmp_path / "run", verbose=False)))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    good = (data / "red" / "red_000.png").read_bytes()
    files = [("files", ("a.png", good, "image/png")), ("files", ("cut.jpg", buffer.getvalue()[:300], "image/jpeg")),
             ("files", ("notes.txt", b"hello", "text/plain"))]
    response = client.post("/predict?top_k=9", files=files)
    assert response.status_code == 200, response.text
    a, cut, notes = response.json()["results"]
    assert a["filename"] == "a.png" and len(a["predictions"]) == 2  # top_k capped at the 2 classes
    assert cut["status"] == 422 and "cut.jpg" in cut["error"] and "predictions" not in cut
    assert notes["status"] == 415 and "notes.txt" in notes["error"]


@pytest.mark.slow
@needs(HYMENOPTERA)
def test_ten_real_photos_train_with_the_default_command(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tlearn_log: pytest.LogCaptureFixture) -> None:
    """The reported crash: two class folders of 5 JPEGs each, the default backbone and mode."""
    import shutil

    monkeypatch.setattr("tlearn.cli.START", time.perf_counter())
    for name in ("ants", "bees"):
        (tmp_path / "ten" / name).mkdir(parents=True)
        for photo in sorted((HYMENOPTERA / "train" / name).glob("*.jpg"))[:5]:
            shutil.copy(photo, tmp_path / "ten" / name)
    code, out, err = cli("train", tmp_path / "ten", "--out", tmp_path / "run", capsys=capsys)
    assert code == 0, err
    assert "the dense head stops early on 2 training image(s)" in tlearn_log.text and "test: accuracy" in out
