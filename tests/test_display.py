"""What a notebook shows of tlearn's results (display.py and the ``_repr_html_`` methods): pictures and tables made
from the values, names escaped, long results cut with a count, and never an exception inside the notebook."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, make_folder, make_image
from tlearn import ImageClassifier
from tlearn.display import MAX_IMAGES, Frame, Metrics, Predictions, thumbnail
from tlearn.train import History

PNG = b"\x89PNG\r\n\x1a\n"


def history(epochs: int = 8) -> History:
    h = History(best_epoch=3)
    for i in range(epochs):
        h.append("head" if i < 4 else "finetune", loss=1 / (i + 1), accuracy=0.5 + i / 20, val_loss=1.2 / (i + 1),
                 val_accuracy=0.45 + i / 20)
    return h


def test_a_history_plots_its_curves_and_shows_them_with_its_last_epochs() -> None:
    h = history()
    fig = h.plot("mine")
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy", "loss"]
    assert fig._repr_png_().startswith(PNG)  # how a notebook shows the figure, whatever its backend
    page = h._repr_html_()
    assert page.count('<img src="data:image/png;base64,') == 1 and "the last 5 of 8 epochs" in page
    assert page.count("<tr>") == 6 and "finetune" in page and "best: head epoch 3 of 4" in page
    assert "No epoch trained yet" in History()._repr_html_()


def test_metrics_stay_a_dict_and_show_escaped_tables_and_the_confusion_matrix() -> None:
    m = Metrics({"split": "test", "n": 10, "accuracy": 0.8, "loss": 0.41, "classes": ["<b>cat</b>", "dog"],
                 "per_class": {"<b>cat</b>": {"precision": 1.0, "recall": 0.6, "f1": 0.75, "support": 5},
                               "dog": {"precision": 0.71, "recall": 1.0, "f1": 0.83, "support": 5}},
                 "confusion_matrix": [[3, 2], [0, 5]]})
    assert m["accuracy"] == 0.8 and isinstance(m, dict) and json.loads(json.dumps(m)) == dict(m)
    page = m._repr_html_()
    assert "&lt;b&gt;cat&lt;/b&gt;" in page and "<b>cat</b>" not in page
    assert "<table" in page and page.count("data:image/png;base64,") == 1  # the confusion matrix
    many = Metrics({"split": "test", "mean_average_precision": 0.9, "micro_f1": 0.8, "loss": 0.2, "per_label": {
        f"tag{i}": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "average_precision": None, "support": 0,
                    "threshold": 0.5} for i in range(100)}})
    page = many._repr_html_()
    assert "mean average precision" in page and "… and 60 more labels" in page and "tag39" in page
    assert "tag40" not in page


def test_predictions_show_each_picture_with_bars_and_a_placeholder_for_a_missing_one(tmp_path: Path) -> None:
    photo = make_image(tmp_path / "a <photo>.png", (200, 30, 30), seed=1)
    results = Predictions([
        {"path": str(photo), "predictions": [{"class": "red & co", "probability": 0.9},
                                             {"class": "blue", "probability": 0.1}],
         "labels": [{"class": "red & co", "probability": 0.9}], "novelty": 3.2, "unknown": True},
        {"path": str(tmp_path / "gone.jpg"), "predictions": [{"class": "blue", "probability": 1.0}]},
        {"path": str(tmp_path / "bad.jpg"), "error": "not an image"}])
    page = results._repr_html_()
    assert page.count("data:image/jpeg;base64,") == 1 and "a &lt;photo&gt;.png" in page
    assert "red &amp; co" in page and "width:180px" in page and "labels: red &amp; co" in page
    assert "unknown: unlike the training images (novelty 3.20)" in page
    assert page.count('class="missing"') == 2 and "not an image" in page and "gone.jpg" in page
    assert results == list(results) and results[0]["unknown"]
    many = Predictions([{"path": str(photo), "predictions": []}] * (MAX_IMAGES + 7))
    assert "… and 7 more images" in many._repr_html_()
    assert 'class="missing"' in thumbnail(tmp_path)  # a folder: the reason, not an exception


def test_a_display_that_fails_shows_the_plain_result_and_why() -> None:
    page = Metrics({"split": "test", "per_class": "not a table"})._repr_html_()
    assert "the rich display failed" in page and "not a table" in page


def test_tlearn_never_switches_the_matplotlib_backend(tmp_path: Path) -> None:
    code = ("import sys, matplotlib; matplotlib.use('svg'); from tlearn import plots; from tests.test_display import "
            f"history; plots.curves(history(), __import__('pathlib').Path({str(tmp_path / 'c.png')!r})); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout.split()
    assert out == ["svg", "False"] and (tmp_path / "c.png").read_bytes().startswith(PNG)


def test_a_classifier_shows_a_summary_its_results_and_its_report(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=8)
    clf = ImageClassifier(**TINY, verbose=False)
    assert "not trained yet" in repr(clf)
    clf.fit(data, out=tmp_path / "run")
    about = clf.summary()
    assert about["classes"] == ["blue", "red"] and "test accuracy" in about and about["why"]
    assert repr(clf).startswith("ImageClassifier(test_efficientnet:") and "2 classes" in repr(clf)
    assert "classes (2): blue, red" in clf._repr_html_()
    assert isinstance(clf.evaluate(), Metrics) and "<table" in clf.evaluate()._repr_html_()
    predicted = clf.predict(sorted((data / "red").glob("*.png"))[:2])
    assert isinstance(predicted, Predictions) and predicted._repr_html_().count("data:image/jpeg") == 2
    explained = clf.explain([*sorted((data / "red").glob("*.png"))[:1], tmp_path / "gone.png"], class_name="blue")
    page = explained._repr_html_()
    assert page.count("data:image/jpeg") == 1 and "evidence for blue (" in page and 'class="missing"' in page
    frame = ImageClassifier.load(tmp_path / "run", verbose=False).show_report()
    assert isinstance(frame, Frame) and frame._repr_html_().startswith("<iframe srcdoc=\"&lt;!DOCTYPE html&gt;")
    with pytest.raises(Exception, match="no report at"):
        clf.show_report(tmp_path / "elsewhere")


def test_check_and_compare_have_python_entry_points_with_displays(tmp_path: Path) -> None:
    import tlearn
    from tlearn.compare import compare_models

    data = make_folder(tmp_path / "photos", per_class=6)
    (data / "red" / "<broken>.jpg").write_text("<html>404</html>")
    report = tlearn.check_data(data, progress=False)
    assert report.images == 12 and any(f.kind == "undecodable" for f in report.findings)
    page = report._repr_html_()
    assert "&lt;broken&gt;.jpg" in page and "undecodable" in page and "<td>blue</td>" in page
    rows = compare_models(data, "logreg-pixels,small-cnn", tmp_path / "cmp", epochs=1, seed=3, workers=0)
    assert [r["model"] for r in rows] == ["logreg-pixels", "small-cnn"] and rows.out == tmp_path / "cmp"
    page = rows._repr_html_()
    assert page.count("<tr>") == 3 and "data:image/png;base64," in page and "train seconds" in page
    with pytest.raises(tlearn.TlearnError, match="unknown option"):
        compare_models(data, "small-cnn", tmp_path / "cmp2", epoch=1)
