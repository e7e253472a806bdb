"""The online book builds with zero warnings and every page renders in headless Chromium.

The build copies the stored notebooks (no execution) and runs Jupyter Book 1.x with warnings
as errors. Each built page is then served on 127.0.0.1 and opened in Debian's Chromium
through Playwright (pointed at /usr/bin/chromium; no browser download). A page passes when
its title is present, every <img> has loaded, every math element was typeset by the
book's own MathJax, and no request for a local resource failed.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BOOK = REPO / "book"
HTML = BOOK / "_build" / "html"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Pages Sphinx writes that are not book content (index.html only redirects to intro.html).
NOT_PAGES = {"genindex.html", "search.html", "index.html"}
# Requests the browser makes on its own, not for anything a page references.
BROWSER_OWN = {"/favicon.ico"}


@pytest.fixture(scope="module")
def built_book() -> Path:
    shutil.rmtree(BOOK / "_build", ignore_errors=True)
    result = subprocess.run([sys.executable, str(BOOK / "build.py")], capture_output=True, text=True)
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0 and not warnings, "book build failed:\n" + "\n".join(warnings or log.splitlines()[-30:])
    return HTML


def _pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if p.name not in NOT_PAGES and "_static" not in p.parts)


def test_index_redirects_to_the_introduction(built_book):
    assert "intro.html" in (built_book / "index.html").read_text()


def test_book_has_every_chapter_and_exercise(built_book):
    names = {p.relative_to(built_book).as_posix() for p in _pages(built_book)}
    for folder in ("notebooks", "exercises"):
        for notebook in (REPO / folder).glob("*.ipynb"):
            assert f"{folder}/{notebook.stem}.html" in names, f"{folder}/{notebook.name} is not in book/_toc.yml"
    assert {"intro.html", "how_to_use.html", "references.html"} <= names


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    failures: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def send_error(self, code, message=None, explain=None):
        if self.path not in BROWSER_OWN:
            type(self).failures.append(f"{code} {self.path}")
        super().send_error(code, message, explain)


@pytest.fixture(scope="module")
def server(built_book):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: scripts/test.sh installs Debian's chromium with apt-get")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS[1:], headless=True)
        yield b
        b.close()


_PAGE_STATE = """() => ({
  title: document.title,
  images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
  mathSource: document.querySelectorAll('.math, span.math, div.math').length,
  mathTypeset: document.querySelectorAll('mjx-container').length,
  mathErrors: document.querySelectorAll('mjx-merror').length,
  body: document.body ? document.body.innerText.length : 0,
})"""


def test_every_page_renders_in_chromium(built_book, server, browser):
    pages = _pages(built_book)
    assert len(pages) >= 5
    problems = []
    context = browser.new_context()
    for page_path in pages:
        rel = page_path.relative_to(built_book).as_posix()
        page = context.new_page()
        failed: list[str] = []
        page.on("requestfailed", lambda r, failed=failed: failed.append(f"{r.url} ({r.failure})")
                if r.url.startswith(server) else None)
        page.on("response", lambda r, failed=failed: failed.append(f"{r.url} ({r.status})")
                if r.url.startswith(server) and r.status >= 400 and not r.url.endswith(tuple(BROWSER_OWN)) else None)
        page.goto(f"{server}/{rel}", wait_until="load")
        page.wait_for_function(
            "() => !document.querySelector('.math') || document.querySelectorAll('mjx-container').length > 0",
            timeout=20_000)
        state = page.evaluate(_PAGE_STATE)
        if not state["title"].strip():
            problems.append(f"{rel}: empty <title>")
        if state["body"] < 200:
            problems.append(f"{rel}: almost no text ({state['body']} characters)")
        for image in state["images"]:
            if not image["ok"]:
                problems.append(f"{rel}: image {image['src']} did not load")
        if state["mathSource"] and state["mathTypeset"] < state["mathSource"]:
            problems.append(f"{rel}: {state['mathSource']} math elements, {state['mathTypeset']} typeset")
        if state["mathErrors"]:
            problems.append(f"{rel}: {state['mathErrors']} MathJax errors")
        problems += [f"{rel}: failed local request {f}" for f in failed]
        page.close()
    context.close()
    problems += [f"server error {f}" for f in _QuietHandler.failures]
    assert not problems, "\n".join(problems)


def test_lecture_pages_show_every_stored_figure(built_book):
    import nbformat

    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(notebook, as_version=4)
        stored = sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.outputs)
        html = (built_book / "notebooks" / f"{notebook.stem}.html").read_text()
        shown = html.count('<img alt="_images/') + html.count('<img alt="../_images/')
        assert stored >= 1, f"{notebook.name} has no figure"
        assert shown == stored, f"{notebook.name}: {stored} figures stored, {shown} on the page"
