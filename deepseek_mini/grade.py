"""Grade an exercise notebook against the course's own copy of its chapter's exercises.

    python -m deepseek_mini.grade exercises/01_baseline_transformer.ipynb
    python -m deepseek_mini.grade alice.ipynb --chapter 02_mla --json alice.json --timeout 30

What is graded comes from the package, not from the learner's file. Each exercise notebook
carries its chapter id in its metadata (``{"deepseek_mini": {"chapter": "03_moe"}}``), and
the package ships that chapter's grading spec (``deepseek_mini/grading/03_moe.json``,
generated from ``solutions/`` by ``python -m deepseek_mini.exercises``): the exercise ids,
their points and their check-cell sources. So a learner who edits the points, replaces a
check cell with ``pass``, deletes a check cell or pastes an exercise twice changes nothing:

* the learner's check cells are never run; for each exercise the spec's check source runs
  instead, right after the learner's solution cell (matched by nbgrader ``grade_id``);
* before each check, every ``deepseek_mini`` module is dropped from ``sys.modules`` and
  ``deepseek_mini.checks`` is imported afresh, with the notebook's folder and the kernel's
  working directory taken off ``sys.path`` for the import (and the module must be the
  grader's own file), so a solution cell that monkeypatches ``checks.check_*`` or the
  reference it compares with, or writes a fake ``deepseek_mini`` package next to the
  notebook, cannot fake a pass; and a notebook in a clone's root is graded with the
  grader's copy, not the clone's;
* points come from the spec; an exercise whose solution cell is gone scores 0 ("missing");
  when a solution cell appears twice, the last copy is graded, once.

Which chapter a notebook is: its metadata says, and nothing may contradict it. A notebook
without a chapter id, or with one this package does not know, cannot be graded. A notebook
is refused as "another chapter" when ``--chapter`` names a different one, when its file
name starts with a different chapter number (``01_...`` holding chapter 02; other names
are free), or when it holds exercise cells (``grade_id``) of another chapter. So chapter 02 saved as chapter 01 is
refused whether or not its metadata was edited too.

The other cells (imports, helpers, scratch work) are set-up cells and run in order. One
that fails is reported once, "set-up cell N failed: ...", numbering every cell from 1. A
failure before the first exercise (the imports) leaves nothing meaningful to run, so every
exercise shows "not run (set-up failed)"; a failure further down is reported and grading
goes on.

The grader never crashes on a broken notebook: a cell that raises, a syntax error or a
wrong answer costs only its exercise. A cell that runs past ``--timeout`` seconds is
interrupted and reported as a timeout; if the kernel does not come back, or dies
(``os._exit``, a segfault), a fresh kernel is started, the set-up cells and the solutions
that ran are replayed, and grading goes on. Hand-edited metadata cannot crash it either: a
``grade_id`` that is not a string matches no exercise (its cell counts as one without an
id), and a cell without a type, a source or a metadata object makes the notebook
ungradable (exit 2). Should the grader itself fail, the command says so and exits 2, never
1 (which would read as "graded, points lost").

This is not a security boundary: graded code runs unsandboxed with the grader's rights,
as with nbgrader, and a determined learner can patch deeper (``torch.allclose``, the
import system). Grade untrusted notebooks in a container or a throwaway account.

Exit codes: 0 every exercise earned full marks; 1 graded, some points lost; 2 the notebook
could not be graded (missing, unreadable, no or unknown chapter id, another chapter, or a
bad ``--json`` path).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

from deepseek_mini.exercises import CHAPTER_KEY, _nbgrader, chapter_of

__all__ = ["ExerciseResult", "GradeReport", "grade_notebook", "known_chapters", "load_spec", "main"]

EXIT_FULL_MARKS, EXIT_POINTS_LOST, EXIT_NOT_GRADED = 0, 1, 2
DEFAULT_TIMEOUT_S = 60
_PROBE_TIMEOUT_S = 10          # a kernel that cannot run `pass` in this long after an interrupt is replaced
_TIMEOUT_ENAME = "Timeout"
_CHAPTER_NUMBER = re.compile(r"^(\d{2})_")
NOT_RUN = "not run (set-up failed)"

# Run in the learner's kernel before every check: a fresh deepseek_mini (checks and the
# references they import), bound to the name the spec's check sources use. The import skips
# the notebook's folder and the kernel's working directory ('' on sys.path), unless the
# grader's own package lives there: a `deepseek_mini/` beside the notebook (a clone's root
# when the grader is installed elsewhere, or a fake package a solution cell wrote) is never
# imported. A copy found anywhere else is refused as not the grader's own file.
_FRESH_CHECKS = """\
def _deepseek_mini_fresh_checks(expected, notebook_dir):
    import importlib, os, sys
    own_root = os.path.dirname(os.path.dirname(expected))
    shadowing = {{os.path.realpath(notebook_dir), os.path.realpath(os.getcwd())}} - {{own_root}}
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not (isinstance(p, str) and os.path.realpath(p or ".") in shadowing)]
    try:
        for name in [n for n in sys.modules if n.split(".")[0] == "deepseek_mini"]:
            del sys.modules[name]
        importlib.invalidate_caches()
        module = importlib.import_module("deepseek_mini.checks")
    finally:
        sys.path[:] = saved
    if os.path.realpath(module.__file__) != expected:
        raise ImportError(f"deepseek_mini.checks came from {{module.__file__}}, not the grader's copy {{expected}}")
    return module
