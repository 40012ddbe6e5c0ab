# %% [markdown]
# # 01 · Product-key memory (PKM)
#
# *Lample et al., "Large Memory Layers with Product Keys", NeurIPS 2019, arXiv 1907.05242.*
#
# This is the first notebook of the memory-layer line
# PKM → PEER → Memory+ → UltraMem → **UltraMemV2**. Every later layer keeps PKM's central trick:
# a query is matched against a *huge* set of keys without scoring each key. Here we build that
# trick by hand, prove (by test) that it is exact, and train a small PKM to see which memory
# slots it actually uses.
#
# Conventions used in every notebook:
#
# * each mechanism is first written inline in plain `torch`, then checked against the reference
#   package `umv2_ref` with `torch.testing.assert_close`, so the notebook and the package cannot drift;
# * exercises are stubs that raise `NotImplementedError`, followed by `check("name", fn)`, which
#   tells you at once whether your function is right (solutions: `notebooks/solutions/`);
# * `SMOKE` (set by the test command) shrinks the training runs; the full run takes a few minutes on a laptop.

# %%
from umv2_ref.notebook import setup

SMOKE = setup()

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from ipywidgets import interact

from umv2_ref import viz
from umv2_ref.exercises import check
from umv2_ref.layers import PKM, PKMConfig
from umv2_ref.retrieval import dense_topk, product_key_topk
from umv2_ref.values import weighted_sum

# %% [markdown]
# ## 1. Why a memory layer?
#
# A dense feed-forward block touches **every** parameter for every token: doubling its parameters
# doubles its compute. A memory layer breaks that link. It owns a table of $N$ value vectors
# $V\in\mathbb R^{N\times D_v}$ and, per token, reads only the $k \ll N$ rows whose keys best match
# a query $q(x)$:
#
# $$\mathcal I = \mathrm{TopK}_k\big(\{q(x)^\top k_i\}_{i=1}^{N}\big),\qquad
#   w = \mathrm{softmax}\big((q(x)^\top k_i)_{i\in\mathcal I}\big),\qquad
#   m(x) = \sum_{i\in\mathcal I} w_i\, V[i]. \qquad\text{(PKM Sec. 3; docs/references.md §2.1)}$$
#
# Reading $k$ rows costs $k\,D_v$ multiply-adds whatever $N$ is, so $N$ can grow to millions of
# slots. The catch is the first step: **finding** the top-$k$ keys. Done naively it scores all
# $N$ keys — exactly the $O(N)$ compute we wanted to avoid.

# %% [markdown]
# ## 2. Brute force: score every key
#
# With $N$ keys of dimension $d_q$ the naive search is one matrix-vector product and a top-k.
# We time it for a growing $N$ to see the linear cost.

# %%
d_q, k = 64, 8
q = torch.randn(d_q)  # [d_q] one query


def brute_force_topk(q, keys, k):
    scores = keys @ q  # [N] one dot product per key: O(N d_q)
    return scores.topk(k)


sizes = [64**2, 128**2] if SMOKE else [64**2, 128**2, 256**2, 512**2]
for N in sizes:
    keys = torch.randn(N, d_q) / math.sqrt(d_q)  # [N, d_q]
    start = time.perf_counter()
    for _ in range(20):
        brute_force_topk(q, keys, k)
    print(f"N = {N:>7,}: {1e3 * (time.perf_counter() - start) / 20:6.2f} ms per query, {N * d_q:>11,} MACs")

# %% [markdown]
# ## 3. Product keys: $n^2$ keys from $2n$ sub-keys
#
# PKM (Sec. 3.2) never stores the $N$ keys. It keeps two sets of $n=\sqrt N$ **sub-keys**,
# $C=\{c_1..c_n\}$ and $C'=\{c'_1..c'_n\}$ with $c_i, c'_j\in\mathbb R^{d_q/2}$, and *defines* the
# key of slot $(i, j)$ as their concatenation $k_{ij}=[c_i; c'_j]$. Split the query the same way,
# $q=[q_1;q_2]$; then the score separates into a **row** part and a **column** part:
#
# $$q^\top k_{ij} = q_1^\top c_i + q_2^\top c'_j = s_{row}[i] + s_{col}[j],\qquad
#   s_{row}=Cq_1\in\mathbb R^n,\; s_{col}=C'q_2\in\mathbb R^n .$$
#
# Slot $(i,j)$ has the flat id $i\cdot n+j$ everywhere in `umv2_ref`. Let us check the
# separation on a small memory by building all $n^2$ keys explicitly.

