"""The grader scores each exercise on its own, never crashes on a broken notebook, and
grades against the course's own checks and points, so the cheats of issue #9 earn nothing."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nbformat
import pytest

from deepseek_mini import grade
from deepseek_mini.grade import (EXIT_FULL_MARKS, EXIT_NOT_GRADED, EXIT_POINTS_LOST, NOT_RUN, grade_notebook,
                                 load_spec, main)

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
    assert "chapter: 01_baseline_transformer" in printed and "total: 10 / 10" in printed
    data = json.loads(out.read_text())
    assert data["total"] == data["max_total"] == 10 and len(data["exercises"]) == 5
    assert data["chapter"] == "01_baseline_transformer" and data["setup_errors"] == []
    assert main([str(REPO / "exercises" / solution.name)]) == EXIT_POINTS_LOST


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"cells": [], "metadata": {},
                                                                     "nbformat": 4, "nbformat_minor": 5})])
def test_ungradable_notebooks_exit_2_with_a_reason(tmp_path, capsys, content):
    path = tmp_path / "learner.ipynb"
    if content is not None:
        path.write_text(content)
    assert main([str(path)]) == EXIT_NOT_GRADED
    assert "cannot grade" in capsys.readouterr().err


# ---------------------------------------------------------------- a grader that cannot be fooled


def _cell(nb, grade_id: str):
    return next(c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id)


def _save(nb, path: Path) -> Path:
    nbformat.write(nb, path)
    return path


def test_planted_cheats_earn_only_what_was_solved(tmp_path):
    """Every cheat of issue #9 on the chapter 01 exercises; only top_p_filter is really solved."""
    nb = nbformat.read(REPO / "exercises" / "01_baseline_transformer.ipynb", as_version=4)
    solved = nbformat.read(REPO / "solutions" / "01_baseline_transformer.ipynb", as_version=4)
    _cell(nb, "rms_norm_check").source = "pass"                          # check cell replaced by `pass`
    _cell(nb, "apply_rope_check").metadata.nbgrader.points = 1000        # points metadata inflated
    _cell(nb, "causal_mask").source += (                                 # the check monkeypatched, two ways
        "\n\nimport sys\n"
        "checks.check_causal_mask = lambda fn: print('✓ causal_mask')\n"
        "sys.modules['deepseek_mini.checks'].check_causal_mask = checks.check_causal_mask\n")
    nb.cells.remove(_cell(nb, "append_to_cache_check"))                  # check cell deleted
    _cell(nb, "top_p_filter").source = _cell(solved, "top_p_filter").source
    pasted = copy.deepcopy([_cell(nb, "top_p_filter"), _cell(nb, "top_p_filter_check")])  # pasted twice
    for cell in pasted:
        cell.id = nbformat.v4.new_code_cell().id                         # Jupyter gives a pasted cell a new id
    nb.cells += pasted
    scratch = nb.cells.index(_cell(nb, "rms_norm_check")) + 1
    nb.cells.insert(scratch, nbformat.v4.new_code_cell("raise ValueError('scratch work')"))
    report = grade_notebook(_save(nb, tmp_path / "01_baseline_transformer.ipynb"), timeout=60)

    by_name = {e.exercise: e for e in report.exercises}
    assert list(by_name) == [e["id"] for e in load_spec("01_baseline_transformer")["exercises"]]
    assert (report.total, report.max_total) == (2, 10), report.table()
    for name in ("rms_norm", "apply_rope", "causal_mask", "append_to_cache"):
        assert (by_name[name].points, by_name[name].status) == (0, "not attempted"), report.table()
    assert by_name["apply_rope"].max_points == 2
    assert (by_name["top_p_filter"].points, by_name["top_p_filter"].status) == (2, "passed")
    assert "2 cells have grade_id 'top_p_filter'" in by_name["top_p_filter"].message
    assert report.setup_errors == [f"set-up cell {scratch + 1} (`raise ValueError('scratch work')`) failed: "
                                   "ValueError: scratch work"]


