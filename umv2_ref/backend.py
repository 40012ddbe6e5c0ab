"""Backend registry: which implementation of the hot functions a layer calls.

``umv2_ref`` never imports triton.  The reference functions are registered here as the
``"torch"`` backend; ``import kernels`` registers the fused Triton versions as ``"triton"``
(same signatures).  Layers take ``backend="auto" | "torch" | "triton"``: ``"auto"`` picks
triton for CUDA inputs when it is registered, torch otherwise.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from . import retrieval, values

FUNCTIONS = ("weighted_sum", "peer_values", "tucker_topk")
_BACKENDS: dict[str, dict[str, Callable]] = {
    "torch": {
        "weighted_sum": values.weighted_sum,
        "peer_values": values.peer_values,
        "tucker_topk": retrieval.tucker_topk,
    }
}


def register_backend(name: str, functions: dict[str, Callable]) -> None:
    """Register an implementation of every name in ``FUNCTIONS`` (``kernels`` calls this)."""
    missing = set(FUNCTIONS) - set(functions)
    if missing:
        raise ValueError(f"backend {name!r} lacks {sorted(missing)}")
    _BACKENDS[name] = dict(functions)


def available() -> list[str]:
    return sorted(_BACKENDS)


def resolve(backend: str, like: Tensor) -> str:
    """The concrete backend for ``backend`` given an input tensor's device."""
    if backend == "auto":
        return "triton" if like.is_cuda and "triton" in _BACKENDS else "torch"
    if backend not in _BACKENDS:
        hint = " (run `import kernels` to register the Triton kernels)" if backend == "triton" else ""
        raise ValueError(f"backend must be 'auto' or one of {available()}, got {backend!r}{hint}")
    return backend


def get(function: str, backend: str, like: Tensor) -> Callable:
    """The implementation of ``function`` for ``backend`` ("auto" resolved against ``like``)."""
    return _BACKENDS[resolve(backend, like)][function]