# %%
n, d_q = 16, 32
sub_row = torch.randn(n, d_q // 2)  # [n, d_q/2]  C
sub_col = torch.randn(n, d_q // 2)  # [n, d_q/2]  C'
q = torch.randn(d_q)  # [d_q]
q1, q2 = q[: d_q // 2], q[d_q // 2 :]  # [d_q/2] each

full_keys = torch.cat(  # [n*n, d_q]: row i*n+j is [c_i ; c'_j]
    [sub_row[:, None, :].expand(n, n, -1), sub_col[None, :, :].expand(n, n, -1)], dim=-1
).reshape(n * n, d_q)
s_row, s_col = sub_row @ q1, sub_col @ q2  # [n], [n]
grid = s_row[:, None] + s_col[None, :]  # [n, n]: grid[i, j] = s_row[i] + s_col[j]

torch.testing.assert_close(full_keys @ q, grid.flatten())
print("n^2 =", n * n, "slot scores from", 2 * n, "sub-key scores")

# %% [markdown]
# ### The two-stage top-k
#
# Because the grid is a *sum* of a row term and a column term, the best slots must use good rows
# **and** good columns. PKM therefore
#
# 1. takes the top-$k$ rows $I_{row}=\mathrm{TopK}(s_{row})$ and the top-$k$ columns $I_{col}=\mathrm{TopK}(s_{col})$,
# 2. forms the $k\times k$ candidate pairs $I_{row}\times I_{col}$ and their scores $s_{row}[i]+s_{col}[j]$,
# 3. keeps the top-$k$ of those $k^2$ candidates.
#
# Cost: $O(n\,d_q + k^2)$ instead of $O(n^2 d_q)$ — for the paper's $N=512^2$, $k=32$ that is
# $512 + 1024$ scores instead of $262{,}144$. The whole layer as a diagram (shapes on the arrows; $d$ =
# model width, $d_q$ = query width, $D_v$ = value width):

# %%
fig = viz.product_key_diagram(n=8, k=3)
plt.show()

# %%
k = 5
top_r, idx_r = s_row.topk(k)  # [k] best rows
top_c, idx_c = s_col.topk(k)  # [k] best columns
cand = top_r[:, None] + top_c[None, :]  # [k, k] candidate scores
best, flat = cand.flatten().topk(k)  # [k] positions inside the k x k block
slots = idx_r[flat // k] * n + idx_c[flat % k]  # [k] back to slot ids i*n + j

ref_scores, ref_slots = product_key_topk(s_row, s_col, k)
torch.testing.assert_close(best, ref_scores)
torch.testing.assert_close(slots, ref_slots)
print("selected slots:", slots.tolist())

# %% [markdown]
# The picture: orange bars in the margins mark $I_{row}$ and $I_{col}$ (all other rows and columns are
# dimmed, so the $k\times k$ candidate block stays bright); the $k$ red squares — the true top-$k$ of
# the whole grid — all lie inside that block.

# %%
fig = viz.key_score_grid(grid, selected=slots, row_candidates=idx_r, col_candidates=idx_c,
                         title=f"additive grid, top-{k} (red) inside the {k}x{k} candidates")
plt.show()

# %% [markdown]
# ### Why it is exact
#
# Take any slot $(i, j)$ with $i\notin I_{row}$. Let $j^{\star}=\arg\max s_{col}$ (always in $I_{col}$).
# Every row $i'\in I_{row}$ has $s_{row}[i']\ge s_{row}[i]$, so the $k$ candidate slots
# $(i', j^{\star})$ all satisfy $s_{row}[i']+s_{col}[j^{\star}]\ge s_{row}[i]+s_{col}[j]$: the slot $(i,j)$
# is beaten by $k$ candidates and cannot be in the top-$k$. The same holds for $j\notin I_{col}$.
# Hence $\mathrm{TopK}(\text{grid}) \subseteq I_{row}\times I_{col}$. (With ties, several slot sets are
# equally correct; then only the *scores* are unique.)
#
# A proof deserves a test. We compare against the brute-force `dense_topk` on many random
# problems — continuous scores, so indices must agree — and on heavily tied integer scores,
# where the scores must agree.

# %%
trials = 200 if SMOKE else 5000
gen = torch.Generator().manual_seed(0)
for t in range(trials):
    n_t = int(torch.randint(2, 40, (), generator=gen))
    k_t = int(torch.randint(1, n_t + 1, (), generator=gen))
    a, b = torch.randn(3, n_t, generator=gen), torch.randn(3, n_t, generator=gen)  # 3 queries at once
    s_pk, i_pk = product_key_topk(a, b, k_t)
    s_bf, i_bf = dense_topk(a, b, k_t)
    assert torch.equal(i_pk, i_bf) and torch.allclose(s_pk, s_bf), (t, n_t, k_t)
    a_tied = torch.randint(0, 3, (3, n_t), generator=gen).float()  # many ties
    b_tied = torch.randint(0, 3, (3, n_t), generator=gen).float()
    assert torch.equal(product_key_topk(a_tied, b_tied, k_t)[0], dense_topk(a_tied, b_tied, k_t)[0])
print(f"product-key top-k == brute force on {trials} random and {trials} tied problems")

# %% [markdown]
# ### Exercise 1 — the two-stage top-k, batched
#
# *Goal: find the exact top-k of an n×n additive grid from a k×k candidate block, for a batch.*
#
# Write `my_product_key_topk(s_row, s_col, k)` for a batch of queries: `s_row`, `s_col` are
# `[B, n]`; return `(scores [B, k], slot_ids [B, k])`, scores descending and `slot_id = i * n + j`.
# **Do not build the n×n grid**: the checker watches the tensors your function allocates and refuses
# one with n² scores per query (and calls of `product_key_topk` / `dense_topk`).
# Hint: `topk`, broadcasting to a `[B, k, k]` block, `gather`. The checker names the common
# mistakes, for example pairing the $r$-th best row only with the $r$-th best column.

# %%
def my_product_key_topk(s_row, s_col, k):
    raise NotImplementedError  # your code here


check("nb01_product_key_topk", my_product_key_topk)

# %% [markdown]
# ### Exercise 2 — three sub-key sets
#
# *Goal: extend the exactness argument to three sub-key sets, $n^3$ slots.*
#
# Split the query in **three** parts and give each its own sub-key set: slot $(i, j, l)$ scores
# $s_1[i] + s_2[j] + s_3[l]$ and has the id $(i\cdot n + j)\cdot n + l$. Write
# `my_cube_topk(s1, s2, s3, k)` (each `[B, n]`) returning the exact top-k `(scores [B, k], ids [B, k])`.
# Decide first which candidates suffice (the proof above carries over), and again do not build a
# tensor with n² or more scores per query.

# %%
def my_cube_topk(s1, s2, s3, k):
    raise NotImplementedError  # your code here


check("nb01_cube_topk", my_cube_topk)

# %% [markdown]
# ### Try it: the candidate set as $k$ grows
#
# `show_product_keys` draws the grid of one random query. Move `k` and the seed: the red top-$k$
# never leaves the bright candidate block. Notice PKM's **topology bias** too: the runner-up always
# shares a row or a column with the winner (it is $(i_1, j_2)$ or $(i_2, j_1)$) — notebook 02 shows
# how UltraMem's Tucker grid removes it.

# %%
def show_product_keys(k=4, seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    _, sel = product_key_topk(a, b, k)
    fig = viz.key_score_grid(a[:, None] + b[None, :], selected=sel, row_candidates=a.topk(k).indices,
                             col_candidates=b.topk(k).indices, title=f"n = {n}, k = {k}")
    plt.show()
    return sel


sel = show_product_keys(k=4, seed=0)
(i1, j1), (i2, j2) = divmod(int(sel[0]), 16), divmod(int(sel[1]), 16)
assert i1 == i2 or j1 == j2  # the runner-up shares a row or a column with the winner

# %%
# NBVAL_IGNORE_OUTPUT
interact(show_product_keys, k=(1, 16), seed=(0, 20), n=(16, 48, 8));

# %% [markdown]
# ## 4. Multi-head PKM, by hand
#
# A PKM layer runs $H$ such searches in parallel (multi-head memory, docs/references.md §2.1): each head $h$ has its own query
# projection slice and its own two sub-key sets, selects its own $k$ slots, applies a softmax
# over its $k$ scores, and all heads read **the same** value table; their reads are summed:
#
# $$q(x)=\mathrm{BN}(W_q x+b_q)\in\mathbb R^{H d_q},\qquad
#   m(x)=\sum_{h=1}^{H}\sum_{i\in\mathcal I_h} \mathrm{softmax}(s^{(h)})_i\, V[i].$$
#
# Heads multiply the slots read per token ($H\cdot k$) at almost no cost. Below we rebuild the
# forward pass of `umv2_ref.layers.PKM` from its parameters and compare.

# %%
cfg = PKMConfig(d_model=32, n_keys=16, d_key=16, heads=4, topk=4, query_norm="batch")
layer = PKM(cfg)
x = torch.randn(64, cfg.d_model)  # [T, d] a batch of tokens
H, dk, n = cfg.heads, cfg.d_key, cfg.n_keys

ret = layer.retrieval
q = ret.query(x)  # [T, H*dk]  W_q x + b_q
q = F.batch_norm(q, None, None, ret.query_norm.weight, ret.query_norm.bias, training=True)  # batch statistics
q = q.view(-1, H, 2, dk // 2)  # [T, H, 2, dk/2] heads, then the two halves
s_row = torch.einsum("thd,hnd->thn", q[:, :, 0], ret.keys[:, 0])  # [T, H, n]
s_col = torch.einsum("thd,hnd->thn", q[:, :, 1], ret.keys[:, 1])  # [T, H, n]
scores, idx = product_key_topk(s_row, s_col, cfg.topk)  # [T, H, k] per head
w = scores.softmax(-1)  # [T, H, k] softmax over each head's k slots
out = (w[..., None] * layer.values[idx]).sum(dim=(1, 2))  # [T, d] sum over heads and slots

ref = layer(x)
torch.testing.assert_close(out, ref.output)
torch.testing.assert_close(idx.flatten(1), ref.indices)
torch.testing.assert_close(out, weighted_sum(layer.values, idx.flatten(1), w.flatten(1)))  # EmbeddingBag form
print("inline multi-head PKM == umv2_ref.layers.PKM; slots read per token:", ref.indices.shape[-1])

# %% [markdown]
# ## 5. Which slots get used? Query normalisation
#
# A slot whose key is never in anyone's top-$k$ is **dead**: it is never read, so its value never
# receives a gradient and its key never moves. PKM's evaluation code (docs/references.md §2.3) measures this with
# the access distribution $z_i = c_i/\sum_j c_j$ over a validation set ($c_i$ = how often slot $i$ was
# selected):
#
# $$\text{usage} = \frac{\#\{i: z_i>0\}}{N},\qquad
#   \mathrm{KL}(z\,\|\,\mathrm{uniform}) = \log N + \sum_i z_i\log z_i .$$
#
# KL is 0 for perfectly uniform access and $\log(1/f)$ when a fraction $f$ of the slots is used
# uniformly. A reference point for "dead" plots: with $A$ uniformly random accesses, expected usage
# is $1-(1-1/N)^A\approx 1-e^{-A/N}$ (docs/references.md §7.7).
#
# ### Exercise 3 — usage metrics
#
# *Goal: measure how much of a memory is used — the fraction of slots read and the KL of the access
# distribution to uniform.*
#
# Given selections `indices [T, k]` over `n_slots` slots, return `torch.stack([usage, kl])` in float64
# (with $0 \log 0 = 0$), without the package's `viz.usage_metrics`.

# %%
def my_usage_metrics(indices, n_slots):
    raise NotImplementedError  # your code here


check("nb01_usage_metrics", my_usage_metrics)

# %% [markdown]
# ### Exercise 4 — the usage of random reads
#
# *Goal: derive the baseline of every usage plot — what uniformly random reads would reach.*
#
# The formula above treats the $A$ accesses as independent. A PKM head, though, reads $k$
# **distinct** slots per token, and there are $H$ heads. Write `my_expected_usage(n_slots, tokens,
# heads, k)` (float64 tensors `[B]`, one configuration per entry) returning the expected fraction of
# the $N$ slots read at least once when each of the `tokens` × `heads` selections is $k$ distinct slots
# drawn uniformly at random.

# %%
def my_expected_usage(n_slots, tokens, heads, k):
    raise NotImplementedError  # your code here


check("nb01_expected_usage", my_expected_usage)

# %% [markdown]
# ### Why normalise queries?
#
# Real hidden states are **anisotropic**: they share a large common component (a mean offset)
# on top of the token-specific part. A linear query inherits it, $q = W_q(\mu + \varepsilon) =
# W_q\mu + W_q\varepsilon$, and when $\|W_q\mu\|$ dominates, every token's query points the same
# way and picks the same few slots. PKM puts a **BatchNorm** on the queries (docs/references.md §2.1):
# subtracting the batch mean removes $W_q\mu$ and rescaling spreads the queries over all keys;
# the paper credits it with higher usage and lower KL. Here we can watch the effect directly.
#
# We generate inputs $x=\mu+\varepsilon$ where $\varepsilon$ is one of `clusters` random centres
# plus a little noise and $\|\mu\| = $ `offset` $\cdot\sqrt d$, and count the slots a freshly
# initialised PKM reads with query BatchNorm, with a per-token LayerNorm, and with no normalisation.

# %%
D_MODEL, N_KEYS = 32, 16  # N = 256 slots


def make_task(offset, clusters=512, d=D_MODEL, seed=0):
    """Cluster centres [C, d], their regression targets [C, d] and the shared offset mu [d]."""
    g = torch.Generator().manual_seed(seed)
    centers, targets = torch.randn(clusters, d, generator=g), torch.randn(clusters, d, generator=g)
    mu = torch.randn(d, generator=g)
    return centers, targets, offset * math.sqrt(d) * mu / mu.norm()


def sample(task, batch, gen):
    centers, targets, mu = task
    c = torch.randint(0, len(centers), (batch,), generator=gen)  # [B] which cluster
    x = mu + centers[c] + 0.1 * torch.randn(batch, centers.shape[1], generator=gen)  # [B, d]
    return x, targets[c]  # the target is a lookup: one vector per cluster


def make_pkm(query_norm, seed=0):
    torch.manual_seed(seed)
    return PKM(PKMConfig(d_model=D_MODEL, n_keys=N_KEYS, d_key=32, heads=2, topk=4, query_norm=query_norm))


@torch.no_grad()
def slot_counts(layer, x):
    """Accesses per slot over a batch of inputs: [N]."""
    return torch.bincount(layer(x).indices.reshape(-1), minlength=layer.cfg.n_slots)


def usage_at_init(offset=3.0):
    x, _ = sample(make_task(offset), 4096, torch.Generator().manual_seed(2))
    curves = {f"query norm: {qn}": slot_counts(make_pkm(qn), x) for qn in ("batch", "layer", None)}
    fig = viz.sorted_usage(curves, title=f"usage at init, offset = {offset}")
    plt.show()
    return {label: viz.usage_metrics(c) for label, c in curves.items()}


init_usage = usage_at_init(3.0)
init_usage

# %%
assert init_usage["query norm: batch"]["fraction_used"] > 0.9
assert init_usage["query norm: None"]["fraction_used"] < 0.5
assert init_usage["query norm: layer"]["fraction_used"] < 0.5  # a per-token norm keeps the shared direction
for label, m in init_usage.items():
    print(f"{label:18}: used {100 * m['fraction_used']:5.1f}% | dead {m['dead']:3d} of {N_KEYS ** 2}")

# %% [markdown]
# **A caveat for language models.** BatchNorm normalises every query with the mean and variance of the
# whole batch — in a language model, of all positions of all sequences. During training the query of
# token $t$ then depends on the tokens that come *after* it: a causal model sees its future through the
# normalisation statistics (at evaluation the running statistics hide the leak, so it is easy to miss).
# The check below changes only the last token of a batch and watches the first token's query move.
# That is why the language models of notebooks 06 and 08 use a per-token **LayerNorm** on their
# queries. LayerNorm is causal-safe, but as the usage above shows, it does not remove a direction
# shared by all tokens: it centres each query over its own features, not over the batch. Here the
# inputs are independent points, not sequences, so BatchNorm is harmless and we keep it.

# %%
bn = torch.nn.BatchNorm1d(4)  # training mode: batch statistics
tokens = torch.randn(8, 4)  # [T, d] eight "positions" of one sequence
later_changed = tokens.clone()
later_changed[-1] += 5.0  # change only the LAST position
moved = (bn(tokens)[0] - bn(later_changed)[0]).abs().max().item()
ln = torch.nn.LayerNorm(4)
moved_ln = (ln(tokens)[0] - ln(later_changed)[0]).abs().max().item()
print(f"first position's normalised query moves by {moved:.3f} (BatchNorm) and {moved_ln:.3f} (LayerNorm)")
assert moved > 0.1 and moved_ln == 0.0

# %% [markdown]
# Slide the offset: at 0 the inputs are isotropic and all three layers use most slots; as the shared
# component grows, the layers without BatchNorm collapse onto a few slots while BatchNorm is unaffected.

# %%
# NBVAL_IGNORE_OUTPUT
interact(usage_at_init, offset=(0.0, 5.0, 0.5));

# %% [markdown]
# ## 6. Training a small PKM
#
# Usage at initialisation is only half the story: training moves the keys, and it can spread the
# reads out or concentrate them further. A dead slot's own key and value receive no gradient (they are
# never selected), but the query projection $W_q$ does, and as it moves, queries can land on dead keys
# and bring them back. Whether that happens is an empirical question; we measure it.
# We fit a PKM layer alone to the lookup task above — predict the cluster's target
# vector from $x$ — with the paper's recipe: Adam, values at a constant learning rate. The memory
# has $N=256$ slots and the task 512 clusters, so the layer has to share slots between clusters and
# benefits from using all of them.

# %%
steps = 60 if SMOKE else 1500
OFFSET = 3.0


def train_pkm(query_norm, steps, offset=OFFSET, batch=256):
    layer, task = make_pkm(query_norm), make_task(offset)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        x, y = sample(task, batch, gen)
        loss = F.mse_loss(layer(x).output, y)  # [B, d] vs [B, d]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    layer.eval()  # BatchNorm: use the running statistics from now on
    x_val, y_val = sample(task, 4096, torch.Generator().manual_seed(2))
    with torch.no_grad():
        val = F.mse_loss(layer(x_val).output, y_val).item()
    return layer, torch.tensor(losses), val, slot_counts(layer, x_val)


start = time.perf_counter()
runs = {qn: train_pkm(qn, steps) for qn in ("batch", None)}
print(f"trained 2 x {steps} steps in {time.perf_counter() - start:.1f} s")
for qn, (_, losses, val, counts) in runs.items():
    m = viz.usage_metrics(counts)
    dead_init = init_usage[f"query norm: {qn}"]["dead"]  # same init, same 4096 inputs, before training
    print(f"query norm {str(qn):5}: val MSE {val:.3f} | used {100 * m['fraction_used']:.1f}% | "
          f"KL {m['kl_uniform']:.3f} | dead {m['dead']} (at init: {dead_init})")

# %%
window = max(1, steps // 20)
smooth = {f"query norm: {qn}": F.avg_pool1d(r[1][None, None], window, 1)[0, 0] for qn, r in runs.items()}
fig = viz.line_plot(torch.arange(len(next(iter(smooth.values())))) + window, smooth, xlabel="step",
                    ylabel="train MSE", title=f"training loss (moving average over {window} steps)")
plt.show()

# %% [markdown]
# Where the reads land after training: the heatmap shows the $16\times16$ key grid (red = dead
# slot, a colour no live count takes), the histogram the spread of access counts.

# %%
for qn, (_, _, _, counts) in runs.items():
    viz.slot_usage(counts, title=f"query norm: {qn}")
    plt.show()

# %%
fig = viz.sorted_usage({f"query norm: {qn}": r[3] for qn, r in runs.items()}, title="usage after training")
plt.show()

# %%
after = {qn: viz.usage_metrics(r[3]) for qn, r in runs.items()}
assert after["batch"]["fraction_used"] > after[None]["fraction_used"]
assert after["batch"]["kl_uniform"] < after[None]["kl_uniform"]
dead_init = init_usage["query norm: None"]["dead"]
print(f"without query norm: {dead_init} dead slots at init, {after[None]['dead']} after {steps} steps "
      f"(net change {after[None]['dead'] - dead_init:+d}); with BatchNorm: {after['batch']['dead']} dead")
if not SMOKE:
    assert runs["batch"][2] < runs[None][2]  # and it fits the task better
    assert after[None]["dead"] < dead_init / 2  # most dead slots come back: the query projection moves

# %% [markdown]
# ## Summary
#
# * Product keys turn a search over $n^2$ keys into two searches over $n$ sub-keys plus a
#   $k\times k$ candidate block, and — because the grid score is **additive** — the result is
#   *exactly* the brute-force top-$k$.
# * Heads multiply the slots read per token; all heads share one value table.
# * A memory is only as large as the slots it uses. Query BatchNorm removes the shared component of
#   the inputs and keeps usage high from the first step; without it most slots start dead. Over the
#   full-size run (1500 steps) training brings most of them back — the query projection moves
#   although dead keys do not; a short run need not — but the layer still ends with fewer slots in use
#   and a less even spread than with BatchNorm (numbers printed above).
# * In a causal language model BatchNorm leaks future tokens through its batch statistics, so the
#   language models later in this course use a per-token LayerNorm, which keeps the leak out but
#   not the shared direction.
#
# Next, **02 · TDQKR**: UltraMem replaces the additive grid by a Tucker-decomposed bilinear one,
# which is more expressive but whose fast top-$m$ is no longer exact.
