# %% [markdown]
# # 07 — Triton kernels for the hot paths
#
# Notebooks 01–06 built every memory layer from plain PyTorch ops.  That code is correct and easy
# to read, but it is not how a memory layer should run: a PKM / PEER / UltraMemV2 value read is a
# **gather** of a few rows from a huge table, and PyTorch executes it as a sequence of separate
# kernels that each write a large intermediate to GPU memory and read it back.
#
# This notebook goes from the naive PyTorch gather to the fused kernels in `kernels/`, step by step:
#
# 1. **What the naive version moves through memory**, counted in bytes.
# 2. **A first Triton kernel**: the PKM value bag, one program per block of tokens.
# 3. **The fused UltraMemV2 value path** (`kernels.peer_values`, Eq. 15 with multi-core slices).
# 4. **The backward pass**, and why the table gradient needs *atomics* or *sorting*.
# 5. **The fused TDQKR top-m** (`kernels.tucker_topk`): the k×k candidate grid never leaves registers.
# 6. **Layers on the `"triton"` backend** and the **benchmark table**.
#
# Without a GPU every kernel runs in Triton's *interpreter* (`TRITON_INTERPRET=1`): the same
# Python kernel source, executed by numpy on CPU tensors.  It is slow (about a millisecond per
# program) but exact, so every cell below cross-checks a kernel against `umv2_ref` with
# `assert_close`.  Shapes: `T` tokens, `m` slots per token, `N` table rows, `D_p`/`D_v` widths,
# `c` Tucker cores.

# %%
from umv2_ref.notebook import setup

SMOKE = setup()
import kernels  # sets TRITON_INTERPRET=1 itself when there is no GPU, before importing triton

print("Triton interpreter:", kernels.INTERPRETED)

# %%
from pathlib import Path

import torch
import triton
import triton.language as tl
from IPython.display import Markdown, display
from ipywidgets import interact
from torch.testing import assert_close

from umv2_ref import UltraMemV2, UltraMemV2Config, retrieval, values, viz
from umv2_ref.exercises import check

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors

# %% [markdown]
# ## 1. The naive PyTorch value path and the bytes it moves
#
# UltraMemV2's value read (Eq. 15, notebook 04) for one token is
#
# $$a_i = \langle P[i], \tilde x\rangle,\qquad z = \sum_{i \in I(x)} a_i\, s_i\, V[i],$$
#
# and `umv2_ref.values.peer_values` writes it in three PyTorch lines:
#
# ```python
# pre = torch.einsum("...md,...d->...m", pre_table[indices], x_pre)   # gather [T, m, D_p], then dot
# w = pre[..., None] * scores                                          # [T, m, c]
# z = pool(table[indices], w)                                          # gather [T, m, D_v], then sum
# ```
#
# Each line is at least one GPU kernel, and each *gather* (`pre_table[indices]`) **writes** a
# `[T, m, D]` tensor to memory that the next kernel **reads back**.  A fused kernel reads each
# selected row once, keeps the partial sum in registers and writes only `z`.  On a GPU this
# operation is bound by memory traffic, not arithmetic (it does about one multiply-add per byte),
# so bytes moved is the right cost model.  Let us count them.

# %%
def naive_forward_bytes(T, m, d_pre, d_value, cores, elt):
    """Memory traffic of the three-line PyTorch version, by component (bytes)."""
    return {
        "gathered rows (read)": T * m * (d_pre + d_value) * elt,
        "[T,m,D] gathers written": T * m * (d_pre + d_value) * elt,
        "[T,m,D] gathers read back": T * m * (d_pre + d_value) * elt,
        "x, indices, scores, z": T * d_pre * elt + 2 * T * m * 8 + T * m * cores * elt + T * d_value * elt,
    }


def fused_forward_parts(T, m, d_pre, d_value, cores, elt):
    """Memory traffic of the fused kernel: each selected row read once, z written once (bytes)."""
    return {
        "gathered rows (read)": T * m * (d_pre + d_value) * elt,
        "x, indices, scores, z": T * d_pre * elt + T * m * 8 + T * m * cores * elt + T * d_value * elt,
    }


