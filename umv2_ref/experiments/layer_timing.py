"""CPU time of one memory layer's forward and forward+backward at a small configuration.

``python -m umv2_ref.experiments.layer_timing [--tokens 2048] [--threads 1] [--repeats 20]``

Every layer reads the same input ``[tokens, d_model]``; times are medians over ``--repeats`` runs
after ``--warmup`` untimed runs, in milliseconds (printed as a Markdown table), with
``torch.set_num_threads(--threads)``.  Times are process CPU time (``time.process_time``), so other
jobs on a shared machine disturb them less than wall time; with several threads it sums them all.  The
backward pass is ``output.sum()`` (plus the auxiliary losses) back to the input and all parameters.
A dense SwiGLU FFN of the same width (inner 3.25 d, the README 227M ratio) is the yardstick.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import PKM, PKMConfig, UltraMem, UltraMemConfig, UltraMemV2, UltraMemV2Config

D_MODEL = 256
V2 = dict(d_model=D_MODEL, n_keys=64, d_key=64, topm=16, d_pre=64, d_value=64)


class SwiGLU(nn.Module):
    """Dense yardstick: ``W_3 (W_2 x * SiLU(W_1 x))``."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, inner, bias=False), nn.Linear(d, inner, bias=False)
        self.w3 = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.w2(x) * F.silu(self.w1(x)))


def layers() -> dict[str, Callable[[], nn.Module]]:
    """Name -> constructor, all at d_model = 256 and 64 x 64 = 4096 slots."""
    return {
        "UltraMemV2 (n=64, D_k=64, m=16, D_p=D_v=64)": lambda: UltraMemV2(UltraMemV2Config(**V2)),
        "UltraMemV2, exact full-grid top-m": lambda: UltraMemV2(UltraMemV2Config(**V2, exact_topk=True)),
        "UltraMemV2, two-quadrant prefilter": lambda: UltraMemV2(UltraMemV2Config(**V2, prefilter_quadrants=2)),
        "UltraMemV2, shared query across ranks": lambda: UltraMemV2(UltraMemV2Config(**V2, per_rank_queries=False)),
        "UltraMem v1 (E=4, D_v=64)": lambda: UltraMem(UltraMemConfig(d_model=D_MODEL, n_keys=64, d_key=64, topm=16,
                                                                     d_value=64)),
        "UltraMem v1, 2 heads x m=8": lambda: UltraMem(UltraMemConfig(d_model=D_MODEL, n_keys=64, d_key=64, topm=8,
                                                                      d_value=64, heads=2)),
        "PKM (4 heads x k=16, D_v=256)": lambda: PKM(PKMConfig(d_model=D_MODEL, n_keys=64, d_key=64, heads=4, topk=16)),
        "dense SwiGLU FFN (inner 832)": lambda: SwiGLU(D_MODEL, 832),
    }


def _loss(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.sum()
    return out.output.sum() + sum(out.aux_losses.values(), torch.zeros(()))


def median_ms(fn: Callable[[], None], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def time_layer(make: Callable[[], nn.Module], tokens: int, repeats: int, warmup: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms), medians."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(tokens, D_MODEL, requires_grad=True)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        _loss(layer(x)).backward()

    return median_ms(forward, repeats, warmup), median_ms(forward_backward, repeats, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.tokens} tokens, d_model {D_MODEL}, "
          f"median CPU time of {args.repeats} runs after {args.warmup} warmup, float32")
    print(f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("\n| layer | forward CPU ms | fwd+bwd CPU ms |\n|---|---:|---:|")
    for name, make in layers().items():
        fwd, fwd_bwd = time_layer(make, args.tokens, args.repeats, args.warmup)
        print(f"| {name} | {fwd:.2f} | {fwd_bwd:.2f} |")
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
