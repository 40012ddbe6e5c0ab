"""Benchmark the kernels: ``python -m kernels.bench`` (GPU) -> Markdown table.

On a CUDA GPU, in bf16, for T in {4096, 16384, 65536}, m in {32, 128}, D in {128, 192, 256},
N in {2^20, 2^21, 2^22}: forward and forward+backward milliseconds (median of CUDA-event timings)
of the fused kernel, the pure-PyTorch reference and, for ``weighted_sum``,
``torch.nn.functional.embedding_bag``; the bytes each op must move, the achieved GB/s and its
percentage of the measured device copy bandwidth.  Then the retrieval stage (T = 16384, n = 1024,
r = 2, c = 2, D_k in {192, 512}, k = m in {32, 128}): the scoring GEMMs alone, GEMMs + the
PyTorch TDQKR top-m, GEMMs + the fused top-m.  Writes ``--out`` (default
``kernels/bench_results.md``) with the card name and torch/triton versions.

Without a GPU it checks the kernels against the reference in the interpreter at small sizes and
runs the whole table machinery once on tiny CPU sizes (``--dry-run`` timings are interpreter
wall-clock and mean nothing); it says that real timings need a GPU and writes no file.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import kernels  # first: sets TRITON_INTERPRET before triton is imported
import triton
from umv2_ref import retrieval, values

HAS_GPU = torch.cuda.is_available()
DEFAULT_OUT = Path(__file__).with_name("bench_results.md")


@dataclass
class Sweep:
    """The grid of value-path sizes (D = D_p = D_v) and the retrieval settings."""

    T: tuple[int, ...] = (4096, 16384, 65536)
    m: tuple[int, ...] = (32, 128)
    D: tuple[int, ...] = (128, 192, 256)
    N: tuple[int, ...] = (2**20, 2**21, 2**22)
    cores: int = 2  # per-core score slices for peer_values (weighted_sum uses one weight per slot)
    retrieval_T: int = 16384
    retrieval_n: int = 1024
    retrieval_dk: tuple[int, ...] = (192, 512)
    retrieval_km: tuple[int, ...] = (32, 128)
    rank: int = 2
    dtype: torch.dtype = torch.bfloat16
    reps: int = 20


DRY_RUN = Sweep(T=(40,), m=(6,), D=(24,), N=(200,), retrieval_T=24, retrieval_n=40, retrieval_dk=(16,),
                retrieval_km=(5,), dtype=torch.float32, reps=2)


# ---------------------------------------------------------------------------------------------
# timing and bytes
# ---------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter otherwise."""
    fn()  # warm-up (compiles the kernels)
    times = []
    for _ in range(reps):
        if HAS_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str, reps: int) -> float:
    """Measured device copy bandwidth: read + write of a large tensor (1 GiB on a GPU)."""
    numel = 2**28 if HAS_GPU else 2**22
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / ms / 1e6


def lookup_bytes(T: int, m: int, N: int, DP: int, DV: int, c: int, elt: int, backward: bool) -> int:
    """Bytes a value lookup must move (no cache reuse of gathered rows; indices int64, coefficients fp32).

    forward: read x_pre, indices, scores, T*m gathered rows of P and V; write z.
    backward adds: read dz, x_pre, indices, scores, the gathered rows again; write dx_pre and
    dscores; with pre-values the per-(t, k) coefficients (fp32, written and read back); the dense
    table gradients (N rows of P and V, written once).  ``DP = 0``: ``weighted_sum`` (no P, no x_pre).
    """
    fwd = T * DP * elt + T * m * 8 + T * m * c * elt + T * m * (DP + DV) * elt + T * DV * elt
    if not backward:
        return fwd
    coefficients = 2 * T * m * (c + 1) * 4 if DP else 0
    bwd = T * DV * elt + T * DP * elt + T * m * 8 + T * m * c * elt + T * m * (DP + DV) * elt
    bwd += T * DP * elt + T * m * c * elt + coefficients + N * (DP + DV) * elt
    return fwd + bwd


# ---------------------------------------------------------------------------------------------
# value-path benchmark
# ---------------------------------------------------------------------------------------------


def embedding_bag(table, idx, w):
    """``F.embedding_bag`` with per-sample weights: PKM's value read in one library call."""
    return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")


def fwd_bwd(fn: Callable, args: tuple, grad: torch.Tensor) -> Callable[[], object]:
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return lambda: torch.autograd.grad(fn(*args), diff, grad)


