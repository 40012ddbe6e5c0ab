"""Exercise checkers for the notebooks: ``from umv2_ref.exercises import check``.

Each ``nbXX_*.py`` module in this package registers the exercises of one notebook; importing the
package imports them all.
"""
import importlib
import pkgutil

from .harness import REGISTRY, Exercise, check, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name.startswith("nb"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["REGISTRY", "Exercise", "check", "register"]
