"""Every registered exercise: its solution passes its checker, and every known-wrong answer fails.

Solutions live in ``notebooks/solutions/<exercise name>.py`` and define ``solution``.
"""
import importlib.util
from pathlib import Path

import pytest

from umv2_ref.exercises import REGISTRY, check

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


def load_solution(name: str):
    path = SOLUTIONS / f"{name}.py"
    assert path.exists(), f"exercise {name!r} has no solution file {path}"
    spec = importlib.util.spec_from_file_location(f"solution_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.solution


def test_registry_not_empty():
    assert len(REGISTRY) >= 2


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_solution_is_accepted(name):
    assert check(name, load_solution(name), verbose=False) == "correct"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_known_wrong_answers_are_rejected(name):
    for wrong in REGISTRY[name].wrong:
        assert check(name, wrong, verbose=False) == "mismatch", f"checker accepted known-wrong {wrong.__name__}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_stub_reports_not_attempted(name):
    def stub(*args):
        raise NotImplementedError

    assert check(name, stub, verbose=False) == "not attempted"


def test_every_solution_file_belongs_to_an_exercise():
    orphans = [p.stem for p in SOLUTIONS.glob("*.py") if p.stem not in REGISTRY]
    assert not orphans, f"solution files without a registered exercise: {orphans}"
