"""The notebook exporter: the package is in sync with the notebooks, and the exporter's rules
hold on synthetic notebooks."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import nbformat
import pytest

from deepseek_mini import export as exporter
from deepseek_mini.export import EXPORT_MARKER, ExportError, check, render_modules

GENERATED = sorted(p for p in exporter.PACKAGE_DIR.rglob("*.py")
                   if p.read_text().startswith(exporter.GENERATED_TAG))


def write_notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """cells: ("md" | "code", source)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nbformat.write(nb, path)
    return path


def module_all(text: str) -> list[str]:
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("no __all__")


def test_package_is_in_sync_with_the_notebooks():
    assert check(verbose=False) == []


def test_chapter_01_generates_the_four_modules():
    names = {p.stem for p in GENERATED}
    assert {"layers", "rope", "attention", "generate"} <= names
    assert set(render_modules()) == set(GENERATED)


@pytest.mark.parametrize("path", GENERATED, ids=[p.stem for p in GENERATED])
def test_generated_module_defines_each_public_name_once_and_exports_it(path):
    text = path.read_text()
    defined = []
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.append(node.name)
        elif isinstance(node, ast.Assign):
            defined += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.append(node.target.id)
    public = [n for n in defined if not n.startswith("_")]
    assert len(public) == len(set(public)), f"defined twice: {sorted({n for n in public if public.count(n) > 1})}"
    names = module_all(text)
    assert names == public
    module = importlib.import_module(".".join(("deepseek_mini", *path.relative_to(exporter.PACKAGE_DIR).with_suffix("").parts)))
    assert list(module.__all__) == names
    for name in names:
        assert hasattr(module, name), name
    assert module.__doc__ and module.__doc__.strip()


DOC = '"""A synthetic module for the exporter tests."""\n'


def test_render_collects_cells_in_order_with_header_docstring_and_sections(tmp_path):
    nb = write_notebook(tmp_path / "99_synthetic.ipynb", [
        ("md", "# Chapter\n## 1. First section"),
        ("code", f"{EXPORT_MARKER} synth\n{DOC}\nimport math\n\n\ndef first():\n    return 1"),
        ("code", "x = 'not exported'"),
        ("md", "## 2. Second section"),
        ("code", f"{EXPORT_MARKER} synth\ndef second():\n    return 2"),
        ("code", f"{EXPORT_MARKER} other\n\"\"\"Another module.\"\"\"\nVALUE = 3"),
    ])
    rendered = render_modules([nb])
    by_name = {p.name: t for p, t in rendered.items()}
    assert set(by_name) == {"synth.py", "other.py"}
    assert all(p.is_relative_to(exporter.PACKAGE_DIR) for p in rendered)
    text = by_name["synth.py"]
    header = text.splitlines()[0]
    assert header.startswith(exporter.GENERATED_TAG)
    assert "99_synthetic.ipynb" in header                      # the header names the notebook
    # First cell verbatim (docstring, imports, code), then __all__, then later cells.
    assert text.index(DOC.strip()) < text.index("def first") < text.index("__all__") \
        < text.index("# --- ") < text.index("def second")
    assert "99_synthetic.ipynb: 2. Second section" in text
    assert "99_synthetic.ipynb: # Chapter" not in text          # the section is the last heading
    assert "not exported" not in text
    assert module_all(text) == ["first", "second"]
    assert module_all(by_name["other.py"]) == ["VALUE"]
    ns: dict = {}
    exec(compile(text, "synth.py", "exec"), ns)                 # the output is valid Python
    assert ns["first"]() + ns["second"]() == 3 and ns["__doc__"] == DOC.strip().strip('"')


