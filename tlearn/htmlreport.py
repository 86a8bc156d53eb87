"""``report.html``: one self-contained page per run (every image embedded, no network), rebuilt from the run's
files by ``tlearn report RUN``.

Sections: header (data, model, mode and why, settings, time, versions), training curves, sample grid (plain and
augmented), test metrics with the confusion matrix, the highest-loss images, calibration, the model summary and
the data-quality findings. The figures are also written beside it as PNG files."""

from __future__ import annotations

import contextlib
import functools
import html
import json
import platform
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlearn import fileio, grids, multireport, plots
from tlearn.artifact import load_model, read_run
from tlearn.calibrate import binned
from tlearn.config import AugmentConfig, TlearnError
from tlearn.configio import from_dict
from tlearn.fileio import atomic_write_text, default_cache_dir, file_sha256, read_csv_rows
from tlearn.pages import html_table, page, png_tag, section
from tlearn.report import read_predictions_csv

if TYPE_CHECKING:
    from torch import nn

    from tlearn.explain import Explainer

    Explaining = Callable[[], Explainer]  # the run's explainer, built on first call

GALLERY = 12  # highest-loss images shown
CORRECT_PER_CLASS = 2  # correct predictions shown with their heatmaps, per class...
MAX_CLASSES_EXPLAINED = 10  # ...for this many classes
PER_CLASS = 2  # plain and augmented samples per class in the grid
MAX_CLASSES_IN_GRID = 20




def _header(config: dict[str, Any], run_dir: Path, shown_as: Path) -> str:
    spec, decision, train = config["model"], config.get("decision", {}), config.get("train", {})
    summary = config.get("data_summary", {})
    versions = config.get("versions", {})
    model = spec["arch"] if spec["kind"] == "scratch" else (spec.get("backbone") or {}).get("backbone", spec["arch"])
    mode = decision.get("mode", spec["kind"])
    settings = {k: train.get(k) for k in ("batch_size", "lr", "optimizer", "head", "hidden", "dropout",
                                         "weight_decay", "patience") if k in train}
    if mode == "finetune":
        settings.update(unfreeze=decision.get("unfreeze"), lr_mult=decision.get("lr_mult"))
    history = read_csv_rows(run_dir / "history.csv")
    best = config.get("best_epoch")
    augment = config.get("augment", {}).get("augment")
    rows = [["data", f"{summary.get('root', '?')} ({summary.get('layout', '?')})"],
            ["classes", f"{len(spec['classes'])}: " + ", ".join(spec["classes"])],
            ["model", f"{model} ({spec['kind']}), {config.get('params', {}).get('trainable', 0):,} trainable of "
                      f"{config.get('params', {}).get('total', 0):,} parameters"],
            ["mode", f"{mode}: {decision.get('reason', '')}"],
            ["settings", ", ".join(f"{k} {v}" for k, v in settings.items())
             + (f", augment {augment}" if mode in ("frozen", "finetune", "scratch") else "")],
            ["epochs", f"{len(history)} trained" + (f", best {best} kept" if best else "")],
            ["training time", f"{config.get('train_seconds', 0):.1f} s"],
            ["versions", f"tlearn {versions.get('tlearn')}, torch {versions.get('torch')}, "
                         f"timm {versions.get('timm')}, Python {platform.python_version()}"]]
    counts = summary.get("counts", {})
    splits = list(counts)
    count_rows = [[c, *(counts[s][c] for s in splits)] for c in spec["classes"]]
    count_rows.append(["total", *(sum(counts[s].values()) for s in splits)])
    title = f"{model}:{mode} on {Path(summary.get('root', shown_as)).name}"
    return (f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(str(shown_as))}</p>"
            + html_table(rows, ["", ""], "kv") + (html_table(count_rows, ["class", *splits]) if splits else ""))


