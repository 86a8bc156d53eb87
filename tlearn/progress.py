"""Progress bars: tqdm's own choice (``tqdm.auto``), a widget bar in a Jupyter notebook where ipywidgets is
installed (the ``notebook`` extra), else the text bar, which a notebook redraws in place. Without ipywidgets,
tqdm's warning that it fell back to text is left out: the text bar is the intended fallback."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
