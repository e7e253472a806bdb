"""The grader scores each exercise on its own and never crashes on a broken notebook."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from deepseek_mini.grade import EXIT_FULL_MARKS, EXIT_NOT_GRADED, EXIT_POINTS_LOST, grade_notebook, main

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((REPO / "solutions").glob("*.ipynb"))
TIMEOUT = 8


def _max_points(path: Path) -> dict[str, float]:
    """Points per exercise, named after the solution cell before each graded cell."""
    nb = nbformat.read(path, as_version=4)
    points, last = {}, None
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("solution"):
            last = meta["grade_id"]
        if meta.get("grade"):
            points[last] = float(meta["points"])
    return points


def _with_solution(path: Path, grade_id: str, source: str, tmp_path: Path) -> Path:
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id)
    cell.source = source
    out = tmp_path / path.name
    nbformat.write(nb, out)
    return out


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_solutions_score_full_marks(solution):
    report = grade_notebook(solution, timeout=60)
    assert report.total == report.max_total == sum(_max_points(solution).values())
    assert all(e.status == "passed" for e in report.exercises), report.table()


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_untouched_exercises_score_zero_without_crashing(solution):
    exercise = REPO / "exercises" / solution.name
    report = grade_notebook(exercise, timeout=60)
    assert report.total == 0 and report.max_total == sum(_max_points(solution).values())
    assert {e.status for e in report.exercises} == {"not attempted"}


def test_a_planted_wrong_answer_loses_exactly_its_points(tmp_path):
    solution = REPO / "solutions" / "01_baseline_transformer.ipynb"
    wrong = ("def causal_mask(q_len, kv_len, q_offset=0):\n"
             "    return torch.ones(q_len, kv_len, dtype=torch.bool)   # sees the future\n")
    report = grade_notebook(_with_solution(solution, "causal_mask", wrong, tmp_path), timeout=60)
    points = _max_points(solution)
    by_name = {e.exercise: e for e in report.exercises}
    assert report.total == report.max_total - points["causal_mask"]
    assert by_name["causal_mask"].status == "failed"
    assert "attends to a future position" in by_name["causal_mask"].message
    assert all(e.status == "passed" for name, e in by_name.items() if name != "causal_mask")


def test_an_infinite_loop_is_a_timeout_and_the_others_are_still_scored(tmp_path):
    solution = REPO / "solutions" / "01_baseline_transformer.ipynb"
    looping = "def rms_norm(x, weight, eps=1e-6):\n    while True:\n        pass\n"
    report = grade_notebook(_with_solution(solution, "rms_norm", looping, tmp_path), timeout=TIMEOUT)
    by_name = {e.exercise: e for e in report.exercises}
    assert by_name["rms_norm"].status == "timeout" and by_name["rms_norm"].points == 0
    assert report.total == report.max_total - _max_points(solution)["rms_norm"]


def test_a_loop_that_ignores_interrupts_gets_a_fresh_kernel(tmp_path):
    solution = REPO / "solutions" / "01_baseline_transformer.ipynb"
    stubborn = ("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "def apply_rope(x, cos, sin):\n    return x\nwhile True:\n    pass\n")
    report = grade_notebook(_with_solution(solution, "apply_rope", stubborn, tmp_path), timeout=TIMEOUT)
    by_name = {e.exercise: e for e in report.exercises}
    assert by_name["apply_rope"].status == "timeout"
    assert report.total == report.max_total - _max_points(solution)["apply_rope"]


def test_a_dying_kernel_and_a_syntax_error_cost_only_their_exercises(tmp_path):
    solution = REPO / "solutions" / "01_baseline_transformer.ipynb"
    path = _with_solution(solution, "append_to_cache", "import os\nos._exit(1)\n", tmp_path)
    path = _with_solution(path, "top_p_filter", "def top_p_filter(logits, p)\n    return logits\n", tmp_path)
    report = grade_notebook(path, timeout=60)
    by_name = {e.exercise: e for e in report.exercises}
    assert by_name["append_to_cache"].status == "kernel died"
    assert by_name["top_p_filter"].status == "error" and "SyntaxError" in by_name["top_p_filter"].message
    points = _max_points(solution)
    assert report.total == report.max_total - points["append_to_cache"] - points["top_p_filter"]


def test_cli_table_json_and_exit_codes(tmp_path, capsys):
    solution = REPO / "solutions" / "01_baseline_transformer.ipynb"
    out = tmp_path / "grades.json"
    assert main([str(solution), "--json", str(out)]) == EXIT_FULL_MARKS
    printed = capsys.readouterr().out
    assert "exercise" in printed and "total: 10 / 10" in printed
    data = json.loads(out.read_text())
    assert data["total"] == data["max_total"] == 10 and len(data["exercises"]) == 5
    assert main([str(REPO / "exercises" / solution.name)]) == EXIT_POINTS_LOST


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"cells": [], "metadata": {},
                                                                     "nbformat": 4, "nbformat_minor": 5})])
def test_ungradable_notebooks_exit_2_with_a_reason(tmp_path, capsys, content):
    path = tmp_path / "learner.ipynb"
    if content is not None:
        path.write_text(content)
    assert main([str(path)]) == EXIT_NOT_GRADED
    assert "cannot grade" in capsys.readouterr().err
