"""Triton kernels for the memory-layer hot paths, registered as the ``"triton"`` backend.

``kernels.peer_values``, ``kernels.weighted_sum`` and ``kernels.tucker_topk`` have the signatures
and validation of their references in :mod:`umv2_ref` (see ``kernels/README.md`` for the designs
and the tolerance contract).  Without a CUDA device the kernels run in Triton's interpreter on
CPU tensors: ``TRITON_INTERPRET=1`` is set here, before the first ``import triton``.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from umv2_ref import backend as _backend  # noqa: E402

from . import config  # noqa: E402
from .config import CONFIG, KernelConfig, table_grad  # noqa: E402
from .lookup import peer_values, weighted_sum  # noqa: E402
from .topk import tucker_topk  # noqa: E402

INTERPRETED = config.INTERPRETED

_backend.register_backend(
    "triton", {"weighted_sum": weighted_sum, "peer_values": peer_values, "tucker_topk": tucker_topk}
)

__all__ = ["CONFIG", "INTERPRETED", "KernelConfig", "peer_values", "table_grad", "tucker_topk", "weighted_sum"]