def bytes_table(T, m, D, cores=2, elt=2):
    versions = {"naive PyTorch": naive_forward_bytes(T, m, D, D, cores, elt),
                "fused kernel": fused_forward_parts(T, m, D, D, cores, elt)}
    print(f"T={T}, m={m}, D_p=D_v={D}, c={cores}, bf16:")
    for name, parts in versions.items():
        print(f"  {name:14s} {sum(parts.values()) / 1e9:6.2f} GB   " +
              ", ".join(f"{k}: {v / 1e9:.2f}" for k, v in parts.items()))
    return versions


versions = bytes_table(16384, 32, 256)
naive_total, fused_total = (sum(v.values()) for v in versions.values())
print(f"the fused kernel moves {naive_total / fused_total:.1f}x fewer bytes")
print(f"at an assumed 3 TB/s: naive {naive_total / 3e12 * 1e3:.2f} ms, fused {fused_total / 3e12 * 1e3:.2f} ms")
assert fused_total < naive_total / 2.5

# %% [markdown]
# The gathered rows themselves are unavoidable: every selected slot's two rows must be read.
# Everything the naive version adds is traffic *about* those rows: writing them out as a dense
# `[T, m, D]` tensor and reading them back.  The fused kernel's floor is about one third of the
# naive traffic; the last line converts both to time at an H100-class 3 TB/s, *if* both ran at full
# bandwidth (the benchmark in section 7 measures how close they get).
#
# Move the sliders to see how the split changes with the batch, the number of slots and the width
# (the widget below is the interactive version of this plot):

# %%
def show_bytes(log2_T=14, m=32, D=256):
    versions = {"naive PyTorch": naive_forward_bytes(2**log2_T, m, D, D, 2, 2),
                "fused kernel": fused_forward_parts(2**log2_T, m, D, D, 2, 2)}
    viz.bytes_breakdown(versions, title=f"peer_values forward, T=2^{log2_T}, m={m}, D={D}, bf16")


show_bytes()

# %%
# NBVAL_IGNORE_OUTPUT
interact(show_bytes, log2_T=(10, 17), m=[16, 32, 64, 128], D=[128, 192, 256]);

# %% [markdown]
# ## 2. A first Triton kernel: the PKM value bag
#
# The simplest memory read is PKM's weighted bag $z_t = \sum_k w_{tk}\, V[i_{tk}]$
# (`umv2_ref.values.weighted_sum`, the same as `torch.nn.functional.embedding_bag`).  A Triton
# kernel is a function executed by a grid of *programs*; each program works on a *block* of data
# held in registers.  Our layout:
#
# * one program per block of `BLOCK_T` tokens, the whole row width `BLOCK_D` (a power of two
#   $\ge D$) in one tile;
# * a loop over the k slots: load the k-th index of each token, **gather** the rows with pointer
#   arithmetic `table_ptr + row * D + d`, multiply by the weight, accumulate in fp32;
# * **masks** for the last, partial block of tokens and for the padded columns `d >= D` — without
#   them a program would read and write past the end of the tensors (on a GPU: garbage or a
#   crash; the interpreter does not check either).

# %%
@triton.jit
def bag_kernel(table_ptr, idx_ptr, w_ptr, out_ptr, T, K, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] this program's tokens
    d = tl.arange(0, BLOCK_D)  # [BD] channels (padded to a power of two)
    ok = (t < T)[:, None] & (d < D)[None, :]  # [BT, BD]
    acc = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)  # [BT, BD] fp32 accumulator in registers
    for k in range(K):
        row = tl.load(idx_ptr + t * K + k, mask=t < T, other=0)  # [BT] k-th slot of each token
        w = tl.load(w_ptr + t * K + k, mask=t < T, other=0.0)  # [BT]
        acc += w[:, None] * tl.load(table_ptr + row[:, None] * D + d[None, :], mask=ok, other=0.0)  # gather
    tl.store(out_ptr + t[:, None] * D + d[None, :], acc, mask=ok)  # z written once


def bag(table, idx, w, block_t=4):
    T, K = idx.shape
    out = torch.empty(T, table.shape[1], device=table.device)  # [T, D] no zero-fill needed: all written
    grid = (triton.cdiv(T, block_t),)
    bag_kernel[grid](table, idx, w, out, T, K, table.shape[1], BLOCK_T=block_t,
                     BLOCK_D=triton.next_power_of_2(table.shape[1]))
    return out


