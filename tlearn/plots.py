"""Every figure tlearn draws, written atomically as PNG.

The figures are matplotlib ``Figure`` objects made without pyplot, so tlearn never selects or changes the
process's matplotlib backend (a notebook keeps its own) and never leaves a figure open in pyplot's state; a
``Figure`` renders itself to PNG whatever the backend.

Axes are labelled, and class names stay readable however long they are or however many classes there are:
long names are wrapped or shortened, and fonts and figure sizes follow the class count.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlearn.config import TlearnError
from tlearn.fileio import atomic_path, atomic_write_bytes, keyed_path, open_regular, safe_name

if TYPE_CHECKING:
    from tlearn.calibrate import Reliability


def figure(**options: Any):
    """A new matplotlib ``Figure`` (``options``: its figsize and so on), outside pyplot, imported on first use;
    shown as a PNG when a notebook displays it, whatever matplotlib's backend there."""
    return _shown_figure()(**options)


@functools.lru_cache(maxsize=1)
def _shown_figure() -> type:
    from matplotlib.figure import Figure

    class Shown(Figure):
        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, dpi=90, format="png", bbox_inches="tight")
            return buffer.getvalue()

    return Shown


def _save(fig, path: Path, metadata: dict[str, str] | None = None) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight", metadata=metadata)
    return Path(path)


FIGURES_VERSION = 2  # bump when a change to the drawing changes figures drawn from the same inputs (2: TrueType text)


def reuse(path: Path, key: Any, draw: Callable[[], Path | None], cache: Path) -> Path | None:
    """The figure at ``path``, which ``draw()`` writes (or returns None for no figure). A figure is a function of
    its inputs, so one drawn before from the same ``key`` is copied from ``figures/`` under the cache folder
    instead; ``key`` None always draws."""
    if key is None:
        return draw()
    stored = keyed_path(cache, "figures", [FIGURES_VERSION, key], ".png")
    try:
        data = stored.read_bytes()
    except OSError:
        data = None
    if data is not None:
        atomic_write_bytes(path, data)
        return Path(path)
    out = draw()
    if out is not None:
        with contextlib.suppress(TlearnError):  # a read-only cache folder: drawn again next time
            atomic_write_bytes(stored, Path(out).read_bytes())
    return out


def label(name: str, width: int = 18) -> str:
    """A class name fit for a tick label: wrapped onto at most two lines, shortened beyond that."""
    lines = textwrap.wrap(name, width) or [name]
    return "\n".join(lines[:2]) if len(lines) <= 2 else lines[0] + "\n" + textwrap.shorten(
        " ".join(lines[1:]), width, placeholder="…")


def curves(history: Any, path: Path, title: str = "") -> Path:
    """``curves_figure`` written to ``path``."""
    return _save(curves_figure(history, title), path)


def curves_figure(history: Any, title: str = ""):
    """Accuracy and loss of a ``train.History``, train vs validation, per epoch; the best epoch and stage
    boundaries are marked. (The History is not imported here: it draws itself with this, ``History.plot``.)"""
    h = history.history
    fig = figure(figsize=(11, 4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.plot(history.epoch, h[key], "o-", ms=3, label=f"training {key}")
        ax.plot(history.epoch, h[f"val_{key}"], "s-", ms=3, label=f"validation {key}")
        ax.axvline(history.best_epoch, color="grey", ls=":", lw=1, label=f"best epoch ({history.best_epoch})")
        for i in range(1, len(history.stage)):
            if history.stage[i] != history.stage[i - 1]:
                ax.axvline(i + 0.5, color="tab:red", ls="--", lw=1, label=f"{history.stage[i]} starts")
        ax.set(xlabel="epoch", ylabel=key, title=f"Training and validation {key}")
        _epoch_axis(ax, len(history.epoch))
        ax.grid(alpha=0.3)
        ax.legend()
    if history.closed_form:
        title = (f"{title}: " if title else "") + "a logistic regression, fitted once (no epochs)"
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _epoch_axis(ax, epochs: int) -> None:
    """Whole-number epoch ticks, and room on both sides, so that a single epoch is a point at 1, not at the
    centre of an axis from 0.96 to 1.04."""
    from matplotlib.ticker import MaxNLocator

    if epochs <= 10:
        ax.set_xticks(range(1, max(epochs, 1) + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, max(epochs, 1) + 0.5)


def confusion(matrix: Sequence[Sequence[int]], classes: list[str], path: Path) -> Path:
    """``confusion_figure`` written to ``path``."""
    return _save(confusion_figure(matrix, classes), path)


def confusion_figure(matrix: Sequence[Sequence[int]], classes: list[str]):
    """Two heatmaps: counts, and rates normalised per true class (each row sums to 1), both annotated."""
    cm = np.asarray(matrix, dtype=float)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(4.5, 0.5 * n + 2.5)
    font = 9 if n <= 10 else max(6, 10 - n // 8)
    stacked = n > 8  # many classes: one heatmap above the other, each as wide as the page
    fig = figure(figsize=(size + 1, 2 * size) if stacked else (2 * size + 1, size))
    axes = fig.subplots(2 if stacked else 1, 1 if stacked else 2)
    names = [label(c, 16) for c in classes]
    for ax, values, what, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], rates, "rate per true class",
                                                                      "{:.2f}")):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() or 1)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), names, rotation=60 if n > 4 else 0, ha="right" if n > 4 else "center",
                      fontsize=font)
        ax.set_yticks(range(n), names, fontsize=font)
        ax.set(xlabel="predicted class", ylabel="true class", title=f"Confusion matrix ({what})")
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    dark = values[i, j] > 0.6 * (values.max() or 1)
                    ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if dark else "black")
    fig.tight_layout()
    return fig


