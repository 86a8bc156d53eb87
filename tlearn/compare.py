"""Compare several models on one dataset and one split: a table (CSV and Markdown) and a bar chart.

A model is named as ``small-cnn``, ``alexnet`` or ``logreg-pixels`` (from scratch), or ``BACKBONE:MODE`` with a
mode of auto, features, frozen or finetune (e.g. ``efficientnet_lite0:finetune``; ``alexnet:features`` is the
ImageNet-pretrained AlexNet, plain ``alexnet`` the one from scratch). Every model trains on the split
the first one made, and the backbone modes share the feature cache.

Data of several labels an image is compared on mean average precision (with micro and macro F1 and exact match at
each model's thresholds), the models ranked by it; chance is then the mean share of images a label has.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlearn import plots
from tlearn.config import DataConfig, OutputConfig, TlearnError, route_options, validate
from tlearn.data import data_root, scan
from tlearn.display import safely
from tlearn.fileio import atomic_write_csv, atomic_write_text, read_csv_rows, safe_name
from tlearn.models import SCRATCH
from tlearn.pages import CSS, html_table, png_tag

log = logging.getLogger("tlearn")
BACKBONE_MODES = ("auto", "features", "frozen", "finetune")


def compare_models(data: str | Path | DataConfig, models: str, out: str | Path, *, verbose: bool = True,
                   **options: Any) -> Comparison:
    """Train each of ``models`` (as ``tlearn compare --models``: "small-cnn,efficientnet_lite0:features") on one
    split of ``data`` (a folder, a label file, or a :class:`DataConfig`) into ``out``; ``options`` are the settings
    they share, by the fields' names (``epochs=5``, ``seed=1``, a label file's ``images``, ...); ``verbose=False``
    trains them without logs or progress bars. Returns a row a model, shown as a table and bars in a notebook."""
    from tlearn.api import CONFIGS

    given = [data] if isinstance(data, DataConfig) else []
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    train_fields = {f.name for cls in CONFIGS for f in dataclasses.fields(cls)}  # ``seed`` is in both
    (config,) = route_options((DataConfig,), {**({} if given else {"path": str(data)}),
                                              **{k: v for k, v in options.items() if k in data_fields}}, given)
    configs = route_options(CONFIGS, {k: v for k, v in options.items() if k in train_fields or k not in data_fields})
    validate(config, *configs)
    return compare(config, models, Path(out), configs, verbose=verbose)


def parse_models(text: str) -> list[dict[str, str]]:
    """'logreg-pixels,efficientnet_lite0:features' -> the ImageClassifier options of each model."""
    models = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in SCRATCH:
            models.append({"mode": "scratch", "model": item})
            continue
        backbone, _, mode = item.partition(":")
        mode = mode or "features"
        if mode not in BACKBONE_MODES:
            raise TlearnError(f"--models entry {item!r}: the mode after ':' must be one of "
                              f"{', '.join(BACKBONE_MODES)}; scratch models are {', '.join(SCRATCH)}")
        models.append({"backbone": backbone, "mode": mode})
    if not models:
        raise TlearnError("--models must name at least one model, e.g. logreg-pixels,efficientnet_lite0:features")
    return models


def compare(data: DataConfig, models: str, out: Path, configs: Sequence[Any], verbose: bool = True) -> Comparison:
    """Train each model into ``out/<name>`` on one split and write ``compare.csv``, ``compare.md``,
    ``compare.png`` and ``compare.html``. ``configs`` are the settings every model shares (``ImageClassifier``'s);
    each model sets its own backbone, mode and scratch model. Returns one row per model."""
    from tlearn.api import ImageClassifier
    from tlearn.run import claim_out

    multi = scan(data).multi_label
    if multi and any(m.get("model") == "logreg-pixels" for m in parse_models(models)):  # before any model trains
        raise TlearnError(f"{data.label_file or data.path} gives several labels an image, and --models "
                          "logreg-pixels takes one class an image: leave it out (small-cnn trains on such data)")
    output = next((c for c in configs if isinstance(c, OutputConfig)), OutputConfig())
    claim_out(out, data_root(data), overwrite=output.overwrite, kind="compare")
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    manifest = data.split_manifest
    for spec in parse_models(models):
        name = spec.get("model") or f"{spec['backbone']}:{spec['mode']}"
        log.info(f"--- {name} ---")
        clf = ImageClassifier(configs=configs, verbose=verbose, **spec)
        folder = safe_name(name.replace(":", "-"))  # a name never becomes a path of its own
        folder = folder if folder not in used else f"{folder}-{len(rows) + 1}"
        used.add(folder)
        run_dir = out / folder
        clf.fit(dataclasses.replace(data, split_manifest=manifest), out=run_dir)
        manifest = manifest or str(run_dir / "split.csv")  # the next models reuse this split
        split = "test" if "test" in clf.metrics else "validation"
        m = clf.metrics[split]
        rows.append({"model": name, "split": split, **{k: m[k] for k in scores(multi)}, "loss": m["loss"],
                     "train_seconds": round(clf.train_seconds, 1), "trainable_params": clf.params["trainable"],
                     "total_params": clf.params["total"],
                     "epochs": "" if clf.history.closed_form else len(clf.history.epoch), "run": str(run_dir)})
    chance = 1 / len(clf.classes)
    if multi:  # a random ranking's average precision is the label's share of images
        rows.sort(key=lambda r: -r["mean_average_precision"])
        per_label = [x["support"] / m["images"] for x in m["per_label"].values() if x["support"]]
        chance = sum(per_label) / len(per_label)
    write_table(rows, out, chance)
    plots.compare_bars(rows, out / "compare.png", chance, scores(multi)[0])
    log.info(f"comparison report: {build_compare(out, rows, chance)}")
    return Comparison(rows, out)


def scores(multi: bool) -> tuple[str, ...]:
    """The scores a model is compared on, the first ranking them."""
    return ("mean_average_precision", "micro_f1", "macro_f1", "exact_match") if multi else ("accuracy",)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns: a model's name and split, its scores, loss, time and size."""
    return ["model", "split", *scores("mean_average_precision" in rows[0]), "loss", "train_seconds",
            "trainable_params", "total_params", "epochs"]


def _cell(column: str, v: Any) -> str:
    """A table cell: seconds to a tenth, scores to four places, counts with thousands separators, and '–' for no
    epochs (a logistic regression is one fit)."""
    if column == "train_seconds":
        return f"{v:.1f}"
    return f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) or "–"