checks = _deepseek_mini_fresh_checks({expected!r}, {notebook_dir!r})
del _deepseek_mini_fresh_checks
"""


@dataclass
class ExerciseResult:
    exercise: str
    points: float
    max_points: float
    status: str    # passed | failed | not attempted | error | timeout | kernel died | missing | not run (set-up failed)
    message: str = ""


@dataclass
class GradeReport:
    notebook: str
    chapter: str
    exercises: list[ExerciseResult]
    setup_errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_total(self) -> float:
        return sum(e.max_points for e in self.exercises)

    def to_json(self) -> dict:
        return {"notebook": self.notebook, "chapter": self.chapter, "total": self.total,
                "max_total": self.max_total, "setup_errors": self.setup_errors,
                "exercises": [asdict(e) for e in self.exercises]}

    def table(self) -> str:
        rows = [(e.exercise, f"{e.points:g}/{e.max_points:g}", e.status, _one_line(e.message)) for e in self.exercises]
        header = ("exercise", "points", "status", "message")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        lines = [f"chapter: {self.chapter}", *self.setup_errors]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3])
        lines.append("-" * (sum(widths) + 6 + 40))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.append(f"total: {self.total:g} / {self.max_total:g}")
        return "\n".join(lines)


def _one_line(message: str, width: int = 100) -> str:
    text = " | ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return text if len(text) <= width else text[: width - 1] + "…"


def _learner_grade_id(cell) -> str | None:
    """The ``grade_id`` of a learner's cell; None when absent or not a string.

    A hand-edited id (a list, a dict) matches no exercise: its cell is treated as a cell
    without one (a set-up cell, or, if marked ``grade``, a check cell that never runs).
    """
    grade_id = _nbgrader(cell).get("grade_id")
    return grade_id if isinstance(grade_id, str) else None


# ------------------------------------------------------------------ the course's grading specs


def _spec_files() -> dict:
    folder = resources.files("deepseek_mini").joinpath("grading")
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {entry.name[: -len(".json")]: entry for entry in entries if entry.name.endswith(".json")}


def known_chapters() -> list[str]:
    """The chapter ids this installation of deepseek_mini can grade."""
    return sorted(_spec_files())


def load_spec(chapter: str) -> dict:
    """The grading spec of ``chapter``: ``{"chapter", "exercises": [{"id", "check_id", "points", "check"}]}``."""
    files = _spec_files()
    if chapter not in files:
        raise ValueError(f"unknown chapter {chapter!r}; this deepseek_mini grades {', '.join(sorted(files)) or 'none'}")
    return json.loads(files[chapter].read_text(encoding="utf-8"))


def _grade_ids(spec: dict) -> set[str]:
    return {e["id"] for e in spec["exercises"]} | {e["check_id"] for e in spec["exercises"]}


def _identify(nb, path: Path, expected: str | None) -> dict:
    """The spec of the notebook's chapter; ``ValueError`` if it has none or belongs to another chapter."""
    chapters = known_chapters()
    claimed = chapter_of(nb)
    if claimed is None:
        raise ValueError(f"notebook {str(path)!r} carries no chapter id (metadata.{CHAPTER_KEY}.chapter): work in a "
                         f"copy of the course's exercises/NN_topic.ipynb, which has one, or add "
                         f'"{CHAPTER_KEY}": {{"chapter": "NN_topic"}} to the notebook metadata '
                         f"(chapters: {', '.join(chapters)})")
    if claimed not in chapters:
        raise ValueError(f"notebook {str(path)!r} says chapter {claimed!r}, which this deepseek_mini does not grade "
                         f"(chapters: {', '.join(chapters)})")
    refused = f"notebook {str(path)!r} is refused: its metadata says chapter {claimed!r}"
    if expected is not None and claimed != expected:
        raise ValueError(f"{refused}, not {expected!r} (a notebook of another chapter)")
    named, own_number = _CHAPTER_NUMBER.match(path.name), _CHAPTER_NUMBER.match(claimed)
    if named and own_number and named.group(1) != own_number.group(1):
        raise ValueError(f"{refused}, but the file name says chapter {named.group(1)}: rename the file or grade "
                         f"the notebook of chapter {named.group(1)}")
    spec = load_spec(claimed)
    learner_ids = {_learner_grade_id(c) for c in nb.cells} - _grade_ids(spec) - {None}
    for other in chapters:
        foreign = learner_ids & _grade_ids(load_spec(other)) if other != claimed else set()
        if foreign:
            raise ValueError(f"{refused}, but it holds exercise cells of chapter {other!r} "
                             f"({', '.join(sorted(foreign))})")
    return spec


