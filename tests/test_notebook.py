"""The notebook of the whole workflow, examples/transfer_learning.ipynb: kept in git without outputs, and run from
a clean kernel as a user runs it (nbclient, a real Jupyter kernel), every cell without error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "transfer_learning.ipynb"


def test_the_notebook_is_kept_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 12
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the notebook's outputs"
    assert not any("!tlearn" in c.source or c.source.startswith("%") for c in code)  # the Python API only


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_and_shows_its_results(tmp_path: Path) -> None:
    from nbclient import NotebookClient

    work = tmp_path / "examples"  # a copy: the notebook writes its runs beside itself
    shutil.copytree(NOTEBOOK.parent / "ants_bees", work / "ants_bees")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    seconds = time.perf_counter() - start
    by_tag = {t: c for c in nb.cells for t in c.get("metadata", {}).get("tags", [])}

    def data(tag: str) -> dict:
        (result,) = [o for o in by_tag[tag].outputs if o.output_type == "execute_result"]
        return result["data"]

    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert "No problems found." in data("check")["text/html"] and "<td>ants</td>" in data("check")["text/html"]
    assert "data:image/png;base64," in data("history")["text/html"]  # the curves, with the last epochs' table
    assert "image/png" in data("curves")  # History.plot(): a figure, shown as a picture
    assert "<table" in data("evaluate")["text/html"] and "accuracy" in data("evaluate")["text/plain"]
    predicted = data("predict")
    assert "data:image/jpeg;base64," in predicted["text/html"]
    assert predicted["text/plain"].index("'bees'") < predicted["text/plain"].index("'ants'")  # bees first
    assert (work / "runs-notebook" / "features.onnx").is_file()
    print(f"notebook: {seconds:.0f} s")
