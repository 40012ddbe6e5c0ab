"""Notebooks are committed without outputs, built from their sources, and in learning order."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_exist_for_every_source():
    sources = {p.stem for p in (ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py")}
    assert sources == {p.stem for p in NOTEBOOKS}


def test_notebooks_match_their_sources():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build_notebooks.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_notebooks_have_no_outputs_and_python3_kernel():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        assert "widgets" not in nb["metadata"], path.name
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


def test_every_notebook_starts_with_setup_and_has_exercises_and_a_widget():
    for path in NOTEBOOKS:
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert "setup(" in code, f"{path.name}: first cell should call umv2_ref.notebook.setup()"
        assert code.count("check(") >= 2, f"{path.name}: needs at least two checked exercises"
        assert "interact" in code, f"{path.name}: needs at least one ipywidgets control"
