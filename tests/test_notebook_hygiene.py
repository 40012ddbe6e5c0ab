"""Notebooks are committed without outputs, built from their sources, and in learning order.

The checks read git's view of the files (the index), so a learner's checkout stays green after
JupyterLab autosaves outputs into the working notebooks (tested below with a scratch repository);
outside git they fall back to the working files.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402
import nbstrip  # noqa: E402

IN_GIT = build_notebooks.in_git(ROOT)


def committed_notebooks(root: Path = ROOT) -> dict[str, dict]:
    """name -> notebook as git stores it (the index), or as on disk outside git."""
    paths = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not IN_GIT:
        return {p.name: json.loads(p.read_text()) for p in paths}
    out = {}
    for p in paths:
        text = build_notebooks.git_index_text(root, p.relative_to(root).as_posix())
        if text is not None:
            out[p.name] = json.loads(text)
    return out


def test_notebooks_exist_for_every_source():
    sources = {p.stem for p in (ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py")}
    assert sources == {Path(n).stem for n in committed_notebooks()}


def test_committed_notebooks_match_their_sources():
    problems = build_notebooks.index_problems(ROOT) if IN_GIT else build_notebooks.worktree_problems(ROOT)
    assert not problems, "\n".join(problems) + "\nrun: python tools/build_notebooks.py"


def test_working_notebooks_have_the_cells_of_their_sources():
    """Outputs in the working files are fine (a learner ran them); different cells are not."""
    problems = build_notebooks.worktree_problems(ROOT)
    assert not problems, "\n".join(problems) + ("\nkeep the .ipynb edits: python tools/build_notebooks.py --from-ipynb;"
                                                 " discard them: python tools/build_notebooks.py --force")


def test_committed_notebooks_have_no_outputs_and_python3_kernel():
    for name, nb in committed_notebooks().items():
        assert nb["metadata"]["kernelspec"]["name"] == "python3", name
        assert not nbstrip.has_outputs(nb), f"{name} is committed with outputs"


def test_every_notebook_starts_with_setup_and_has_exercises_and_a_widget():
    for name, nb in committed_notebooks().items():
        code = "\n".join(src for kind, src in nbstrip.cells_of(nb) if kind == "code")
        assert "setup(" in code, f"{name}: first cell should call umv2_ref.notebook.setup()"
        assert code.count("check(") >= 2, f"{name}: needs at least two checked exercises"
        assert "interact" in code, f"{name}: needs at least one ipywidgets control"


def test_jupyterlab_save_through_jupytext_pairing_leaves_sources_unchanged(tmp_path):
    """What JupyterLab does on save (Jupytext's contents manager and notebooks/jupytext.toml):
    saving a notebook with outputs rewrites its paired source byte for byte, and a cell edit made in
    the notebook lands in the source."""
    from jupyter_server.services.contents.filemanager import FileContentsManager
    from jupytext.sync_contentsmanager import build_sync_jupytext_contents_manager_class

    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("__pycache__"))
    for src in (tmp_path / "notebooks" / "src").glob("[0-9][0-9]_*.py"):  # the author's order: edit, then build
        os.utime(src, (src.stat().st_atime, src.stat().st_mtime - 30))
    assert build_notebooks.build(tmp_path, sorted((tmp_path / "notebooks" / "src").glob("[0-9][0-9]_*.py")))
    manager = build_sync_jupytext_contents_manager_class(FileContentsManager)(root_dir=str(tmp_path))
    for src in sorted((tmp_path / "notebooks" / "src").glob("[0-9][0-9]_*.py")):
        before = src.read_text()
        path = f"notebooks/{src.stem}.ipynb"
        nb = manager.get(path)["content"]
        code = next(c for c in nb.cells if c.cell_type == "code")
        code.outputs, code.execution_count = [{"output_type": "stream", "name": "stdout", "text": "x\n"}], 1
        manager.save({"type": "notebook", "content": nb}, path)
        assert src.read_text() == before, f"{src.name} changed when its notebook was saved with outputs"
        code.source += "\nlearner_edit = 1"
        manager.save({"type": "notebook", "content": nb}, path)
        assert "learner_edit = 1" in src.read_text(), f"{src.name}: the pairing did not carry the edit"
        assert build_notebooks.worktree_problems(tmp_path, [src]) == []


# --- the learner scenario, in a scratch repository -----------------------------------------------

SOURCE = """# %% [markdown]
# # A tiny notebook
# %%
x = 1 + 1
# %%
def exercise():
    raise NotImplementedError
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "notebooks" / "src").mkdir(parents=True)
    (tmp_path / "notebooks" / "src" / "01_tiny.py").write_text(SOURCE)
    shutil.copy(ROOT / ".gitattributes", tmp_path / ".gitattributes")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.invalid")
    _git(tmp_path, "config", "user.name", "t")
    assert build_notebooks.main([], root=tmp_path) == 0
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def _run_in_lab(path: Path, edit_exercise: bool = False) -> None:
    """What JupyterLab's autosave writes: outputs, execution counts, its own key order and metadata."""
    nb = json.loads(path.read_text())
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = i + 1
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["2\n"]}]
        cell["metadata"] = {"scrolled": True}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.2", "mimetype": "text/x-python"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    if edit_exercise:
        nb["cells"][-1]["source"] = ["def exercise():\n", "    return 42\n"]
    path.write_text(json.dumps(nb, indent=1, sort_keys=True))


