"""The grader's specs: generated from solutions/, shipped in the package, in sync with the notebooks."""

from __future__ import annotations

import json

import nbformat
import pytest

from deepseek_mini import exercises
from deepseek_mini.exercises import CHAPTER_KEY, EXERCISES_DIR, REPO_DIR, SOLUTIONS_DIR, chapter_of, grading_spec
from deepseek_mini.grade import known_chapters, load_spec


def _graded(path) -> list[tuple[str, str, float, str]]:
    """(solution grade_id, check grade_id, points, check source) per exercise, read from a notebook."""
    nb = nbformat.read(path, as_version=4)
    rows, last = [], None
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("solution"):
            last = meta["grade_id"]
        if meta.get("grade"):
            rows.append((last, meta["grade_id"], meta["points"], cell.source))
    return rows


def test_every_chapter_has_an_id_a_spec_and_matching_exercises():
    solutions = sorted(SOLUTIONS_DIR.glob("*.ipynb"))
    assert known_chapters() == [p.stem for p in solutions]
    for path in solutions:
        learner = nbformat.read(EXERCISES_DIR / path.name, as_version=4)
        assert chapter_of(nbformat.read(path, as_version=4)) == chapter_of(learner) == path.stem
        spec = load_spec(path.stem)
        assert spec["chapter"] == path.stem
        assert [(e["id"], e["check_id"], e["points"], e["check"]) for e in spec["exercises"]] == _graded(path)


def test_the_package_declares_the_specs_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())
    assert "grading/*.json" in pyproject["tool"]["setuptools"]["package-data"]["deepseek_mini"]


def _notebook(*cells, chapter: str | None = "07_yarn") -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    if chapter is not None:
        nb.metadata[CHAPTER_KEY] = {"chapter": chapter}
    return nb


def _code(source: str, **nbgrader) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    if nbgrader:
        cell.metadata["nbgrader"] = nbgrader
    return cell


SOLUTION = _code("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION", solution=True, grade_id="f")


@pytest.fixture
def course_dirs(tmp_path, monkeypatch):
    """solutions_dir/ (empty), exercises_dir/ and grading_dir/ under tmp_path stand in for the course's."""
    for name in ("SOLUTIONS_DIR", "EXERCISES_DIR", "GRADING_DIR"):
        monkeypatch.setattr(exercises, name, tmp_path / name.lower())
    monkeypatch.setattr(exercises, "REPO_DIR", tmp_path)
    (tmp_path / "solutions_dir").mkdir()


def test_generation_writes_the_spec_and_carries_the_chapter_id(tmp_path, course_dirs):
    check = _code("checks.check_f(f)", grade=True, grade_id="f_check", points=3)
    nbformat.write(_notebook(SOLUTION, check), tmp_path / "solutions_dir" / "07_yarn.ipynb")
    exercises.generate()
    assert exercises.check() == []
    assert chapter_of(nbformat.read(tmp_path / "exercises_dir" / "07_yarn.ipynb", as_version=4)) == "07_yarn"
    spec = json.loads((tmp_path / "grading_dir" / "07_yarn.json").read_text())
    assert spec["exercises"] == [{"id": "f", "check_id": "f_check", "points": 3, "check": "checks.check_f(f)"}]

    # A solution notebook whose chapter id is missing or is not its file name cannot be generated.
    nbformat.write(_notebook(SOLUTION, check, chapter=None), tmp_path / "solutions_dir" / "07_yarn.ipynb")
    with pytest.raises(ValueError, match='"chapter": "07_yarn"'):
        exercises.check()


