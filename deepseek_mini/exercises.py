"""Generate the learner's exercise notebooks from the solution notebooks.

``solutions/NN_topic.ipynb`` is the single source of each chapter's graded exercises. An
exercise is a code cell whose function or class body sits between nbgrader's markers::

    def rms_norm(x, weight, eps=1e-6):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

followed by a graded check cell. This command writes ``exercises/NN_topic.ipynb`` with each
solution region replaced by a stub that raises ``NotImplementedError`` naming the exercise,
and with every output and execution count cleared. The cells keep nbgrader's metadata
(``grade_id``, ``points``, ``solution``, ``grade``), so instructors can also use nbgrader.

    python -m deepseek_mini.exercises          # write exercises/ from solutions/
    python -m deepseek_mini.exercises --check  # exit 1 if exercises/ is out of date

A later chapter joins by adding its solution notebook; nothing here changes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

__all__ = ["BEGIN_SOLUTION", "END_SOLUTION", "strip_solutions", "make_exercise_notebook", "generate", "check"]

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
REPO_DIR = Path(__file__).resolve().parent.parent
SOLUTIONS_DIR = REPO_DIR / "solutions"
EXERCISES_DIR = REPO_DIR / "exercises"
_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)" + re.escape(BEGIN_SOLUTION) + r"\s*$")
_END_RE = re.compile(r"^[ \t]*" + re.escape(END_SOLUTION) + r"\s*$")


def strip_solutions(source: str, exercise: str) -> str:
    """Replace every BEGIN/END SOLUTION region of ``source`` with a NotImplementedError stub."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.splitlines(), start=1):
        begin = _BEGIN_RE.match(line)
        if begin:
            if inside:
                raise ValueError(f"exercise {exercise!r}: nested {BEGIN_SOLUTION} at line {number}")
            inside = True
            indent = begin.group("indent")
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f'{indent}raise NotImplementedError("{exercise}: replace this line with your solution")')
        elif _END_RE.match(line):
            if not inside:
                raise ValueError(f"exercise {exercise!r}: {END_SOLUTION} without {BEGIN_SOLUTION} at line {number}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"exercise {exercise!r}: {BEGIN_SOLUTION} is never closed by {END_SOLUTION}")
    return "\n".join(out)


def _exercise_name(cell: nbformat.NotebookNode) -> str:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    name = meta.get("grade_id")
    if not name:
        raise ValueError(f"a solution cell lacks metadata.nbgrader.grade_id:\n{cell.source[:200]}")
    return f"Exercise {name}"


def make_exercise_notebook(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The learner's version of a solution notebook: stubs instead of solutions, no outputs."""
    nb = nbformat.from_dict(solution)  # a deep copy
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if BEGIN_SOLUTION in cell.source:
            cell.source = strip_solutions(cell.source, _exercise_name(cell))
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("execution", None)
    return nb


def _render(path: Path) -> str:
    solution = nbformat.read(path, as_version=4)
    return nbformat.writes(make_exercise_notebook(solution)) + "\n"


def generate() -> list[Path]:
    """Write exercises/ from solutions/; return the files that changed."""
    EXERCISES_DIR.mkdir(exist_ok=True)
    changed = []
    wanted = {}
    for path in sorted(SOLUTIONS_DIR.glob("*.ipynb")):
        target = EXERCISES_DIR / path.name
        wanted[target] = _render(path)
    for target, text in wanted.items():
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            changed.append(target)
    for stale in EXERCISES_DIR.glob("*.ipynb"):
        if stale not in wanted:
            stale.unlink()
            changed.append(stale)
    return changed


def check() -> list[str]:
    """Problems with exercises/ (empty when it matches what solutions/ generates)."""
    problems = []
    wanted = {EXERCISES_DIR / p.name: _render(p) for p in sorted(SOLUTIONS_DIR.glob("*.ipynb"))}
    for target, text in wanted.items():
        if not target.exists():
            problems.append(f"{target.relative_to(REPO_DIR)} is missing")
        elif target.read_text() != text:
            problems.append(f"{target.relative_to(REPO_DIR)} is out of date")
    for extra in sorted(EXERCISES_DIR.glob("*.ipynb")):
        if extra not in wanted:
            problems.append(f"{extra.relative_to(REPO_DIR)} has no solution notebook")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.exercises",
        description="Write exercises/*.ipynb from solutions/*.ipynb: solution regions become "
                    "NotImplementedError stubs and outputs are cleared.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if exercises/ is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check()
            print("\n".join(problems) if problems else "exercises/ is in sync with solutions/")
            return 1 if problems else 0
        changed = generate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"wrote {path.relative_to(REPO_DIR)}")
    if not changed:
        print("exercises/ already matches solutions/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
