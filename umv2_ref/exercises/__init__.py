"""Exercise checkers for the notebooks: ``from umv2_ref.exercises import check``.

This package is the *engine* (running, comparing, isolating, grading).  The exercises themselves --
references, input generators, learning goals and the deliberately wrong answers each checker must
recognise -- live next to the notebooks in ``notebooks/exercises/nbNN_*.py``, so the reference
package holds no wrong formulas.  They are loaded from the repository checkout this package sits in
(``<repo>/notebooks/exercises``), or from the directory named by ``UMV2_EXERCISES``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import warnings
from pathlib import Path

from ._run import Rule
from .harness import REGISTRY, STATUSES, Alternative, Exercise, Mistake, Result, check, register

DEFS_PACKAGE = "umv2_exercise_defs"
LOAD_ERRORS: dict[str, str] = {}  # definition module -> why it could not be loaded (the tests require none)


def definitions_dir() -> Path:
    """Where the exercise definitions are read from."""
    env = os.environ.get("UMV2_EXERCISES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "notebooks" / "exercises"


def load_definitions() -> dict[str, Exercise]:
    """Import every ``nb*.py`` module of :func:`definitions_dir` once (each registers its exercises)."""
    if DEFS_PACKAGE in sys.modules:
        return REGISTRY
    root = definitions_dir()
    init = root / "__init__.py"
    if not init.exists():
        return REGISTRY  # an installed package without the notebooks: no exercises to check
    spec = importlib.util.spec_from_file_location(DEFS_PACKAGE, init, submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[DEFS_PACKAGE] = package
    spec.loader.exec_module(package)
    for mod in sorted(pkgutil.iter_modules([str(root)]), key=lambda m: m.name):
        if mod.name.startswith("nb"):
            try:  # one broken definition file must not take every notebook's checks down with it
                importlib.import_module(f"{DEFS_PACKAGE}.{mod.name}")
            except Exception as err:
                LOAD_ERRORS[mod.name] = f"{type(err).__name__}: {err}"
                warnings.warn(f"exercise definitions {root / mod.name}.py could not be loaded: {err}", stacklevel=2)
    return REGISTRY


load_definitions()

__all__ = ["LOAD_ERRORS", "REGISTRY", "STATUSES", "Alternative", "Exercise", "Mistake", "Result", "Rule", "check",
           "definitions_dir", "load_definitions", "register"]