def test_all_lists_public_defs_classes_and_constants_only(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", [
        ("code", f"{EXPORT_MARKER} synth\n{DOC}\nimport os\nfrom math import pi\n\n"
                 "CONSTANT = 1\n_private_const = 2\nannotated: int = 3\n\n"
                 "def public():\n    inner = 4\n    return inner\n\n"
                 "def _helper():\n    pass\n\n"
                 "class Thing:\n    attr = 5\n    def method(self):\n        pass\n\n"
                 "class _Hidden:\n    pass\n\n"
                 "async def fetch():\n    pass\n\n"
                 "if True:\n    conditional = 6\n"),
    ])
    (text,) = render_modules([nb]).values()
    assert module_all(text) == ["CONSTANT", "annotated", "public", "Thing", "fetch"]


def test_duplicate_definition_across_cells_raises_naming_it(tmp_path):
    nb = write_notebook(tmp_path / "dup.ipynb", [
        ("md", "## A"),
        ("code", f"{EXPORT_MARKER} synth\n{DOC}\ndef twice():\n    return 1"),
        ("md", "## B"),
        ("code", f"{EXPORT_MARKER} synth\ndef twice():\n    return 2"),
    ])
    with pytest.raises(ExportError, match=r"twice is defined twice.*\(A\).*\(B\)"):
        render_modules([nb])


def test_duplicate_across_two_notebooks_raises(tmp_path):
    a = write_notebook(tmp_path / "a.ipynb", [("code", f"{EXPORT_MARKER} synth\n{DOC}\nSHARED = 1")])
    b = write_notebook(tmp_path / "b.ipynb", [("code", f"{EXPORT_MARKER} synth\nSHARED = 2")])
    with pytest.raises(ExportError, match="SHARED"):
        render_modules([a, b])
    # Same name in different modules is fine.
    c = write_notebook(tmp_path / "c.ipynb", [("code", f"{EXPORT_MARKER} elsewhere\n{DOC}\nSHARED = 2")])
    assert len(render_modules([a, c])) == 2


def test_first_export_cell_without_docstring_raises(tmp_path):
    nb = write_notebook(tmp_path / "nodoc.ipynb", [
        ("code", f"{EXPORT_MARKER} synth\nimport math\n{DOC}"),
    ])
    with pytest.raises(ExportError, match=r"first export cell for synth must start with the module docstring"):
        render_modules([nb])


def test_docstring_only_needed_in_the_first_cell(tmp_path):
    nb = write_notebook(tmp_path / "ok.ipynb", [
        ("code", f"{EXPORT_MARKER} synth\n{DOC}"),
        ("code", f"{EXPORT_MARKER} synth\ndef f():\n    pass"),
    ])
    (text,) = render_modules([nb]).values()
    assert module_all(text) == ["f"]


@pytest.mark.parametrize("line", [f"{EXPORT_MARKER}", f"{EXPORT_MARKER} Bad-Name", f"{EXPORT_MARKER} two words",
                                  f"{EXPORT_MARKER}s rope", f"{EXPORT_MARKER} Rope"])
def test_malformed_export_line_raises(tmp_path, line):
    nb = write_notebook(tmp_path / "bad.ipynb", [("code", f"{line}\n{DOC}")])
    with pytest.raises(ExportError, match="bad export line"):
        render_modules([nb])


@pytest.mark.parametrize("where", ["first_cell", "later_cell"])
def test_cell_that_does_not_parse_raises_export_error(tmp_path, where):
    # ExportError (not a bare SyntaxError) so `python -m deepseek_mini.export` reports it cleanly.
    broken = "def broken(:\n    pass"
    cells = ([("code", f"{EXPORT_MARKER} synth\n{DOC}\n{broken}")] if where == "first_cell" else
             [("code", f"{EXPORT_MARKER} synth\n{DOC}"), ("code", f"{EXPORT_MARKER} synth\n{broken}")])
    nb = write_notebook(tmp_path / "syntax.ipynb", cells)
    with pytest.raises(ExportError, match="does not parse"):
        render_modules([nb])


def test_render_does_not_write_files(tmp_path):
    nb = write_notebook(tmp_path / "nb.ipynb", [("code", f"{EXPORT_MARKER} zz_should_not_exist\n{DOC}")])
    (path,) = render_modules([nb])
    assert path.name == "zz_should_not_exist.py" and not path.exists()


