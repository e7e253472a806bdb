"""Generate the learner's exercise notebooks from the solution notebooks.

``solutions/NN_topic.ipynb`` is the single source of each chapter's graded exercises. An
exercise is a code cell whose function or class body sits between nbgrader's markers::

    def rms_norm(x, weight, eps=1e-6):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

followed by a graded check cell. This command writes two things from each solution notebook:

* ``exercises/NN_topic.ipynb``, the learner's copy: each solution region replaced by a stub
  that raises ``NotImplementedError`` naming the exercise, every output and execution count
  cleared. The cells keep nbgrader's metadata (``grade_id``, ``points``, ``solution``,
  ``grade``), so instructors can also use nbgrader, and the notebook keeps the chapter id
  (``metadata.deepseek_mini.chapter``, equal to the file's stem).
* ``deepseek_mini/grading/NN_topic.json``, the grading spec shipped inside the package: the
  chapter id and, per exercise, its ``grade_id``, points and check-cell source. The grader
  (``python -m deepseek_mini.grade``) takes these from the spec, never from the learner's
  file, so editing points or check cells in a copy changes nothing.

    python -m deepseek_mini.exercises          # write exercises/ and the specs from solutions/
    python -m deepseek_mini.exercises --check  # exit 1 if either is out of date

A later chapter joins by adding its solution notebook (with its chapter id in the notebook
metadata); nothing here changes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

__all__ = ["BEGIN_SOLUTION", "END_SOLUTION", "CHAPTER_KEY", "chapter_of", "strip_solutions",
           "make_exercise_notebook", "grading_spec", "generate", "check"]

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
CHAPTER_KEY = "deepseek_mini"      # notebook metadata: {"deepseek_mini": {"chapter": "03_moe"}}
REPO_DIR = Path(__file__).resolve().parent.parent
SOLUTIONS_DIR = REPO_DIR / "solutions"
EXERCISES_DIR = REPO_DIR / "exercises"
GRADING_DIR = Path(__file__).resolve().parent / "grading"   # package data: found when installed too
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


def _nbgrader(cell: nbformat.NotebookNode) -> dict:
    """A code cell's ``metadata.nbgrader`` ({} for other cells, or when it is not a dict).

    Shared with the grader, which reads learners' files: a hand-edited notebook must not
    crash it with metadata of the wrong shape.
    """
    if not isinstance(cell, dict) or cell.get("cell_type") != "code":
        return {}
    metadata = cell.get("metadata")
    meta = metadata.get("nbgrader") if isinstance(metadata, dict) else None
    return meta if isinstance(meta, dict) else {}


def _grade_id(cell: nbformat.NotebookNode) -> str:
    name = _nbgrader(cell).get("grade_id")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a solution cell needs a string metadata.nbgrader.grade_id (got {name!r}):\n"
                         f"{cell.source[:200]}")
    return name


def _exercise_name(cell: nbformat.NotebookNode) -> str:
    return f"Exercise {_grade_id(cell)}"


def chapter_of(nb: nbformat.NotebookNode) -> str | None:
    """The chapter id a notebook carries in ``metadata.deepseek_mini.chapter`` (None if absent)."""
    meta = nb.get("metadata", {}).get(CHAPTER_KEY)
    chapter = meta.get("chapter") if isinstance(meta, dict) else None
    return chapter if isinstance(chapter, str) and chapter else None


def grading_spec(solution: nbformat.NotebookNode, chapter: str) -> dict:
    """What the grader needs from a solution notebook: per exercise its id, points and check source.

    An exercise is a solution cell followed, before the next solution cell, by exactly one
    graded check cell with positive points; anything else is an authoring error (``ValueError``).
    """
    exercises: list[dict] = []
    for cell in solution.cells:
        meta = _nbgrader(cell)
        if meta.get("solution"):
            if exercises and "check" not in exercises[-1]:
                raise ValueError(f"{chapter}: solution cell {exercises[-1]['id']!r} has no graded check cell "
                                 f"after it (solution cell {_grade_id(cell)!r} comes first)")
            exercises.append({"id": _grade_id(cell)})
        elif meta.get("grade"):
            check_id = meta.get("grade_id") or (f"{exercises[-1]['id']}_check" if exercises else None)
            where = f"{chapter}: graded cell {check_id!r}"
            if not exercises or "check" in exercises[-1]:
                raise ValueError(f"{where} does not follow a solution cell")
            if not isinstance(check_id, str):
                raise ValueError(f"{where} needs a string metadata.nbgrader.grade_id")
            points = meta.get("points")
            if isinstance(points, bool) or not isinstance(points, (int, float)) or points <= 0:
                raise ValueError(f"{where} needs positive metadata.nbgrader.points, got {points!r}")
            exercises[-1].update(check_id=check_id, points=points, check=cell.source)
    unchecked = [e["id"] for e in exercises if "check" not in e]
    if unchecked:
        raise ValueError(f"{chapter}: solution cell {unchecked[0]!r} has no graded check cell after it")
    ids = [e["id"] for e in exercises] + [e["check_id"] for e in exercises]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{chapter}: grade_ids must be unique, got {sorted(ids)}")
    return {"chapter": chapter,
            "generated_from": f"solutions/{chapter}.ipynb by `python -m deepseek_mini.exercises`; do not edit",
            "exercises": exercises}


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


def _solution_notebooks() -> list[Path]:
    """``solutions/*.ipynb``; ``ValueError`` when there are none.

    Without this, an installed package (no ``solutions/``) or a run from the wrong working
    copy would want no files and ``generate()`` would delete every exercise notebook and
    every grading spec as stale.
    """
    rel = SOLUTIONS_DIR.relative_to(REPO_DIR) if SOLUTIONS_DIR.is_relative_to(REPO_DIR) else SOLUTIONS_DIR
    fix = "nothing was written or deleted"
    if not SOLUTIONS_DIR.is_dir():
        raise ValueError(f"no solutions folder {rel}/: run `python -m deepseek_mini.exercises` in a clone of "
                         f"the course (an installed package has no solutions); {fix}")
    notebooks = sorted(SOLUTIONS_DIR.glob("*.ipynb"))
    if not notebooks:
        raise ValueError(f"{rel}/ holds no .ipynb notebooks: restore them from git; {fix}")
    return notebooks


def _wanted() -> dict[Path, str]:
    """Every generated file (exercise notebooks and grading specs) with its expected text."""
    wanted = {}
    for path in _solution_notebooks():
        solution = nbformat.read(path, as_version=4)
        chapter = chapter_of(solution)
        if chapter != path.stem:
            raise ValueError(f"{path.relative_to(REPO_DIR)}: notebook metadata needs "
                             f'"{CHAPTER_KEY}": {{"chapter": "{path.stem}"}} (found {chapter!r})')
        wanted[EXERCISES_DIR / path.name] = nbformat.writes(make_exercise_notebook(solution)) + "\n"
        spec = grading_spec(solution, chapter)
        wanted[GRADING_DIR / f"{chapter}.json"] = json.dumps(spec, indent=1, ensure_ascii=False) + "\n"
    return wanted


def _generated_files() -> list[Path]:
    """The files this command wrote earlier: grading specs, and exercise notebooks whose chapter
    id is their own file name. A learner's copy (``exercises/01_mine.ipynb`` still says
    ``01_baseline_transformer``) or any other notebook in ``exercises/`` is never touched."""
    return sorted([*(path for path in EXERCISES_DIR.glob("*.ipynb") if _chapter_in_file(path) == path.stem),
                   *GRADING_DIR.glob("*.json")])


def _chapter_in_file(path: Path) -> str | None:
    try:
        return chapter_of(nbformat.read(path, as_version=4))
    except Exception:          # unreadable or not a notebook: not ours to delete
        return None


def generate() -> list[Path]:
    """Write exercises/ and deepseek_mini/grading/ from solutions/; return the files that changed.

    Files no solution notebook generates any more are deleted. Every solution notebook is
    read and checked before the first write or delete.
    """
    wanted = _wanted()
    EXERCISES_DIR.mkdir(exist_ok=True)
    GRADING_DIR.mkdir(exist_ok=True)
    changed = []
    for target, text in wanted.items():
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            changed.append(target)
    for stale in _generated_files():
        if stale not in wanted:
            stale.unlink()
            changed.append(stale)
    return changed


def check() -> list[str]:
    """Problems with exercises/ and the grading specs (empty when they match what solutions/ generates)."""
    problems = []
    wanted = _wanted()
    for target, text in wanted.items():
        if not target.exists():
            problems.append(f"{target.relative_to(REPO_DIR)} is missing")
        elif target.read_text() != text:
            problems.append(f"{target.relative_to(REPO_DIR)} is out of date")
    for extra in _generated_files():
        if extra not in wanted:
            problems.append(f"{extra.relative_to(REPO_DIR)} has no solution notebook")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.exercises",
        description="Write exercises/*.ipynb from solutions/*.ipynb (solution regions become "
                    "NotImplementedError stubs, outputs are cleared) and the grader's specs "
                    "deepseek_mini/grading/*.json (exercise ids, points, check cells).")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if exercises/ or the grading specs are stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check()
            print("\n".join(problems) if problems else "exercises/ and the grading specs are in sync with solutions/")
            return 1 if problems else 0
        changed = generate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"wrote {path.relative_to(REPO_DIR)}")
    if not changed:
        print("exercises/ and the grading specs already match solutions/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
