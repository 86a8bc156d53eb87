"""The served page in a real browser: `tlearn serve` as its own process, Debian's chromium driven headless by
Playwright, a real photo uploaded through the page, and the predicted class and its bars on screen.

Skipped, with the reason, where chromium or Playwright is missing (`apt-get install chromium`; Playwright's own
browser download is not used). With TLEARN_DOCS_SCREENSHOTS=1 the screenshot is also written to docs/serve.png.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import HYMENOPTERA, needs

CHROMIUM = shutil.which("chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ants_bees"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install playwright)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A run trained on the bundled example photos, and the environment to serve it in."""
    tmp = tmp_path_factory.mktemp("browser")
    env = {**os.environ, "TLEARN_CACHE_DIR": str(tmp / "cache")}
    subprocess.run([sys.executable, "-m", "tlearn", "train", str(EXAMPLE), "--mode", "features", "--out",
                    str(tmp / "run")], check=True, env=env, capture_output=True)
    return tmp / "run", env


@contextlib.contextmanager
def serving(run: Path, env: dict[str, str]) -> Iterator[str]:
    """`tlearn serve RUN` on a free loopback port, as its own process, until the block ends."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "tlearn", "serve", str(run), "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        for _ in range(300):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


@pytest.fixture(scope="module")
def server(run: tuple[Path, dict[str, str]]) -> Iterator[str]:
    with serving(*run) as url:
        yield url


@contextlib.contextmanager
def browser_page() -> Iterator[Any]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 640})
        finally:
            browser.close()


@needs(HYMENOPTERA)
def test_a_photo_dropped_on_the_page_shows_its_class_and_bars(server: str, tmp_path: Path) -> None:
    photo = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0]
    with browser_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('about').textContent.includes('classes')")
        assert "2 classes (ants, bees)" in page.text_content("#about")
        page.set_input_files("#picker", str(photo))
        card = page.wait_for_selector(".card[data-state='done']", timeout=30_000)
        assert card.get_attribute("data-predicted") == "bees"
        assert ": bees" in card.query_selector(".verdict").text_content()  # "Predicted", or "Closest" if unknown
        shown_unknown = card.query_selector(".unknown") is not None
        assert shown_unknown == (card.get_attribute("data-unknown") == "true")
        bars = card.query_selector_all(".bar")
        assert [b.get_attribute("data-class") for b in bars] == ["bees", "ants"]
        page.wait_for_timeout(600)  # the bars' width transition
        widths = [b.eval_on_selector(".fill", "e => e.getBoundingClientRect().width") for b in bars]
        assert widths[0] > widths[1] >= 0 and widths[0] > 100
        page.set_input_files("#picker", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                "buffer": b"not a photo"}])
        failed = page.wait_for_selector(".card[data-state='error']", timeout=30_000)
        assert "notes.txt: not a readable image" in failed.query_selector(".error").text_content()
        flat = io.BytesIO()
        Image.new("RGB", (320, 240), (128, 128, 128)).save(flat, format="PNG")  # a blank picture, no photo
        page.set_input_files("#picker", files=[{"name": "blank.png", "mimeType": "image/png",
                                                "buffer": flat.getvalue()}])
        blank = page.wait_for_selector(".card[data-state='done'][data-unknown='true']", timeout=30_000)
        assert "unknown: unlike the images this model was trained on" in blank.text_content()
        assert blank.eval_on_selector(".unknown", "e => e.compareDocumentPosition(e.parentNode.querySelector("
                                      "'.chart')) & Node.DOCUMENT_POSITION_FOLLOWING")  # above its bars
        page.set_input_files("#picker", str(photo))  # the good one last, so that it is on top
        page.wait_for_selector(".card[data-state='done']:first-child", timeout=30_000)
        page.wait_for_timeout(600)
        shot = page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        assert errors == [] and len(shot) > 10_000
    if os.environ.get("TLEARN_DOCS_SCREENSHOTS") == "1":
        shutil.copy(tmp_path / "serve.png", DOCS / "serve.png")


@needs(HYMENOPTERA)
def test_a_locked_server_asks_for_the_key_once_and_keeps_it_in_the_tab_only(run: tuple[Path, dict[str, str]]
                                                                            ) -> None:
    key = "k" * 12 + "-right-key-0123456789"
    photo = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0]
    with serving(run[0], {**run[1], "TLEARN_API_KEY": key}) as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector("#keyform:not([hidden])")
        assert "needs an API key" in page.text_content("#about")
        page.fill("#key", key[:-1] + "X")  # one character wrong
        page.click("#keyform button")
        page.wait_for_function("document.getElementById('about').textContent.includes('refused')")
        page.fill("#key", key)
        page.click("#keyform button")
        page.wait_for_function("document.getElementById('about').textContent.includes('classes')")
        assert page.is_hidden("#keyform") and page.input_value("#key") == ""
        page.set_input_files("#picker", str(photo))
        card = page.wait_for_selector(".card[data-state='done']", timeout=30_000)
        assert card.get_attribute("data-predicted") == "bees"
        stored = page.evaluate("JSON.stringify([localStorage, sessionStorage, document.cookie])")
        assert key not in stored and key not in page.content()