# ------------------------------------------------------------------ running cells


class _Runner:
    """Runs cells one at a time in a kernel, surviving timeouts and kernel death."""

    def __init__(self, nb, cwd: Path, timeout: int) -> None:
        self.nb, self.cwd = nb, cwd
        self.client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", allow_errors=False, interrupt_on_timeout=True,
            error_on_timeout={"ename": _TIMEOUT_ENAME,
                              "evalue": f"the cell ran longer than {timeout} s (an infinite loop?) and was interrupted",
                              "traceback": []},
            resources={"metadata": {"path": str(cwd)}}, record_timing=False)
        self.replay: list[int] = []   # cells to re-run on a fresh kernel

    def __enter__(self) -> _Runner:
        self._context = self.client.setup_kernel()
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._context.__exit__(*exc)
        except Exception:  # a kernel that is already gone cannot be shut down politely
            pass

    def run(self, index: int) -> tuple[str, str]:
        """('ok' | 'error' | 'timeout' | 'died', message) for the notebook's cell ``index``."""
        return self._execute(self.nb.cells[index], index)

    def run_source(self, source: str) -> tuple[str, str]:
        """Like ``run`` for code that is not in the learner's notebook (the grader's own cells)."""
        return self._execute(nbformat.v4.new_code_cell(source), 0)

    def _execute(self, cell, index: int) -> tuple[str, str]:
        try:
            self.client.execute_cell(cell, index)
            return "ok", ""
        except CellExecutionError as exc:
            if exc.ename == _TIMEOUT_ENAME:
                if not self._responsive():
                    self.restart()
                return "timeout", exc.evalue
            return "error", f"{exc.ename}: {exc.evalue}"
        except DeadKernelError:
            self.restart()
            return "died", "the kernel died while running this cell (os._exit, a crash or out of memory)"
        except Exception as exc:  # anything else the client raises must not stop the grading
            self.restart()
            return "error", f"{type(exc).__name__}: {exc}"

    def _responsive(self) -> bool:
        probe = nbformat.v4.new_code_cell("pass")
        saved = self.client.timeout
        self.client.timeout = _PROBE_TIMEOUT_S
        try:
            self.client.execute_cell(probe, 0)
            return True
        except Exception:
            return False
        finally:
            self.client.timeout = saved

    def restart(self) -> None:
        """A fresh kernel with the set-up cells and the solutions that ran replayed."""
        self.__exit__(None, None, None)       # shuts down the old kernel, dead or hung
        self.client.km = None
        self.client.kc = None
        self.__enter__()
        for index in self.replay:
            try:
                self.client.execute_cell(self.nb.cells[index], index)
            except Exception:
                pass

    def check(self, source: str) -> tuple[str, str]:
        """Run a check from the spec against a freshly imported ``deepseek_mini.checks``."""
        kind, message = self.run_source(_FRESH_CHECKS.format(expected=_checks_file(), notebook_dir=str(self.cwd)))
        if kind != "ok":
            return kind, f"the grader could not import a fresh deepseek_mini.checks: {message}"
        return self.run_source(source)


