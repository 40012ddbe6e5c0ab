"""Argument validation shared by the reference functions and the Triton kernels.

Every public function validates its inputs *before* doing any work, and the error names the
argument, the expected shape and what it got.  Kernels call the same helpers so that the
reference and the fused path refuse exactly the same inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _defer_to_device(x: Tensor) -> bool:
    """Value checks that would read device memory back to the host are deferred to the device.

    Eager CPU tensors are checked on the host (exact error messages, with the offending values).
    CUDA (and any other accelerator) tensors, and every tensor while ``torch.compile`` traces, get a
    ``torch._assert_async``: no host round trip, no graph break.  It raises ``RuntimeError`` with the
    same sentence (without the values, which would need a sync) on CPU, and a device-side assert
    on CUDA (reported at the next synchronisation).
    """
    return x.device.type != "cpu" or torch.compiler.is_compiling()


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
    """Refuse out-of-range indices instead of reading garbage memory (sync-free off the CPU)."""
    if indices.numel() == 0:
        return
    if _defer_to_device(indices):
        ok = ((indices >= 0) & (indices < size)).all()
        torch._assert_async(ok, f"{name} must lie in [0, {size}) (the rows of {table_name})")
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
    """Refuse NaN or infinite entries (a value check: it reads the tensor's data; sync-free off the CPU)."""
    if x.numel() == 0:
        return
    if _defer_to_device(x):
        torch._assert_async(torch.isfinite(x).all(), f"{name} must be finite (NaN or infinite entries found)")
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite; got {bad} NaN or infinite entries of {x.numel()}")