def _decision(config: dict[str, Any]) -> str:
    """Where the data fell in the classic strategy table, and what was measured and decided instead."""
    decision = config.get("decision", {})
    parts = [f"<p>{html.escape(decision.get('reason', 'no decision recorded'))}</p>"]
    if decision.get("table"):
        parts.append(f"<p>The classic strategy table, by training-set size, says: <b>{html.escape(decision['table'])}"
                     "</b>. tlearn shows it for reference and decides from the measurements below.</p>")
    if decision.get("budget"):
        why = f" ({html.escape(decision['budget_why'])})" if decision.get("budget_why") else ""
        parts.append(f"<p>Time budget: {decision['budget']:.0f} s for the whole run{why}.</p>")
    m = decision.get("measured")
    if m:
        parts.append(f"<p>Measured before planning: {m['rate']:.0f} images/s through the base on this machine "
                     f"(decoding and forward pass), and {m['misses']:,} image views not yet in the feature cache"
                     + (f" ({m['larger_misses']:,} for {html.escape(m['larger'])})" if m.get("larger") else "")
                     + ". The estimates below come from these.</p>")
    plan = decision.get("plan", [])
    if plan:
        rows = [[i, s["name"], f"~{s['estimate_s']:.0f} s" if s.get("estimate_s") else "-", s["status"],
                 f"{s['seconds']:.1f} s" if s.get("seconds") else "-",
                 "-" if s.get("val_loss") is None else f"{s['val_loss']:.4f} ({s.get('val_loss_calibrated', '-')})",
                 "-" if s.get("val_accuracy") is None else s["val_accuracy"],
                 s.get("head") or s.get("why") or ""] for i, s in enumerate(plan, 1)]
        parts.append(html_table(rows, ["step", "what", "estimate", "outcome", "took", "val loss (calibrated)",
                                       "val accuracy", "head, or why"]))
        candidates = [[s["name"], c["head"], c["val_loss"], c["val_accuracy"]] for s in plan
                      for c in s.get("candidates", [])]
        if candidates:
            parts.append("<p>Heads tried on the cached features (trained on the training split, scored on "
                         "validation; the lowest loss is kept):</p>"
                         + html_table(candidates, ["step", "head", "val loss", "val accuracy"]))
    return "\n".join(parts)


def _curves(run_dir: Path, config: dict[str, Any]) -> str:
    path = run_dir / "curves.png"
    if not path.is_file():
        return "<p class='muted'>No curves.png in this run.</p>"
    note = ("<p>The dotted line marks the best epoch, whose weights were kept; a dashed red line marks where "
            "fine-tuning starts.</p>")
    kept = [s for s in config.get("decision", {}).get("plan", []) if s.get("status") == "kept"]
    if kept and kept[-1].get("head", "").startswith("dense") and config["model"]["kind"] == "head":
        note += ("<p>This dense head stopped early on 15 % of the training images, so its curves' validation line "
                 "is that split; its score on the validation split is in the Decision section.</p>")
    return note + png_tag(path)


def _train_rows(config: dict[str, Any], run_dir: Path) -> list[tuple[Path, str]]:
    """The training images and their classes (several labels: joined by ';'), from the run's split.csv."""
    root = Path(config.get("data_summary", {}).get("root", ""))
    return [(root / r["path"], r["class"] if "class" in r else ";".join(json.loads(r["labels"])))
            for r in read_csv_rows(run_dir / "split.csv") if r.get("split") == "train"]


def _samples(config: dict[str, Any], train: list[tuple[Path, str]], run_dir: Path, cache: Path) -> str:
    """A few training images per class after preprocessing, and augmented versions of them."""
    if not train:
        return "<p class='muted'>No training images are listed in this run's split.csv.</p>"
    pp = config["model"]["preprocessing"]
    augment = from_dict(AugmentConfig, config.get("augment", {}), str(run_dir / "config.json"))
    classes = config["model"]["classes"][:MAX_CLASSES_IN_GRID]
    chosen = {name: [p for p, c in train if name in c.split(";")][:PER_CLASS] for name in classes}  # ';': labels
    try:
        key = ["samples", 1, pp, augment, [[name, [file_sha256(p) for p in paths]] for name, paths in chosen.items()]]
    except OSError:
        key = None  # moved or unreadable since training: drawn from what is still there
    more = len(config["model"]["classes"]) - len(classes)
    path = plots.reuse(run_dir / "samples.png", key, lambda: grids.sample_grid(chosen, pp, augment, run_dir, PER_CLASS),
                       cache)
    if path is None:
        return "<p class='muted'>The training images are not readable from here.</p>"
    return (f"<p>{PER_CLASS} training images per class as the model sees them (resized and cropped), then the same "
            f"images augmented as the image modes train on them (<code>--augment {augment.augment}</code>).</p>"
            + png_tag(path) + (f"<p class='muted'>{more} more classes not shown.</p>" if more > 0 else ""))


