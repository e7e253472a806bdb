"""Build the online book: copy in the notebooks and MathJax, then run Jupyter Book 1.x.

    python book/build.py            # -> book/_build/html/index.html

The lecture notebooks (``notebooks/``) and the generated exercises (``exercises/``) are
copied into ``book/notebooks`` and ``book/exercises`` with their stored outputs; nothing is
executed. Links from a notebook to a book page (``../book/facts.md``, which JupyterLab opens
from ``notebooks/``) are rewritten to the page's place in the book (``../facts.md``). MathJax 3
is copied from the ``django-static-mathjax`` wheel into ``book/_assets`` so that math
typesets without a network. Sphinx warnings are errors.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parent
REPO = BOOK.parent
COPIED = {"notebooks": REPO / "notebooks", "exercises": REPO / "exercises"}


def copy_sources() -> None:
    for name, source in COPIED.items():
        target = BOOK / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for notebook in sorted(source.glob("*.ipynb")):
            text = notebook.read_text(encoding="utf-8")
            (target / notebook.name).write_text(text.replace("](../book/", "](../"), encoding="utf-8")


def copy_mathjax() -> None:
    import mathjax  # the django-static-mathjax wheel: MathJax's own files, nothing Django-specific

    source = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    # Not under book/_static: Jupyter Book injects every .js file found there into every page.
    target = BOOK / "_assets" / "mathjax"
    if not (target / "tex-chtml.js").exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def build() -> int:
    copy_sources()
    copy_mathjax()
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book), "build", str(BOOK), "--builder", "html", "--warningiserror", "--keep-going"]
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(build())
