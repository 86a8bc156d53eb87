"""``check_data``: the Python entry point of ``tlearn check``. Every file of a folder or label file looked at
(``check.check``), with, where asked, the search for suspected mislabels and for outliers (``labels.py``) on a
base's cached features; one ``Report``, shown as tables in a notebook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlearn.check import Report, check
from tlearn.config import BackboneConfig, DataConfig, route_options, validate


def check_data(data: str | Path | DataConfig, *, labels: bool = False, outliers: bool = False,
               backbone: str | None = None, min_size: int = 0, near_threshold: int = 4, progress: bool = True,
               **data_options: Any) -> Report:
    """Check ``data`` (a folder, a label file, or a :class:`DataConfig`; ``data_options`` are its fields, such as
    ``images`` for a label file): files that cannot be used, duplicates and leakage, class balance; with
    ``labels``, suspected mislabels, and with ``outliers``, images unlike the rest of their class, both from
    ``backbone``'s features (default: the default backbone's). ``min_size``: inputs smaller than this many pixels
    are listed."""
    given = [data] if isinstance(data, DataConfig) else []
    (config,) = route_options((DataConfig,), {**({} if given else {"path": str(data)}), **data_options}, given)
    validate(config)
    report = check(config, min_size=min_size, near_threshold=near_threshold, progress=progress)
    base = backbone or BackboneConfig.backbone
    if labels:
        from tlearn.labels import suspects  # torch and timm: only when the search runs

        found = suspects(config, backbone=base, progress=progress)
        report.findings += found
        report.notes.append(f"suspected mislabels (--labels): {len(found)} found among the labelled images")
    if outliers:
        from tlearn.labels import unusual

        found = unusual(config, backbone=base, progress=progress)
        report.findings += found
        report.notes.append(f"outliers (--outliers): {len(found)} image(s) unlike the rest of their class")
    return report
