"""How tlearn's results show in a Jupyter notebook: HTML made from values, for the ``_repr_html_`` methods of
``History``, ``ImageClassifier`` and the results of ``evaluate`` and ``predict``.

Nothing here imports IPython, and nothing runs until a notebook asks for a display. Names from the data (class
names, file names) are escaped. A long result is cut, with a count of what was left out ("… and 9,950 more
images"). A display never raises inside the notebook: a picture that cannot be read becomes a placeholder with
the reason, and anything else that fails shows the plain text of the result with the error.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlearn.pages import html_table

MAX_ROWS = 40  # rows of a table shown (classes, labels, epochs), the rest counted
MAX_IMAGES = 24  # predictions shown with their pictures, the rest counted
THUMBNAIL = 160  # px, the longer side of a prediction's picture
STYLE = ("<style>.tlearn table{border-collapse:collapse;font-size:.9em;margin:.4em 0}.tlearn td,.tlearn th{"
         "border:1px solid #ddd;padding:.2em .5em;text-align:left}.tlearn td.n{text-align:right}.tlearn .muted{"
         "color:#666}.tlearn .bar{background:#4c78a8;height:.9em;display:inline-block;vertical-align:middle}"
         ".tlearn .pred{display:flex;gap:1em;align-items:center;margin:.5em 0}.tlearn .missing{width:"
         f"{THUMBNAIL}px;height:{THUMBNAIL // 2}px;background:#f3f3f3;color:#a00;font-size:.8em;padding:.3em;"
         "overflow:hidden}</style>")


class Metrics(dict):
    """``evaluate()``'s result: the same dict of metrics as before, shown in a notebook as tables and (one class
    an image) the confusion matrix."""

    def _repr_html_(self) -> str:
        return safely(metrics_html, self)


class Predictions(list):
    """``predict()``'s result: the same list of per-image results, shown in a notebook as each picture beside bars
    of its top-k probabilities (and, several labels an image, the labels given)."""

    def _repr_html_(self) -> str:
        return safely(predictions_html, self)


class Frame:
    """A self-contained HTML file (a run's report) shown in a frame of the notebook; its path elsewhere."""

    def __init__(self, path: Path, height: int = 800):
        self.path, self.height = Path(path), height

    def __repr__(self) -> str:
        return f"{self.path} (open it in a browser)"

    def _repr_html_(self) -> str:
        try:
            page = self.path.read_text(encoding="utf-8")
        except OSError as e:
            return _placeholder(f"{self.path}: {e}")
        return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(self.height)}px;'
                'border:1px solid #ddd"></iframe>')


class Explanations(list):
    """``explain()``'s result: the same list of per-image results, shown in a notebook as each photo beside the
    photo under its heatmap, with the class (or label) explained and its probability."""

    def _repr_html_(self) -> str:
        return safely(explanations_html, self)


def safely(show: Callable[[Any], str], value: Any) -> str:
    """``show(value)``, or, if it fails, the value's plain text and why the rich display failed."""
    try:
        return f'<div class="tlearn">{STYLE}{show(value)}</div>'
    except Exception as e:  # noqa: BLE001 - a display must never raise inside the notebook
        return (f"<pre>{html.escape(repr(value)[:5000])}</pre><p>(the rich display failed: "
                f"{html.escape(type(e).__name__)}: {html.escape(str(e)[:300])})</p>")


