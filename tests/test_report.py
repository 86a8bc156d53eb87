"""What a person sees: the run report, calibration, test-time augmentation, prediction charts, TensorBoard."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOURS, TINY, make_folder, make_image
from tlearn import ImageClassifier
from tlearn.calibrate import calibrated, ece, fit_temperature, nll, reliability
from tlearn.cli import main
from tlearn.images import CropResize, eval_transform, tta_views
from tlearn.plots import label

SECTIONS = ["Decision", "Training curves", "Sample images", "Test metrics", "Misclassified: top losses",
            "Correct predictions and their evidence", "Calibration", "Unlike the training data", "Model summary",
            "Suspected mislabels", "Data quality"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = make_folder(root / "photos", per_class=12, classes=("blue", "green", "red"))
    clf = ImageClassifier(**TINY, epochs=15, verbose=False, cache_dir=str(root / "cache"))
    clf.fit(data, out=root / "run")
    return root / "run"


def test_ece_matches_a_hand_computed_example() -> None:
    # 4 predictions: confidences 0.9, 0.9 (one right, one wrong), 0.6 (right), 0.3 (3 classes, right).
    proba = np.array([[0.9, 0.1, 0.0], [0.9, 0.05, 0.05], [0.4, 0.6, 0.0], [0.3, 0.3, 0.4]])
    y = np.array([0, 1, 1, 2])
    # 10 bins: 0.9 lands in (0.8, 0.9] with accuracy 1/2; 0.6 in (0.5, 0.6], accuracy 1; 0.4 in (0.3, 0.4], acc 1.
    expected = (2 * abs(0.5 - 0.9) + abs(1 - 0.6) + abs(1 - 0.4)) / 4
    assert ece(proba, y, bins=10) == pytest.approx(expected)
    bins = reliability(proba, y, bins=10)
    assert bins.count.tolist() == [0, 0, 0, 1, 0, 1, 0, 0, 2, 0]
    assert ece(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2])) == 0.0  # certain and right: perfectly calibrated


def test_binning_confidences_matches_binning_probabilities_below_one_half() -> None:
    from tlearn.calibrate import binned

    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(17) * 0.3, 300)  # 17 classes: many top-1 confidences below 0.5
    y = rng.integers(0, 17, 300)
    assert (proba.max(1) < 0.5).sum() > 50
    direct = binned(proba.max(1), proba.argmax(1) == y)
    assert direct.count.tolist() == reliability(proba, y).count.tolist()
    assert direct.ece == pytest.approx(ece(proba, y))
    assert binned(np.array([0.4]), np.array([True]), bins=10).count.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]


def test_temperature_scaling_lowers_validation_nll_and_keeps_the_predictions() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    logits = rng.normal(0, 1, (400, 5))
    logits[np.arange(400), y] += 2.0
    overconfident = 4 * logits
    t = fit_temperature(overconfident, y)
    assert t > 2  # it undoes most of the scaling
    assert nll(overconfident, y, t) < nll(overconfident, y) - 0.1
    assert ece(calibrated(overconfident, t), y) < ece(calibrated(overconfident, 1.0), y)
    assert (calibrated(overconfident, t).argmax(1) == overconfident.argmax(1)).all()


def test_report_has_every_section_and_is_self_contained(run: Path) -> None:
    page = (run / "report.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == SECTIONS
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)  # nothing outside the file
    images = re.findall(r"src=\"data:image/png;base64,([^\"]+)\"", page)
    assert len(images) == 8  # curves, sample grid, confusion matrix, top losses, correct ones, reliability diagram,
    # the novelty histogram and the training images least like their class
    assert "beside its Grad-CAM heatmap" in page and "No heatmaps" not in page
    assert "No training or validation image is suspected of being in the wrong folder" in page
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    assert f"temperature, <b>{config['model']['temperature']:.3f}</b>" in page
    for text in ("tlearn 0.1.0", "torch ", "blue", "green", "red", "trainable", "head.1", "Linear", "ECE"):
        assert text in page, text


def test_report_rebuilds_from_the_run_folder(run: Path, capsys: pytest.CaptureFixture) -> None:
    before = (run / "report.html").read_text()
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert "report written to" in capsys.readouterr().out
    assert re.findall(r"<h2>(.*?)</h2>", (run / "report.html").read_text()) == SECTIONS
    assert len((run / "report.html").read_text()) == pytest.approx(len(before), rel=0.05)
    assert main(["report", str(run.parent)]) == 2  # not a run folder: a one-line error


def test_predictions_csv_and_metrics_agree(run: Path) -> None:
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = json.loads((run / "metrics.json").read_text())
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == metrics["test"]["n"]
    assert np.mean([r["true"] == r["predicted"] for r in test]) == pytest.approx(metrics["test"]["accuracy"])
    assert np.mean([float(r["loss"]) for r in test]) == pytest.approx(metrics["test"]["loss"], abs=1e-4)
    c = metrics["test"]["calibration"]
    assert set(c) == {"temperature", "ece", "ece_uncalibrated", "loss_uncalibrated", "fitted_on"}


def test_predict_uses_the_temperature_unless_told_not_to(run: Path) -> None:
    clf = ImageClassifier.load(run, verbose=False)
    clf.spec.temperature = 3.0  # a visibly different temperature
    image = next((run.parent / "photos" / "red").glob("*.png"))
    scaled = clf.predict(image, top_k=3)[0]["predictions"]
    raw = clf.predict(image, top_k=3, calibration=False)[0]["predictions"]
    assert scaled[0]["class"] == raw[0]["class"]
    assert scaled[0]["probability"] < raw[0]["probability"]


def test_tta_views_and_evaluate_shows_both(run: Path, capsys: pytest.CaptureFixture) -> None:
    clf = ImageClassifier.load(run, verbose=False)
    names = tta_views(clf.spec.preprocessing)
    views = [eval_transform(clf.spec.preprocessing, name) for name in names]
    assert names[:2] == ["center", "flip"] and len(views) == 6 and all(isinstance(v, CropResize) for v in views)
    image = Image.new("RGB", (80, 60))
    image.paste((255, 0, 0), (0, 0, 40, 60))  # left half red
    centre, mirrored = views[0](image), views[1](image)
    assert np.allclose(centre.flip(-1).numpy(), mirrored.numpy())
    assert not np.allclose(views[2](image).numpy(), views[3](image).numpy())  # left and right corners differ
    assert main(["evaluate", str(run), "--tta", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tta"] is True and set(out["without_tta"]) == {"accuracy", "loss"}
    assert main(["evaluate", str(run), "--tta"]) == 0
    assert "with test-time augmentation: accuracy" in capsys.readouterr().out


def test_predict_plot_draws_image_and_bars(run: Path, tmp_path: Path) -> None:
    images = sorted((run.parent / "photos" / "blue").glob("*.png"))[:2]
    out = tmp_path / "chart.png"
    assert main(["predict", str(run), *map(str, images), "--plot", str(out), "--top-k", "3"]) == 0
    chart = Image.open(out)
    assert chart.width > 600 and chart.height > 300  # two rows of image + bars


def test_long_class_names_are_wrapped_for_axes() -> None:
    name = "a very long class name with many words that would overflow any axis label"
    text = label(name, 18)
    assert text.count("\n") == 1 and all(len(line) <= 18 for line in text.split("\n"))
    assert label("daisy") == "daisy"


def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_folder(tmp_path / "photos", per_class=8)
    clf = ImageClassifier(**TINY, epochs=4, verbose=False, tensorboard=True)
    clf.fit(data, out=tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/training", "loss/validation", "accuracy/training", "accuracy/validation"} <= tags
    assert len(events.Scalars("loss/validation")) == len(clf.history.epoch)
    assert events.Scalars("loss/validation")[0].value == pytest.approx(clf.history.history["val_loss"][0])


def test_confusion_heatmap_stays_readable_with_many_long_class_names(tmp_path: Path) -> None:
    from tlearn.plots import confusion

    names = [f"class number {i} with a rather long descriptive name" for i in range(20)]
    matrix = (np.eye(20) * 9 + 1).astype(int).tolist()
    image = Image.open(confusion(matrix, names, tmp_path / "cm.png"))
    assert image.height > image.width  # 20 classes: the two heatmaps stack, each as wide as the page
    assert image.width >= 1000


def test_report_builds_when_images_have_gone_since_training(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=10)
    clf = ImageClassifier(**TINY, epochs=3, verbose=False)
    clf.fit(data, out=tmp_path / "run")
    for path in list((data / "red").glob("*.png"))[:6]:
        path.unlink()  # some training and some test images
    (data / "blue" / "blue_000.png").write_bytes(b"damaged")
    assert main(["report", str(tmp_path / "run")]) == 0
    assert re.findall(r"<h2>(.*?)</h2>", (tmp_path / "run" / "report.html").read_text()) == SECTIONS


def test_report_lists_suspected_mislabels_with_thumbnails(tmp_path: Path) -> None:
    data = tmp_path / "photos"
    for split, n in (("train", 10), ("validation", 4), ("test", 4)):
        make_folder(data / split, per_class=n, seed=len(split))
    planted = make_image(data / "train" / "blue" / "actually_red.png", COLOURS["red"], seed=99)
    clf = ImageClassifier(**TINY, mode="features", verbose=False)
    clf.fit(data, out=tmp_path / "run")
    found = [f for f in json.loads((tmp_path / "run" / "check.json").read_text())["findings"]
             if f["kind"] == "mislabel"]
    assert found and found[0]["path"] == str(planted) and "believes 'red'" in found[0]["detail"]
    page = (tmp_path / "run" / "report.html").read_text()
    section = page.split("<h2>Suspected mislabels</h2>")[1].split("<h2>")[0]
    assert "actually_red.png" in section and "data:image/png;base64," in section
    assert "actually_red.png" not in page.split("<h2>Data quality</h2>")[1]  # listed once, in its own section
    assert (tmp_path / "run" / "mislabels.png").is_file() and planted.is_file()  # nothing is moved


def test_a_run_without_a_feature_map_reports_why_it_has_no_heatmaps(tmp_path: Path) -> None:
    clf = ImageClassifier(mode="scratch", model="logreg-pixels", verbose=False)
    clf.fit(make_folder(tmp_path / "photos", per_class=10), out=tmp_path / "run")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "No heatmaps: a logreg-pixels run has no convolutional feature map" in page
    assert (tmp_path / "run" / "top_losses.png").is_file()  # the thumbnails are still there
    assert main(["report", str(tmp_path / "run")]) == 0  # rebuilt: a grid without heatmaps is never reused...
    assert "No heatmaps: a logreg-pixels" in (tmp_path / "run" / "report.html").read_text()  # ...so it says why
