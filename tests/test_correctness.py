"""Correctness on every device and every input: each test here failed before its fix (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, make_folder, make_image
from tlearn import fileio, run
from tlearn.api import ImageClassifier
from tlearn.backbones import load_backbone
from tlearn.checkpoint import CHECKPOINT_FILE
from tlearn.config import BackboneConfig, TrainConfig
from tlearn.models import Classifier, make_head, summary
from tlearn.runtime import Engine
from tlearn.train import DevicePlacementError, Precision, fit_head, tensor_batches, train_one_epoch


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


def test_a_failing_report_leaves_the_run_as_it_was_and_resumable(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The run is written whole or not at all: a failing report leaves no model beside a stale checkpoint (before
    the staged write, the model was saved and the checkpoint left behind), and --resume finishes the run."""
    def broken(*_args, **_kwargs):
        raise RuntimeError("the report failed")

    data, out = make_folder(tmp_path / "photos", per_class=6), tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(run, "build_report", broken)
        clf = ImageClassifier(**TINY, mode="frozen", epochs=2, verbose=False, workers=0, batch_size=8)
        with pytest.raises(RuntimeError, match="the report failed"):
            clf.fit(data, out=out)
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_FILE, "split.csv"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    resumed = ImageClassifier(**TINY, mode="frozen", epochs=2, verbose=False, workers=0, batch_size=8,
                              resume=str(out))
    resumed.fit(data)
    assert (out / "model.safetensors").is_file() and (out / "report.html").is_file()
    assert not (out / CHECKPOINT_FILE).exists()