def _metrics(metrics: dict[str, Any], run_dir: Path, cache: Path) -> str:
    split = "test" if "test" in metrics else "validation"
    m = metrics[split]
    per_class = [[name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in m["per_class"].items()]
    path = plots.reuse(run_dir / "confusion.png", ["confusion", m["confusion_matrix"], m["classes"]],
                       lambda: plots.confusion(m["confusion_matrix"], m["classes"], run_dir / "confusion.png"), cache)
    return (f"<p class='big'>{split}: accuracy {m['accuracy']:.2%}, loss {m['loss']:.4f} on {m['n']} images</p>"
            + html_table(per_class, ["class", "precision", "recall", "f1", "support"]) + png_tag(path))


def _gallery(predictions: list[dict[str, Any]], run_dir: Path, cache: Path, explainer: Explaining) -> str:
    split = "test" if any(r["split"] == "test" for r in predictions) else "validation"
    rows = sorted((r for r in predictions if r["split"] == split), key=lambda r: -r["loss"])
    wrong = [r for r in rows if r["true"] != r["predicted"]]
    pairs = Counter((r["true"], r["predicted"]) for r in wrong).most_common(10)
    shown = [(Path(r["path"]), f"true {r['true']}\npredicted {r['predicted']} ({r['probability']:.0%})\n"
                                f"loss {r['loss']:.2f}") for r in rows[:GALLERY]]
    grid, why = grids.heat_grid(shown, run_dir / "top_losses.png", grids.fingerprint(rows), explainer, cache)
    intro = (f"<p>{len(wrong)} of {len(rows)} {split} images are misclassified. The {min(GALLERY, len(rows))} "
             "images with the highest loss (the lowest probability of their true class), worst first, each beside "
             "its Grad-CAM heatmap: where the evidence for the predicted class lies (<code>tlearn explain</code>)."
             "</p>")
    pair_table = html_table([[t, p, n] for (t, p), n in pairs], ["true class", "predicted as", "images"]) \
        if pairs else ""
    return intro + pair_table + why + (png_tag(grid) if grid else "")


def _correct(predictions: list[dict[str, Any]], classes: list[str], run_dir: Path, cache: Path,
             explainer: Explaining) -> str:
    """The most confident correct predictions of a few classes, with their heatmaps."""
    split = "test" if any(r["split"] == "test" for r in predictions) else "validation"
    rows = [r for r in predictions if r["split"] == split]
    right = sorted((r for r in rows if r["true"] == r["predicted"]), key=lambda r: -r["probability"])
    shown = [(Path(r["path"]), f"{r['true']} ({r['probability']:.0%})") for name in classes[:MAX_CLASSES_EXPLAINED]
             for r in [r for r in right if r["true"] == name][:CORRECT_PER_CLASS]]
    if not shown:
        return "<p class='muted'>No image of this split is classified correctly.</p>"
    grid, why = grids.heat_grid(shown, run_dir / "correct.png", grids.fingerprint(rows), explainer, cache,
                           cols=2 * CORRECT_PER_CLASS)
    more = len(classes) - MAX_CLASSES_EXPLAINED
    return (f"<p>The {CORRECT_PER_CLASS} most confident correct {split} predictions of each class, beside their "
            "heatmaps. Evidence on the background rather than on the subject means the model learned a shortcut "
            "that will not hold on new photos.</p>" + why + (png_tag(grid) if grid else "")
            + (f"<p class='muted'>{more} more classes not shown.</p>" if more > 0 else ""))


def _calibration(metrics: dict[str, Any], predictions: list[dict[str, Any]], run_dir: Path, cache: Path) -> str:
    split = "test" if "test" in metrics else "validation"
    c = metrics[split].get("calibration")
    if not c:
        return "<p class='muted'>This run has no calibration data.</p>"
    rows = [r for r in predictions if r["split"] == split]
    correct = np.array([r["true"] == r["predicted"] for r in rows])
    before, after = (binned(np.array([r[key] for r in rows]), correct)
                     for key in ("probability_uncalibrated", "probability"))
    path = plots.reuse(run_dir / "reliability.png", ["reliability", before, after, c["temperature"]],
                       lambda: plots.reliability_diagram(before, after, c["temperature"], run_dir / "reliability.png"),
                       cache)
    text = (f"<p>Expected calibration error (ECE, 15 bins) on the {split} split: <b>{c['ece_uncalibrated']:.4f}</b> "
            f"before and <b>{c['ece']:.4f}</b> after temperature scaling. The temperature, "
            f"<b>{c['temperature']:.3f}</b>, was fitted on {html.escape(c.get('fitted_on', 'validation'))} by "
            f"minimising the negative log-likelihood; it is stored in the model, and <code>tlearn predict</code> "
            f"uses it unless given <code>--no-calibration</code>. Loss on {split}: {c['loss_uncalibrated']:.4f} "
            f"before, {metrics[split]['loss']:.4f} after.</p>")
    if split == "validation" and c.get("fitted_on", "validation") == "validation":
        text += ("<p><b>This run has no test split</b>, so the temperature was fitted on the very images it is "
                 "evaluated on here: the numbers after scaling are optimistic.</p>")
    return text + png_tag(path)


def _novelty(config: dict[str, Any], metrics: dict[str, Any], predictions: list[dict[str, Any]], run_dir: Path,
             cache: Path) -> str:
    """The novelty threshold, the score on validation and test, and the training images least like their class."""
    n = config["model"].get("novelty")
    if not n:
        return "<p class='muted'>This model was saved without a novelty score (before tlearn had one).</p>"
    scores = {split: vs for split in ("validation", "test") if (vs := [
        r["novelty"] for r in predictions if r["split"] == split and r.get("novelty") is not None])}
    shares = ", ".join(f"{m['novelty']['unknown']:.1%} of {split}" for split, m in metrics.items() if "novelty" in m)
    how = (f"the larger of the standardised distance of its features to the {n['k']} nearest training images and "
           "the standardised energy of the head's logits") if n.get("with_energy", True) else \
        f"the standardised distance of its features to the {n['k']} nearest training images"
    text = (f"<p>Each prediction carries a <b>novelty</b> score: how unlike the training images the image is ({how})."
            f" Above the threshold, <b>{n['threshold']:.3f}</b>, it is called <b>unknown</b>. The threshold accepts "
            f"{n['accept']:.0%} of images like the training data, as measured on "
            f"{html.escape(n.get('fitted_on', 'validation'))}. Called unknown here: {shares or 'none measured'}. "
            "<code>tlearn evaluate RUN --unknown FOLDER</code> measures it on photos of other things.</p>")
    if scores:
        text += png_tag(plots.reuse(run_dir / "novelty.png", ["novelty", scores, n["threshold"]],
                                    lambda: plots.novelty_histogram(scores, n["threshold"], run_dir / "novelty.png"),
                                    cache))
    odd = read_csv_rows(run_dir / "outliers.csv")
    if not odd:
        return text
    shown = [(Path(r["path"]), _caption(Path(r["path"]), f"{r['class']}: {float(r['score']):.3f}")) for r in odd]

    def draw() -> Path | None:
        tiles = grids.thumbnails(shown)
        return plots.image_grid(tiles, run_dir / "outliers.png", cols=4, tile=2.6) if tiles else None

    grid = plots.reuse(run_dir / "outliers.png", ["outliers", 1, [[str(p), c] for p, c in shown]], draw, cache)
    return (text + "<h3>Training images least like the rest of their class</h3><p>The mean cosine distance of each "
            "training image's features to its nearest other images of the same class, most unusual first: junk "
            "that slipped into a folder (a web placeholder, a screenshot) shows up here. Nothing was moved.</p>"
            + (png_tag(grid) if grid else "") + html_table([[r["path"], r["class"], r["score"]] for r in odd],
                                                           ["file", "class", "distance"]))


def _summary(model: nn.Module | None, config: dict[str, Any], base: Any, run_dir: Path, cache: Path) -> str:
    """Keras's model summary. Its rows depend on the architecture, the weights and the head's shape only, so they
    are kept under the cache folder, and a re-run does not build the network to list its layers again."""
    spec = config["model"]
    concatenated = spec["kind"] == "head" and "+" in spec["arch"]
    shape = {k: spec.get(k) for k in ("kind", "arch", "weights_id", "num_features", "hidden", "dropout")}
    key = ["summary", 1, shape, len(spec["classes"]), spec["preprocessing"]["input_size"],
           config.get("decision", {}).get("unfreeze") if spec["kind"] == "finetuned" else None]
    stored = fileio.keyed_path(cache, "report", key, ".json")
    try:
        rows = json.loads(stored.read_text())
    except (OSError, ValueError):
        rows = _summary_rows(model, config, base, run_dir)
        with contextlib.suppress(TlearnError):
            atomic_write_text(stored, json.dumps(rows))
    table = [[r["layer"], r["type"], str(tuple(r["output"])) if isinstance(r["output"], list) else r["output"],
              r["params"], "yes" if r["trainable"] else "no"] for r in rows]
    header = ["layer", "type", "output shape", "parameters", "trained"]
    if concatenated:  # bases of different input sizes: the head alone, on their concatenated features
        return (f"<p>The head reads the concatenated pooled features ({spec['num_features']:,} per image) of the "
                f"frozen bases {html.escape(spec['backbone']['backbone'].replace('+', ' and '))} "
                f"({config.get('params', {}).get('total', 0):,} parameters in all, "
                f"{sum(r['params'] for r in rows):,} of them trained).</p>" + html_table(table, header))
    total = sum(r["params"] for r in rows)
    trainable = sum(r["trainable"] for r in rows)
    return (f"<p>{trainable:,} trainable and {total - trainable:,} frozen parameters, {total:,} in all. Output "
            "shapes are for one image.</p>" + html_table(table, header))


def _summary_rows(model: nn.Module | None, config: dict[str, Any], base: Any, run_dir: Path) -> list[dict[str, Any]]:
    """The summary's rows, with the model (and for a head, its base) loaded from the run when not given."""
    from tlearn.models import Classifier, summary, unfreeze_groups

    spec = config["model"]
    if model is None:
        _, model, _ = load_model(run_dir)
    if spec["kind"] == "head" and "+" in spec["arch"]:
        rows = summary(model, [spec["num_features"]])
        return [{**r, "trainable": r["params"]} for r in rows]
    if spec["kind"] == "head":
        if base is None:
            from tlearn.backbones import load_backbone
            from tlearn.config import BackboneConfig

            base = load_backbone(from_dict(BackboneConfig, spec["backbone"], str(run_dir / "config.json")))
        model = Classifier(base.model, model)
    flags = {p: p.requires_grad for p in model.parameters()}  # set to what trained, then put back
    try:
        for p in model.parameters():
            p.requires_grad_(spec["kind"] == "scratch")
        if spec["kind"] in ("head", "finetuned"):
            for p in model.head.parameters():
                p.requires_grad_(True)
        if spec["kind"] == "finetuned" and config.get("decision", {}).get("unfreeze"):
            unfreeze_groups(model.base, config["decision"]["unfreeze"], 1.0, (0.1, 0.01))
        return summary(model, spec["preprocessing"]["input_size"])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _check_findings(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "check.json"
    return json.loads(path.read_text()).get("findings", []) if path.is_file() else []


def _mislabels(run_dir: Path, cache: Path) -> str:
    """The suspected mislabels found after training, most suspicious first, with thumbnails."""
    found = [f for f in _check_findings(run_dir) if f.get("kind") == "mislabel"]
    if not found:
        return ("<p>No training or validation image is suspected of being in the wrong folder (or the search did "
                "not run: it needs the pretrained base's cached features, which a scratch run has none of). "
                "<code>tlearn check DATA --labels</code> searches any folder.</p>")
    shown = [(Path(f["path"]), _caption(Path(f["path"]), f["detail"])) for f in found[:GALLERY]]

    def draw() -> Path | None:
        tiles = grids.thumbnails(shown)
        return plots.image_grid(tiles, run_dir / "mislabels.png", cols=4, tile=2.6) if tiles else None

    try:
        key = ["mislabels", 1, [[file_sha256(p), caption] for p, caption in shown]]
    except OSError:
        key = None
    grid = plots.reuse(run_dir / "mislabels.png", key, draw, cache)
    rows = [[f["path"], f["detail"]] for f in found[:50]]
    return (f"<p>{len(found)} training or validation image(s) are in a folder that a model which never saw them "
            "disagrees with, confidently (confident learning on out-of-fold predictions from the base's features; "
            "the same search as <code>tlearn check DATA --labels</code>). Most suspicious first. Some are "
            "labelling mistakes, some are hard photos: look before moving anything. Nothing was moved.</p>"
            + (png_tag(grid) if grid else "") + html_table(rows, ["file", "why"])
            + (f"<p class='muted'>Showing 50 of {len(found)}.</p>" if len(found) > 50 else ""))


def _caption(path: Path, detail: str) -> str:
    """The file's name and a finding's detail, wrapped to a thumbnail's width (five lines at most)."""
    name = path.name if len(path.name) <= 32 else path.name[:31] + "…"
    return "\n".join([name, *textwrap.wrap(detail, 34, max_lines=4, placeholder=" …")])


def _findings(run_dir: Path) -> str:
    findings = [f for f in _check_findings(run_dir) if f.get("kind") != "mislabel"]  # shown in their section
    skips = read_csv_rows(run_dir / "skipped.csv")
    if not findings and not skips:
        return ("<p>The check at training time found no exact duplicates, no leakage across splits and no "
                "conflicting labels, and no file was skipped. Near-duplicates need the full <code>tlearn check "
                "DATA</code>.</p>")
    rows = [[f.get("severity", ""), f.get("kind", ""), f.get("path", ""), f.get("detail", "")] for f in findings]
    rows += [["skipped", "unreadable", s["path"], s["reason"]] for s in skips]
    note = f"<p class='muted'>Showing 50 of {len(rows)}.</p>" if len(rows) > 50 else ""
    return html_table(rows[:50], ["severity", "finding", "file", "detail"]) + note + \
        "<p>Run <code>tlearn check DATA</code> for the full report, including near-duplicates.</p>"


def build_report(run_dir: str | Path, model: nn.Module | None = None, base: Any = None, *,
                 config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                 predictions: list[dict[str, Any]] | None = None, train: list[tuple[Path, str]] | None = None,
                 cache_dir: str | Path | None = None, shown_as: Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (and its PNG figures). The run writer passes what the run has in memory: the
    config, metrics, per-image predictions (``report.prediction_rows``), the training images with their classes,
    the model and, for a head, its base. ``tlearn report RUN`` passes nothing, and they are read from the run's
    files. Figures and the model summary drawn before from the same inputs are reused from the cache folder.
    ``shown_as`` is the folder named on the page when the run is written elsewhere first."""
    run_dir = Path(run_dir)
    shown_as = Path(shown_as or run_dir)
    config = read_run(run_dir).config if config is None else config  # validated: the one inside the model file
    if metrics is None or predictions is None:
        metrics_path, predictions_path = run_dir / "metrics.json", run_dir / "predictions.csv"
        if not metrics_path.is_file() or not predictions_path.is_file():
            raise TlearnError(f"{run_dir} has no metrics.json or predictions.csv: was it written by `tlearn train` "
                              "with --out? (a model saved by ImageClassifier.save after fit without out has no "
                              "evaluation)")
        try:
            metrics = json.loads(metrics_path.read_text())
            predictions = multireport.read_predictions_csv(predictions_path, config["model"]["classes"]) if \
                config["model"].get("multi_label") else read_predictions_csv(predictions_path)
            if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
                raise ValueError("metrics.json is not a JSON object of splits")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TlearnError(f"{run_dir}: metrics.json or predictions.csv is damaged ({e}); retrain, or restore "
                              "them") from e
    train = _train_rows(config, run_dir) if train is None else train
    cache = Path(cache_dir or default_cache_dir())
    explainer = functools.cache(lambda: grids.explainer(run_dir, model, base, cache_dir))  # built if a figure is drawn
    if config["model"].get("multi_label"):
        middle = [section(title, part) for title, part in multireport.sections(
            metrics, predictions, config["model"]["classes"], run_dir, cache)]
        body = "\n".join([_header(config, run_dir, shown_as), section("Decision", _decision(config)),
                          section("Training curves", _curves(run_dir, config)),
                          section("Sample images", _samples(config, train, run_dir, cache)), *middle,
                          section("Model summary", _summary(model, config, base, run_dir, cache)),
                          section("Data quality", _findings(run_dir))])
        return page(run_dir, shown_as, body)
    body = "\n".join([
        _header(config, run_dir, shown_as),
        section("Decision", _decision(config)),
        section("Training curves", _curves(run_dir, config)),
        section("Sample images", _samples(config, train, run_dir, cache)),
        section("Test metrics", _metrics(metrics, run_dir, cache)),
        section("Misclassified: top losses", _gallery(predictions, run_dir, cache, explainer)),
        section("Correct predictions and their evidence", _correct(predictions, config["model"]["classes"],
                                                                    run_dir, cache, explainer)),
        section("Calibration", _calibration(metrics, predictions, run_dir, cache)),
        section("Unlike the training data", _novelty(config, metrics, predictions, run_dir, cache)),
        section("Model summary", _summary(model, config, base, run_dir, cache)),
        section("Suspected mislabels", _mislabels(run_dir, cache)),
        section("Data quality", _findings(run_dir)),
    ])
    return page(run_dir, shown_as, body)
