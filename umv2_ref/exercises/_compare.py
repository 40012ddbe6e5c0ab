"""Compare a learner's output with the expected one: output kinds, dtypes, shapes, tolerances.

The rules are strict on *kind* and explicit on precision:

* a tensor is expected where the reference returns a tensor, a Python ``int`` where it returns an
  ``int`` (numpy integers are fine, ``bool`` and floats are not), a number where it returns a float;
* floating outputs must be real and floating: integer, bool and complex tensors are mismatches,
  nothing is cast silently;
* integer outputs (slot ids, indices, labels) must have an integer dtype: float ids are refused
  even when they round to the right value;
* a float64 exercise accepts a float32 answer when the exercise allows it, compared at float32's
  tolerance; any other lower precision is refused with the dtype named;
* equality is ``|got - want| <= rtol * |want| + atol * max|want|`` elementwise (``atol`` is relative
  to the output's largest magnitude, so it means the same for outputs of size 1e-6 and 1e6), NaN
  never equals anything.

``compare`` returns ``None`` when equal, else a :class:`Diff` with a one-line summary and details.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

# tolerance used for a float32 answer to a float64 exercise
FLOAT32_TOL = (1e-5, 1e-6)
_PRECISION = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@dataclass
class Diff:
    summary: str  # one line: what is wrong
    details: list[str] = field(default_factory=list)  # first differing entries, etc.


def as_outputs(out: Any) -> tuple:
    """A function's return value as a tuple of outputs (tuples and lists are unpacked)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def describe(x: Any) -> str:
    """'(3, 4) float32' for a tensor, '7 (int)' for a number, the type name otherwise."""
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, bool):
        return f"{x} (bool)"
    if isinstance(x, numbers.Number):
        return f"{x!r} ({type(x).__name__})"
    return type(x).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _kind_problem(got: Any, want: Any, allow_float32: bool) -> str | None:
    """Why ``got`` is the wrong kind of output for ``want``, or None."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            if type(got).__module__ == "numpy":
                return f"you returned a numpy {type(got).__name__}; return a torch tensor (torch.from_numpy)"
            if got is None:
                return "you returned None -- did you forget `return`?"
            return f"you returned {describe(got)}; this exercise expects a tensor of shape {tuple(want.shape)} " \
                   f"and dtype {_dtype_name(want.dtype)}"
        if got.is_complex():
            return f"you returned complex values ({_dtype_name(got.dtype)}); this exercise expects real " \
                   f"{_dtype_name(want.dtype)}"
        if want.dtype == torch.bool:
            if got.dtype != torch.bool:
                return f"you returned {_dtype_name(got.dtype)}; this exercise expects a bool mask"
            return None
        if not want.is_floating_point():  # integer ids, counts, labels
            if got.is_floating_point() or got.dtype == torch.bool:
                return f"you returned {_dtype_name(got.dtype)}; this exercise expects integers " \
                       f"({_dtype_name(want.dtype)}), and float or bool values are not rounded for you"
            return None
        if not got.is_floating_point():
            return f"you returned {_dtype_name(got.dtype)}; this exercise expects floating point " \
                   f"{_dtype_name(want.dtype)}"
        p_got, p_want = _PRECISION.get(got.dtype, 0), _PRECISION.get(want.dtype, 0)
        if p_got < p_want and not (allow_float32 and got.dtype == torch.float32 and want.dtype == torch.float64):
            return f"you returned {_dtype_name(got.dtype)}; this exercise expects {_dtype_name(want.dtype)}"
        return None
    if isinstance(want, bool):
        return None if isinstance(got, bool) else f"you returned {describe(got)}; this exercise expects a bool"
    if isinstance(want, numbers.Integral):
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            extra = " (use int(...) on a 0-dim tensor)" if isinstance(got, torch.Tensor) else ""
            return f"you returned {describe(got)}; this exercise expects a Python int{extra}"
        return None
    if isinstance(want, numbers.Real):
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            return f"you returned {describe(got)}; this exercise expects a real number"
        return None
    return None


def _tolerance(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> tuple[float, float]:
    if want.dtype == torch.float64 and got.dtype == torch.float32:
        return max(tol[0], FLOAT32_TOL[0]), max(tol[1], FLOAT32_TOL[1])
    return tol


def _fmt(v: float) -> str:
    return f"{v:.9g}"


def _tensor_diff(g: torch.Tensor, w: torch.Tensor, tol: tuple[float, float], show: int) -> Diff | None:
    if g.shape != w.shape:
        return Diff(f"expected shape {tuple(w.shape)}, got {tuple(g.shape)}")
    if w.numel() == 0:
        return None
    if w.dtype == torch.bool:
        ok = g == w
    elif not w.is_floating_point():
        ok = g.to(torch.int64) == w.to(torch.int64)
    else:
        rtol, atol = _tolerance(g, w, tol)
        g64, w64 = g.double(), w.double()
        scale = w64.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max().item()
        both_inf = torch.isinf(w64) & (g64 == w64)
        ok = ((g64 - w64).abs() <= rtol * w64.abs() + atol * scale) | both_inf
    if bool(ok.all()):
        return None
    bad = (~ok).nonzero()
    details = []
    for pos in bad[:show].tolist():
        at = tuple(pos)
        gv, wv = g[at].item(), w[at].item()
        details.append(f"at {at}: got {_fmt(gv) if isinstance(gv, float) else gv}, "
                       f"expected {_fmt(wv) if isinstance(wv, float) else wv}")
    summary = f"{len(bad)} of {w.numel()} entries differ"
    if w.is_floating_point():
        err = (g.double() - w.double()).abs()
        finite = err[torch.isfinite(err)]
        if finite.numel():
            summary += f" (max abs error {finite.max().item():.3g})"
        if torch.isnan(g).any() and not torch.isnan(w).any():
            summary += "; your output has NaN"
    return Diff(summary, details)


def _number_diff(g: numbers.Number, w: numbers.Number, tol: tuple[float, float]) -> Diff | None:
    if isinstance(w, numbers.Integral):
        return None if int(g) == int(w) else Diff(f"expected {w}, got {g} (difference {int(g) - int(w):+d})")
    rtol, atol = tol
    if abs(float(g) - float(w)) <= rtol * abs(float(w)) + atol * abs(float(w)):
        return None
    return Diff(f"expected {_fmt(float(w))}, got {_fmt(float(g))}")


def compare(got: Any, want: Any, tol: tuple[float, float], allow_float32: bool = True,
            labels: tuple[str, ...] = (), show: int = 5) -> Diff | None:
    """None when ``got`` equals ``want`` under the rules above, else the first problem found."""
    got_t, want_t = as_outputs(got), as_outputs(want)
    if len(got_t) != len(want_t):
        if len(want_t) == 1:
            return Diff(f"expected one output, got a {type(got).__name__} of {len(got_t)}")
        return Diff(f"expected {len(want_t)} outputs (a tuple), got "
                    + (f"{len(got_t)}" if isinstance(got, (tuple, list)) else f"one {describe(got)}"))
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        label = labels[i] if i < len(labels) else (f"output {i}" if len(want_t) > 1 else "output")
        problem = _kind_problem(g, w, allow_float32)
        if problem:
            return Diff(f"{label}: {problem}")
        if isinstance(w, torch.Tensor):
            g = g.detach()
            if g.device.type != "cpu":
                g = g.cpu()
            if g.layout != torch.strided:
                g = g.to_dense()
            diff = _tensor_diff(g, w, tol, show)
        else:
            diff = _number_diff(g, w, tol)
        if diff:
            return Diff(f"{label}: {diff.summary}", diff.details)
    return None


def to_cpu(out: Any) -> Any:
    """Detach and copy tensors to CPU so later mutation by the learner's code cannot change them."""
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu", copy=True)
    if isinstance(out, (tuple, list)):
        return tuple(to_cpu(o) for o in out)
    return out
