"""Checked exercises: run a learner's function against the reference on random inputs.

An exercise is registered once (in ``notebooks/exercises/nbNN_*.py``) with a reference function, an
input generator, a one-line learning goal and *known-wrong* answers, each with a hint that teaches.
In a notebook the learner writes a function and calls ``check("name", my_fn)``, which prints a
report and returns a :class:`Result` whose ``status`` is one of

* ``"correct"``       -- it matches the reference on every trial and follows the method rules;
* ``"not attempted"`` -- the function still raises ``NotImplementedError`` (the stub);
* ``"mismatch"``      -- a wrong value, a wrong kind of output, an exception, or a broken method
  rule; ``result.mistake`` names the registered known-wrong answer it behaves like (or None) and
  the report prints the exercise's spec, the first differing entries and the learner's own
  traceback frame;
* ``"timeout"``       -- it did not return within ``timeout`` seconds (default 30);
* ``"crashed"``       -- the process running it died (isolated exercises: the Triton kernels).

``check`` itself never raises for anything the learner's function does or returns; it raises only
``KeyError`` for an unknown exercise name.  The tests run every solution
(``notebooks/solutions/<name>.py``) and every known-wrong answer through the checker.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ._compare import FLOAT32_TOL, as_outputs, compare, describe
from ._run import Rule, Run, fork_refusal, run_forked, run_inline

STATUSES = ("correct", "not attempted", "mismatch", "timeout", "crashed")
DEFAULT_TIMEOUT = 30.0
_MARK = {"correct": "✅ correct", "not attempted": "⏳ not attempted yet", "mismatch": "❌ mismatch",
         "timeout": "⌛ timeout", "crashed": "💥 crashed"}


@dataclass
class Mistake:
    """A known-wrong answer.  ``fn`` is a function that makes the mistake (the tests run it).

    Without ``rule`` the mistake is recognised by its *values*: a learner's answer that matches ``fn``
    on every trial is named after it.  With ``rule`` it is a *method* mistake (right values, forbidden
    way), recognised when the rule is broken.
    """

    name: str
    fn: Callable[..., Any]
    hint: str
    rule: Rule | None = None


@dataclass
class Alternative:
    """A different but acceptable convention: an answer matching ``fn`` counts as correct, with ``note``."""

    name: str
    fn: Callable[..., Any]
    note: str


@dataclass
class Exercise:
    name: str
    notebook: str  # "01" .. "08"
    fn_name: str  # the stub's function name in the notebook (the grader looks it up)
    goal: str  # one-line learning goal
    reference: Callable[..., Any]
    make_inputs: Callable[[torch.Generator], tuple]  # one trial's positional arguments
    mistakes: list[Mistake]
    spec: str  # arguments and outputs: shapes, dtypes (printed on a mismatch)
    outputs: tuple[str, ...] = ()  # names of the outputs, for the report
    alternatives: list[Alternative] = field(default_factory=list)
    fingerprints: tuple[str, ...] = ()  # regexes of the solution that must not appear before the exercise
    max_copied: float = 0.5  # share of the solution's code that may appear above the exercise (leaks.py)
    trials: int = 4
    rtol: float = 1e-5
    atol: float = 1e-6  # relative to the output's largest magnitude
    allow_float32: bool = True  # a float32 answer to a float64 exercise is compared at float32 tolerance
    timeout: float = DEFAULT_TIMEOUT
    isolate: bool = False  # run the learner's function in a forked child (crash-safe)
    crash_hint: str = ""

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(m.rule for m in self.mistakes if m.rule is not None)

    def tolerance_text(self, float64_output: bool = True) -> str:
        text = f"|got - expected| <= {self.rtol:g} * |expected| + {self.atol:g} * max|expected|"
        if self.allow_float32 and float64_output:
            text += f" (a float32 answer to float64 inputs: rtol {max(self.rtol, FLOAT32_TOL[0]):g}, " \
                    f"atol {max(self.atol, FLOAT32_TOL[1]):g})"
        return text


REGISTRY: dict[str, Exercise] = {}


def register(name: str, reference: Callable, make_inputs: Callable, mistakes: list[Mistake], **kwargs: Any) -> Exercise:
    """Add an exercise; it needs a goal, a spec and at least two known-wrong answers."""
    if name in REGISTRY:
        raise ValueError(f"exercise {name!r} is registered twice")
    if len(mistakes) < 2:
        raise ValueError(f"exercise {name!r} needs at least two known-wrong answers")
    names = [m.name for m in mistakes] + [a.name for a in kwargs.get("alternatives", [])]
    if len(set(names)) != len(names):
        raise ValueError(f"exercise {name!r}: mistake names must be unique, got {names}")
    REGISTRY[name] = Exercise(name, reference=reference, make_inputs=make_inputs, mistakes=list(mistakes), **kwargs)
    return REGISTRY[name]


@dataclass
class Result:
    """What ``check`` found.  ``report`` is the full human-readable text it printed."""

    name: str
    status: str
    message: str
    mistake: str | None = None
    hint: str = ""
    report: str = ""
    trials: int = 0
    seconds: float = 0.0
    _shown_in: Any = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "correct"

    def __str__(self) -> str:
        return self.report

    def _ipython_display_(self) -> None:
        # check() already printed the report in this cell; print it again only when asked later
        if self._shown_in is not None and self._shown_in == _execution_count():
            return
        print(self.report)


def _execution_count() -> Any:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return None if shell is None else shell.execution_count
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------


def _arg_line(ex: Exercise, args: tuple) -> str:
    try:
        names = list(inspect.signature(ex.reference).parameters)
    except (TypeError, ValueError):
        names = []
    parts = []
    for i, a in enumerate(args):
        label = names[i] if i < len(names) else f"arg{i}"
        parts.append(f"{label} {describe(a)}" if isinstance(a, torch.Tensor) else f"{label}={a!r}")
    return ", ".join(parts)


def _safe(fn: Callable, args: tuple) -> Any:
    """Run a trusted function (reference, mistake, alternative) on a copy of the inputs."""
    return fn(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))


def _matches(got_per_trial: list, fn: Callable, inputs: list[tuple], ex: Exercise) -> bool:
    try:
        return all(compare(g, _safe(fn, args), (ex.rtol, ex.atol), ex.allow_float32) is None
                   for g, args in zip(got_per_trial, inputs))
    except Exception:
        return False


def _execute(ex: Exercise, fn: Callable, inputs: list[tuple], timeout: float, isolate: bool) -> Run:
    if isolate:
        refusal = fork_refusal()
        if refusal is None:
            return run_forked(fn, inputs, ex.rules, timeout)
        run = run_inline(fn, inputs, ex.rules, timeout)
        run.detail = f"ran in this process without crash protection: {refusal}"
        return run
    return run_inline(fn, inputs, ex.rules, timeout)


def _judge(ex: Exercise, fn: Callable, seed: int, timeout: float, isolate: bool) -> tuple[Result, list[str]]:
    """Run and compare; returns the result and the report lines after the headline."""
    gen = torch.Generator().manual_seed(seed)
    with_trial = len(inspect.signature(ex.make_inputs).parameters) > 1
    inputs = [ex.make_inputs(gen, t) if with_trial else ex.make_inputs(gen) for t in range(ex.trials)]
    start = time.perf_counter()
    run = _execute(ex, fn, inputs, timeout, isolate)
    seconds = time.perf_counter() - start
    lines = [f"  (your function printed)\n{run.stdout.rstrip()}"] if run.stdout.strip() else []
    if run.detail and run.status != "crashed":
        lines.append(f"  note: {run.detail}")

    def result(status: str, message: str, mistake: str | None = None, hint: str = "") -> Result:
        return Result(ex.name, status, message, mistake, hint, trials=len(run.trials), seconds=seconds)

    if run.status == "timeout":
        return result("timeout", f"no answer within {timeout:g} s (trial {len(run.trials)}): an endless loop? "
                                 f"check(..., timeout=...) allows more time"), lines
    if run.status == "crashed":
        hint = ex.crash_hint or "the process died inside your code"
        return result("crashed", f"{run.detail} (trial {len(run.trials)})", hint=hint), lines
    last = run.trials[-1]
    if last.status == "not attempted" and len(run.trials) == 1:
        return result("not attempted", "the function still raises NotImplementedError -- fill in the stub"), lines
    if last.status in ("raised", "not attempted", "bad output"):
        t = len(run.trials) - 1
        lines.append(f"  trial {t} inputs: {_arg_line(ex, inputs[t])}")
        if last.frame:
            lines.append("  in your code:\n" + last.frame)
        return result("mismatch", f"trial {t}: raised {last.error}" if last.status != "bad output" else last.error), \
            lines
    got = [t.output for t in run.trials]
    wants = [_safe(ex.reference, args) for args in inputs]
    for t, (g, w) in enumerate(zip(got, wants)):
        diff = compare(g, w, (ex.rtol, ex.atol), ex.allow_float32, ex.outputs)
        if diff is None:
            continue
        for alt in ex.alternatives:
            if _matches(got, alt.fn, inputs, ex):
                return result("correct", f"matches on {ex.trials} random inputs, with {alt.name}: {alt.note}"), lines
        value_mistake = next((m for m in ex.mistakes if m.rule is None and _matches(got, m.fn, inputs, ex)), None)
        rule_mistake = next((m for m in ex.mistakes if m.rule is not None
                             and any(ex.rules.index(m.rule) in tr.violations for tr in run.trials)), None)
        found = value_mistake or rule_mistake
        lines.append(f"  trial {t} inputs: {_arg_line(ex, inputs[t])}")
        lines.append(f"  expected: {', '.join(describe(o) for o in as_outputs(w))}; "
                     f"you returned: {', '.join(describe(o) for o in as_outputs(g))}")
        lines.extend(f"    {d}" for d in diff.details)
        return result("mismatch", f"trial {t}: {diff.summary}", found.name if found else None,
                      found.hint if found else ""), lines
    broken = sorted({i for tr in run.trials for i in tr.violations} | _growing_op_counts(ex, run, inputs))
    if broken:
        rule = ex.rules[broken[0]]
        mistake = next(m for m in ex.mistakes if m.rule is rule)
        return result("mismatch", f"right values, but the method breaks a rule of the exercise: {rule.text}",
                      mistake.name, mistake.hint), lines
    return result("correct", f"matches on {ex.trials} random inputs"), lines


def _growing_op_counts(ex: Exercise, run: Run, inputs: list[tuple]) -> set[int]:
    """Indices of "op_count_fixed" rules broken: more ops at a larger size, at least one per size step."""
    broken = set()
    for i, rule in enumerate(ex.rules):
        if rule.kind != "op_count_fixed":
            continue
        points = sorted((rule.size(args), tr.n_ops) for args, tr in zip(inputs, run.trials))
        (small, ops_small), (large, ops_large) = points[0], points[-1]
        if large > small and ops_large - ops_small >= large - small:
            broken.add(i)
    return broken


def check(name: str, fn: Callable[..., Any], seed: int = 0, verbose: bool = True, timeout: float | None = None,
          isolate: bool | None = None) -> Result:
    """Run ``fn`` against exercise ``name``'s reference on several random inputs; print and return a Result.

    ``timeout`` (seconds) defaults to the exercise's (30 s); ``isolate=True`` runs ``fn`` in a forked
    child process (the default for the Triton exercises).
    """
    if name not in REGISTRY:
        if not REGISTRY:
            raise KeyError(f"unknown exercise {name!r}: no exercise definitions were found (they live in the "
                           "repository's notebooks/exercises/; set UMV2_EXERCISES to that directory)")
        raise KeyError(f"unknown exercise {name!r}; known: {sorted(REGISTRY)}")
    ex = REGISTRY[name]
    timeout = ex.timeout if timeout is None else float(timeout)
    isolate = ex.isolate if isolate is None else bool(isolate)
    if not callable(fn):
        res, lines = Result(name, "mismatch", f"expected your function, got {describe(fn)}"), []
    else:
        try:
            res, lines = _judge(ex, fn, seed, timeout, isolate)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # never let an odd answer crash the notebook
            res, lines = Result(name, "mismatch", f"the checker could not use your answer "
                                                  f"({type(err).__name__}: {err})"), []
    head = f"[{name}] {_MARK[res.status]}"
    if res.mistake:
        head += f" -- this looks like the known mistake '{res.mistake}'"
    body = [head, f"  {res.message}"]
    if res.hint:
        body.append(f"  hint: {res.hint}")
    body.extend(lines)
    if res.status in ("mismatch", "timeout", "crashed"):
        body.append(f"  spec: {ex.spec}")
        float64_output = "float64" in ex.spec or "float32 accepted" in ex.spec
        body.append(f"  tolerance: {ex.tolerance_text(float64_output)}")
    res.report = "\n".join(body)
    if verbose:
        print(res.report)
        res._shown_in = _execution_count()
    return res
