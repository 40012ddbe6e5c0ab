"""Project hygiene: install files agree, and the import direction umv2_ref <- kernels holds."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_environment_yml_pins_exactly_requirements_txt():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert [p for p in pip_section if p != "-e ."] == requirement_lines()
    assert "-e ." in pip_section


def test_pyproject_dependencies_are_pinned_in_requirements():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_-]+", d).group(0).lower() for d in deps}
    pinned = {ln.split("==")[0].lower() for ln in requirement_lines()}
    assert names <= pinned, f"pyproject dependencies missing from requirements.txt: {names - pinned}"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    head = readme[:1500]
    assert "make lab" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_reference_package_never_imports_triton():
    for path in (ROOT / "umv2_ref").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(triton|kernels)\b", path.read_text(), re.M), path
    code = "import sys, umv2_ref, umv2_ref.layers, umv2_ref.values, umv2_ref.retrieval; " \
           "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'kernels')]; print(bad); assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