def lookup_rows(sw: Sweep, device: str, copy_gbs: float) -> list[dict]:
    rows = []
    elt = torch.empty((), dtype=sw.dtype).element_size()
    for N in sw.N:
        for D in sw.D:
            pre = (torch.randn(N, D, device=device) * D**-0.5).to(sw.dtype).requires_grad_()  # [N, D]
            table = torch.randn(N, D, device=device).to(sw.dtype).requires_grad_()  # [N, D]
            for T in sw.T:
                for m in sw.m:
                    x = torch.randn(T, D, device=device).to(sw.dtype).requires_grad_()  # [T, D]
                    idx = torch.randint(0, N, (T, m), device=device)  # [T, m]
                    s = torch.randn(T, m, sw.cores, device=device).to(sw.dtype).requires_grad_()  # [T, m, c]
                    w = torch.randn(T, m, device=device).to(sw.dtype).requires_grad_()  # [T, m]
                    g = torch.randn(T, D, device=device).to(sw.dtype)  # [T, D]
                    shape = dict(T=T, m=m, D=D, N=N)
                    peer_args = (x, pre, table, idx, s)
                    for impl, fn in (("triton", kernels.peer_values), ("torch", values.peer_values)):
                        rows.append(measure("peer_values", impl, fn, peer_args, g, shape, sw, copy_gbs,
                                            lambda bwd: lookup_bytes(T, m, N, D, D, sw.cores, elt, bwd)))
                    ws_args = (table, idx, w)
                    for impl, fn in (("triton", kernels.weighted_sum), ("torch", values.weighted_sum),
                                     ("embedding_bag", embedding_bag)):
                        rows.append(measure("weighted_sum", impl, fn, ws_args, g, shape, sw, copy_gbs,
                                            lambda bwd: lookup_bytes(T, m, N, 0, D, 1, elt, bwd)))
            del pre, table
    return rows


def measure(op, impl, fn, args, grad, shape, sw, copy_gbs, bytes_of) -> dict:
    """One table row: forward and forward+backward time, bytes, GB/s and % of copy bandwidth."""
    row = dict(op=op, impl=impl, **shape)
    for label, backward in (("fwd", False), ("fwd+bwd", True)):
        step = fwd_bwd(fn, args, grad) if backward else (lambda: fn(*args))
        try:
            ms = median_ms(step, sw.reps)
        except torch.OutOfMemoryError:
            row[label] = None
            torch.cuda.empty_cache()
            continue
        nbytes = bytes_of(backward)
        gbs = nbytes / ms / 1e6
        row[label] = dict(ms=ms, bytes=nbytes, gbs=gbs, pct=100 * gbs / copy_gbs)
    return row


# ---------------------------------------------------------------------------------------------
# retrieval-stage benchmark
# ---------------------------------------------------------------------------------------------


def retrieval_rows(sw: Sweep, device: str) -> list[dict]:
    """Scoring GEMMs alone vs GEMMs + PyTorch TDQKR top-m vs GEMMs + fused top-m (forward)."""
    rows = []
    T, n, r, c = sw.retrieval_T, sw.retrieval_n, sw.rank, 2
    for dk in sw.retrieval_dk:
        q = torch.randn(T, 2, r, dk, device=device).to(sw.dtype)  # [T, 2, r, D_k] row / column queries
        keys = (torch.randn(2, n, r, dk, device=device) * dk**-0.5).to(sw.dtype)  # [2, n, r, D_k]
        cores = torch.rand(c, r, r, device=device).to(sw.dtype)  # [c, r, r]
        rank1 = retrieval.rank1_factors(cores)

        def gemms():
            s_row = torch.einsum("trd,nrd->tnr", q[:, 0], keys[0])  # [T, n, r]
            s_col = torch.einsum("trd,nrd->tnr", q[:, 1], keys[1])  # [T, n, r]
            return s_row, s_col

        for km in sw.retrieval_km:
            shape = dict(T=T, n=n, D_k=dk, k=km, m=km)
            paths = {
                "scoring GEMMs alone": gemms,
                "GEMMs + torch top-m": lambda: retrieval.tucker_topk(*gemms(), cores, km, k=km, rank1=rank1),
                "GEMMs + triton top-m": lambda: kernels.tucker_topk(*gemms(), cores, km, k=km, rank1=rank1),
            }
            for impl, fn in paths.items():
                rows.append(dict(impl=impl, ms=median_ms(fn, sw.reps), **shape))
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "OOM | | |"
    return f"{entry['ms']:.3f} | {entry['bytes'] / 1e9:.3f} | {entry['gbs']:.0f} | {entry['pct']:.0f}%"


LOOKUP_HEADER = ("| op | impl | T | m | D | N | fwd ms | fwd GB | fwd GB/s | fwd % copy "
                 "| fwd+bwd ms | fwd+bwd GB | fwd+bwd GB/s | fwd+bwd % copy |")