table = torch.randn(50, 12, device=DEV)  # [N, D]: D = 12 is padded to BLOCK_D = 16
idx = torch.randint(0, 50, (9, 3), device=DEV)  # [T, k]: T = 9 leaves a partial last block of 4
w = torch.randn(9, 3, device=DEV)  # [T, k]
assert_close(bag(table, idx, w), values.weighted_sum(table, idx, w))
print("teaching bag kernel == umv2_ref.values.weighted_sum")

# %% [markdown]
# ### Exercise 1 — what the masks switch off
#
# *Goal: count what a block layout launches — cdiv programs, and the lanes the two masks must switch off.*
#
# Write `masked_lanes(T, D, block_t, block_d)` for the layout above (one program per `block_t` tokens,
# a tile of `block_t × block_d` lanes per program, `block_d` the next power of two $\ge D$).  Return
# `(programs, idle_lanes)`: how many programs the grid launches, and how many (token, channel) lanes of
# all their tiles lie outside the `[T, D]` data — exactly the lanes a mask must switch off.  For the
# cell above (T = 9, D = 12, `block_t` = 4) that is 3 programs and 84 idle lanes.

# %%
def masked_lanes(T, D, block_t, block_d):
    raise NotImplementedError


check("nb07_masked_lanes", masked_lanes)

# %% [markdown]
# ### Exercise 2 — your own gather kernel: the weight gradient
#
# *Goal: write a Triton kernel that gathers rows by loaded indices and reduces them, with both masks right.*
#
# The bag's gradient with respect to its weights is, per token and slot, a dot product with the
# upstream gradient $g_t$:
#
# $$\frac{\partial L}{\partial w_{tk}} = \langle g_t,\ V[i_{tk}]\rangle = \sum_d g_{td}\,V[i_{tk}, d].$$
#
# Write `my_weight_grad(table, idx, g)` that **launches a Triton kernel you write** and returns
# `dw [T, k]` as a CPU tensor: gather the rows like `bag_kernel` does, multiply by the token's `g`
# tile and reduce over the channels with `tl.sum(..., axis=1)`; store one value per (token, slot).
# The checker uses odd T (always a partial last block), small N (duplicate rows) and refuses an answer
# computed without a Triton kernel.  It runs your launcher in a **separate process**: a load or store
# without its mask can crash a process outright (the interpreter does not always catch it), and then
# the check reports `crashed` instead of killing this notebook's kernel.
# Solution: `notebooks/solutions/nb07_gather_kernel.py`.

# %%
def my_weight_grad(table, idx, g):
    # table [N, D]; idx [T, k]; g [T, D] -> dw [T, k]
    raise NotImplementedError


check("nb07_gather_kernel", my_weight_grad)

# %% [markdown]
# ## 3. The fused UltraMemV2 value path
#
# `kernels.peer_values` extends the bag kernel in three ways, all inside the same loop over slots:
#
# 1. load the token's `x_pre [BLOCK_T, D_p]` once, gather the pre-value rows `P[i]` and compute the
#    pre-score $a_i = \langle P[i], \tilde x\rangle$ (plus an optional activation — PEER's GELU —
#    written with plain `tl` ops: exact GELU via `tl.erf`, since libdevice does not exist in the
#    interpreter);
# 2. **multi-core slices**: with scores `[T, m, c]`, channel `d` is weighted by the score of core
#    `d // (D_v / c)` — a gather from the small score tensor, no reshaping;
# 3. inputs in bf16/fp16 are cast to fp32 on load; the output is cast back on store.
#
# Cross-check against the reference, with awkward sizes (T = 21 tokens, D_v = 18 = 3 cores × 6):

# %%
T, m, N, D_p, D_v, c = 21, 5, 60, 10, 18, 3
x_pre = torch.randn(T, D_p, device=DEV)  # [T, D_p]
pre_table = torch.randn(N, D_p, device=DEV) / D_p**0.5  # [N, D_p]
value_table = torch.randn(N, D_v, device=DEV)  # [N, D_v]
indices = torch.randint(0, N, (T, m), device=DEV)  # [T, m]
scores = torch.randn(T, m, c, device=DEV)  # [T, m, c]

for act in (None, "gelu"):
    fused = kernels.peer_values(x_pre, pre_table, value_table, indices, scores, act)  # [T, D_v]
    assert_close(fused, values.peer_values(x_pre, pre_table, value_table, indices, scores, act))