def test_class_weights_reach_the_loss_through_the_loops_device_owner() -> None:
    """On CUDA the class weights were put on the GPU while heads on features train on the CPU. Now the loop places
    them itself; the armed check (as in every test) fails a loop that uses weights it did not place, on the CPU
    as a GPU would."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 1, 1], 10)
    X = (rng.normal(0, 1, (40, 8)) + 3 * y[:, None]).astype(np.float32)
    weight = torch.tensor([2.0, 0.5])  # made by the caller, on no device the loop chose
    head, history, _ = fit_head(X, y, X, y, 2, TrainConfig(head="dense", epochs=3), weight=weight)
    assert len(history.epoch) == 3 and next(head.parameters()).device.type == "cpu"
    run = Precision(torch.device("cpu"))
    model = run.module(make_head(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DevicePlacementError, match="training: tensor 2 is on cpu, not placed by the loop"):
        train_one_epoch(model, tensor_batches(X, y, 8)(), opt, run, weight)
    train_one_epoch(model, tensor_batches(X, y, 8)(), opt, run, run.put(weight))


def test_the_armed_device_check_fails_on_the_cpu_for_what_skipped_the_owner(
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = Precision(torch.device("cpu"))
    head = run.module(make_head(4, 2, dropout=0.0))
    placed, stray = run.put(torch.zeros(3)), torch.zeros(3)
    run.check("test", head, placed)
    with pytest.raises(DevicePlacementError, match="tensor 1 is on cpu, not placed by the loop"):
        run.check("test", head, placed, stray)
    with pytest.raises(DevicePlacementError, match="model.1.weight"):
        run.check("test", make_head(4, 2, dropout=0.0))
    monkeypatch.setenv("TLEARN_CHECK_DEVICES", "0")  # disarmed: only the device type is compared
    run.check("test", head, placed, stray)
    with pytest.raises(DevicePlacementError, match="is on meta"):
        run.check("test", head, stray.to("meta"))


@pytest.mark.parametrize("mode,options", [("features", {"head": "dense", "class_weight": "balanced"}),
                                          ("features", {"head": "logreg"}), ("frozen", {}),
                                          ("finetune", {"class_weight": "balanced"}), ("scratch", {}),
                                          ("scratch", {"model": "logreg-pixels"}), ("auto", {})])
def test_every_mode_trains_with_the_device_check_armed(tmp_path: Path, mode: str, options: dict) -> None:
    assert os.environ["TLEARN_CHECK_DEVICES"] == "1"  # armed for every test (conftest)
    extra = {} if mode == "scratch" else TINY
    clf = ImageClassifier(**extra, mode=mode, epochs=2, head_epochs=1, verbose=False, workers=0, batch_size=8,
                          **options)
    data = make_folder(tmp_path / "photos", per_class=8, classes=("blue", "red", "green"))
    (data / "green" / "green_000.png").unlink()  # imbalanced, so that balanced class weights are not all 1
    clf.fit(data)
    assert clf.history.epoch


@pytest.mark.parametrize("kind", ["features", "finetune"])
def test_a_model_trained_on_cuda_predicts_on_this_machine_where_the_caller_says(tmp_path: Path, kind: str) -> None:
    data = make_folder(tmp_path / "photos", per_class=6)
    trained = ImageClassifier(**TINY, mode=kind, epochs=1, head_epochs=1, verbose=False, workers=0, batch_size=8)
    trained.fit(data)
    trained.train_config.device, trained.train_config.precision = "cuda", "fp16"  # as a run on a GPU saves it
    trained.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["device"] == "cuda"
    expected = [r["predictions"][0]["class"] for r in ImageClassifier.load(tmp_path / "run", verbose=False,
                                                                          device="cpu").predict([data / "red"])]
    for options in ({}, {"device": "cpu", "precision": "fp32"}):
        clf = ImageClassifier.load(tmp_path / "run", verbose=False, **options)
        assert clf.extractor.run.device.type == "cpu" and clf.extractor.run.dtype is None
        assert [r["predictions"][0]["class"] for r in clf.predict([data / "red"])] == expected
        assert clf.train_config.epochs == 1  # how it was trained is still read from the run
    out = subprocess.run([sys.executable, "-m", "tlearn.cli", "predict", str(tmp_path / "run"), str(data / "red"),
                          "--device", "cpu", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [r["predictions"][0]["class"] for r in json.loads(out.stdout)] == expected


@pytest.mark.parametrize("mode", ["frozen", "features"])
def test_fitting_twice_with_one_seed_gives_one_result_and_leaves_the_global_rng_alone(tmp_path: Path,
                                                                                     mode: str) -> None:
    data = make_folder(tmp_path / "photos", per_class=8)
    clf = ImageClassifier(**TINY, mode=mode, head="dense", epochs=3, verbose=False, workers=0, batch_size=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = clf.fit(data).history["val_loss"]
    assert torch.equal(torch.get_rng_state(), state)  # training drew nothing from the caller's generator
    torch.rand(7)  # the caller's own random draws change nothing in the next fit
    assert clf.fit(data).history["val_loss"] == first


def test_the_api_seed_seeds_the_split_as_the_cli_seed_does(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=20)
    splits = {}
    for seed in (0, 5):
        clf = ImageClassifier(**TINY, mode="features", head="logreg", verbose=False, workers=0, seed=seed)
        clf.fit(data)
        assert clf.data_config.seed == seed
        splits[seed] = sorted(s.path.name for s in clf.data.split("validation"))
    assert splits[0] != splits[5]
    given = ImageClassifier(**TINY, mode="features", head="logreg", verbose=False, workers=0, seed=5)
    given.fit(data, seed=0)  # a split seed given to fit still wins
    assert sorted(s.path.name for s in given.data.split("validation")) == splits[0]


@pytest.mark.parametrize(("pixels", "expected"), [
    (np.full((16, 16), 0.5, dtype=np.float32), 128),  # floats in [0, 1], as scientific and HDR tools write them
    (np.full((16, 16), 300.0, dtype=np.float32), 255),  # above 255: the brightest pixel becomes 255
    (np.full((16, 16), np.nan, dtype=np.float32), 0),
])
def test_a_float_tiff_decodes_to_its_brightness_and_check_says_so(tmp_path: Path, pixels: np.ndarray,
                                                                   expected: int) -> None:
    from PIL import Image

    from tlearn.check import inspect_file
    from tlearn.images import load_image

    path = tmp_path / "float.tif"
    Image.fromarray(pixels, "F").save(path)
    assert np.asarray(load_image(path))[0, 0].tolist() == [expected] * 3  # was black for [0, 1]
    findings, _ = inspect_file(path)
    assert [f.kind for f in findings if f.severity == "info"] == ["high-bit-depth"]


def test_check_reports_exactly_the_conversions_the_decoder_makes(tmp_path: Path) -> None:
    from PIL import Image

    from tlearn.check import inspect_file
    from tlearn.images import decode, open_image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [photo, photo.rotate(90)]
    files = {"grey.png": (photo.convert("L"), {}), "print.jpg": (photo.convert("CMYK"), {}),
             "alpha.png": (photo.convert("RGBA"), {}), "grey-alpha.png": (photo.convert("LA"), {}),
             "deep.png": (Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)), {}),
             "anim.gif": (frames[0], {"save_all": True, "append_images": frames[1:]}),
             "rotated.jpg": (photo, {"exif": exif}), "plain.jpg": (photo, {})}
    for name, (image, options) in files.items():
        image.save(tmp_path / name, **options)
        made: list[str] = []
        with open_image(tmp_path / name) as im:
            decode(im, lambda kind, detail, made=made: made.append(kind))
        said = [f.kind for f in inspect_file(tmp_path / name)[0] if f.severity == "info"]
        assert sorted(said) == sorted(made), name
        assert bool(made) == (name != "plain.jpg"), name


def test_only_the_decoder_opens_image_files() -> None:
    package = Path(__file__).parent.parent / "tlearn"
    opening = [p.name for p in package.glob("*.py") if "Image.open(" in p.read_text()]
    assert opening == ["images.py"]


def test_a_class_missing_from_training_is_an_error_that_survives_python_O() -> None:
    code = ("import numpy as np\nfrom tlearn.train import fold_logreg\nfrom tlearn.config import TlearnError\n"
            "try:\n    fold_logreg(np.eye(4, dtype=np.float32), np.array([0, 1, 0, 1]), 3, 0)\n"
            "except TlearnError as e:\n    print('error:', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert "error: classes [2] (by index) have no image in the training split" in out.stdout, out.stderr


def test_predict_takes_a_tuple_of_paths(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "photos", per_class=4)
    files = tuple(sorted((data / "red").iterdir())[:2])
    clf = ImageClassifier(**TINY, mode="features", head="logreg", verbose=False, workers=0)
    clf.fit(data)
    for inputs in (files, iter(files), list(files)):
        assert [r["path"] for r in clf.predict(inputs)] == [str(p) for p in files]


def test_the_digest_memo_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "_digests", {})
    monkeypatch.setattr(fileio, "MEMO_ENTRIES", 3)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * 10)
    digests = [fileio.file_sha256(p) for p in paths]
    assert len(fileio._digests) == 3 and len(set(digests)) == 6
    assert fileio.file_sha256(paths[0]) == digests[0]  # forgotten here, still right


def test_concurrent_torch_extractions_leave_the_thread_count_as_it_was(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two extractions at once, the second starting while the first runs and ending after it: without taking
    turns, the second would restore the first one's setting. PyTorch's thread count is process-wide in its
    thread pool and MKL (OpenMP's part is per thread), so a process-wide stand-in models it here."""
    setting = {"threads": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: setting["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: setting.update(threads=n))
    paths = [make_image(tmp_path / f"{i}.png", (10 * i, 0, 0), i) for i in range(2)]
    inside = threading.Event()

    def first(x: torch.Tensor) -> torch.Tensor:
        inside.wait(timeout=1.0)  # taking turns, the second cannot start before this returns
        return x.mean((2, 3))

    def second(x: torch.Tensor) -> torch.Tensor:
        inside.set()
        time.sleep(0.3)
        return x.mean((2, 3))

    plain = {"input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3,
             "crop_pct": 1.0, "crop_mode": "center"}
    engines = [Engine(fn, plain, 3, "torch", "fp32", torch.device("cpu"), 1, 8, 1) for fn in (first, second)]
    a = threading.Thread(target=engines[0].extract, args=(paths,), kwargs={"progress": False})
    a.start()
    time.sleep(0.1)
    engines[1].extract(paths, progress=False)
    a.join()
    assert setting["threads"] == 2


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_training_frames_images_as_evaluation_does_for_every_crop_mode(crop_mode: str) -> None:
    """Before, training always resized the short side and centre-cropped, while evaluation followed the backbone's
    crop mode: a squash backbone trained on crops and was evaluated on squashed images."""
    from PIL import Image

    from tlearn.augment import train_transform
    from tlearn.config import AugmentConfig
    from tlearn.images import eval_transform

    pp = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
          "std": (0.229, 0.224, 0.225), "crop_pct": 1.0 if crop_mode == "border" else 0.875, "crop_mode": crop_mode}
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, :30] = (250, 20, 20)  # red at the left edge, which a centre crop throws away
    wide[:, 30:] = np.random.default_rng(0).integers(0, 255, (40, 90, 3))
    image = Image.fromarray(wide)
    trained = train_transform(pp, AugmentConfig(augment="none"))(image)
    evaluated = eval_transform(pp)(image)
    assert trained.shape == evaluated.shape == (3, 32, 32)
    assert (trained - evaluated).abs().max() < 0.1  # the same framing; CropResize differs by a grey level or two
    shown = train_transform(pp, AugmentConfig(augment="none"), normalize=False)(image)
    assert 0 <= shown.min() and shown.max() <= 1
    if crop_mode == "border":  # the padding is the mean colour, in both
        assert torch.allclose(evaluated[:, 0, 0], torch.zeros(3), atol=0.03)
        assert torch.allclose(shown[:, 0, 0], torch.tensor(pp["mean"]), atol=0.01)
