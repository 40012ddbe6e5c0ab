"""The notebooks' exercises: references, input generators, goals and known-wrong answers.

``umv2_ref.exercises`` (the checking engine) imports every ``nbNN_*.py`` module here; each calls
``register``.  The deliberately wrong formulas live here, next to the notebooks, not in the
reference package.  Every known-wrong answer carries a hint that says what the mistake is and why.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from umv2_ref.exercises.harness import Mistake, Rule

SMALL_PRIMES = (7, 11, 13)


def draw(gen: torch.Generator, low: int, high: int) -> int:
    """A random int in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def pick(gen: torch.Generator, *options):
    return options[int(torch.randint(0, len(options), (), generator=gen))]


def uses_package(variant: Callable, *functions: Callable, instead: str, when: Callable[[dict], bool] | None = None,
                 how: str = "") -> Mistake:
    """The method mistake of calling the package's own implementation of the exercise.

    ``when`` restricts the rule to calls whose arguments satisfy it (``how`` describes them).
    """
    modules = {f.__module__ for f in functions}
    if len(functions) > 3 and len(modules) == 1:
        names = f"a function of {modules.pop()}"
    else:
        names = ", ".join(f"{f.__module__.split('.')[-1]}.{f.__name__}" for f in functions)
    return Mistake("uses_package_function", variant,
                   f"you called {names}{how}, which computes what this exercise asks you to write; {instead}",
                   Rule("no_calls", f"do not call {names}{how}", calls=functions, when=when))


def module_functions(module) -> tuple[Callable, ...]:
    """Every function defined in ``module`` (for "use no function of umv2_ref.X")."""
    return tuple(f for f in vars(module).values() if inspect.isfunction(f) and f.__module__ == module.__name__)


def no_tensor_with(text: str, predicate: Callable[[tuple], Callable[[torch.Tensor], bool]]) -> Rule:
    """A rule that no tensor the learner allocates satisfies ``predicate(args)``."""
    return Rule("no_alloc", text, alloc=predicate)


def divisible_by(size: Callable[[tuple], int]) -> Callable[[tuple], Callable[[torch.Tensor], bool]]:
    """Allocation predicate: the tensor's number of entries is a multiple of ``size(args)``.

    With prime sizes larger than every other dimension, only a tensor that really has those
    dimensions (a full grid, a projected table) can be a multiple.
    """
    return lambda args: (lambda t, s=size(args): t.numel() % s == 0)
