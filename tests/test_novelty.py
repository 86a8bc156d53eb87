"""Novelty: the scorer's arithmetic, and "novelty"/"unknown" in every prediction from every backend, saved with
the model, for models saved before it, and refused when its stored tensor is damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import load_file, save_file

from tests.conftest import COLOURS, HYMENOPTERA, TINY, make_folder, make_image, needs
from tlearn import ImageClassifier, TlearnError
from tlearn.artifact import CONFIG_FILE, MODEL_FILE, NOVELTY_TENSOR
from tlearn.config import DataConfig
from tlearn.labels import unusual
from tlearn.novelty import cap_rows, energy, fit, graph_module, knn_distance, normalised, outliers, sample_rows
from tlearn.predictor import Predictor
from tlearn.serve.app import create_app

FAST = {"verbose": False, "workers": 0}


def _clusters(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(centres), n)
    return centres[y] + rng.normal(0, 0.3, (n, centres.shape[1])), y


def test_the_threshold_accepts_the_asked_share_and_far_images_are_above_it() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 16)) + 5
    (X, y), (V, _) = _clusters(rng, 300, centres), _clusters(rng, 400, centres)
    logits = lambda F: -((F[:, None, :] - centres[None]) ** 2).sum(2) / 10  # noqa: E731 - a head near its classes
    scorer = fit(X, y, V, logits(V), accept=0.9)
    accepted = (scorer.score(V, logits(V)) <= scorer.threshold).mean()
    assert abs(accepted - 0.9) < 0.01
    far = -centres[:2] * 3  # unlike any training row
    assert (scorer.score(far, logits(far)) > scorer.threshold).all()
    assert scorer.reference.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(scorer.reference.astype(np.float32), axis=1), 1, atol=1e-3)


def test_with_a_handful_of_validation_images_the_distance_alone_is_thresholded_on_training_images_too() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 3, (2, 16)) + 5
    (X, y), (V, _), (new, _) = (_clusters(rng, n, centres) for n in (40, 3, 500))
    scorer = fit(X, y, V, rng.normal(size=(3, 2)), accept=0.98)
    assert not scorer.with_energy and "3 validation and 40 training images" in scorer.fitted_on
    assert scorer.threshold >= 2.05  # at least the normal distribution's 98th percentile
    assert (scorer.score(new, np.zeros((500, 2))) > scorer.threshold).mean() < 0.05  # images like the training data
    far = -centres * 3
    assert (scorer.score(far, np.zeros((2, 2))) > scorer.threshold).all()
    with torch.no_grad():
        twin = graph_module(scorer)(torch.from_numpy(far.astype(np.float32)), torch.zeros(2, 2)).numpy()
    np.testing.assert_allclose(twin, scorer.score(far, np.zeros((2, 2))), rtol=1e-4)


def test_the_reference_is_a_per_class_sample_within_the_cap() -> None:
    y = np.array([0] * 90 + [1] * 10)
    rows = sample_rows(y, 40, seed=0)
    assert len(rows) == 40 and (np.bincount(y[rows]) == [30, 10]).all()  # the small class whole, the rest to the large
    assert list(sample_rows(y, 500, seed=0)) == list(range(100))
    assert cap_rows(1280) == (10 << 20) // 2560
    X = np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32)
    small = fit(X, y, X[:20], np.zeros((20, 2)), accept=0.98, cap_bytes=64 * 2 * 25)
    assert small.reference.shape == (25, 64) and small.config()["rows"] == 25


def test_energy_ignores_what_the_softmax_ignores() -> None:
    z = np.array([[0.0, 3.0], [0.0, -3.0], [0.0, 0.1]])  # a binary logistic regression's [0, z]
    np.testing.assert_allclose(energy(z), energy(z + 7.0))
    assert energy(z)[0] == pytest.approx(energy(z)[1])  # as confident either way
    assert energy(z)[2] > energy(z)[0]  # unsure: higher


def test_outliers_score_each_image_against_the_rest_of_its_class() -> None:
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(0, 0.1, (20, 8)) + 3, [[-3.0] * 8], rng.normal(0, 0.1, (5, 8)) - 3, [[1.0] * 8]])
    y = np.array([0] * 21 + [1] * 5 + [2])
    score = outliers(X, y)
    assert int(np.nanargmax(score[:21])) == 20  # the planted one
    assert np.isnan(score[-1])  # a class of one has no others to compare with
    same = normalised(X[:21])
    np.testing.assert_allclose(score[:21], knn_distance(same, same, 10, exclude_self=True), atol=1e-6)
    np.testing.assert_allclose(knn_distance(same, same, 10, exclude_self=True, chunk=4),  # in pieces, the same
                               knn_distance(same, same, 10, exclude_self=True), atol=1e-6)


def test_the_graph_module_scores_as_numpy_does() -> None:
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(50, 12)), rng.integers(0, 3, 50)
    scorer = fit(X, y, X[:10] + 0.1, rng.normal(size=(10, 3)), accept=0.98)
    F, Z = rng.normal(size=(7, 12)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
    with torch.no_grad():
        ours = graph_module(scorer)(torch.from_numpy(F), torch.from_numpy(Z)).numpy()
    np.testing.assert_allclose(ours, scorer.score(F, Z), atol=1e-4)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("novelty")
    data = make_folder(tmp / "photos", per_class=16)
    others = tmp / "others"
    for i in range(6):
        make_image(others / f"green_{i}.png", COLOURS["green"], 500 + i)
    clf = ImageClassifier(**TINY, **FAST, mode="features", head="logreg", cache_dir=str(tmp / "cache"))
    clf.fit(data, out=tmp / "run")
    return tmp / "run", data, others


def _novelty(results: list[dict]) -> np.ndarray:
    return np.array([r["novelty"] for r in results])


def test_every_backend_gives_the_same_novelty_and_a_colour_never_seen_is_unknown(run, tmp_path: Path) -> None:
    run_dir, data, others = run
    cache = str(run_dir.parent / "cache")
    images = sorted((data / "blue").iterdir()) + sorted((data / "red").iterdir()) + sorted(others.iterdir())
    fast = Predictor.load(run_dir, cache_dir=cache)
    torch_backend = Predictor.load(run_dir, cache_dir=cache, runtime="torch", verbose=False)
    assert fast.backend == "onnx" and torch_backend.backend == "torch"
    from tlearn.export import export

    export(run_dir, tmp_path / "m.onnx", cache_dir=cache)
    exported = Predictor.load(tmp_path / "m.onnx")
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["novelty"]["threshold"] == fast.threshold and "novelty" in card["outputs"]
    results = [p.predict(images) for p in (fast, torch_backend, exported)]
    for r in results[1:]:
        np.testing.assert_allclose(_novelty(r), _novelty(results[0]), atol=1e-3)
        assert [x["unknown"] for x in r] == [x["unknown"] for x in results[0]]
    assert all(r["unknown"] for r in results[0][32:])  # green: a colour this model never saw
    assert sum(r["unknown"] for r in results[0][:32]) <= 2  # a 98 % threshold set on 4 validation images: rough
    assert _novelty(results[0][32:]).min() > _novelty(results[0][:32]).max()
    assert all(set(r) == {"path", "predictions"} for r in fast.predict(images, unknown=False))
    config = json.loads((run_dir / CONFIG_FILE).read_text())["model"]["novelty"]
    assert config["rows"] == len(load_file(str(run_dir / MODEL_FILE))[NOVELTY_TENSOR])


def test_evaluate_measures_other_photos_and_the_report_shows_the_score(run, tmp_path: Path) -> None:
    run_dir, _, others = run
    clf = ImageClassifier.load(run_dir, verbose=False, cache_dir=str(run_dir.parent / "cache"))
    metrics = clf.evaluate(unknown=others)
    assert metrics["unknown"]["auroc"] > 0.95 and metrics["unknown"]["unknown"] == 1.0
    assert metrics["unknown"]["images"] == 6 and 0 <= metrics["novelty"]["unknown"] <= 0.5
    (tmp_path / "empty").mkdir()
    with pytest.raises(TlearnError, match="no images there"):
        clf.evaluate(unknown=tmp_path / "empty")
    with pytest.raises(TlearnError, match="no such folder"):
        clf.evaluate(unknown=tmp_path / "missing")
    page = (run_dir / "report.html").read_text()
    assert "Unlike the training data" in page and "novelty.png" not in page  # drawn inline
    assert (run_dir / "novelty.png").is_file() and (run_dir / "outliers.csv").is_file()
    rows = (run_dir / "predictions.csv").read_text().splitlines()
    assert rows[0].endswith(",novelty") and all(r.rsplit(",", 1)[1] for r in rows[1:])


def test_the_server_says_unknown_and_can_be_told_not_to(run) -> None:
    run_dir, data, others = run
    predictor = Predictor.load(run_dir, cache_dir=str(run_dir.parent / "cache"))
    files = [("files", ("g.png", (others / "green_0.png").read_bytes(), "image/png")),
             ("files", ("b.png", next((data / "blue").iterdir()).read_bytes(), "image/png"))]
    answer = TestClient(create_app(predictor)).post("/predict", files=files).json()["results"]
    assert [r["unknown"] for r in answer] == [True, False] and answer[0]["novelty"] > predictor.threshold
    quiet = TestClient(create_app(predictor, unknown=False)).post("/predict", files=files).json()["results"]
    assert all("novelty" not in r and "unknown" not in r for r in quiet)


def _rewrite(run_dir: Path, tensors: dict, model_section: dict | None = None, version: int | None = None) -> None:
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    if model_section is not None:
        config["model"] = model_section
    if version is not None:
        config["format_version"] = version
    text = json.dumps(config, indent=2) + "\n"
    save_file(tensors, str(run_dir / MODEL_FILE), metadata={"format": "tlearn-model", "config": text})
    (run_dir / CONFIG_FILE).write_text(text)


def test_a_model_saved_before_novelty_predicts_as_before_and_says_why_once(run, tmp_path: Path, tlearn_log) -> None:
    run_dir, data, _ = run
    old = shutil.copytree(run_dir, tmp_path / "old")
    tensors = load_file(str(old / MODEL_FILE))
    del tensors[NOVELTY_TENSOR]
    model = json.loads((old / CONFIG_FILE).read_text())["model"]
    del model["novelty"]
    _rewrite(old, tensors, model, version=1)
    for runtime in ("auto", "torch"):
        tlearn_log.clear()
        p = Predictor.load(old, cache_dir=str(run_dir.parent / "cache"), runtime=runtime, verbose=False)
        results = p.predict([data / "blue"])
        assert all(set(r) == {"path", "predictions"} for r in results)
        said = [r.getMessage() for r in tlearn_log.records if "before tlearn scored novelty" in r.getMessage()]
        assert len(said) == 1, (runtime, said)
    new = Predictor.load(run_dir, cache_dir=str(run_dir.parent / "cache")).predict([data / "blue"])
    np.testing.assert_allclose([r["predictions"][0]["probability"] for r in results],
                               [r["predictions"][0]["probability"] for r in new], atol=1e-5)


@pytest.mark.parametrize("damage", ["dtype", "shape", "nan"])
def test_a_damaged_reference_is_a_one_line_error(run, tmp_path: Path, damage: str) -> None:
    run_dir, _, _ = run
    bad = shutil.copytree(run_dir, tmp_path / "bad")
    tensors = load_file(str(bad / MODEL_FILE))
    ref = tensors[NOVELTY_TENSOR]
    tensors[NOVELTY_TENSOR] = {"dtype": ref.astype(np.float32), "shape": ref[:-1],
                               "nan": np.full_like(ref, np.nan)}[damage]
    _rewrite(bad, tensors)
    for runtime in ("auto", "torch"):
        with pytest.raises(TlearnError) as e:
            Predictor.load(bad, cache_dir=str(run_dir.parent / "cache"), runtime=runtime, verbose=False)
        assert NOVELTY_TENSOR in str(e.value) and "\n" not in str(e.value)


def test_check_outliers_lists_the_image_unlike_its_class(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=14)
    make_image(data / "blue" / "odd.png", COLOURS["green"], 99)
    found = unusual(DataConfig(path=str(data)), progress=False)
    assert found and found[0].path.endswith("odd.png") and found[0].kind == "outlier"


def _not_photos(folder: Path, n: int = 30) -> Path:
    """Pictures people upload by mistake: flat colours with noise, gradients and pages of text."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    for i in range(n):
        if i % 3 == 0:
            pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 6, (240, 320, 3)), 0, 255)
        elif i % 3 == 1:
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            pixels = np.repeat(a + (b - a) * np.linspace(0, 1, 320)[None, :, None], 240, 0)
        else:
            page = Image.new("RGB", (320, 240), (250, 250, 245))
            for line in range(10):
                ImageDraw.Draw(page).text((10, 8 + 22 * line), f"line {line} of page {i}: the quick brown fox",
                                          fill=(20, 20, 20))
            pixels = np.asarray(page)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
@needs(HYMENOPTERA)
def test_on_real_photos_pictures_that_are_not_photos_are_unknown_and_the_placeholder_stands_out(
        tmp_path: Path) -> None:
    clf = ImageClassifier(mode="features", verbose=False)
    clf.fit(HYMENOPTERA, out=tmp_path / "run")
    metrics = clf.evaluate(unknown=_not_photos(tmp_path / "not_photos"))
    assert metrics["unknown"]["auroc"] >= 0.97 and metrics["unknown"]["unknown"] >= 0.9
    assert metrics["novelty"]["unknown"] <= 0.06  # validation here: hymenoptera has no test split
    first = (tmp_path / "run" / "outliers.csv").read_text().splitlines()[1]
    assert first.split(",")[0].endswith("imageNotFound.gif")  # the web placeholder among the ants