@pytest.mark.parametrize("cells, message", [
    ([SOLUTION], "has no graded check cell"),
    ([SOLUTION, SOLUTION], "has no graded check cell"),
    ([_code("checks.check_f(f)", grade=True, grade_id="f_check", points=2)], "does not follow a solution cell"),
    ([SOLUTION, _code("checks.check_f(f)", grade=True, grade_id="f_check")], "positive metadata.nbgrader.points"),
    ([SOLUTION, _code("checks.check_f(f)", grade=True, grade_id="f_check", points=0)], "positive"),
    ([SOLUTION, _code("checks.check_f(f)", grade=True, grade_id="f", points=1)], "grade_ids must be unique"),
    ([_code("def f(): pass", solution=True, grade_id=["f"])], r"string metadata\.nbgrader\.grade_id \(got \['f'\]\)"),
    ([SOLUTION, _code("checks.check_f(f)", grade=True, grade_id={"id": 1}, points=1)],
     r"graded cell \{'id': 1\} needs a string metadata\.nbgrader\.grade_id"),
])
def test_grading_spec_rejects_malformed_solution_notebooks(cells, message):
    with pytest.raises(ValueError, match=message):
        grading_spec(_notebook(*cells), "07_yarn")


def test_a_solution_cell_followed_by_another_solution_names_both():
    second = _code("def g():\n    ### BEGIN SOLUTION\n    return 2\n    ### END SOLUTION", solution=True, grade_id="g")
    check = _code("checks.check_g(g)", grade=True, grade_id="g_check", points=1)
    with pytest.raises(ValueError) as info:
        grading_spec(_notebook(SOLUTION, second, check), "07_yarn")
    assert str(info.value) == ("07_yarn: solution cell 'f' has no graded check cell after it "
                               "(solution cell 'g' comes first)")


def test_generation_deletes_only_what_it_generated(tmp_path, course_dirs):
    # A chapter removed from solutions/ takes its exercise notebook with it; a learner's copy of
    # an exercise notebook (same chapter id, another file name) and other notebooks stay.
    check = _code("checks.check_f(f)", grade=True, grade_id="f_check", points=1)
    for stem in ("07_yarn", "08_grpo"):
        nbformat.write(_notebook(SOLUTION, check, chapter=stem), tmp_path / "solutions_dir" / f"{stem}.ipynb")
    exercises.generate()
    out = tmp_path / "exercises_dir"
    (out / "07_mine.ipynb").write_bytes((out / "07_yarn.ipynb").read_bytes())   # the learner's copy
    (out / "notes.ipynb").write_text("not even json")
    (tmp_path / "solutions_dir" / "08_grpo.ipynb").unlink()
    exercises.generate()
    assert sorted(p.name for p in out.iterdir()) == ["07_mine.ipynb", "07_yarn.ipynb", "notes.ipynb"]
    assert sorted(p.name for p in (tmp_path / "grading_dir").iterdir()) == ["07_yarn.json"]


@pytest.mark.parametrize("solutions", ["missing", "empty"])
def test_generation_without_solution_notebooks_is_an_error_not_a_mass_delete(tmp_path, monkeypatch, capsys, solutions):
    # An installed package, or a run from the wrong folder, has no solutions/: every exercise
    # notebook and every grading spec used to look stale, and generate() deleted them all.
    monkeypatch.setattr(exercises, "REPO_DIR", tmp_path)
    for name, real in (("EXERCISES_DIR", EXERCISES_DIR), ("GRADING_DIR", exercises.GRADING_DIR)):
        copy = tmp_path / real.name
        copy.mkdir()
        for path in real.iterdir():
            (copy / path.name).write_bytes(path.read_bytes())
        monkeypatch.setattr(exercises, name, copy)
    monkeypatch.setattr(exercises, "SOLUTIONS_DIR", tmp_path / "solutions")
    if solutions == "empty":
        (tmp_path / "solutions").mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert len(before) >= 6
    reason = "no solutions folder solutions/" if solutions == "missing" else "solutions/ holds no .ipynb notebooks"
    for call in (exercises.generate, exercises.check):
        with pytest.raises(ValueError, match=reason):
            call()
    assert exercises.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {reason}") and err.count("\n") == 1 and "nothing was written or deleted" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
