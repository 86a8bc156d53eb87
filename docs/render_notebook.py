"""Execute examples/transfer_learning.ipynb, export it to HTML and screenshot two of its cells with headless
Chromium (Debian's `chromium` package, driven by Playwright), for the README:

    .venv/bin/pip install nbconvert && .venv/bin/python docs/render_notebook.py

writes docs/notebook-predict.png (the prediction with its bars and the heatmap) and docs/notebook-curves.png.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "examples"
        shutil.copytree(ROOT / "examples" / "ants_bees", work / "ants_bees")
        nb = nbformat.read(ROOT / "examples" / "transfer_learning.ipynb", as_version=4)
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
        executed = work / "executed.ipynb"
        nbformat.write(nb, executed)
        subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", str(executed)], check=True,
                       capture_output=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(executed.with_suffix(".html").as_uri())
            for tag, name in (("predict", "notebook-predict.png"), ("curves", "notebook-curves.png")):
                cells = page.locator(".jp-CodeCell").filter(has_text={"predict": "features.predict([photo]",
                                                                      "curves": "frozen.fit("}[tag])
                cells.first.screenshot(path=str(ROOT / "docs" / name))
                print(f"docs/{name}")
            browser.close()


if __name__ == "__main__":
    main()
