"""umv2_ref: pure-PyTorch reference implementation of UltraMemV2 and the memory-layer line.

PKM (arXiv 1907.05242) -> PEER (2407.04153) -> Memory+ (2412.09764) -> UltraMem (2411.12364)
-> UltraMemV2 (2508.18756).  The single source of truth for notebooks and Triton kernels; never
imports triton.
"""
from . import layers, retrieval, values
from .layers import (
    PEER,
    PKM,
    MemoryOutput,
    MemoryPlus,
    PKMConfig,
    UltraMem,
    UltraMemConfig,
    UltraMemV2,
    UltraMemV2Config,
    refresh_rank1,
)

__all__ = [
    "layers", "retrieval", "values",
    "PKM", "PEER", "MemoryPlus", "UltraMem", "UltraMemV2", "MemoryOutput",
    "PKMConfig", "UltraMemConfig", "UltraMemV2Config", "refresh_rank1",
]