def figure_tag(fig: Any) -> str:
    """A matplotlib figure as an embedded PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png", bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def more(shown: int, total: int, what: str) -> str:
    return f'<p class="muted">… and {total - shown:,} more {what}</p>' if total > shown else ""


def history_html(history: Any) -> str:
    """The training curves (``History.plot``) and a table of the last epochs."""
    from tlearn.plots import curves_figure

    h, n = history.history, len(history.epoch)
    if not n:
        return "<p>No epoch trained yet.</p>"
    first = max(0, n - 5)
    rows = [[history.epoch[i], history.stage[i], *(h[k][i] for k in ("loss", "accuracy", "val_loss",
                                                                      "val_accuracy"))] for i in range(first, n)]
    note = f"<p>best: {html.escape(history.best())}{' (the weights kept)' if history.best_epoch else ''}</p>"
    return (figure_tag(curves_figure(history)) + note + (f'<p class="muted">the last {n - first} of {n} epochs</p>'
                                                         if first else "")
            + html_table(rows, ["epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy"]))


def metrics_html(m: dict[str, Any]) -> str:
    """Evaluation metrics: the scores, per class (or label) precision, recall and F1, and the confusion matrix."""
    if "per_label" in m:  # several labels an image
        keys = ("mean_average_precision", "micro_f1", "macro_f1", "exact_match", "loss")
        per = m["per_label"]
        columns = ["label", "precision", "recall", "f1", "average_precision", "support", "threshold"]
    else:
        keys = ("accuracy", "loss")
        per = m.get("per_class", {})
        columns = ["class", "precision", "recall", "f1", "support"]
    scores = [[k.replace("_", " "), m[k]] for k in keys if isinstance(m.get(k), int | float)]
    images = m.get("n", m.get("images"))
    head = f"<p><b>{html.escape(str(m.get('split', '')))}</b>" + (f", {images:,} images" if images else "") + "</p>"
    names = list(per)[:MAX_ROWS]
    rows = [[name, *("–" if per[name].get(c) is None else per[name][c] for c in columns[1:])] for name in names]
    out = head + html_table(scores, ["metric", "value"]) + html_table(rows, columns) + more(
        len(names), len(per), "classes" if "per_class" in m else "labels")
    matrix, classes = m.get("confusion_matrix"), m.get("classes")
    if matrix and classes and len(classes) <= MAX_ROWS:
        from tlearn.plots import confusion_figure

        out += figure_tag(confusion_figure(matrix, classes))
    return out


def predictions_html(results: list[dict[str, Any]]) -> str:
    """Each image beside bars of its top-k probabilities."""
    return per_image(results, _prediction)


def explanations_html(results: list[dict[str, Any]]) -> str:
    """Each photo beside itself under its heatmap."""
    return per_image(results, _explanation)


def per_image(results: list[dict[str, Any]], show: Callable[[dict[str, Any]], tuple[str, str]]) -> str:
    """A row for each of the first ``MAX_IMAGES`` results: its picture and file name, then what ``show`` says of
    it (``show``: a result → its picture, and the HTML under the name); a file that could not be read as a
    placeholder with the reason."""
    parts = []
    for r in results[:MAX_IMAGES]:
        name = html.escape(Path(str(r.get("path", ""))).name)
        picture, body = (_placeholder(r["error"]), ": skipped") if "error" in r else show(r)
        parts.append(f'<div class="pred">{picture}<div><b>{name}</b>{body}</div></div>')
    return "".join(parts) + more(len(parts), len(results), "images")


def _prediction(r: dict[str, Any]) -> tuple[str, str]:
    bars = "".join(f'<tr><td>{html.escape(str(p["class"]))}</td><td><span class="bar" style="width:'
                   f'{200 * p["probability"]:.0f}px"></span> {p["probability"]:.3f}</td></tr>'
                   for p in r["predictions"])
    given = ""
    if "labels" in r:
        given = "<p>labels: " + (", ".join(html.escape(str(p["class"])) for p in r["labels"]) or "none") + "</p>"
    unknown = f'<p style="color:#a00">unknown: unlike the training images (novelty {r["novelty"]:.2f})</p>' \
        if r.get("unknown") else ""
    return thumbnail(r.get("path", "")), f"{unknown}{given}<table>{bars}</table>"


def _explanation(r: dict[str, Any]) -> tuple[str, str]:
    import numpy as np

    from tlearn.images import ImageDecodeError, load_image
    from tlearn.plots import side_by_side

    try:
        picture = _jpeg_tag(side_by_side(np.asarray(load_image(Path(r["path"]))), r["heatmap"], 2 * THUMBNAIL))
    except (ImageDecodeError, OSError, ValueError) as e:
        picture = _placeholder(str(e))
    return picture, f'<p>evidence for {html.escape(str(r["class"]))} ({r["probability"]:.3f})</p>'


def _jpeg_tag(image: Any) -> str:
    """A PIL image, or an (H, W, 3) uint8 array, as an embedded JPEG."""
    from PIL import Image

    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def thumbnail(path: str | Path) -> str:
    """The picture at ``path``, small, as an embedded JPEG; a placeholder with the reason if it cannot be read."""
    from tlearn.images import ImageDecodeError, load_image

    try:
        image = load_image(Path(path))
    except (ImageDecodeError, OSError, ValueError) as e:
        return _placeholder(str(e))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return _jpeg_tag(image)


def _placeholder(reason: str) -> str:
    return f'<div class="missing">no picture: {html.escape(str(reason)[:200])}</div>'


def classifier_html(about: dict[str, Any]) -> str:
    """A short summary of a classifier: what it is, its classes, and its scores."""
    rows = [[k, v] for k, v in about.items() if k != "classes"]
    classes = about.get("classes", [])
    shown = ", ".join(html.escape(c) for c in classes[:MAX_ROWS])
    return (html_table(rows, ["", ""], "kv") + f"<p>classes ({len(classes)}): {shown}</p>"
            + more(min(len(classes), MAX_ROWS), len(classes), "classes"))


def report_html(report: Any) -> str:
    """``check``'s report: what was read, the findings by kind, the images per class and split, and the first
    findings with their files."""
    head = (f"<p><b>{html.escape(str(report.root))}</b>: {report.files:,} files, {report.images:,} readable images"
            + (f", {len(report.classes)} classes ({html.escape(report.layout)})" if report.classes else "") + "</p>")
    blocking = {f.kind for f in report.blocking()}
    severity = {f.kind: f.severity for f in report.findings}
    summary = [[kind, n, severity[kind], "yes" if kind in blocking else ""] for kind, n in report.summary().items()]
    out = head + (html_table(summary, ["finding", "files", "severity", "blocking"]) if summary else
                  "<p>No problems found.</p>")
    if report.counts:
        splits = list(report.counts)
        names = list(next(iter(report.counts.values())))
        rows = [[c, *(report.counts[s][c] for s in splits)] for c in names[:MAX_ROWS]]
        if report.split_images:
            rows.append(["images", *(report.split_images[s] for s in splits)])
        out += html_table(rows, ["label" if report.split_images else "class", *splits]) + more(
            min(len(names), MAX_ROWS), len(names), "classes")
    out += "".join(f"<p>{html.escape(n)}</p>" for n in report.notes)
    findings = report.findings[:MAX_ROWS]
    if findings:
        out += html_table([[f.severity, f.kind, f.path, f.detail] for f in findings],
                          ["severity", "kind", "file", "detail"]) + more(len(findings), len(report.findings),
                                                                        "findings")
    return out