def _checks_file() -> str:
    """Where the grader's own ``deepseek_mini.checks`` lives (found without importing it)."""
    return os.path.realpath(importlib.util.find_spec("deepseek_mini.checks").origin)


def _status_of(kind: str, message: str, in_solution: bool) -> tuple[str, str]:
    if kind == "timeout":
        return "timeout", message
    if kind == "died":
        return "kernel died", message
    if "NotImplementedError" in message:
        return "not attempted", "the exercise still raises NotImplementedError"
    if in_solution:
        return "error", f"in your solution cell: {message}"
    if message.startswith(("CheckFailure", "AssertionError")):
        return "failed", message.split(": ", 1)[-1]
    return "error", message


def _setup_error(nb, index: int, message: str) -> str:
    first_line = next((line.strip() for line in nb.cells[index].source.splitlines() if line.strip()), "")
    first_line = first_line if len(first_line) <= 40 else first_line[:39] + "…"
    return f"set-up cell {index + 1} (`{first_line}`) failed: {_one_line(message)}"


# ------------------------------------------------------------------ grading


def grade_notebook(path: str | Path, timeout: int = DEFAULT_TIMEOUT_S, chapter: str | None = None) -> GradeReport:
    """Run the notebook at ``path`` and score each of its chapter's exercises independently.

    ``chapter``, when given, is the chapter the notebook must be (an instructor grading one
    assignment). Raises ``ValueError`` only when the notebook cannot be graded at all (see
    the module docstring); every failure inside the notebook is a score.
    """
    path = Path(path)
    if not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(f"timeout ({timeout!r}) must be a positive number of seconds")
    if not path.is_file():
        raise ValueError(f"notebook {str(path)!r} does not exist")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:
        raise ValueError(f"notebook {str(path)!r} could not be read as a Jupyter notebook: {exc}") from None
    _check_cells(nb, path)
    if chapter is not None and chapter not in known_chapters():
        raise ValueError(f"unknown chapter {chapter!r}; this deepseek_mini grades {', '.join(known_chapters())}")
    spec = _identify(nb, path, chapter)
    exercises = spec["exercises"]
    check_ids = {e["check_id"] for e in exercises}

    # The learner's cells: solution copies per exercise, check cells (never run), the rest set-up.
    copies: dict[str, list[int]] = {e["id"]: [] for e in exercises}
    skipped, first_exercise_cell = set(), len(nb.cells)
    for index, cell in enumerate(nb.cells):
        meta, grade_id = _nbgrader(cell), _learner_grade_id(cell)
        if meta.get("solution") or meta.get("grade") or grade_id in check_ids:
            first_exercise_cell = min(first_exercise_cell, index)
        if meta.get("grade") or grade_id in check_ids:
            skipped.add(index)
        elif meta.get("solution") and grade_id in copies:
            copies[grade_id].append(index)
    exercise_of = {index: e for e in exercises for index in copies[e["id"]]}

    outcome: dict[str, tuple[str, str]] = {}
    setup_errors: list[str] = []
    setup_failed = False
    if any(copies.values()):              # nothing to run when every exercise is missing
        with _Runner(nb, path.resolve().parent, timeout) as runner:
            for index, cell in enumerate(nb.cells):
                if cell.get("cell_type") != "code" or not cell.source.strip() or index in skipped:
                    continue
                exercise = exercise_of.get(index)
                kind, message = runner.run(index)
                if exercise is None:
                    if kind == "ok":
                        runner.replay.append(index)
                        continue
                    setup_errors.append(_setup_error(nb, index, message))
                    if index < first_exercise_cell:
                        setup_failed = True
                        break
                    continue
                if kind == "ok":
                    runner.replay.append(index)
                if index != copies[exercise["id"]][-1]:
                    continue                  # an earlier copy: the last one is graded
                if kind != "ok":
                    outcome[exercise["id"]] = _status_of(kind, message, in_solution=True)
                    continue
                kind, message = runner.check(exercise["check"])
                outcome[exercise["id"]] = ("passed", "") if kind == "ok" else _status_of(kind, message, False)

    results = []
    for e in exercises:
        n_copies = len(copies[e["id"]])
        if n_copies == 0:
            status, message = "missing", (f"no solution cell with grade_id {e['id']!r}: copy it back from "
                                          f"exercises/{spec['chapter']}.ipynb")
        elif e["id"] in outcome:
            status, message = outcome[e["id"]]
        elif setup_failed:
            status, message = NOT_RUN, setup_errors[-1].split(" failed:")[0] + " failed"
        else:
            status, message = "error", "the check did not run"
        if n_copies > 1:
            note = f"{n_copies} cells have grade_id {e['id']!r}; the last one was graded"
            message = f"{message} ({note})" if message else note
        points = float(e["points"])
        results.append(ExerciseResult(e["id"], points if status == "passed" else 0.0, points, status, message))
    return GradeReport(str(path), spec["chapter"], results, setup_errors)