print("kernels.peer_values == umv2_ref.values.peer_values (no activation, and GELU)")

# %% [markdown]
# The kernel also refuses what the reference refuses, *before* launching — an out-of-range index
# would otherwise make the gather read memory outside the table:

# %%
bad = indices.clone()
bad[3, 2] = N  # one past the last row
try:
    kernels.peer_values(x_pre, pre_table, value_table, bad, scores)
except ValueError as err:
    print("refused:", err)

# %% [markdown]
# ## 4. The backward pass: why the table gradient needs atomics or sorting
#
# The gradient splits in two very different parts.
#
# * **Per token** — $\partial L/\partial s$, $\partial L/\partial \tilde x$: token t's gradients
#   depend only on token t's rows, so the program that owns token t computes and writes them.
#   No two programs write the same place.
# * **Per table row** — $\partial L/\partial V[i] = \sum_{(t,k):\, i_{tk}=i} a_{tk} s_{tk}\, g_t$:
#   a sum over *every* (token, slot) pair that read row i.  Popular rows are read by many tokens,
#   and one token can read the same row twice.  Programs own tokens, so they **collide on rows**.
#
# Here is what goes wrong with a plain scatter when an index repeats (`dV[idx] = contrib` keeps
# only one of the colliding writes):

# %%
idx_dup = torch.tensor([[5, 5, 2], [5, 1, 2]])  # [T=2, k=3]: token 0 reads row 5 twice
w_dup = torch.ones(2, 3)  # [T, k]
g_dup = torch.tensor([[1.0], [10.0]])  # [T, D=1] upstream gradient per token
contrib = (w_dup[..., None] * g_dup[:, None, :]).flatten(0, 1)  # [T*k, 1] one term per (t, k)

overwritten = torch.zeros(6, 1)
overwritten[idx_dup.flatten()] = contrib  # a scatter: colliding writes, one survives
summed = torch.zeros(6, 1).index_add_(0, idx_dup.flatten(), contrib)  # what the gradient is
print("row:           ", list(range(6)))
print("scatter (wrong):", overwritten.flatten().tolist())
print("sum (right):    ", summed.flatten().tolist())
assert summed[5].item() == 1 + 1 + 10 and overwritten[5].item() != summed[5].item()

# %% [markdown]
# The kernels offer two correct algorithms (`kernels.table_grad("atomic" | "sorted")`):
#
# * **atomic**: each token program does `tl.atomic_add(dV + row * D + d, contribution)` into an
#   fp32 buffer.  The hardware serialises colliding adds, so nothing is lost — but the *order* in
#   which they land changes from run to run on a GPU, and fp32 addition is not associative: the
#   last bits of dV differ between runs.
# * **sorted**: `torch.sort(indices, stable=True)` lists the (token, slot) pairs grouped by row,
#   `searchsorted` finds each row's segment, and **one program per block of rows** sums its
#   segments in that fixed order and writes each row once.  No atomics, a fixed summation order:
#   **bitwise reproducible**.  (`"auto"` picks it when `torch.use_deterministic_algorithms(True)`.)
#
# The sort turns "who writes row i?" into a contiguous segment per row:

# %%
rows_sorted, order = idx_dup.flatten().sort(stable=True)
print("pairs (t*k + slot) sorted by row:", order.tolist())
print("their rows:                      ", rows_sorted.tolist())
print("segment bounds (row r: [b[r], b[r+1])):", torch.searchsorted(rows_sorted, torch.arange(7)).tolist())

# %% [markdown]
# Both algorithms agree with autograd through the reference, and the sorted one is bitwise
# identical across runs (in the interpreter programs run one at a time, so atomics are
# reproducible too; on a GPU they are not):

# %%
def value_grads(algo, idx):
    leaves = [t.clone().requires_grad_() for t in (x_pre, pre_table, value_table, scores)]
    with kernels.table_grad(algo):
        out = kernels.peer_values(leaves[0], leaves[1], leaves[2], idx, leaves[3])  # [T, D_v]
        return torch.autograd.grad(out, leaves, torch.ones_like(out))


