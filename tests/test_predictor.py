"""The predictor: a run folder → predictions through ONNX Runtime and NumPy, the same as the full stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, make_folder
from tlearn.api import ImageClassifier
from tlearn.predictor import Predictor

FAST = {"verbose": False, "workers": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("predictor")
    data = make_folder(tmp / "photos", per_class=10)
    clf = ImageClassifier(**TINY, **FAST, mode="features", head="dense", cache_dir=str(tmp / "cache"))
    clf.fit(data, out=tmp / "run")
    return tmp / "run", data


def _probabilities(results: list[dict]) -> np.ndarray:
    return np.array([[p["probability"] for p in r["predictions"]] for r in results])


def test_the_onnx_predictor_gives_the_full_stacks_predictions(run: tuple[Path, Path]) -> None:
    run_dir, data = run
    cache = str(run_dir.parent / "cache")
    fast = Predictor.load(run_dir, cache_dir=cache)
    assert fast.backend == "onnx" and fast.stack is None  # the base's ONNX export is in the cache: no torch needed
    full = ImageClassifier.load(run_dir, verbose=False, cache_dir=cache)
    images = [data / "red", data / "blue", data / "red" / "missing.png"]
    (data / "red" / "broken.png").write_bytes(b"not an image")
    for views in (["center"], ["center", "flip"]):
        fast.views = full.spec.views = views
        for tta in (False, True):
            ours, theirs = fast.predict(images, top_k=2, tta=tta), full.predict(images, top_k=2, tta=tta)
            assert [r["path"] for r in ours] == [r["path"] for r in theirs]
            assert [[p["class"] for p in r.get("predictions", [])] for r in ours] == \
                [[p["class"] for p in r.get("predictions", [])] for r in theirs]
            ok = [i for i, r in enumerate(ours) if "predictions" in r]
            np.testing.assert_allclose(_probabilities([ours[i] for i in ok]), _probabilities([theirs[i] for i in ok]),
                                       atol=1e-4)
    broken = [r for r in ours if r["path"].endswith("broken.png")]
    assert broken and "error" in broken[0]
    (data / "red" / "broken.png").unlink()


def test_without_the_onnx_export_it_uses_the_full_stack(run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, data = run
    moved = shutil.copytree(run_dir, tmp_path / "run")
    p = Predictor.load(moved, cache_dir=str(tmp_path / "empty-cache"), verbose=False)
    assert p.backend == "torch" and p.stack is not None
    assert p.predict([data / "red"], top_k=1)[0]["predictions"][0]["class"] == "red"
    torch_path = Predictor.load(run_dir, cache_dir=str(run_dir.parent / "cache"), runtime="torch", verbose=False)
    assert torch_path.backend == "torch"


def test_importing_the_predictor_loads_no_training_code_torch_or_scikit_learn() -> None:
    code = ("import sys, tlearn.predictor; heavy = ('torch', 'timm', 'sklearn', 'tlearn.train', 'tlearn.api', "
            "'tlearn.recipes', 'tlearn.extractor', 'tlearn.augment', 'tlearn.htmlreport', 'matplotlib'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predict_command_goes_through_the_predictor(run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from tlearn.cli import main

    run_dir, data = run
    monkeypatch.setenv("TLEARN_CACHE_DIR", str(run_dir.parent / "cache"))
    loaded = []
    real = Predictor.load.__func__

    def load(cls: type, *args, **kwargs) -> Predictor:
        loaded.append(real(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(Predictor, "load", classmethod(load))
    assert main(["predict", str(run_dir), str(data / "red"), "--top-k", "1"]) == 0
    assert loaded and loaded[0].stack is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and all(line.startswith(str(data / "red")) and ": red " in line for line in lines)
