"""Correctness on every device and every input: each test here failed before its fix (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY, make_folder
from tlearn import run
from tlearn.api import ImageClassifier
from tlearn.backbones import load_backbone
from tlearn.checkpoint import CHECKPOINT_FILE
from tlearn.config import BackboneConfig
from tlearn.models import Classifier, make_head, summary


def test_the_model_summary_runs_wherever_the_model_lives() -> None:
    """On CUDA the base sits on the GPU and the head on the CPU when the report summarises them; the meta device
    stands in for the GPU here, and mixing it with the CPU fails as a GPU would."""
    bb = load_backbone(BackboneConfig(backbone="test_efficientnet", pretrained=False))
    model = Classifier(bb.model, make_head(bb.num_features, 3, hidden=8, dropout=0.1))
    size = bb.preprocessing["input_size"]
    expected = summary(model, size)
    assert expected[-1]["output"] == (1, 3) and len(expected) > 5
    bb.model.to("meta")
    assert summary(model, size) == expected
    model.to("meta")
    assert summary(model, size) == expected


def test_a_failing_report_leaves_the_saved_model_and_no_checkpoint(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args, **_kwargs):
        raise RuntimeError("the report failed")

    monkeypatch.setattr(run, "build_report", broken)
    clf = ImageClassifier(**TINY, mode="frozen", epochs=2, verbose=False, workers=0, batch_size=8)
    with pytest.raises(RuntimeError, match="the report failed"):
        clf.fit(make_folder(tmp_path / "photos", per_class=6), out=tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()
