"""Checked exercises: run a learner's function against the reference on random inputs.

An exercise is registered once (in ``umv2_ref/exercises/nbXX_*.py``) with a reference function,
an input generator and at least one *known-wrong* variant.  In a notebook the learner writes a
function and calls ``check("name", my_fn)``, which prints and returns one of

* ``"correct"``        -- matches the reference on every trial,
* ``"not attempted"``  -- the function still raises ``NotImplementedError`` (the stub),
* ``"mismatch"``       -- with a readable report: which trial, which output, max error, first
                          differing positions, or the exception it raised.

The tests run every solution (``notebooks/solutions/<name>.py``) through its checker and every
known-wrong variant too, so a checker that accepts anything cannot pass CI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

RESULTS = ("correct", "not attempted", "mismatch")


@dataclass
class Exercise:
    name: str
    reference: Callable[..., Any]
    make_inputs: Callable[[torch.Generator], tuple]  # one trial's positional arguments
    wrong: list[Callable[..., Any]]  # known-wrong answers the checker must reject
    trials: int = 4
    rtol: float = 1e-5
    atol: float = 1e-6
    description: str = ""
    extra: dict = field(default_factory=dict)


REGISTRY: dict[str, Exercise] = {}


def register(name: str, reference: Callable, make_inputs: Callable, wrong: list[Callable], **kwargs: Any) -> Exercise:
    """Add an exercise; ``wrong`` must hold at least one known-wrong variant."""
    if name in REGISTRY:
        raise ValueError(f"exercise {name!r} is registered twice")
    if not wrong:
        raise ValueError(f"exercise {name!r} needs at least one known-wrong variant")
    REGISTRY[name] = Exercise(name, reference, make_inputs, list(wrong), **kwargs)
    return REGISTRY[name]


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _compare(got: Any, want: Any, ex: Exercise) -> str | None:
    """None when equal within tolerance, else a short human-readable report."""
    got_t, want_t = _as_tuple(got), _as_tuple(want)
    if len(got_t) != len(want_t):
        return f"expected {len(want_t)} output(s), got {len(got_t)}"
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        label = f"output {i}" if len(want_t) > 1 else "output"
        if not isinstance(w, torch.Tensor):
            if g != w:
                return f"{label}: expected {w!r}, got {g!r}"
            continue
        if not isinstance(g, torch.Tensor):
            return f"{label}: expected a tensor of shape {tuple(w.shape)}, got {type(g).__name__}"
        if g.shape != w.shape:
            return f"{label}: expected shape {tuple(w.shape)}, got {tuple(g.shape)}"
        if w.is_floating_point():
            g = g.to(w.dtype)
            ok = torch.isclose(g, w, rtol=ex.rtol, atol=ex.atol, equal_nan=False)
        else:
            ok = g.to(w.dtype) == w
        if not bool(ok.all()):
            bad = (~ok).nonzero()[:3].tolist()
            detail = ", ".join(f"at {tuple(p)}: got {g[tuple(p)].item():.6g}, expected {w[tuple(p)].item():.6g}" for p in bad)
            err = (g.double() - w.double()).abs().max().item() if w.is_floating_point() else None
            head = f"{label}: {int((~ok).sum())} of {w.numel()} entries differ"
            return head + (f" (max abs error {err:.3g})" if err is not None else "") + f"; {detail}"
    return None


def check(name: str, fn: Callable[..., Any], seed: int = 0, verbose: bool = True) -> str:
    """Run ``fn`` against exercise ``name``'s reference on several random inputs."""
    if name not in REGISTRY:
        raise KeyError(f"unknown exercise {name!r}; known: {sorted(REGISTRY)}")
    ex = REGISTRY[name]
    gen = torch.Generator().manual_seed(seed)
    result, report = "correct", ""
    for trial in range(ex.trials):
        args = ex.make_inputs(gen)
        want = ex.reference(*_clone(args))
        try:
            got = fn(*_clone(args))
        except NotImplementedError:
            result, report = "not attempted", "the function still raises NotImplementedError -- fill in the stub"
            break
        except Exception as err:  # a learner's bug: report it, do not crash the notebook
            result, report = "mismatch", f"trial {trial}: raised {type(err).__name__}: {err}"
            break
        problem = _compare(got, want, ex)
        if problem:
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            result, report = "mismatch", f"trial {trial} (input shapes {shapes}): {problem}"
            break
    if verbose:
        mark = {"correct": "✅ correct", "not attempted": "⏳ not attempted yet", "mismatch": "❌ mismatch"}[result]
        print(f"[{name}] {mark}" + (f": {report}" if report else f" on {ex.trials} random inputs"))
    return result
