"""Suspected mislabels: confident learning on out-of-fold probabilities finds images in the wrong folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import HYMENOPTERA, make_folder, make_image, needs
from tlearn import TlearnError
from tlearn.cli import main
from tlearn.labels import label_issues, out_of_fold


def test_label_issues_finds_the_confidently_wrong_rows_most_suspicious_first() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    proba = np.full((90, 3), 0.05)
    proba[np.arange(90), y] = 0.9  # every row believes its own label...
    planted = {7: (2, 0.02), 40: (0, 0.10), 75: (1, 0.05)}  # ...except these: (believed class, own probability)
    for i, (j, own) in planted.items():
        proba[i] = 0.0
        proba[i, j], proba[i, y[i]] = 1 - own, own
    proba[50] = [0.3, 0.4, 0.3]  # unsure, but it believes nothing confidently: not a suspect
    proba += rng.uniform(0, 0.01, proba.shape)
    proba /= proba.sum(1, keepdims=True)
    assert list(label_issues(proba, y)) == [7, 75, 40]  # by the probability of their own class, lowest first


def test_out_of_fold_needs_two_images_per_class() -> None:
    X = np.random.default_rng(0).normal(size=(7, 4))
    with pytest.raises(TlearnError, match="at least 2 images in every class"):
        out_of_fold(X, np.array([0, 0, 0, 1, 1, 1, 2]))
    proba = out_of_fold(X[:6], np.array([0, 0, 0, 1, 1, 1]))
    assert proba.shape == (6, 2) and np.allclose(proba.sum(1), 1)


@pytest.mark.slow
def test_check_labels_lists_a_planted_mislabel_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_folder(tmp_path / "photos", per_class=12, classes=("blue", "red"))
    wrong = make_image(data / "blue" / "actually_red.png", (210, 40, 40), seed=99)
    fix = tmp_path / "quarantine.csv"
    assert main(["check", str(data), "--labels", "--json", "--fix-report", str(fix)]) == 0
    findings = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["kind"] == "mislabel"]
    assert findings and findings[0]["path"] == str(wrong) and "believes 'red'" in findings[0]["detail"]
    assert wrong.exists()  # nothing is moved...
    assert f'{wrong},"mislabel: in folder \'blue\'' in fix.read_text()  # ...but it is listed to set aside


@pytest.mark.slow
@needs(HYMENOPTERA)
def test_most_planted_label_errors_in_real_photos_are_found(tmp_path: Path) -> None:
    """A small real subset with 10 % of its training photos moved to the other class's folder."""
    from tlearn.config import DataConfig
    from tlearn.labels import suspects

    planted = set()
    for split in ("train", "val"):
        for c, other in (("ants", "bees"), ("bees", "ants")):
            for i, f in enumerate(sorted((HYMENOPTERA / split / c).glob("*.jpg"))[:40]):
                wrong = split == "train" and i % 10 == 3  # 4 of each class's 40
                target = tmp_path / "data" / split / (other if wrong else c) / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, target)
                if wrong:
                    planted.add(str(target))
    found = {f.path for f in suspects(DataConfig(path=str(tmp_path / "data")), progress=False)}
    assert len(planted) == 8
    assert len(found & planted) >= 0.7 * len(planted), (sorted(found), sorted(planted))
    assert len(found & planted) >= 0.5 * len(found)  # at least half of the suspects are planted errors
