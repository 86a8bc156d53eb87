"""Training modes: frozen keeps the base intact, finetune trains only what it should, scratch baselines,
auto's choice, resume after kill -9, class weights, precision, comparison."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, make_folder
from tlearn import ImageClassifier, TlearnError
from tlearn.config import TrainConfig
from tlearn.models import Classifier, stages, unfreeze_groups
from tlearn.recipes.plan import DERIVED, choose, format_table, table_advice
from tlearn.train import class_weights, make_head, make_optimizer, resolve_precision

FAST = {"verbose": False, "workers": 0, "batch_size": 8}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("modes") / "photos", per_class=12, classes=("blue", "green", "red"))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_mode_never_changes_the_base_or_its_batchnorm_statistics(photos: Path, tmp_path: Path) -> None:
    clf = ImageClassifier(**TINY, mode="frozen", epochs=2, **FAST)
    before = snapshot(clf.backbone.model)
    clf.fit(photos, out=tmp_path / "run")
    after = clf.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any("running_mean" in k for k in before)
    # The same forward pass in training mode would have moved the statistics: the test can fail.
    clf.backbone.model.train()(torch.randn(4, 3, 160, 160))
    assert not all(torch.equal(before[k], clf.backbone.model.state_dict()[k]) for k in before)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["kind"] == "head"


def test_finetune_changes_only_the_unfrozen_stages_and_the_head(photos: Path, tmp_path: Path) -> None:
    clf = ImageClassifier(**TINY, mode="finetune", epochs=2, head_epochs=2, unfreeze="2", lr=0.01, **FAST)
    pretrained = snapshot(clf.backbone.model)
    clf.fit(photos, out=tmp_path / "run")
    assert len(clf.history.epoch) == 4 and clf.history.stage == ["head", "head", "finetune", "finetune"]
    groups = stages(clf.model.base)
    tuned = clf.model.base.state_dict()
    changed = {name for name in pretrained if not torch.equal(pretrained[name], tuned[name])}
    top = {n for g in groups[-2:] for n in g}
    deep = {n for g in groups[:-2] for n in g}
    assert changed & top, "the top two stages were trained"
    assert not changed & deep, "the deeper stages stayed frozen"
    assert not any("running" in n for n in changed), "BatchNorm statistics stay as pretrained"
    assert all(torch.equal(pretrained[k], v) for k, v in clf.backbone.model.state_dict().items()), \
        "the cached-feature base is a separate, untouched copy"


def test_unfreeze_groups_get_discriminative_learning_rates() -> None:
    import timm

    base = timm.create_model("test_efficientnet")
    groups = unfreeze_groups(base, "3", lr=1e-3, lr_mults=(0.1, 0.01))
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-5, 1e-5])
    assert [g["name"] for g in groups] == ["base stage 5/5", "base stage 4/5", "base stage 3/5"]
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == {n for g in stages(base)[-3:] for n in g}
    model = Classifier(base, make_head(base.num_features, 2))
    opt = make_optimizer([{"params": list(model.head.parameters()), "lr": 1e-3}, *groups], TrainConfig())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4, 1e-5, 1e-5])
    assert len(unfreeze_groups(base, "all", 1e-3, (0.1, 0.01))) == len(stages(base))


@pytest.mark.parametrize("model", ["small-cnn", "alexnet", "logreg-pixels"])
def test_scratch_models_train_save_and_load(photos: Path, tmp_path: Path, model: str) -> None:
    clf = ImageClassifier(mode="scratch", model=model, epochs=2, **FAST)
    clf.fit(photos, out=tmp_path / "run")
    loaded = ImageClassifier.load(tmp_path / "run", verbose=False)
    assert loaded.spec.kind == "scratch" and loaded.spec.arch == model
    a, b = clf.predict([photos / "red"]), loaded.predict([photos / "red"])
    np.testing.assert_allclose([r["predictions"][0]["probability"] for r in a],
                               [r["predictions"][0]["probability"] for r in b], rtol=1e-5)
    assert clf.params["trainable"] == clf.params["total"] > 0


def test_finetuned_model_saves_its_base_and_reloads(photos: Path, tmp_path: Path) -> None:
    clf = ImageClassifier(**TINY, mode="finetune", epochs=2, head_epochs=2, lr=0.01, **FAST)
    clf.fit(photos, out=tmp_path / "run")
    loaded = ImageClassifier.load(tmp_path / "run", verbose=False)
    assert loaded.spec.kind == "finetuned"
    tuned, pretrained = clf.model.base.state_dict(), clf.backbone.model.state_dict()
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in tuned), "fine-tuning changed the base"
    assert all(torch.equal(v, tuned[k]) for k, v in loaded.model.base.state_dict().items()), "the base is saved"
    again, before = loaded.evaluate(), clf.evaluate()
    assert again["confusion_matrix"] == before["confusion_matrix"]
    assert again["loss"] == pytest.approx(before["loss"], rel=1e-5)  # float32 rounding, magnified by temperature
    assert 0 < clf.params["trainable"] < clf.params["total"]


def test_auto_shows_the_strategy_table_and_records_its_plan(photos: Path, tmp_path: Path) -> None:
    config = TrainConfig()
    rows = [table_advice(n, 10, config) for n in (300, 5000, 50000)]
    assert [r for r, _ in rows] == [0, 1, 2]
    assert "300 training images" in rows[0][1] and "features" in rows[0][1]
    assert "<- your data: 5000 images" in format_table(5000, 10, config).splitlines()[1]
    assert choose(300, 10, TrainConfig(mode="frozen")).mode == "frozen"
    clf = ImageClassifier(**TINY, **FAST)
    clf.fit(photos, out=tmp_path / "run")
    decision = json.loads((tmp_path / "run" / "config.json").read_text())["decision"]
    assert decision["mode"] == "features" and decision["reason"].startswith("auto: kept")
    assert decision["table"].startswith("24 training images")
    assert decision["budget_why"].startswith(DERIVED) and decision["budget"] > 0  # on a CPU, from measurements
    steps = {s["kind"]: s for s in decision["plan"]}
    assert steps["features"]["status"] == "kept" and steps["features"]["val_loss"] is not None
    assert "larger" not in steps  # random weights: no packaged larger base is offered
    assert steps["finetune"]["status"] == "skipped" and "too few" in steps["finetune"]["why"]
    assert steps["top"]["status"] == "skipped" and "too few" in steps["top"]["why"]


def test_class_weights_balance_only_when_imbalanced() -> None:
    balanced = np.array([0] * 10 + [1] * 12)
    skewed = np.array([0] * 30 + [1] * 10)
    assert class_weights(balanced, 2, "auto") is None
    assert class_weights(skewed, 2, "auto").tolist() == pytest.approx([40 / 60, 40 / 20])
    assert class_weights(skewed, 2, "none") is None
    assert class_weights(balanced, 2, "balanced") is not None


def test_precision_choices() -> None:
    assert resolve_precision("cpu").dtype is None
    assert resolve_precision("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(TlearnError, match="fp16 needs a CUDA device"):
        resolve_precision("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(TlearnError, match="no CUDA device"):
            resolve_precision("cuda")


def test_bf16_training_runs_on_cpu(photos: Path) -> None:
    clf = ImageClassifier(mode="scratch", model="small-cnn", epochs=1, precision="bf16", device="cpu", **FAST)
    history = clf.fit(photos)
    assert np.isfinite(history.history["loss"]).all()


def test_compare_writes_the_table_and_chart(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tlearn.cli import main

    code = main(["compare", str(photos), "--models", "logreg-pixels,test_efficientnet:features,small-cnn",
                 "--no-pretrained", "--out", str(tmp_path / "cmp"), "--workers", "0", "--epochs", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert {"compare.csv", "compare.md", "compare.png", "logreg-pixels", "test_efficientnet-features"} <= \
        {p.name for p in (tmp_path / "cmp").iterdir()}
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("model,split,accuracy,loss,train_seconds,trainable_params,total_params")
    assert [r.split(",")[0] for r in rows[1:]] == ["logreg-pixels", "test_efficientnet:features", "small-cnn"]
    assert "| logreg-pixels | test |" in out and out.count(" | – |") >= 1  # a logistic regression has no epochs
    assert "| small-cnn | test |" in out and "| 2 |" in out
    splits = [(tmp_path / "cmp" / d / "split.csv").read_text() for d in ("logreg-pixels", "test_efficientnet-features")]
    assert splits[0] == splits[1], "every model trains on the same split"
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "href='logreg-pixels/report.html'" in page and "href='test_efficientnet-features/report.html'" in page
    assert page.count("data:image/png;base64,") == 2  # accuracy/time bars, overlaid validation curves (small-cnn)
    runs = ("logreg-pixels", "test_efficientnet-features")
    assert all((tmp_path / "cmp" / d / "report.html").is_file() for d in runs)


def test_compare_rejects_unknown_modes() -> None:
    from tlearn.compare import parse_models

    assert parse_models("small-cnn, resnet18:finetune,resnet18") == [
        {"mode": "scratch", "model": "small-cnn"}, {"backbone": "resnet18", "mode": "finetune"},
        {"backbone": "resnet18", "mode": "features"}]
    with pytest.raises(TlearnError, match="must be one of auto, features, frozen, finetune"):
        parse_models("resnet18:scratch")


def test_augment_preview_writes_a_grid(photos: Path, tmp_path: Path) -> None:
    from tlearn.cli import main

    assert main(["augment-preview", str(photos / "red" / "red_000.png"), "--n", "4", "--out",
                 str(tmp_path / "grid.png"), "--augment", "strong"]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tlearn.cli", "train", str(data), "--mode", "scratch", "--model", "small-cnn",
            "--epochs", "6", "--batch-size", "8", "--workers", "0", "--out", str(out), *extra]


def test_kill_mid_epoch_then_resume_matches_an_uninterrupted_run(photos: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run(_train_cmd(photos, tmp_path / "whole"), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_cmd(photos, tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (tmp_path / "cut" / "model.safetensors").exists(), "killed mid-training"
    resumed = subprocess.run(_train_cmd(photos, tmp_path / "ignored", "--resume", str(tmp_path / "cut")), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    # Model, optimizer, scheduler and RNG states all come back, so the resumed run retraces the same epochs.
    assert (tmp_path / "cut" / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert cut[split]["accuracy"] == whole[split]["accuracy"]
        assert cut[split]["loss"] == pytest.approx(whole[split]["loss"], rel=1e-6)
    assert not checkpoint.exists(), "a finished run drops its checkpoint"
    with pytest.raises(TlearnError, match="nothing|no checkpoint"):
        ImageClassifier(resume=str(tmp_path / "cut"), verbose=False).fit(photos)