def test_a_failing_set_up_cell_is_reported_once_and_a_deleted_exercise_is_missing(tmp_path):
    nb = nbformat.read(REPO / "exercises" / "02_mla.ipynb", as_version=4)
    solved = nbformat.read(REPO / "solutions" / "02_mla.ipynb", as_version=4)
    setup = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells[setup].source += "\nimport einops_with_a_typo\n"
    nb.cells.remove(_cell(nb, "split_query"))
    nb.cells.remove(_cell(nb, "split_query_check"))
    # A solved exercise whose cell leaves a trace if it runs: after a set-up failure it must not.
    _cell(nb, "mla_cache_bytes").source = (_cell(solved, "mla_cache_bytes").source
                                          + "\nopen('solution_ran.txt', 'w').close()\n")
    report = grade_notebook(_save(nb, tmp_path / "learner.ipynb"), timeout=60)

    assert report.setup_errors == [f"set-up cell {setup + 1} (`import torch`) failed: "
                                   "ModuleNotFoundError: No module named 'einops_with_a_typo'"]
    statuses = {e.exercise: e.status for e in report.exercises}
    assert statuses == {"split_query": "missing", "mla_cache_bytes": NOT_RUN,
                        "absorb_query": NOT_RUN, "absorbed_attention": NOT_RUN}
    assert (report.total, report.max_total) == (0, 8)
    assert not (tmp_path / "solution_ran.txt").exists()
    assert main([str(tmp_path / "learner.ipynb")]) == EXIT_POINTS_LOST  # graded, not "cannot grade"


def _write_fake_package(folder: str) -> str:
    """Source of a solution-cell tail that writes a deepseek_mini whose checks pass anything."""
    return ("\n\nimport pathlib\n"
            f"fake = pathlib.Path({folder!r}) / 'deepseek_mini'\n"
            "fake.mkdir(parents=True)\n"
            "(fake / '__init__.py').write_text('')\n"
            "(fake / 'checks.py').write_text('def __getattr__(name):\\n    return lambda fn: None\\n')\n")


def test_a_fake_checks_package_written_by_a_solution_cell_earns_nothing(tmp_path):
    nb = nbformat.read(REPO / "exercises" / "03_moe.ipynb", as_version=4)
    # Next to the notebook: the fresh import does not look there, the real checks run.
    _cell(nb, "group_limited_topk").source += _write_fake_package(".")
    # Elsewhere, put first on sys.path: imported, and refused as not the grader's own file.
    _cell(nb, "routing_weights").source += (_write_fake_package("elsewhere")
                                            + "import sys\nsys.path.insert(0, 'elsewhere')\n")
    report = grade_notebook(_save(nb, tmp_path / "03_moe.ipynb"), timeout=60)
    assert (report.total, report.max_total) == (0, 8), report.table()
    by_name = {e.exercise: e for e in report.exercises}
    assert by_name.pop("group_limited_topk").status == "not attempted", report.table()
    assert all(e.status == "error" and "not the grader's copy" in e.message for e in by_name.values()), report.table()


def test_a_notebook_in_a_clones_root_is_graded_with_the_graders_checks(tmp_path):
    # The grader installed in one place, the learner's notebook in the root of another clone:
    # the clone's deepseek_mini/ beside the notebook must not stand in for the grader's.
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "deepseek_mini", clone / "deepseek_mini", ignore=shutil.ignore_patterns("__pycache__"))
    notebook = clone / "02_mla.ipynb"
    shutil.copy(REPO / "solutions" / "02_mla.ipynb", notebook)
    report = grade_notebook(notebook, timeout=60)
    assert report.total == report.max_total == 8, report.table()


def _all_grade_ids_bogus(tmp_path: Path) -> Path:
    """Chapter 01 with every grade_id hand-edited into a list or a dict (unhashable)."""
    nb = nbformat.read(REPO / "exercises" / "01_baseline_transformer.ipynb", as_version=4)
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if "grade_id" in meta:
            meta["grade_id"] = [meta["grade_id"]] if meta.get("solution") else {"id": meta["grade_id"]}
    return _save(nb, tmp_path / "01_baseline_transformer.ipynb")


def test_a_grade_id_that_is_not_a_string_matches_no_exercise(tmp_path, capsys, monkeypatch):
    # Used to escape as "TypeError: unhashable type: 'list'" (exit 1, as if graded).
    _refuse_to_run(monkeypatch)            # no solution cell matches: nothing to run
    path = _all_grade_ids_bogus(tmp_path)
    report = grade_notebook(path, timeout=TIMEOUT)
    assert (report.total, report.max_total) == (0, 10)
    assert {e.status for e in report.exercises} == {"missing"}
    assert main([str(path)]) == EXIT_POINTS_LOST
    assert "missing" in capsys.readouterr().out