def markdown(lookups: list[dict], retrievals: list[dict], copy_gbs: float, device_name: str) -> str:
    timer = "CUDA-event" if HAS_GPU else "perf_counter (CPU)"
    lines = [
        f"# Kernel benchmark: {device_name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; measured copy bandwidth {copy_gbs:.0f} GB/s; "
        f"median of {timer} timings; bytes: the traffic model `kernels.bench.lookup_bytes`.",
        "",
        LOOKUP_HEADER,
        "|---" * 14 + "|",
    ]
    for r in lookups:
        lines.append(f"| {r['op']} | {r['impl']} | {r['T']} | {r['m']} | {r['D']} | {r['N']} | "
                     f"{_cell(r['fwd'])} | {_cell(r['fwd+bwd'])} |")
    lines += ["", "## Retrieval stage (forward)", "", "| path | T | n | D_k | k = m | ms |", "|---" * 6 + "|"]
    for r in retrievals:
        lines.append(f"| {r['impl']} | {r['T']} | {r['n']} | {r['D_k']} | {r['k']} | {r['ms']:.3f} |")
    return "\n".join(lines) + "\n"


def targets(lookups: list[dict], retrievals: list[dict], at: dict) -> list[str]:
    """The H100 targets of the kernels issue, evaluated on this run (``at``: the value-path config)."""
    pick = {r["impl"]: r for r in lookups if r["op"] == "peer_values" and all(r[k] == v for k, v in at.items())}
    fused, ref = pick.get("triton"), pick.get("torch")
    lines = ["", f"## Targets (H100) at peer_values {at}", ""]
    if fused and ref and fused["fwd"] and fused["fwd+bwd"]:
        speedup = ref["fwd+bwd"]["ms"] / fused["fwd+bwd"]["ms"] if ref["fwd+bwd"] else float("nan")
        lines += [f"- forward >= 80% of copy bandwidth: {fused['fwd']['pct']:.0f}%",
                  f"- forward+backward >= 5x faster than the PyTorch reference: {speedup:.1f}x",
                  f"- forward+backward < 1.65 ms: {fused['fwd+bwd']['ms']:.3f} ms"]
    gemm_ms = {(r["D_k"], r["k"]): r["ms"] for r in retrievals if r["impl"] == "scoring GEMMs alone"}
    for r in retrievals:
        if r["impl"] == "GEMMs + triton top-m":
            ratio = r["ms"] / gemm_ms[(r["D_k"], r["k"])]
            lines.append(f"- fused retrieval within 2x of its GEMMs (D_k={r['D_k']}, k=m={r['k']}): {ratio:.2f}x")
    return lines


def interpreter_check() -> None:
    """Small-size correctness of every kernel against umv2_ref (what a CPU can tell)."""
    torch.manual_seed(0)
    x, pre, table = torch.randn(37, 12), torch.randn(97, 12), torch.randn(97, 18)
    idx, s = torch.randint(0, 97, (37, 5)), torch.randn(37, 5, 3)
    err = kernels.peer_values(x, pre, table, idx, s, "gelu") - values.peer_values(x, pre, table, idx, s, "gelu")
    print(f"peer_values   max |kernel - reference| = {err.abs().max():.2e}")
    err = kernels.weighted_sum(table, idx, s[..., 0]) - values.weighted_sum(table, idx, s[..., 0])
    print(f"weighted_sum  max |kernel - reference| = {err.abs().max():.2e}")
    s_row, s_col, cores = torch.randn(16, 23, 2), torch.randn(16, 23, 2), torch.rand(2, 2, 2)
    got, want = kernels.tucker_topk(s_row, s_col, cores, 8, k=6), retrieval.tucker_topk(s_row, s_col, cores, 8, k=6)
    same = bool((got[1] == want[1]).all())
    print(f"tucker_topk   same indices: {same}, max score error {(got[0] - want[0]).abs().max():.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write (GPU only)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (exercise the script, no real timings)")
    args = parser.parse_args(argv)
    device = "cuda" if HAS_GPU else "cpu"
    sw = DRY_RUN if (args.dry_run or not HAS_GPU) else Sweep()
    if not HAS_GPU:
        print("No CUDA device: Triton runs in its CPU interpreter, so timings need a GPU.")
        print("Interpreter correctness at small sizes:")
        interpreter_check()
        print("\nDry run of the benchmark machinery on tiny CPU sizes (interpreter wall-clock: NOT kernel timings):")
    copy_gbs = copy_bandwidth_gbs(device, sw.reps)
    name = torch.cuda.get_device_name() if HAS_GPU else "CPU (Triton interpreter, dry run)"
    lookups, retrievals = lookup_rows(sw, device, copy_gbs), retrieval_rows(sw, device)
    at = dict(T=16384, m=32, D=256, N=2**20) if sw is not DRY_RUN else dict(T=sw.T[0], m=sw.m[0], D=sw.D[0], N=sw.N[0])
    report = markdown(lookups, retrievals, copy_gbs, name) + "\n".join(targets(lookups, retrievals, at)) + "\n"
    print(report)
    if HAS_GPU and not args.dry_run:
        args.out.write_text(report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
