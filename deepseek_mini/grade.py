"""Grade an exercise notebook: run it with nbclient and score each exercise on its own.

    python -m deepseek_mini.grade exercises/01_baseline_transformer.ipynb
    python -m deepseek_mini.grade my_copy.ipynb --json grades.json --timeout 30

An exercise is nbgrader-style: a *solution* cell (``metadata.nbgrader.solution = true``)
followed by a *graded* check cell (``grade = true`` with ``points``). The exercise earns its
points when its solution cell and its check cell both run without raising.

The grader never crashes on a broken notebook. Each cell runs separately, so an exception,
a syntax error or a wrong answer costs only that exercise. A cell that runs past
``--timeout`` seconds (an infinite loop) is interrupted and reported as a timeout; if the
kernel does not come back, or dies (``os._exit``, a segfault), a fresh kernel is started,
the notebook's set-up cells and the solutions that already passed are replayed, and
grading goes on with the next exercise.

Exit codes: 0 every exercise earned full marks; 1 graded, some points lost;
2 the notebook could not be graded (missing, unreadable, or no graded cells).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

__all__ = ["ExerciseResult", "GradeReport", "grade_notebook", "main"]

EXIT_FULL_MARKS, EXIT_POINTS_LOST, EXIT_NOT_GRADED = 0, 1, 2
DEFAULT_TIMEOUT_S = 60
_PROBE_TIMEOUT_S = 10          # a kernel that cannot run `pass` in this long after an interrupt is replaced
_TIMEOUT_ENAME = "Timeout"


@dataclass
class ExerciseResult:
    exercise: str
    points: float
    max_points: float
    status: str                # passed | failed | not attempted | error | timeout | kernel died
    message: str = ""


@dataclass
class GradeReport:
    notebook: str
    exercises: list[ExerciseResult]

    @property
    def total(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_total(self) -> float:
        return sum(e.max_points for e in self.exercises)

    def to_json(self) -> dict:
        return {"notebook": self.notebook, "total": self.total, "max_total": self.max_total,
                "exercises": [asdict(e) for e in self.exercises]}

    def table(self) -> str:
        rows = [(e.exercise, f"{e.points:g}/{e.max_points:g}", e.status, _one_line(e.message)) for e in self.exercises]
        header = ("exercise", "points", "status", "message")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3]]
        lines.append("-" * (sum(widths) + 6 + 40))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.append(f"total: {self.total:g} / {self.max_total:g}")
        return "\n".join(lines)


def _one_line(message: str, width: int = 100) -> str:
    text = " | ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return text if len(text) <= width else text[: width - 1] + "…"


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) if cell.cell_type == "code" else {}


@dataclass
class _Exercise:
    grade_id: str
    check_index: int
    solution_index: int | None
    max_points: float


def _find_exercises(nb) -> list[_Exercise]:
    exercises, last_solution = [], None
    for index, cell in enumerate(nb.cells):
        meta = _nbgrader(cell)
        if meta.get("solution"):
            last_solution = index
        if meta.get("grade"):
            # Name the exercise after its solution cell ("rms_norm"), else after the check cell.
            name = _nbgrader(nb.cells[last_solution]).get("grade_id") if last_solution is not None else None
            exercises.append(_Exercise(name or meta.get("grade_id", f"cell {index}"), index, last_solution,
                                       float(meta.get("points", 0))))
            last_solution = None
    return exercises


class _Runner:
    """Runs cells one at a time in a kernel, surviving timeouts and kernel death."""

    def __init__(self, nb, cwd: Path, timeout: int) -> None:
        self.nb = nb
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
        """('ok' | 'error' | 'timeout' | 'died', message) for cell ``index``."""
        cell = self.nb.cells[index]
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
        """A fresh kernel with the set-up cells and the passing solutions replayed."""
        self.__exit__(None, None, None)       # shuts down the old kernel, dead or hung
        self.client.km = None
        self.client.kc = None
        self.__enter__()
        for index in self.replay:
            try:
                self.client.execute_cell(self.nb.cells[index], index)
            except Exception:
                pass


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


def grade_notebook(path: str | Path, timeout: int = DEFAULT_TIMEOUT_S) -> GradeReport:
    """Run the notebook at ``path`` and score each exercise independently.

    Raises ``ValueError`` only when the notebook cannot be graded at all (missing,
    unreadable, or without graded cells); every failure inside the notebook is a score.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"notebook {str(path)!r} does not exist")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:
        raise ValueError(f"notebook {str(path)!r} could not be read as a Jupyter notebook: {exc}") from None
    exercises = _find_exercises(nb)
    if not exercises:
        raise ValueError(f"notebook {str(path)!r} has no graded cells (metadata.nbgrader.grade = true)")
    by_check = {e.check_index: e for e in exercises}
    solution_of = {e.solution_index: e for e in exercises if e.solution_index is not None}
    outcome: dict[str, tuple[str, str]] = {}
    with _Runner(nb, path.resolve().parent, timeout) as runner:
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            exercise = by_check.get(index) or solution_of.get(index)
            if exercise is not None and exercise.grade_id in outcome:
                continue                      # its solution already failed: skip the check
            kind, message = runner.run(index)
            if exercise is None:
                if kind == "ok":
                    runner.replay.append(index)
                continue
            if kind != "ok":
                outcome[exercise.grade_id] = _status_of(kind, message, index == exercise.solution_index)
            elif index == exercise.check_index:
                outcome[exercise.grade_id] = ("passed", "")
            else:
                runner.replay.append(index)
    results = []
    for e in exercises:
        status, message = outcome.get(e.grade_id, ("error", "the check cell did not run"))
        results.append(ExerciseResult(e.grade_id, e.max_points if status == "passed" else 0.0,
                                      e.max_points, status, message))
    return GradeReport(str(path), results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.grade",
        description="Run an exercise notebook and score each exercise independently.",
        epilog="exit codes: 0 full marks, 1 some points lost, 2 the notebook could not be graded",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", help="the .ipynb to grade (anywhere on disk)")
    parser.add_argument("--json", metavar="FILE", help="also write the scores as JSON for a gradebook")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"seconds one cell may run before it counts as a timeout (default: {DEFAULT_TIMEOUT_S})")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout ({args.timeout}) must be a positive number of seconds")
    try:
        report = grade_notebook(args.notebook, timeout=args.timeout)
    except ValueError as exc:
        print(f"cannot grade: {exc}", file=sys.stderr)
        return EXIT_NOT_GRADED
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return EXIT_FULL_MARKS if report.total == report.max_total else EXIT_POINTS_LOST


if __name__ == "__main__":
    raise SystemExit(main())
