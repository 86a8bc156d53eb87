"""What a person reads: history.csv, curves.png, the skipped-files list and the printed tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlearn.data import Skipped
from tlearn.fileio import atomic_path, atomic_write_csv

if TYPE_CHECKING:  # torch and matplotlib load only when something is plotted or trained: `tlearn check` starts fast
    from tlearn.train import History


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def write_history_csv(history: History, path: Path) -> None:
    keys = list(history.history)
    atomic_write_csv(path, ["epoch", "stage", *keys],
                     ([epoch, history.stage[i], *(f"{history.history[k][i]:.6f}" for k in keys)]
                      for i, epoch in enumerate(history.epoch)))


def plot_curves(history: History, path: Path, title: str = "") -> None:
    """Accuracy and loss, train vs validation, per epoch; the best epoch and stage boundaries are marked."""
    h = history.history
    plt = pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.plot(history.epoch, h[key], "o-", ms=3, label=f"training {key}")
        ax.plot(history.epoch, h[f"val_{key}"], "s-", ms=3, label=f"validation {key}")
        ax.axvline(history.best_epoch, color="grey", ls=":", lw=1, label=f"best epoch ({history.best_epoch})")
        for i in range(1, len(history.stage)):
            if history.stage[i] != history.stage[i - 1]:
                ax.axvline(i + 0.5, color="tab:red", ls="--", lw=1, label=f"{history.stage[i]} starts")
        ax.set(xlabel="epoch", ylabel=key, title=f"Training and validation {key}")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_skipped_csv(skipped: list[Skipped], path: Path) -> None:
    atomic_write_csv(path, ["path", "reason"], ([str(s.path), s.reason] for s in skipped))


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    return f"{c:.4f}" if isinstance(c, float) else str(c)


def format_metrics(metrics: dict[str, Any], split: str) -> str:
    rows = [[name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in metrics["per_class"].items()]
    head = f"{split}: accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} on {metrics['n']} images"
    cm = metrics["confusion_matrix"]
    names = metrics["classes"]
    cm_rows = [[f"true {names[i]}", *cm[i]] for i in range(len(names))]
    return "\n\n".join([head, table(rows, ["class", "precision", "recall", "f1", "support"]),
                        "confusion matrix (rows: true, columns: predicted)",
                        table(cm_rows, ["", *names])])


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    splits = list(counts)
    classes = list(next(iter(counts.values())))
    rows = [[c, *(counts[s][c] for s in splits)] for c in classes]
    rows.append(["total", *(sum(counts[s].values()) for s in splits)])
    return table(rows, ["class", *splits])


def format_predictions(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']}: skipped: {r['error']}")
            continue
        top = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
        lines.append(f"{r['path']}: {top}")
    return "\n".join(lines)


def enable_logging() -> None:
    """Show tlearn's progress messages on stderr (once), as plain lines."""
    import logging
    import sys

    logger = logging.getLogger("tlearn")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