def pr_curves(y: np.ndarray, proba: np.ndarray, classes: list[str], path: Path) -> Path:
    """The precision-recall curve of each label with a positive image, its average precision in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = figure(figsize=(7, 5.5))
    ax = fig.subplots()
    for k, name in enumerate(classes):
        if y[:, k].any():
            precision, recall, _ = precision_recall_curve(y[:, k], proba[:, k])
            ax.step(recall, precision, where="post", lw=1.2,
                    label=f"{label(name)} (AP {average_precision_score(y[:, k], proba[:, k]):.2f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02), title="Precision-recall per label")
    ax.legend(fontsize=7, ncol=2 if len(classes) > 12 else 1, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def reliability_diagram(before: Reliability, after: Reliability, temperature: float, path: Path) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling, with each bin's mean confidence,
    its number of predictions, and the diagonal of perfect calibration."""
    fig = figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, rel, name in ((axes[0], before, "uncalibrated"), (axes[1], after, f"temperature {temperature:.2f}")):
        width = rel.edges[1] - rel.edges[0]
        centres = rel.edges[:-1] + width / 2
        shown = rel.count > 0
        bars = ax.bar(centres[shown], rel.accuracy[shown], width=width * 0.9, color="tab:blue", alpha=0.8,
                      label="accuracy in bin")
        ax.bar_label(bars, labels=[str(c) for c in rel.count[shown]], padding=2, fontsize=7, color="tab:blue")
        ax.bar(centres[shown], rel.confidence[shown], width=width * 0.9, fill=False, edgecolor="tab:red",
               hatch="//", lw=0.8, label="mean confidence in bin")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (top-1 probability)",
               title=f"{name}: ECE {rel.ece:.3f}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def novelty_histogram(scores: dict[str, list[float]], threshold: float, path: Path) -> Path:
    """The novelty scores of each split as overlaid histograms, with the threshold above which images are called
    unknown."""
    fig = figure(figsize=(7, 3.4))
    ax = fig.subplots()
    values = [v for vs in scores.values() for v in vs] + [threshold]
    bins = np.linspace(min(values), max(values), 31)
    for split, vs in scores.items():
        ax.hist(vs, bins=bins, alpha=0.55, label=f"{split} ({len(vs)})")
    ax.axvline(threshold, color="tab:red", lw=1.5, ls="--", label=f"threshold {threshold:.2f}")
    ax.set(xlabel="novelty (higher: less like the training data)", ylabel="images")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def image_grid(tiles: list[tuple[np.ndarray, str]], path: Path, cols: int = 6, tile: float = 2.2,
               aspect: float = 1.0) -> Path:
    """Images (H, W, 3 arrays, uint8 or floats in [0, 1]) with a caption (one or more lines) above each, ``cols``
    to a row; ``tile`` is each cell's width in inches at 90 dpi, and ``aspect`` its height over its width.
    Composed with Pillow: a grid of dozens of photos takes a fraction of a second this way, against seconds as
    matplotlib subplots."""
    from PIL import Image, ImageDraw

    size, height = round(tile * 90), round(tile * 90 * aspect)
    face = font(11)
    tiles = [(image, "\n".join(fit_text(line, face, size)[0] for line in caption.split("\n")))
             for image, caption in tiles]
    lines = max((caption.count("\n") + 1 for _, caption in tiles), default=1)
    head = 16 * lines + 6
    cols = max(1, min(cols, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    pad = 8
    canvas = Image.new("RGB", (cols * (size + pad) + pad, rows * (height + head + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(tiles):
        x, y = pad + (i % cols) * (size + pad), pad + (i // cols) * (height + head + pad)
        picture = Image.fromarray(_uint8(image))
        picture.thumbnail((size, height))
        canvas.paste(picture, (x + (size - picture.width) // 2, y + head))
        draw.multiline_text((x + size // 2, y + head - 3), caption, fill="black", font=face, anchor="md",
                            align="center", spacing=3)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


@functools.lru_cache(maxsize=8)
def font(size: int):
    """DejaVu Sans, the TrueType font matplotlib ships, at ``size`` pixels: it has the glyphs of accented, Greek,
    Cyrillic and many other class names, which Pillow's built-in bitmap font draws as boxes."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def fit_text(text: str, face, width: int, lines: int = 1) -> list[str]:
    """``text`` wrapped at spaces onto at most ``lines`` lines no wider than ``width`` pixels in ``face``, the last
    shortened with "…" where it still does not fit."""
    out, words = [], text.split(" ")
    while words and len(out) < lines:
        line = words.pop(0)
        while words and face.getlength(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        if len(out) == lines - 1 and words:  # the last line: the rest goes on it, shortened
            line = " ".join([line, *words])
            words = []
        while face.getlength(line) > width and len(line) > 1:
            line = line[:-2] + "…"
        out.append(line)
    return out or [""]


def _uint8(image: np.ndarray) -> np.ndarray:
    data = np.asarray(image)
    return data if data.dtype == np.uint8 else (np.clip(data, 0, 1) * 255).round().astype(np.uint8)


def overlay(photo: np.ndarray, heat: np.ndarray, size: int | None = None) -> np.ndarray:
    """The photo ((H, W, 3) uint8) under its heatmap ((H, W) in [0, 1]) in the jet colour map, as the Keras
    tutorial draws Grad-CAM: the more evidence, the more colour, and the plain photo where there is none. With
    ``size``, both are first shrunk to fit ``size`` pixels."""
    from matplotlib import colormaps
    from PIL import Image

    if size is not None and max(photo.shape[:2]) > size:
        picture = Image.fromarray(photo)
        picture.thumbnail((size, size))
        photo = np.asarray(picture)
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), "F").resize(picture.size, Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0, 1)
    colour = colormaps["jet"](heat)[..., :3] * 255
    alpha = 0.6 * np.sqrt(heat)[..., None]
    return (photo * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def side_by_side(photo: np.ndarray, heat: np.ndarray, size: int) -> np.ndarray:
    """The photo and the photo under its heatmap, each shrunk to fit ``size`` pixels, side by side (a white gap
    between them)."""
    from PIL import Image

    shown = overlay(photo, heat, size)
    plain = Image.fromarray(photo)
    plain.thumbnail((size, size))
    gap = np.full((shown.shape[0], 6, 3), 255, np.uint8)
    return np.hstack([np.asarray(plain), gap, shown])


def heatmap_figure(photo: np.ndarray, heat: np.ndarray, title: list[str], path: Path, size: int = 480) -> Path:
    """The photo, and the photo under its heatmap, side by side with ``title``'s lines above them; a PNG marked as
    tlearn's (``HEATMAP_MARK``), so that a later run may replace it and nothing else."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    pair = Image.fromarray(side_by_side(photo, heat, size))
    face = font(14)
    title = [part for line in title for part in fit_text(line, face, pair.width, lines=2)]  # fits a small photo
    pad, head = 10, 20 * len(title) + 8
    canvas = Image.new("RGB", (pair.width + 2 * pad, pair.height + head + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((pad, pad + 20 * i), line, fill="black", font=face)
    canvas.paste(pair, (pad, pad + head))
    info = PngInfo()
    info.add_text("Software", HEATMAP_MARK)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


HEATMAP_MARK = "tlearn explain"


def explained_figure(result: dict[str, Any], path: Path, printable: Callable[[str], str] = str) -> Path:
    """``tlearn explain``'s figure of one ``Explainer.explain(with_image=True)`` result, its title the top-k
    probabilities and the class explained (``printable`` makes names safe to show); the result's image and
    heatmap arrays are taken out of it."""
    name = Path(result["path"]).name
    title = [f"{name}: " + ", ".join(f"{p['class']} {p['probability']:.1%}" for p in result["predictions"]),
             f"heatmap: where the evidence for {result['class']} ({result['probability']:.1%}) lies"]
    return heatmap_figure(np.asarray(result.pop("image")), result.pop("heatmap"), [printable(t) for t in title], path)


def heatmap_path(out: Path, image: Path, taken: set[Path], class_name: str | None = None) -> Path:
    """``out/<image name>.heatmap.png`` (``<image name>.<class>.heatmap.png`` for the evidence for a class asked
    for, so that it stands beside the default one), numbered (``-2``, ``-3``, ...) past names this command already
    ``taken`` and past files that an earlier ``tlearn explain`` did not write: only its own figures are ever
    replaced."""
    stem = _name_part(image.stem, 80, "image")
    tag = f".{_name_part(class_name, 60, 'class')}" if class_name else ""
    for n in itertools.count(1):
        candidate = out / f"{stem}{'' if n == 1 else f'-{n}'}{tag}.heatmap.png"
        if candidate not in taken and (not os.path.lexists(candidate) or _ours(candidate)):
            taken.add(candidate)
            return candidate
    raise AssertionError("unreachable")


def _name_part(text: str, limit: int, fallback: str) -> str:
    """``safe_name`` of ``text``, or ``fallback`` for a name of no letters it keeps (e.g. "日本")."""
    try:
        return safe_name(text, limit)
    except TlearnError:
        return fallback


def _ours(path: Path) -> bool:
    """Whether ``path`` is a regular file that ``heatmap_figure`` wrote (its mark is in the PNG's first chunks)."""
    try:
        with open_regular(path) as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00" + HEATMAP_MARK.encode() in head


def prediction_charts(results: list[dict[str, Any]], path: Path, most: int) -> Path | None:
    """``prediction_chart`` of the first ``most`` images that could be read among ``predict``'s results (None
    when none could)."""
    from tlearn.images import thumbnail

    shown = [(thumbnail(Path(r["path"])), Path(r["path"]).name + (": unknown" if r.get("unknown") else ""),
              r["predictions"]) for r in results if "predictions" in r][:most]
    return prediction_chart(shown, path) if shown else None


def prediction_chart(results: list[tuple[np.ndarray, str, list[dict[str, Any]]]], path: Path) -> Path:
    """Per image: the picture beside a horizontal bar chart of its top-k class probabilities."""
    k = max(len(preds) for _, _, preds in results)
    height = max(2.6, 0.42 * k + 1)
    fig = figure(figsize=(10, height * len(results)))
    axes = fig.subplots(len(results), 2, squeeze=False, gridspec_kw={"width_ratios": [1, 1.6]})
    for (image, name, preds), (ax_img, ax_bar) in zip(results, axes, strict=True):
        ax_img.imshow(image)
        ax_img.axis("off")
        ax_img.set_title(textwrap.shorten(name, 40, placeholder="…"), fontsize=9)
        names = [label(p["class"], 28) for p in preds]
        probs = [p["probability"] for p in preds]
        bars = ax_bar.barh(names, probs, color=["tab:blue"] + ["tab:grey"] * (len(preds) - 1))
        ax_bar.bar_label(bars, labels=[f"{p:.1%}" for p in probs], padding=3, fontsize=8)
        ax_bar.invert_yaxis()
        ax_bar.set(xlim=(0, 1.15), xlabel="probability", title=f"Top {len(preds)} classes")
        ax_bar.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _save(fig, path, {"Software": "tlearn predict --plot"})  # how --plot knows a chart it may replace


def compare_curves(histories: dict[str, dict[str, list]], path: Path) -> Path:
    """Each model's validation accuracy and loss per epoch, overlaid."""
    fig = figure(figsize=(12, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for name, h in histories.items():
        ax_acc.plot(h["epoch"], h["val_accuracy"], "o-", ms=2.5, label=name)
        ax_loss.plot(h["epoch"], h["val_loss"], "o-", ms=2.5, label=name)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy per model")
    ax_loss.set(xlabel="epoch", ylabel="validation loss", title="Validation loss per model", yscale="log")
    for ax in (ax_acc, ax_loss):
        _epoch_axis(ax, max((len(h["epoch"]) for h in histories.values()), default=1))
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def compare_bars(rows: list[dict[str, Any]], path: Path, chance: float, score: str = "accuracy") -> Path:
    """A score (accuracy, or mean average precision) and training time per model, side by side, with the chance
    level marked."""
    names = [r["model"] for r in rows]
    what = score.replace("_", " ")
    fig = figure(figsize=(11, 0.6 * len(rows) + 2))
    ax_acc, ax_time = fig.subplots(1, 2)
    bars = ax_acc.barh(names, [r[score] for r in rows], color="tab:blue")
    ax_acc.bar_label(bars, labels=[f"{r[score]:.1%}" for r in rows], padding=3)
    ax_acc.axvline(chance, color="grey", ls=":")
    ax_acc.set(xlim=(0, 1.12), xlabel=f"{rows[0]['split']} {what} (dotted: chance, {chance:.0%})",
               title=what.capitalize())
    ax_acc.invert_yaxis()
    bars = ax_time.barh(names, [r["train_seconds"] for r in rows], color="tab:orange")
    ax_time.bar_label(bars, labels=[f"{r['train_seconds']:.0f} s" for r in rows], padding=3)
    ax_time.set(xlabel="training time (s)", title="Training time")
    ax_time.invert_yaxis()
    fig.tight_layout()
    return _save(fig, path)