def _check_cells(nb, path: Path) -> None:
    """``ValueError`` for a notebook whose cells are not cells (nbformat reads some such files)."""
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise ValueError(f"notebook {str(path)!r} has no list of cells: not a Jupyter notebook")
    for number, cell in enumerate(cells, start=1):
        if not (isinstance(cell, dict) and isinstance(cell.get("cell_type"), str)
                and isinstance(cell.get("source"), str) and isinstance(cell.get("metadata", {}), dict)):
            raise ValueError(f"notebook {str(path)!r}: cell {number} is malformed (it needs a cell_type, a source "
                             "and a metadata object); open and save the notebook in Jupyter to repair it")


def _json_path_problem(target: str) -> str | None:
    """Why ``--json target`` could not be written, checked before any grading starts."""
    path = Path(target)
    if path.is_dir():
        return f"--json {target!r} is a directory; give a file name such as grades.json"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"--json {target!r}: the folder {str(parent)!r} does not exist"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"--json {target!r} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.grade",
        description="Run an exercise notebook and score each of its chapter's exercises with the course's "
                    "own checks and points. Graded code runs unsandboxed: grade untrusted notebooks in a "
                    "container or a throwaway account.",
        epilog="exit codes: 0 full marks, 1 some points lost, 2 the notebook could not be graded",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", help="the .ipynb to grade (anywhere on disk)")
    parser.add_argument("--chapter", metavar="ID",
                        help="refuse the notebook unless it is this chapter, e.g. 02_mla")
    parser.add_argument("--json", metavar="FILE", help="also write the scores as JSON for a gradebook")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"seconds one cell may run before it counts as a timeout (default: {DEFAULT_TIMEOUT_S})")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout ({args.timeout}) must be a positive number of seconds")
    problem = _json_path_problem(args.json) if args.json else None
    if problem:
        print(f"cannot grade: {problem}", file=sys.stderr)
        return EXIT_NOT_GRADED
    try:
        report = grade_notebook(args.notebook, timeout=args.timeout, chapter=args.chapter)
    except ValueError as exc:
        print(f"cannot grade: {exc}", file=sys.stderr)
        return EXIT_NOT_GRADED
    except Exception as exc:  # a grader bug must read as "not graded", never as "points lost" (exit 1)
        print(f"cannot grade: the grader failed ({type(exc).__name__}: {_one_line(str(exc), 200)}); "
              "this is a bug in deepseek_mini.grade, please report it", file=sys.stderr)
        return EXIT_NOT_GRADED
    print(report.table())
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as exc:
            print(f"cannot write {args.json}: {exc}", file=sys.stderr)
            return EXIT_NOT_GRADED
        print(f"wrote {args.json}")
    return EXIT_FULL_MARKS if report.total == report.max_total else EXIT_POINTS_LOST


if __name__ == "__main__":
    raise SystemExit(main())
