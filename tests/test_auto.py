"""Mode auto decides from measurements within a time budget; more accuracy from cached features (probe.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, make_folder
from tlearn.api import ImageClassifier
from tlearn.calibrate import fit_temperature
from tlearn.config import TlearnError, TrainConfig, parse_duration
from tlearn.recipes import auto
from tlearn.recipes.heads import C_GRID, Probe, Split, choose_head, logreg_logits, refit
from tlearn.recipes.job import Job
from tlearn.recipes.plan import (
    DERIVED,
    Clock,
    Measured,
    budget_seconds,
    derived_budget,
    derives_budget,
    features_run_estimate,
    plan,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ants_bees"
FAST = {"verbose": False, "workers": 0, "batch_size": 8}


def measured(rate: float = 150.0, n_val: int = 170, n_train: int = 1918,
             top: tuple[float, float] | None = None) -> Measured:
    """Oxford-17-like counts (with more training images) and a larger base to add; ``rate`` is the fake
    extraction throughput, ``top`` the seconds per sample of the top stage."""
    views = 2 * (n_train + n_val + 272)  # nothing cached yet
    return Measured(n_train, n_val, 272, 1280, rate, misses=views, larger="big", larger_cost=1.7,
                    larger_misses=views, larger_features=1280, top=top)


def statuses(steps: list) -> dict[str, str]:
    return {s.kind: s.status for s in steps}


def test_plan_takes_every_step_without_a_budget() -> None:
    steps = plan(measured(), Clock(None), max_epochs=10, finetune=True)
    assert statuses(steps) == {"features": "planned", "larger": "planned", "finetune": "planned"}
    # estimates come from the measured rate: 2 views x 2360 images at 150 img/s, plus choosing the head
    assert steps[0].estimate == pytest.approx(4720 / 150 + 1 + 4e-6 * 2 * 1918 * 1280)
    assert steps[1].estimate > steps[0].estimate  # the larger base costs 1.7x per image


def test_fine_tuning_on_cached_activations_is_planned_from_its_measured_cost() -> None:
    steps = plan(measured(top=(0.002, 0.0005)), Clock(None), max_epochs=10, finetune=True)
    assert [s.kind for s in steps] == ["features", "larger", "top", "finetune"]
    top = steps[2]
    # an epoch: 1918 training images x 2 views forward and backward, the validation images forward twice
    assert top.detail["epoch_estimate_s"] == pytest.approx(1918 * 2 * 0.002 + 2 * 170 * 0.0005, abs=0.05)
    assert top.estimate == pytest.approx(10 * (1918 * 2 * 0.002 + 2 * 170 * 0.0005))  # cached: no extra pass
    extra = dataclasses.replace(measured(top=(0.002, 0.0005)), top_extra=300)  # features cached, activations not
    assert plan(extra, Clock(None), 10, True)[2].estimate == pytest.approx(top.estimate + 300 / 150)
    assert "top" not in statuses(plan(measured(top=None), Clock(None), 10, True))  # no known split
    assert "top" not in statuses(plan(measured(top=(0.002, 0.0005)), Clock(None), 10, finetune=False))


def test_the_default_budget_on_a_cpu_is_three_times_a_features_run() -> None:
    assert budget_seconds(TrainConfig(), "cpu") == (None, DERIVED)
    assert budget_seconds(TrainConfig(), "cuda") == (1800.0, "the default for mode auto on a GPU")
    assert budget_seconds(TrainConfig(time_budget="90s"), "cpu")[0] == 90  # an explicit budget wins
    assert derives_budget(TrainConfig(), "cpu") and not derives_budget(TrainConfig(time_budget="90s"), "cpu")
    assert not derives_budget(TrainConfig(mode="features"), "cpu") and not derives_budget(TrainConfig(), "cuda")
    small, large = measured(n_train=1000), measured(n_train=10000)
    budget, why = derived_budget(small, elapsed=5.0)
    assert budget == pytest.approx(3 * features_run_estimate(small, 5.0)) and why.startswith(DERIVED)
    assert features_run_estimate(small, 5.0) == pytest.approx(5.0 + small.misses / 150 + 3 * (
        1 + 4e-6 * 2 * 1000 * 1280) + 10)
    assert derived_budget(large, 5.0)[0] > 4 * budget  # the budget grows with the work: no fixed ceiling
    # with the work it grows, the larger base fits it wherever it costs less than twice the first base
    steps = plan(large, Clock(derived_budget(large, 5.0)[0]), 10, finetune=False)
    assert statuses(steps)["larger"] == "planned"


def test_a_slow_machine_skips_fine_tuning() -> None:
    fast = plan(measured(rate=1000.0), Clock(600), max_epochs=10, finetune=True)
    slow = plan(measured(rate=20.0), Clock(600), max_epochs=10, finetune=True)
    assert statuses(fast)["finetune"] == "planned"
    assert statuses(slow)["finetune"] == "skipped" and "over budget: 2 epochs need" in slow[-1].why


def test_a_budget_too_small_for_more_gives_features_only() -> None:
    steps = plan(measured(), Clock(20), max_epochs=10, finetune=True)
    assert statuses(steps) == {"features": "planned", "larger": "skipped", "finetune": "skipped"}
    assert all(s.why.startswith("over budget") for s in steps[1:])


def test_too_few_validation_images_skip_fine_tuning_whatever_the_budget() -> None:
    steps = plan(measured(n_val=12), Clock(None), max_epochs=10, finetune=True)
    assert statuses(steps)["finetune"] == "skipped" and "12 validation images are too few" in steps[-1].why


def test_small_data_fine_tunes_only_where_it_is_cheap() -> None:
    def hymenoptera(rate: float) -> Measured:  # 245 training and 153 validation images, nothing cached
        return Measured(245, 153, 0, 1280, rate, 796, "big", 1.7, 796, 1280)

    cpu = plan(hymenoptera(150.0), Clock(None), max_epochs=10, finetune=True)
    assert statuses(cpu)["finetune"] == "skipped" and cpu[-1].why.startswith("small data (245 < 1000")
    gpu = plan(hymenoptera(5000.0), Clock(None), max_epochs=10, finetune=True)
    assert statuses(gpu)["finetune"] == "planned"  # two epochs cost less than the features steps


def test_durations_parse_and_bad_ones_are_named() -> None:
    assert [parse_duration(t) for t in ("90s", "10m", "2h", "45", "auto", "none")] == [90, 600, 7200, 45, None,
                                                                                         None]
    with pytest.raises(TlearnError, match="--time-budget must be a duration such as 90s.*Received: "
                                          "time_budget='soon'"):
        ImageClassifier(**TINY, time_budget="soon")
    with pytest.raises(TlearnError, match="--backbone A\\+B must name distinct backbones"):
        ImageClassifier(backbone="a+a")


def _fake_probe(worse: bool, real: Probe) -> Probe:
    """``real`` as a worse head (its held-out logits turned against the labels), or as it is: steps are compared
    on the validation loss after temperature scaling, which comes from those logits."""
    import dataclasses

    loss = 9.0 if worse else real.chosen["val_loss"]
    return dataclasses.replace(real, chosen={**real.chosen, "val_loss": loss},
                               val_logits=-3 * real.val_logits if worse else real.val_logits)


def test_a_step_that_does_not_improve_validation_is_discarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    """The larger base's head scores worse on validation, so the run keeps the first base's head."""
    data = make_folder(tmp_path / "photos", per_class=12)
    monkeypatch.setattr(auto, "_larger", lambda job, names: ("test_efficientnet_gn", 1.5))
    real = auto.probe_features

    def probe(job: Job, names: list[str]):  # the concatenation looks worse than the first base alone
        found = real(job, names)
        return (_fake_probe(len(names) > 1, found[0]), *found[1:])

    monkeypatch.setattr(auto, "probe_features", probe)
    clf = ImageClassifier(**TINY, **FAST)
    clf.fit(data, out=tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    steps = {s["kind"]: s for s in config["decision"]["plan"]}
    assert steps["larger"]["status"] == "discarded" and steps["larger"]["val_loss"] == 9.0
    assert steps["features"]["status"] == "kept"
    assert config["backbone"]["backbone"] == "test_efficientnet"  # not the concatenation


def test_a_step_that_improves_validation_is_kept_with_concatenated_bases(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_folder(tmp_path / "photos", per_class=12)
    monkeypatch.setattr(auto, "_larger", lambda job, names: ("test_efficientnet_gn", 1.5))
    clf = ImageClassifier(**TINY, **FAST, head="logreg")
    real = auto.probe_features

    def probe(job: Job, names: list[str]):  # the concatenation looks better
        found = real(job, names)
        return (_fake_probe(len(names) == 1, found[0]), *found[1:])

    monkeypatch.setattr(auto, "probe_features", probe)
    clf.fit(data, out=tmp_path / "run")
    steps = {s["kind"]: s for s in clf.decision.plan}
    both = "test_efficientnet+test_efficientnet_gn"
    assert steps["larger"]["status"] == "kept" and steps["larger"]["features"] == both
    loaded = ImageClassifier.load(tmp_path / "run", verbose=False)
    assert loaded.backbone_config.backbone == "test_efficientnet+test_efficientnet_gn"
    assert loaded.spec.num_features == clf.extractor.base("test_efficientnet").num_features + \
        clf.extractor.base("test_efficientnet_gn").num_features
    images = [data / "red", data / "blue"]
    assert loaded.predict(images, top_k=2) == clf.predict(images, top_k=2)


def test_concatenated_bases_work_for_features_only(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=10)
    clf = ImageClassifier("test_efficientnet+test_efficientnet_gn", pretrained=False, mode="finetune", **FAST)
    with pytest.raises(TlearnError, match="only a head on features can use: use --mode features or auto"):
        clf.fit(data)
    clf = ImageClassifier("test_efficientnet+test_efficientnet_gn", pretrained=False, mode="features", **FAST)
    clf.fit(data, out=tmp_path / "run")
    assert "+" in clf.spec.arch and "+" in clf.spec.weights_id
    assert "concatenated pooled features" in (tmp_path / "run" / "report.html").read_text()


def test_fine_tuning_stops_at_the_time_budget(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=12)
    clf = ImageClassifier(**TINY, **FAST, mode="finetune", epochs=50, head_epochs=2, time_budget="1s")
    clf.fit(data)
    assert clf.history.stage.count("finetune") <= 1  # the first epoch already passed the budget


def _separable(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = (rng.normal(0, 1, (n, 16)) + 2.5 * np.eye(3, 16)[y]).astype(np.float32)
    return Split(X, X[:, ::-1].copy(), y)  # a "mirror view" that is a different, less useful feature order


def test_logreg_probe_chooses_c_by_cross_validation_and_refits_with_out_of_fold_logits() -> None:
    train, val = _separable(90, 0), _separable(60, 1)
    config = TrainConfig(head="logreg")
    probe = choose_head(train, val, 3, config)
    assert probe.chosen["head"] == "logreg" and probe.chosen["C"] in C_GRID
    assert probe.val_logits.shape == (60, 3) and probe.val_accuracy > 0.8
    final = refit(probe, train, val, 3, config)
    oof, y = final.calibration
    assert final.refit and oof.shape == (150, 3) and (y == np.concatenate([train.y, val.y])).all()
    # held out, every row: the validation split's from the model fitted on train, the training split's out of fold
    np.testing.assert_array_equal(oof[90:], probe.val_logits)
    seen = train.logits(lambda X: logreg_logits(probe.model, X), probe.chosen["flip"])
    assert np.abs(oof[:90] - seen).max() > 1e-3
    # the folded head is the refit scikit-learn model
    with torch.no_grad():
        ours = final.head(torch.from_numpy(val.X)).numpy()
    np.testing.assert_allclose(ours, logreg_logits(final.model, val.X), rtol=1e-4, atol=1e-4)
    assert not np.allclose(ours, probe.val_logits)  # refit on more data moved it


def test_auto_head_reports_every_candidate() -> None:
    train, val = _separable(90, 0), _separable(60, 1)
    probe = choose_head(train, val, 3, TrainConfig(head="auto", epochs=5))
    assert {c["head"] for c in probe.candidates} == {"logreg", "dense"}
    assert probe.val_loss == min(c["val_loss"] for c in probe.candidates)


def spy_views(clf: ImageClassifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The views ``clf`` extracts from now on, in order (through its feature service, as training and prediction
    do)."""
    seen: list[str] = []
    real = clf.extractor.features

    def extract(paths, names=None, view="center", *args, **kw):
        seen.append(view)
        return real(paths, names, view, *args, **kw)

    monkeypatch.setattr(clf.extractor, "features", extract)
    return seen


