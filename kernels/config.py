"""Run-time knobs of the kernels and the allocator every kernel output goes through.

* ``CONFIG.table_grad`` picks the algorithm for the table gradients (d table, d pre_table):
  ``"sorted"`` (one stable sort of the indices shared by both tables, then one program per block
  of rows writes each row once in the table dtype; bitwise reproducible), ``"atomic"`` (relaxed
  fp32 ``tl.atomic_add`` into zero-filled fp32 accumulators, then a cast; run-to-run order of
  colliding adds varies on a GPU) or ``"auto"`` (= ``"sorted"``: it moves fewer bytes -- each
  gradient row is written once, with no fp32 zero-fill and no cast pass -- and is deterministic;
  by the byte model in ``kernels/README.md``, an estimate until a GPU measures both).
* ``CONFIG.hot_rows``: rows read by more than this many (token, slot) pairs are summed by a
  separate one-program-per-row kernel so that a popular row does not stall a block of rows.
* Block sizes, warps and pipeline depths are ``triton.autotune`` configs in ``kernels/lookup.py``
  (one fixed config in the interpreter).
* ``empty`` allocates every buffer a kernel writes with ``tl.store``.  It is ``torch.empty``:
  the kernels never rely on zero-initialised memory.  The tests replace it with a NaN-filling
  allocator to prove that (the atomic path alone zero-fills its accumulators on purpose).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

TABLE_GRADS = ("auto", "atomic", "sorted")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels/__init__.py decides it before this import


@dataclass
class KernelConfig:
    table_grad: str = "auto"  # see module docstring
    hot_rows: int = 32  # a row read more often than this goes to the hot-row kernel (sorted path)


CONFIG = KernelConfig()


def resolve_table_grad() -> str:
    algo = CONFIG.table_grad
    if algo not in TABLE_GRADS:
        raise ValueError(f"kernels.CONFIG.table_grad must be one of {TABLE_GRADS}, got {algo!r}")
    return "sorted" if algo == "auto" else algo


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