@pytest.mark.parametrize("breakage, message", [
    (lambda cells: cells[1].pop("cell_type"), "cell 2 is malformed"),
    (lambda cells: cells[1].__setitem__("source", 5), "cell 2 is malformed"),
], ids=["no_cell_type", "source_not_text"])
def test_a_malformed_cell_makes_the_notebook_ungradable(tmp_path, capsys, monkeypatch, breakage, message):
    _refuse_to_run(monkeypatch)
    data = json.loads((REPO / "exercises" / "01_baseline_transformer.ipynb").read_text())
    breakage(data["cells"])
    path = tmp_path / "01_baseline_transformer.ipynb"
    path.write_text(json.dumps(data))
    assert main([str(path)]) == EXIT_NOT_GRADED
    err = capsys.readouterr().err
    assert err.startswith("cannot grade:") and message in err and err.count("\n") == 1, err


def test_a_failure_inside_the_grader_exits_2_not_1(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("unhashable type: 'list'")
    monkeypatch.setattr(grade, "grade_notebook", broken)
    assert main([str(REPO / "exercises" / "02_mla.ipynb")]) == EXIT_NOT_GRADED
    err = capsys.readouterr().err
    assert err == ("cannot grade: the grader failed (TypeError: unhashable type: 'list'); "
                   "this is a bug in deepseek_mini.grade, please report it\n")


def test_the_grader_and_the_generator_read_nbgrader_metadata_alike():
    from deepseek_mini import exercises
    assert grade._nbgrader is exercises._nbgrader


def _refuse_to_run(monkeypatch):
    """Make any attempt to start a kernel fail the test: refusals happen before running anything."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("the grader started a kernel for a notebook it should have refused")
    monkeypatch.setattr(grade, "_Runner", no_kernel)


def _chapter_02(tmp_path, name: str, chapter: str | None = "02_mla") -> Path:
    nb = nbformat.read(REPO / "solutions" / "02_mla.ipynb", as_version=4)
    if chapter is None:
        del nb.metadata["deepseek_mini"]
    else:
        nb.metadata["deepseek_mini"]["chapter"] = chapter
    return _save(nb, tmp_path / name)


@pytest.mark.parametrize("name, chapter, args, reason", [
    # chapter 02 saved as chapter 01: refused by its file name ...
    ("01_baseline_transformer.ipynb", "02_mla", [], "the file name says chapter 01"),
    # ... and, with its metadata edited to match, by its cells
    ("01_baseline_transformer.ipynb", "01_baseline_transformer", [], "holds exercise cells of chapter '02_mla'"),
    ("my_work.ipynb", "01_baseline_transformer", [], "holds exercise cells of chapter '02_mla'"),
    # an instructor grading chapter 01 is handed chapter 02
    ("my_work.ipynb", "02_mla", ["--chapter", "01_baseline_transformer"], "not '01_baseline_transformer'"),
    ("my_work.ipynb", None, [], "carries no chapter id"),
    ("my_work.ipynb", "09_unknown", [], "'09_unknown', which this deepseek_mini does not grade"),
    ("my_work.ipynb", "02_mla", ["--chapter", "09_unknown"], "unknown chapter '09_unknown'"),
])
def test_a_notebook_of_another_or_no_chapter_is_refused(tmp_path, capsys, monkeypatch, name, chapter, args, reason):
    _refuse_to_run(monkeypatch)
    assert main([str(_chapter_02(tmp_path, name, chapter)), *args]) == EXIT_NOT_GRADED
    err = capsys.readouterr().err
    assert err.startswith("cannot grade:") and reason in err, err


@pytest.mark.parametrize("timeout", [0, -1, 2.5])
def test_grade_notebook_rejects_a_bad_timeout(timeout):
    with pytest.raises(ValueError, match="positive number of seconds"):
        grade_notebook(REPO / "exercises" / "02_mla.ipynb", timeout=timeout)


@pytest.mark.parametrize("target, reason", [(".", "is a directory"), ("no_such_folder/grades.json", "does not exist")])
def test_a_bad_json_path_is_refused_before_grading(tmp_path, capsys, monkeypatch, target, reason):
    monkeypatch.chdir(tmp_path)
    _refuse_to_run(monkeypatch)
    notebook = _chapter_02(tmp_path, "02_mla.ipynb")
    assert main([str(notebook), "--json", target]) == EXIT_NOT_GRADED
    err = capsys.readouterr().err
    assert err.startswith("cannot grade: --json") and reason in err, err
