"""Run-time knobs of the kernels and the allocator every kernel output goes through.

* ``CONFIG.table_grad`` picks the algorithm for the table gradients (d table, d pre_table):
  ``"atomic"`` (fp32 ``tl.atomic_add``, fast, run-to-run order varies on a GPU), ``"sorted"``
  (stable sort of the rows + one program per block of rows, bitwise reproducible) or ``"auto"``
  (``"sorted"`` when ``torch.are_deterministic_algorithms_enabled()``, else ``"atomic"``).
* ``empty`` allocates every buffer a kernel writes with ``tl.store``.  It is ``torch.empty``:
  the kernels never rely on zero-initialised memory.  The tests replace it with a NaN-filling
  allocator to prove that (the atomic path alone zero-fills its accumulator on purpose).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

TABLE_GRADS = ("auto", "atomic", "sorted")


@dataclass
class KernelConfig:
    table_grad: str = "auto"  # see module docstring
    block_t: int = 16  # tokens per program in the lookup kernels
    block_rows: int = 16  # table rows per program in the sorted segment reduction


CONFIG = KernelConfig()


def resolve_table_grad() -> str:
    algo = CONFIG.table_grad
    if algo not in TABLE_GRADS:
        raise ValueError(f"kernels.CONFIG.table_grad must be one of {TABLE_GRADS}, got {algo!r}")
    if algo == "auto":
        return "sorted" if torch.are_deterministic_algorithms_enabled() else "atomic"
    return algo


@contextmanager
def table_grad(algo: str) -> Iterator[None]:
    """``with kernels.table_grad("sorted"): loss.backward()`` -- pick the table-gradient algorithm."""
    if algo not in TABLE_GRADS:
        raise ValueError(f"table_grad must be one of {TABLE_GRADS}, got {algo!r}")
    old, CONFIG.table_grad = CONFIG.table_grad, algo
    try:
        yield
    finally:
        CONFIG.table_grad = old


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel-written buffer comes from here (tests monkeypatch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)