def markdown(rows: list[dict[str, Any]], chance: float) -> str:
    shown = columns(rows)
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + f"\n\nChance level: {chance:.4f}{_ranked(rows)}\n"


def _ranked(rows: list[dict[str, Any]]) -> str:
    return " (mean average precision); ranked by it" if "mean_average_precision" in rows[0] else ""


def write_table(rows: list[dict[str, Any]], out: Path, chance: float) -> None:
    written = [*columns(rows), "run"]
    atomic_write_csv(out / "compare.csv", written, ([r[c] for c in written] for r in rows))
    atomic_write_text(out / "compare.md", markdown(rows, chance))


def build_compare(out: Path, rows: list[dict[str, Any]], chance: float) -> Path:
    """``out/compare.html``: the comparison table, accuracy and training-time bars, each model's validation curves
    overlaid, and a link to each model's own report."""
    histories = {}
    for r in rows:
        history = read_csv_rows(Path(r["run"]) / "history.csv")
        if history and r["epochs"] != "":  # a logistic regression is one fit: no curve
            histories[r["model"]] = {"epoch": [int(h["epoch"]) for h in history],
                                     **{k: [float(h[k]) for h in history] for k in ("val_accuracy", "val_loss")}}
    shown = [{**r, "train_seconds": f"{r['train_seconds']:.1f}", "epochs": r["epochs"] if r["epochs"] != "" else "–"}
             for r in rows]
    table = html_table([[r[c] for c in columns(rows)] for r in shown], [c.replace("_", " ") for c in columns(rows)])
    links = "".join(f"<li><a href='{html.escape(Path(r['run']).name)}/report.html'>{html.escape(r['model'])}</a>"
                    "</li>" for r in rows)
    curves = png_tag(plots.compare_curves(histories, out / "compare_curves.png")) if histories else \
        "<p>No model here trained in epochs: each is a logistic regression, fitted once.</p>"
    bars = png_tag(out / "compare.png") if (out / "compare.png").is_file() else ""
    body = (f"<h1>Comparison on {html.escape(rows[0]['split'])} split</h1>"
            f"<p>Every model trained on the same split. Chance level: {chance:.1%}{_ranked(rows)}.</p>{table}{bars}"
            f"<h2>Validation curves</h2>{curves}<h2>Each model's report</h2><ul>{links}</ul>")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tlearn comparison</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    atomic_write_text(out / "compare.html", page)
    return out / "compare.html"


class Comparison(list):
    """``compare_models()``'s result: a row a model (as ``compare.csv``), shown in a notebook as the table and the
    bars of ``out/compare.png``."""

    def __init__(self, rows: list[dict[str, Any]], out: Path):
        super().__init__(rows)
        self.out = Path(out)

    def _repr_html_(self) -> str:
        return safely(comparison_html, self)


def comparison_html(rows: Comparison) -> str:
    if not rows:
        return "<p>No model compared.</p>"
    shown = columns(list(rows))
    bars = rows.out / "compare.png"
    return (html_table([[r[c] if r[c] != "" else "–" for c in shown] for r in rows], [c.replace("_", " ")
                                                                                       for c in shown])
            + (png_tag(bars) if bars.is_file() else "") + f'<p class="muted">written to {html.escape(str(rows.out))}'
            "</p>")