hot = torch.randint(0, 4, (T, m), device=DEV)  # [T, m]: only 4 rows, many collisions
leaves = [t.clone().requires_grad_() for t in (x_pre, pre_table, value_table, scores)]
ref = values.peer_values(leaves[0], leaves[1], leaves[2], hot, leaves[3])
want = torch.autograd.grad(ref, leaves, torch.ones_like(ref))
atomic, sorted_1, sorted_2 = value_grads("atomic", hot), value_grads("sorted", hot), value_grads("sorted", hot)
for a, s1, s2, r in zip(atomic, sorted_1, sorted_2, want):
    assert_close(a, r)
    assert_close(s1, r)
    assert torch.equal(s1, s2)
print("atomic and sorted gradients == autograd of umv2_ref; sorted run 1 == run 2 bitwise")

# %% [markdown]
# How common are collisions?  With T tokens each picking m of N rows uniformly, a row is read
# Tm/N times on average, and the hottest rows far more once routing is skewed.  The histogram
# shows the read counts per row for a batch of uniform picks:

# %%
counts = torch.bincount(torch.randint(0, 4096, (2048 * 8,)), minlength=4096)  # [N] reads per row
viz.slot_usage(counts, title="reads per row: T=2048 tokens x m=8 picks over N=4096 rows")
print(f"rows read by more than one pair: {(counts > 1).float().mean():.0%}")

# %% [markdown]
# ### Exercise 3 — the deterministic table gradient
#
# *Goal: turn "many programs add into the same row" into a fixed-order segment sum — sort, find the
# segments, sum them.*
#
# Write `sorted_table_grad(n_rows, idx, w, g)` returning
# $dV[i] = \sum_{(t,k):\, idx_{tk} = i} w_{tk}\, g_t$ as `[n_rows, D]`, the way
# `_scatter_sorted_kernel` does it: stable-sort the flattened indices, build the contributions in
# sorted order, find each row's segment with `torch.searchsorted`, sum each segment (rows with an
# empty segment get zeros).  The checker watches the tensor operations you use: it requires a stable
# sort and refuses atomic-style accumulation (`index_add_`, `scatter_add_`, `index_put_(...,
# accumulate=True)`), which is exactly what this algorithm avoids.
# Solution: `notebooks/solutions/nb07_sorted_table_grad.py`.

# %%
def sorted_table_grad(n_rows, idx, w, g):
    # idx, w [T, k]; g [T, D] -> dV [n_rows, D]
    raise NotImplementedError


check("nb07_sorted_table_grad", sorted_table_grad)

# %% [markdown]
# ## 5. The fused TDQKR top-m
#
# Retrieval (notebook 02) scores a k×k candidate grid per token, $\sum_c s_{row}[i]^\top C_c\,
# s_{col}[j]$, after the rank-1 prefilter picks k rows and k columns.  The PyTorch path writes that
# grid to memory (`[T, k*k]` floats: 1 GiB at T = 16384, k = 128) and runs `topk` on it.
# `kernels.tucker_topk` keeps the prefilter's two `torch.topk` calls and fuses the rest into one
# program per token:
#
# 1. gather the k candidate rows and columns (`[k, r]` each),
# 2. build the k×k grid in registers with $\sum_c C_c$ (r and c are compile-time constants),
# 3. pick the top m by **iterative argmax**: m rounds of "take the maximum, remember it, set it to
#    $-\infty$" — the winners come out sorted,
# 4. write the m slot ids and their per-core scores `[m, c]`.
#
# Its backward (to $s_{row}$, $s_{col}$ and the cores) touches only the m winners and is plain PyTorch.

# %%
s_row = torch.randn(2, 6, 23, 2, device=DEV, requires_grad=True)  # [B, S, n, r]: n = 23 keys per axis
s_col = torch.randn(2, 6, 23, 2, device=DEV, requires_grad=True)  # [B, S, n, r]
cores = torch.rand(2, 2, 2, device=DEV, requires_grad=True)  # [c, r, r]
got_scores, got_idx = kernels.tucker_topk(s_row, s_col, cores, 7, k=5)  # [B, S, 7, c], [B, S, 7]
want_scores, want_idx = retrieval.tucker_topk(s_row, s_col, cores, 7, k=5)
assert torch.equal(got_idx, want_idx)
assert_close(got_scores, want_scores)
g = torch.randn_like(got_scores)
for a, b in zip(torch.autograd.grad(got_scores, (s_row, s_col, cores), g),
                torch.autograd.grad(want_scores, (s_row, s_col, cores), g)):
    assert_close(a, b)