# ------------------------------------------------------------------ failing loudly (issue #9)
@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A throw-away repository: tmp/notebooks/*.ipynb export into tmp/pkg/."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pkg").mkdir()
    monkeypatch.setattr(exporter, "REPO_DIR", tmp_path)
    monkeypatch.setattr(exporter, "NOTEBOOK_DIR", tmp_path / "notebooks")
    monkeypatch.setattr(exporter, "PACKAGE_DIR", tmp_path / "pkg")
    return tmp_path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = exporter.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_never_overwrites_a_hand_written_module(sandbox, capsys):
    hand_written = sandbox / "pkg" / "model.py"
    hand_written.write_text('"""Hand-written model assembly."""\n\nclass Transformer:\n    pass\n')
    before = hand_written.read_text()
    write_notebook(sandbox / "notebooks" / "09_scale.ipynb", [
        ("md", "## 3. The model"),
        ("code", f"{EXPORT_MARKER} model\n{DOC}\nSTUB = 1"),
    ])
    for args in ([], ["--check"]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "Traceback" not in err            # one line
        assert "pkg/model.py is hand-written (no generated header)" in err
        assert "'#| export model' cell in notebooks/09_scale.ipynb cell 2 (3. The model)" in err
    assert hand_written.read_text() == before


def test_export_still_rewrites_a_module_that_carries_the_generated_header(sandbox, capsys):
    generated = sandbox / "pkg" / "synth.py"
    generated.write_text(f"{exporter.GENERATED_TAG} from an old notebook.\nOLD = 1\n")
    write_notebook(sandbox / "notebooks" / "nb.ipynb", [("code", f"{EXPORT_MARKER} synth\n{DOC}\nNEW = 2")])
    code, out, _ = run_cli(capsys)
    assert code == 0 and "wrote pkg/synth.py" in out
    assert "NEW = 2" in generated.read_text() and "OLD" not in generated.read_text()


def test_an_export_aimed_at_the_real_model_py_is_refused(tmp_path):
    nb = write_notebook(tmp_path / "stray.ipynb", [("code", f"{EXPORT_MARKER} model\n{DOC}")])
    with pytest.raises(ExportError, match=r"deepseek_mini/model\.py is hand-written.*stray\.ipynb cell 1"):
        render_modules([nb])


@pytest.mark.parametrize("text,pattern", [
    ('{"cells": [}', r"broken\.ipynb is not valid JSON \(line 1, column 12"),
    ("", r"broken\.ipynb is not valid JSON \(line 1, column 1"),
    ("[1, 2]", r"broken\.ipynb is JSON but not a Jupyter notebook"),
], ids=["bad_json", "empty", "json_list"])
def test_corrupt_notebook_is_a_one_line_error_naming_the_file(sandbox, capsys, text, pattern):
    (sandbox / "notebooks" / "broken.ipynb").write_text(text)
    with pytest.raises(ExportError, match=pattern):
        render_modules()
    code, out, err = run_cli(capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("export failed: notebooks/broken.ipynb ")


def test_check_names_the_command_that_fixes_drift(sandbox, capsys):
    write_notebook(sandbox / "notebooks" / "nb.ipynb", [("code", f"{EXPORT_MARKER} synth\n{DOC}\nX = 1")])
    (sandbox / "pkg" / "synth.py").write_text(f"{exporter.GENERATED_TAG} from nb.\nX = 0\n")
    (sandbox / "pkg" / "orphan.py").write_text(f"{exporter.GENERATED_TAG} from a deleted notebook.\n")
    problems = check(verbose=False)
    assert len(problems) == 2
    assert all("`python -m deepseek_mini.export`" in p for p in problems)
    assert problems[0].startswith("pkg/synth.py differs from the notebooks; run `python -m deepseek_mini.export`")
    assert "pkg/orphan.py is generated but no notebook exports it" in problems[1]
    code, out, err = run_cli(capsys, "--check")
    assert code == 1 and "-X = 0" in out and "+X = 1" in out
    assert err == "2 module(s) out of date: run `python -m deepseek_mini.export`\n"
    assert run_cli(capsys)[0] == 0                        # the named command does fix it
    assert check(verbose=False) == [] and not (sandbox / "pkg" / "orphan.py").exists()


@pytest.mark.parametrize("line,suggestion", [
    ("#|export synth", "'#| export synth'"),
    ("# | export synth", "'#| export synth'"),
    ("#|  export synth", "'#| export synth'"),
    ("# |export synth", "'#| export synth'"),
    ("#| Export synth", "'#| export synth'"),
    ("#|EXPORT Synth", "'#| export synth'"),
    ("#|export", "'#| export rope'"),
])
def test_near_miss_export_markers_are_flagged_not_dropped(tmp_path, line, suggestion):
    nb = write_notebook(tmp_path / "near.ipynb", [
        ("md", "## 4. Section"),
        ("code", f"{EXPORT_MARKER} synth\n{DOC}"),
        ("code", f"{line}\ndef dropped():\n    pass"),
    ])
    with pytest.raises(ExportError) as info:
        render_modules([nb])
    msg = str(info.value)
    assert msg.endswith(f"near.ipynb cell 3 (4. Section): bad export line {line!r}: write '#| export <module>' "
                        f"exactly (one space after '#|'), e.g. {suggestion}")


def test_export_marker_below_the_first_line_is_flagged(tmp_path):
    nb = write_notebook(tmp_path / "late.ipynb", [
        ("code", f"{EXPORT_MARKER} synth\n{DOC}"),
        ("code", f"# NBVAL_IGNORE_OUTPUT\n{EXPORT_MARKER} synth\ndef dropped():\n    pass"),
    ])
    with pytest.raises(ExportError, match=r"late\.ipynb cell 2 \(\(top\)\): export marker '#\| export synth' "
                                          r"on line 2: it must be the cell's first line"):
        render_modules([nb])


def test_comments_that_merely_mention_export_are_not_markers(tmp_path):
    nb = write_notebook(tmp_path / "ok.ipynb", [
        ("code", f"{EXPORT_MARKER} synth\n{DOC}"),
        ("code", "# export the weights to disk\nmarker = '#| export synth'\n#  | not a marker\n"),
    ])
    (text,) = render_modules([nb]).values()
    assert "weights" not in text


# ------------------------------------------------------------------ never delete what it cannot rebuild
def _copy_generated_modules(sandbox: Path) -> dict[Path, str]:
    """The real generated modules, copied into the sandbox package: what a bad run would delete."""
    copies = {}
    for path in GENERATED:
        target = sandbox / "pkg" / path.relative_to(Path(exporter.__file__).parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
        copies[target] = path.read_text()
    return copies


@pytest.mark.parametrize("notebooks", ["missing", "empty"])
def test_a_missing_or_empty_notebooks_folder_is_an_error_not_a_mass_delete(sandbox, capsys, notebooks):
    # An installed package has no notebooks/: every generated module used to look stale and
    # `python -m deepseek_mini.export` deleted layers, rope, attention, generate, mla and moe.
    copies = _copy_generated_modules(sandbox)
    if notebooks == "missing":
        (sandbox / "notebooks").rmdir()
    else:
        (sandbox / "notebooks" / "notes.txt").write_text("not a notebook")
    reason = "no notebooks folder notebooks/" if notebooks == "missing" else "notebooks/ holds no .ipynb notebooks"
    for args in ([], ["--check"]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"export failed: {reason}") and "nothing was written or deleted" in err
    with pytest.raises(ExportError, match=reason):
        check("01_baseline_transformer.ipynb", verbose=False)
    assert {p: p.read_text() for p in copies} == copies


def test_notebooks_without_any_export_cell_do_not_delete_every_module(sandbox, capsys):
    copies = _copy_generated_modules(sandbox)
    write_notebook(sandbox / "notebooks" / "scratch.ipynb", [("code", "x = 1")])
    code, out, err = run_cli(capsys)
    assert code == 2 and "refusing to delete every generated module" in err
    assert {p: p.read_text() for p in copies} == copies


@pytest.mark.parametrize("name", ["01_baseline_transformr.ipynb", "99_missing.ipynb"])
def test_check_of_a_notebook_that_does_not_exist_raises(sandbox, name):
    write_notebook(sandbox / "notebooks" / "01_baseline_transformer.ipynb",
                   [("code", f"{EXPORT_MARKER} synth\n{DOC}")])
    assert exporter.export() and check(verbose=False) == []
    hint = " (did you mean '01_baseline_transformer.ipynb'?)" if name.startswith("01") else ""
    with pytest.raises(ExportError) as info:
        check(name, verbose=False)
    assert str(info.value) == f"no notebook {name!r} in notebooks/{hint}"


def test_check_of_a_notebook_that_exports_nothing_raises(sandbox, capsys):
    write_notebook(sandbox / "notebooks" / "a.ipynb", [("code", f"{EXPORT_MARKER} synth\n{DOC}")])
    write_notebook(sandbox / "notebooks" / "b.ipynb", [("code", "x = 1")])
    exporter.export()
    assert check("a.ipynb") == [] and "In sync with the notebooks: pkg/synth.py" in capsys.readouterr().out
    with pytest.raises(ExportError, match=r"^b\.ipynb has no '#\| export <module>' cell: it exports nothing"):
        check("b.ipynb")


# ------------------------------------------------------------------ modules inside a package folder
def test_an_export_beside_a_package_folder_of_the_same_name_is_refused(sandbox, capsys):
    # deepseek_mini/fp8/ is a package: `import deepseek_mini.fp8` would never see fp8.py.
    (sandbox / "pkg" / "fp8").mkdir()
    (sandbox / "pkg" / "fp8" / "__init__.py").write_text('"""FP8 training."""\n')
    write_notebook(sandbox / "notebooks" / "05_fp8.ipynb", [("md", "## 2. Quantise"),
                                                            ("code", f"{EXPORT_MARKER} fp8\n{DOC}")])
    code, out, err = run_cli(capsys)
    assert code == 2 and err.count("\n") == 1
    assert ("pkg/fp8/ is a folder (a package), so an '#| export fp8' cell in notebooks/05_fp8.ipynb cell 2 "
            "(2. Quantise) would write pkg/fp8.py, which Python never imports") in err
    assert "'#| export fp8.<module>'" in err
    assert not (sandbox / "pkg" / "fp8.py").exists()


def test_a_dotted_export_writes_a_module_inside_the_package(sandbox, capsys):
    notebook = sandbox / "notebooks" / "05_fp8.ipynb"
    write_notebook(notebook, [("code", f"{EXPORT_MARKER} fp8.quant\n{DOC}\nE4M3_MAX = 448.0")])
    code, _, err = run_cli(capsys)                       # the package must exist first
    assert code == 2 and "needs the package pkg/fp8/: create pkg/fp8/__init__.py" in err
    assert not (sandbox / "pkg" / "fp8").exists()

    (sandbox / "pkg" / "fp8").mkdir()
    init = sandbox / "pkg" / "fp8" / "__init__.py"
    init.write_text('"""FP8 training (hand-written package)."""\n')
    code, out, _ = run_cli(capsys)
    assert code == 0 and out == "wrote pkg/fp8/quant.py\n"
    assert module_all((sandbox / "pkg" / "fp8" / "quant.py").read_text()) == ["E4M3_MAX"]
    assert check("05_fp8.ipynb", verbose=False) == [] and check(verbose=False) == []

    # A nested module no notebook exports any more is stale like any other; the package stays.
    write_notebook(notebook, [("code", f"{EXPORT_MARKER} fp8.scale\n{DOC}\nBLOCK = 128")])
    assert "pkg/fp8/quant.py is generated but no notebook exports it" in check(verbose=False)[-1]
    assert run_cli(capsys)[0] == 0
    assert sorted(p.name for p in (sandbox / "pkg" / "fp8").iterdir()) == ["__init__.py", "scale.py"]