def test_outputs_in_the_working_tree_keep_the_checks_green(repo):
    nb = repo / "notebooks" / "01_tiny.ipynb"
    _run_in_lab(nb)
    assert build_notebooks.index_problems(repo) == []
    assert build_notebooks.worktree_problems(repo) == []
    assert "kept" in build_notebooks.build(repo, [repo / "notebooks" / "src" / "01_tiny.py"])[0]
    assert nbstrip.has_outputs(json.loads(nb.read_text())), "the build must not wipe a learner's outputs"


def test_committed_outputs_still_fail(repo):
    _run_in_lab(repo / "notebooks" / "01_tiny.ipynb")
    _git(repo, "add", "-A")  # no filter configured: the outputs reach the index
    problems = build_notebooks.index_problems(repo)
    assert problems and "has outputs" in problems[0]


def test_clean_filter_hides_outputs_but_shows_edited_cells(repo):
    _git(repo, "config", "filter.nbstrip.clean", f"{sys.executable} {ROOT / 'tools' / 'nbstrip.py'}")
    nb = repo / "notebooks" / "01_tiny.ipynb"
    _run_in_lab(nb)
    assert _git(repo, "diff") == "", "outputs alone must not show as a change"
    _git(repo, "add", "-A")
    assert _git(repo, "status", "--porcelain") == "", "git add stores the output-free notebook: nothing to commit"
    assert build_notebooks.index_problems(repo) == []
    _run_in_lab(nb, edit_exercise=True)
    diff = _git(repo, "diff")
    assert "return 42" in diff and "output_type" not in diff, "an edited cell is a change, its outputs are not"
    assert nbstrip.has_outputs(json.loads(nb.read_text())), "the filter never touches the working file"


def test_build_refuses_to_overwrite_an_edited_notebook_and_can_sync_it_back(repo):
    nb, src = repo / "notebooks" / "01_tiny.ipynb", repo / "notebooks" / "src" / "01_tiny.py"
    _run_in_lab(nb, edit_exercise=True)
    with pytest.raises(build_notebooks.EditedNotebook):
        build_notebooks.build(repo, [src])
    assert "return 42" in "".join(json.loads(nb.read_text())["cells"][-1]["source"]), "the edit survives"
    assert build_notebooks.main(["--check"], root=repo) == 1
    build_notebooks.from_ipynb(repo, [nb])
    assert "return 42" in src.read_text()
    assert build_notebooks.worktree_problems(repo) == []
    # a notebook git changed (checkout, merge) is rebuilt, and so is one with merge-conflict markers
    _git(repo, "add", "-A")
    src.write_text(src.read_text().replace("x = 1 + 1", "x = 2 + 2"))
    assert "wrote" in build_notebooks.build(repo, [src])[0]
    nb.write_text("<<<<<<< HEAD\n" + nb.read_text())
    assert "rebuilt" in build_notebooks.build(repo, [src])[0]
    # an author's edit of the source is built as usual, twice in a row
    for value in ("3", "4"):
        src.write_text(src.read_text().replace("x = 2 + 2" if value == "3" else "x = 3", f"x = {value}"))
        build_notebooks.build(repo, [src])
        assert f"x = {value}" in nb.read_text()


def test_nbval_runs_a_notebook_that_has_outputs(tmp_path):
    """nbval executes the working files: a learner's notebook with outputs must still run."""
    path = tmp_path / "01_tiny.ipynb"
    path.write_text(build_notebooks.build_text(SOURCE.replace("raise NotImplementedError", "return 0")))
    _run_in_lab(path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                             "--nbval-current-env", str(path)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