print("kernels.tucker_topk == umv2_ref.retrieval.tucker_topk: same slots, scores and gradients")

# %% [markdown]
# ## 6. Layers on the `"triton"` backend
#
# `import kernels` registered the three functions as the `"triton"` backend of
# `umv2_ref.backend`; a layer picks it with `backend="triton"` in its config (`"auto"` does so for
# CUDA inputs).  The same weights give the same output and gradients on either backend:

# %%
cfg = UltraMemV2Config(d_model=16, n_keys=8, d_key=8, rank=2, cores=2, topm=6, d_pre=10, d_value=12, backend="torch")
layer = UltraMemV2(cfg).to(DEV)
x = torch.randn(2, 5, 16, device=DEV)  # [B, S, d]
out_torch = layer(x).output  # [B, S, d]
grads_torch = torch.autograd.grad(out_torch.square().sum(), list(layer.parameters()))
cfg.backend = "triton"
out_triton = layer(x).output
grads_triton = torch.autograd.grad(out_triton.square().sum(), list(layer.parameters()))
assert_close(out_triton, out_torch)
for a, b in zip(grads_triton, grads_torch):
    assert_close(a, b, atol=1e-5, rtol=1e-4)
print("UltraMemV2 layer: triton backend == torch backend (output and all parameter gradients)")

# %% [markdown]
# ## 7. The benchmark
#
# `python -m kernels.bench` measures, on a GPU, forward and forward+backward time of each kernel
# against the PyTorch reference (and `F.embedding_bag`), the bytes each must move (section 1's
# model, `kernels.bench.lookup_bytes`) and the achieved fraction of the card's measured copy
# bandwidth.  With a GPU this cell runs a small live version; without one it shows the table
# recorded in `kernels/README.md`.

# %%
if torch.cuda.is_available():
    from kernels import bench

    sweep = bench.Sweep(T=(16384,), m=(32,), D=(256,), N=(2**20,), retrieval_dk=(192,), retrieval_km=(32,), reps=10)
    copy_gbs = bench.copy_bandwidth_gbs("cuda", sweep.reps)
    report = bench.markdown(bench.lookup_rows(sweep, "cuda", copy_gbs), bench.retrieval_rows(sweep, "cuda"),
                            copy_gbs, torch.cuda.get_device_name())
else:
    readme = (Path(kernels.__file__).parent / "README.md").read_text()
    report = readme[readme.index("### Benchmark results"):]
display(Markdown(report))

# %% [markdown]
# ### Exercise 4 — a roofline bound
#
# *Goal: bound a kernel's run time from below by its bytes and its FLOPs — the roofline model.*
#
# A kernel cannot finish faster than its memory traffic at full bandwidth allows, nor faster than
# its arithmetic at the peak FLOP rate; since loads and arithmetic overlap, the larger of the two is
# the lower bound.  Write `roofline_time(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s)`
# returning that bound in seconds for the fused `peer_values` forward: bytes as in
# `fused_forward_parts` (section 1; you may call it), FLOPs counted as 2 per multiply-add and 1 per
# lone multiply — count the pre-score dot products, the weights $a_i s_i^{(c)}$ and the pooling.
# Solution: `notebooks/solutions/nb07_roofline_time.py`.

# %%
def roofline_time(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s):
    raise NotImplementedError


check("nb07_roofline_time", roofline_time)

# %% [markdown]
# ## Summary
#
# * A memory-layer value read is a gather: bandwidth-bound, so **bytes moved** is its cost.  The
#   naive PyTorch version writes and re-reads every gathered row; the fused kernel reads each once
#   and writes only the output — about 3× less traffic.
# * A Triton kernel is a grid of programs over blocks; gathers are pointer arithmetic with loaded
#   indices; masks guard the tail block and padded columns.
# * The per-token gradients are owned by one program each.  The **table gradient** sums over all
#   pairs that read a row, so token programs collide: use **atomics** (fast, run-to-run order
#   varies) or **sort + segment sums** (deterministic, bitwise reproducible).
# * TDQKR's k×k candidate grid fits in registers; top-m by iterative argmax avoids writing it out.
# * Every kernel is checked against `umv2_ref` — in the interpreter on CPU here, compiled on a GPU
#   in `tests/test_kernels_gpu.py`.  Design notes and timings: `kernels/README.md`.
