"""exercises/ is generated from solutions/ and must stay in sync; the checks give useful diagnostics."""

from __future__ import annotations

import nbformat
import pytest
import torch

from deepseek_mini import checks
from deepseek_mini.exercises import (BEGIN_SOLUTION, EXERCISES_DIR, SOLUTIONS_DIR, check, make_exercise_notebook,
                                     strip_solutions)


def test_exercises_are_in_sync_with_solutions():
    assert check() == [], "run `python -m deepseek_mini.exercises` to regenerate exercises/"


def test_every_solution_cell_has_markers_metadata_and_a_graded_check():
    for path in sorted(SOLUTIONS_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        solutions = [c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("solution")]
        graded = [c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")]
        assert 4 <= len(solutions) == len(graded) <= 6, path.name
        assert all(BEGIN_SOLUTION in c.source for c in solutions)
        assert all(c.metadata["nbgrader"]["points"] > 0 for c in graded)
        ids = [c.metadata["nbgrader"]["grade_id"] for c in solutions + graded]
        assert len(ids) == len(set(ids)), f"duplicate grade_id in {path.name}"


def test_generated_exercises_have_stubs_and_no_outputs():
    for path in sorted(EXERCISES_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        text = "".join(c.source for c in nb.cells)
        assert BEGIN_SOLUTION not in text and "NotImplementedError" in text
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None


def test_strip_solutions_keeps_indentation_and_names_the_exercise():
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    stub = strip_solutions(source, "Exercise f")
    assert "return x + y" not in stub and "    y = 1" in stub
    assert '    raise NotImplementedError("Exercise f: replace this line with your solution")' in stub
    namespace = {}
    exec(stub, namespace)
    with pytest.raises(NotImplementedError, match="Exercise f"):
        namespace["f"](1)


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "nested"),
])
def test_strip_solutions_rejects_unbalanced_markers(source, message):
    with pytest.raises(ValueError, match=message):
        strip_solutions(source, "Exercise x")


def test_make_exercise_notebook_requires_a_grade_id():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")]
    with pytest.raises(ValueError, match="grade_id"):
        make_exercise_notebook(nb)


def test_check_reports_shape_dtype_and_first_difference():
    expected = torch.zeros(2, 3)
    with pytest.raises(checks.CheckFailure, match=r"shape \(3, 2\), expected \(2, 3\)"):
        checks.assert_tensor_close("ex", torch.zeros(3, 2), expected)
    with pytest.raises(checks.CheckFailure, match="dtype torch.float64"):
        checks.assert_tensor_close("ex", torch.zeros(2, 3, dtype=torch.float64), expected)
    got = expected.clone()
    got[1, 2] = 5.0
    with pytest.raises(checks.CheckFailure, match=r"1 of 6 elements; first at index \(1, 2\): got 5, expected 0"):
        checks.assert_tensor_close("ex", got, expected)


def test_checks_name_the_failed_property_and_give_a_hint():
    def sees_future(q_len, kv_len, q_offset=0):
        return torch.ones(q_len, kv_len, dtype=torch.bool)

    with pytest.raises(checks.CheckFailure, match=r"row 0 attends to a future position \(column 1\)") as info:
        checks.check_causal_mask(sees_future)
    assert "hint:" in str(info.value)

    def half_split(x, cos, sin):  # pairs channel i with i + D/2: the wrong layout for DeepSeek
        x0, x1 = x.chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)

    with pytest.raises(checks.CheckFailure, match="interleaved"):
        checks.check_rope_rotation(half_split)


def test_checks_pass_the_package_reference_and_say_so(capsys):
    from deepseek_mini.attention import causal_mask
    from deepseek_mini.generate import top_p_filter

    checks.check_causal_mask(causal_mask)
    checks.check_top_p_filter(top_p_filter)
    assert capsys.readouterr().out.count("✓") == 2


def test_an_unfinished_stub_is_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError("Exercise rms_norm: replace this line with your solution")

    with pytest.raises(checks.CheckFailure, match="not implemented yet"):
        checks.check_rms_norm(stub)