def test_a_mirror_trained_head_predicts_from_both_views(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_folder(tmp_path / "photos", per_class=10)
    clf = ImageClassifier(**TINY, **FAST, mode="features", head="logreg")
    clf.fit(data)
    clf.spec.views = ["center", "flip"]
    seen = spy_views(clf, monkeypatch)
    clf.predict([data / "red"])
    assert seen == ["center", "flip"]


def test_temperature_is_left_alone_when_every_prediction_is_right() -> None:
    logits = np.array([[3.0, 0.0], [0.0, 2.0]])
    assert fit_temperature(logits, np.array([0, 1])) == 1.0
    assert fit_temperature(logits, np.array([1, 1])) != 1.0


@pytest.mark.slow
def test_a_short_budget_on_real_photos_keeps_the_plan_and_stops(tmp_path: Path) -> None:
    """The bundled example with the packaged weights and a 30 s budget: features of Lite0, then Lite2 if the
    budget allows, never fine-tuning (12 validation images), and a complete run."""
    clf = ImageClassifier(verbose=False, time_budget="30s")
    clf.fit(EXAMPLE, out=tmp_path / "run")
    decision = json.loads((tmp_path / "run" / "config.json").read_text())["decision"]
    kinds = [s["kind"] for s in decision["plan"]]
    assert kinds == ["features", "larger", "top", "finetune"] and decision["budget"] == 30
    assert decision["plan"][0]["status"] == "kept" and decision["plan"][2]["status"] == "skipped"
    assert decision["plan"][3]["status"] == "skipped"
    assert "12 validation images are too few" in decision["plan"][2]["why"]
    assert decision["mode"] == "features"
    for name in ("model.safetensors", "report.html", "metrics.json"):
        assert (tmp_path / "run" / name).is_file()
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Decision</h2>" in page and "images/s through the base on this machine" in page
    assert decision["measured"]["rate"] > 0 and decision["measured"]["n_val"] == 12


@pytest.mark.parametrize("options", [{"horizontal_flip": False}, {"augment": "none"}])
def test_no_horizontal_flip_keeps_mirror_images_out_of_the_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture,
                                                                options: dict) -> None:
    """Where a mirror image means something else (text, left and right arrows), --no-horizontal-flip keeps the
    mirror view out of the head's training and out of its predictions, and does not compute it."""
    data = make_folder(tmp_path / "photos", per_class=10)
    clf = ImageClassifier(**TINY, **FAST, mode="features", head="logreg", **options)
    seen = spy_views(clf, monkeypatch)
    with caplog.at_level(logging.INFO, logger="tlearn"):
        clf.fit(data)
        assert clf.spec.views == ["center"] and set(seen) == {"center"}
        assert "mirrored" not in caplog.text
        ImageClassifier(**TINY, **FAST, mode="features", head="logreg").fit(data)
        assert "+ mirrored images: val_loss" in caplog.text  # by default they are tried
