"""Argument validation shared by the reference functions and the Triton kernels.

Every public function validates its inputs *before* doing any work, and the error names the
argument, the expected shape and what it got.  Kernels call the same helpers so that the
reference and the fused path refuse exactly the same inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def require_int(name: str, x: Tensor) -> None:
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got dtype {x.dtype}")


def require_ndim(name: str, x: Tensor, ndim: int, shape_doc: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got {tuple(x.shape)}")


def require_min_ndim(name: str, x: Tensor, ndim: int, shape_doc: str) -> None:
    if x.dim() < ndim:
        raise ValueError(f"{name} must have shape {shape_doc} (at least {ndim} dims), got {tuple(x.shape)}")


def require_same(kind: str, **tensors: Tensor) -> None:
    """All tensors share `kind` ('dtype' or 'device')."""
    values = {name: getattr(t, kind) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        listing = ", ".join(f"{n}={v}" for n, v in values.items())
        raise ValueError(f"{', '.join(values)} must share one {kind}; got {listing}")


def require_indices_in_range(name: str, indices: Tensor, size: int, table_name: str) -> None:
    """Refuse out-of-range indices instead of reading garbage memory."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= size:
        raise ValueError(
            f"{name} must lie in [0, {size}) (the rows of {table_name}); got values in [{lo}, {hi}]"
        )


def require_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def require_finite(name: str, x: Tensor) -> None:
    """Refuse NaN or infinite entries (a value check: it reads the tensor's data)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite; got {bad} NaN or infinite entries of {x.numel()}")
