"""Grad-CAM heatmaps: where the evidence lies, in the model's own crop, laid back over the original photo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COLOURS, TINY, make_folder
from tlearn import TlearnError
from tlearn.api import ImageClassifier
from tlearn.cli import main
from tlearn.explain import onto_image
from tlearn.images import crop_box

QUADRANTS = {"top-left": (0, 0), "top-right": (1, 0), "bottom-left": (0, 1), "bottom-right": (1, 1)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageClassifier, Path]:
    """A head on the tiny random-weight base, trained to tell red images from blue ones, saved as a run."""
    tmp = tmp_path_factory.mktemp("explain")
    clf = ImageClassifier(**TINY, mode="features", verbose=False, cache_dir=str(tmp / "cache"))
    clf.fit(make_folder(tmp / "photos", per_class=12))
    clf.save(tmp / "run")
    return clf, tmp / "run"


def red_quadrant(path: Path, quadrant: str, size: tuple[int, int] = (160, 160), seed: int = 0) -> Path:
    """A noisy blue image with a noisy red quarter: the only evidence for 'red' is in ``quadrant``."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.array(COLOURS["blue"]) + rng.normal(0, 25, (h, w, 3))
    x, y = QUADRANTS[quadrant]
    pixels[y * h // 2:(y + 1) * h // 2, x * w // 2:(x + 1) * w // 2] = \
        np.array(COLOURS["red"]) + rng.normal(0, 25, (h // 2, w // 2, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def mass_in(heat: np.ndarray, quadrant: str) -> float:
    h, w = heat.shape
    x, y = QUADRANTS[quadrant]
    return float(heat[y * h // 2:(y + 1) * h // 2, x * w // 2:(x + 1) * w // 2].sum() / heat.sum())


@pytest.mark.parametrize("views", [["center"], ["center", "flip"]])
def test_the_heatmap_lies_on_the_quadrant_that_holds_the_evidence(trained, tmp_path: Path, views: list[str]) -> None:
    """With the mirror view too, its map must be mirrored back, or half of it would land on the wrong side."""
    clf, _ = trained
    clf.spec.views = views
    try:
        for i, quadrant in enumerate(QUADRANTS):
            result = clf.explain(red_quadrant(tmp_path / f"{quadrant}.png", quadrant, seed=i), class_name="red")[0]
            assert result["heatmap"].shape == (160, 160)
            assert mass_in(result["heatmap"], quadrant) > 0.5, quadrant  # of four quarters: chance is 0.25
    finally:
        clf.spec.views = ["center"]


def test_the_heatmap_has_the_photos_size_and_is_zero_outside_the_crop(trained, tmp_path: Path) -> None:
    clf, _ = trained
    wide = red_quadrant(tmp_path / "wide.png", "top-left", size=(300, 120))
    (result,) = clf.explain(wide)
    heat = result["heatmap"]
    assert heat.shape == (120, 300) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    left, _, right, _ = crop_box(clf.spec.preprocessing, 300, 120)
    assert 0 < left < right < 300  # the centre crop of a wide photo leaves its sides out...
    assert not heat[:, :int(left)].any() and not heat[:, int(np.ceil(right)):].any()  # ...and they get nothing
    assert heat[:, int(np.ceil(left)):int(right)].any()


def test_explain_agrees_with_predict(trained, tmp_path: Path) -> None:
    clf, _ = trained
    paths = [red_quadrant(tmp_path / f"{q}.png", q, seed=i) for i, q in enumerate(QUADRANTS)]
    for explained, predicted in zip(clf.explain(paths, top_k=2), clf.predict(paths, top_k=2), strict=True):
        top = predicted["predictions"][0]
        assert explained["class"] == top["class"]
        assert explained["probability"] == pytest.approx(top["probability"], abs=1e-4)
        assert [p["class"] for p in explained["predictions"]] == [p["class"] for p in predicted["predictions"]]
    (first,) = clf.explain(paths[:1])
    not_predicted = "blue" if first["class"] == "red" else "red"
    (other,) = clf.explain(paths[:1], class_name=not_predicted)  # the evidence for a class it did not predict
    assert other["class"] == not_predicted
    assert other["probability"] == pytest.approx(1 - first["probability"], abs=1e-6)
    assert other["predictions"] == first["predictions"]


def test_a_crop_is_laid_back_where_it_came_from() -> None:
    cam = np.zeros((4, 4), np.float32)
    cam[0, 3] = 1.0  # the top-right cell of the crop
    heat = onto_image(cam, (100.0, 0.0, 300.0, 200.0), 400, 200)  # a 200 px crop from the middle of a wide image
    assert not heat[:, :100].any() and not heat[:, 300:].any()
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 250 <= x < 300 and y < 50  # the cell spans x 250-300, y 0-50 of the image


@pytest.mark.parametrize("mode", ["squash", "border", "center"])
def test_crop_box_matches_timms_own_transform(mode: str) -> None:
    """A white dot, sent through timm's evaluation transform, lands where the crop box says it does."""
    import timm.data

    pp = {"input_size": [3, 96, 128], "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3,
          "crop_pct": 0.9, "crop_mode": mode}
    width, height, dot = 400, 250, (260, 90)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[dot[1] - 3:dot[1] + 3, dot[0] - 3:dot[0] + 3] = 255
    x = timm.data.create_transform(**pp, is_training=False)(Image.fromarray(pixels)).numpy()[0]
    y_in, x_in = np.unravel_index(x.argmax(), x.shape)
    left, top, right, bottom = crop_box(pp, width, height)
    expected = ((dot[0] - left) / (right - left) * 128, (dot[1] - top) / (bottom - top) * 96)
    assert abs(x_in - expected[0]) <= 2 and abs(y_in - expected[1]) <= 2


def test_every_kind_of_run_is_explained(tmp_path: Path) -> None:
    photos = make_folder(tmp_path / "photos", per_class=8)
    image = red_quadrant(tmp_path / "q.png", "bottom-right")
    for options in ({"mode": "frozen", "epochs": 1, **TINY}, {"mode": "finetune", "epochs": 1, **TINY},
                    {"mode": "scratch", "model": "small-cnn", "epochs": 1}):
        clf = ImageClassifier(verbose=False, **options)
        clf.fit(photos)
        clf.save(tmp_path / options["mode"])
        loaded = ImageClassifier.load(tmp_path / options["mode"], verbose=False)
        (result,) = loaded.explain([image])
        assert result["heatmap"].shape == (160, 160) and 0 <= result["heatmap"].min() <= result["heatmap"].max() <= 1
        assert result["class"] == loaded.predict([image], top_k=1)[0]["predictions"][0]["class"], options


def test_a_model_without_a_feature_map_says_so(tmp_path: Path) -> None:
    clf = ImageClassifier(mode="scratch", model="logreg-pixels", verbose=False)
    clf.fit(make_folder(tmp_path / "photos", per_class=6))
    with pytest.raises(TlearnError, match="logreg-pixels run has no convolutional feature map"):
        clf.explain([red_quadrant(tmp_path / "q.png", "top-left")])


def test_cli_writes_a_figure_per_image_and_replaces_only_its_own(trained, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    _, run = trained
    image = red_quadrant(tmp_path / "photo.png", "top-left")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "heatmaps"
    out.mkdir()
    theirs = out / "photo.heatmap.png"
    theirs.write_bytes(b"the user's own file")
    assert main(["explain", str(run), str(image), str(broken), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [set(r) for r in results] == [{"path", "class", "probability", "predictions", "heatmap_png"},
                                         {"path", "error"}]
    assert results[0]["heatmap_png"] == str(out / "photo-2.heatmap.png")
    assert theirs.read_bytes() == b"the user's own file"  # never replaced
    assert "broken.jpg: error:" in captured.err
    figure = Image.open(out / "photo-2.heatmap.png")
    assert figure.info.get("Software") == "tlearn explain" and figure.width > figure.height
    assert main(["explain", str(run), str(image), "--out", str(out)]) == 0  # again: its own figure is replaced
    assert sorted(p.name for p in out.iterdir()) == ["photo-2.heatmap.png", "photo.heatmap.png"]
    assert "photo-2.heatmap.png" in capsys.readouterr().out


def test_cli_errors_are_one_line(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, run = trained
    image = red_quadrant(tmp_path / "photo.png", "top-left")
    assert main(["explain", str(run), str(image), "--class", "green", "--out", str(tmp_path / "h")]) == 2
    assert "--class 'green' is not one of this run's classes: blue, red" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert main(["explain", str(run), str(text), "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: error: not a readable image (Pillow cannot identify it)" in err
    assert "no image could be read" in err
    assert not (tmp_path / "h").exists()  # nothing to draw, so no folder either
    assert main(["explain", str(run), str(image), "--out", str(text)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["explain", str(run), str(image), "--out", str(text / "heatmaps")]) == 2
    assert f"cannot create --out {text / 'heatmaps'}: Not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_real_photos_pasted_on_one_half_light_up_that_half(tmp_path: Path) -> None:
    """A head on two concatenated pretrained bases (each with its own crop size), trained on the bundled
    example: each photo, pasted on one half of a grey canvas, has most of its class's evidence on that half."""
    example = Path(__file__).resolve().parents[1] / "examples" / "ants_bees"
    clf = ImageClassifier(backbone="efficientnet_lite0+efficientnet_lite2", mode="features", verbose=False)
    clf.fit(example, out=tmp_path / "run")
    for i, (name, half) in enumerate([("ants", 0), ("bees", 1), ("ants", 1), ("bees", 0)]):
        photo = Image.open(sorted((example / name).glob("*.jpg"))[i])
        photo.thumbnail((224, 448))
        canvas = Image.new("RGB", (448, 448), (128, 128, 128))
        canvas.paste(photo, (half * 224 + (224 - photo.width) // 2, (448 - photo.height) // 2))
        canvas.save(tmp_path / f"{i}.png")
        (result,) = clf.explain([tmp_path / f"{i}.png"], class_name=name)
        heat = result["heatmap"]
        assert heat[:, half * 224:(half + 1) * 224].sum() / heat.sum() > 0.6, (name, half)
    assert "No heatmaps" not in (tmp_path / "run" / "report.html").read_text()
