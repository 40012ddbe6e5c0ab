# %% [markdown]
# # 03 · Value expansion: virtual memory, E projectors, and one shared projection
#
# *UltraMem: Huang et al., arXiv 2411.12364 (implicit value expansion, IVE; summarised as UltraMemV2 Eqs. 8–9);
# UltraMemV2: Huang, Bao, Min et al., arXiv 2508.18756 (Sec. 3.3, Eqs. 10–12; Sec. 3.4, Eq. 15).*
#
# Notebooks 01–02 chose **which** slots a token reads. This one is about **what** a slot holds. A
# memory's capacity is its number of slots, but every slot costs a stored value row. UltraMem's
# implicit value expansion makes the memory *look* $E$ times larger than the table it stores —
# $E\cdot N$ virtual slots over $N$ physical rows — by projecting the physical rows with $E$
# different matrices. UltraMemV2 then replaces the $E$ projectors by **one**. We build both,
# prove by computation that one shared projection is the same as summing the virtual blocks
# first, and count parameters and compute from the papers' formulas.

# %%
from umv2_ref.notebook import setup

SMOKE = setup()

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from ipywidgets import interact

from umv2_ref import costs, viz
from umv2_ref.exercises import check
from umv2_ref.layers import UltraMem, UltraMemConfig, UltraMemV2, UltraMemV2Config
from umv2_ref.values import expanded_lookup, peer_values, weighted_sum

# %% [markdown]
# ## 1. Virtual and physical memory
#
# UltraMem stores a **physical** table $V\in\mathbb R^{N\times D_v}$ and $E$ small projectors
# $W_p\in\mathbb R^{D_v\times D'}$ ($D'$ = model width $d$ here). Each projector defines a **virtual** table
#
# $$\tilde V_p = V\,W_p\in\mathbb R^{N\times D'},\qquad p=1..E,$$
#
# so there are $E\cdot N$ virtual value rows — $\tilde V_p[\text{row}] = V[\text{row}]\,W_p$ — and the
# retrieval grid of notebook 02 is made $E\cdot N$ slots large ($n^2 = E N$). A fixed random
# permutation $\pi$ (`shuffle`) maps virtual slot $v$ to block $p=\lfloor\pi(v)/N\rfloor$ and physical row
# $\pi(v)\bmod N$; shuffling stops the $E$ copies of one physical row from sitting next to each other
# on the grid (docs/references.md §5.7).
#
# The layer's output is a score-weighted sum of the selected virtual rows. Split the selected slots
# by block, with $\hat s_p$ the (sparse, length-$N$) vector of scores landing in block $p$:
#
# $$o = \sum_{p=1}^{E} \tilde V_p^\top \hat s_p = \sum_{p=1}^{E} W_p^\top\big(V^\top \hat s_p\big).
#   \qquad\text{(UltraMemV2 Eqs. 8–9)}$$
#
# The right-hand side is the trick: **retrieve first, expand after**. Pool the physical rows of each
# block ($m$ rows of width $D_v$), then apply $E$ small projections — the virtual tables are never built.
# In a picture, for a $4\times4$ grid over $N=4$ rows with $E=4$ (colour = block; shapes per token):

# %%
fig = viz.value_expansion_diagram(n=4, expand=4)
plt.show()

# %% [markdown]
# Now a real `UltraMem` layer (one core, so each slot has a single score): run its retrieval, and
# compute the output both ways.

# %%
torch.manual_seed(0)
cfg = UltraMemConfig(d_model=32, n_keys=16, d_key=16, rank=2, cores=1, topm=8, d_value=16, expand=4)
layer = UltraMem(cfg)
E, N, D_v, d = cfg.expand, cfg.n_rows, cfg.d_value, cfg.d_model
print(f"grid {cfg.n_keys}x{cfg.n_keys} = {cfg.n_keys ** 2} virtual slots over N = {N} physical rows, E = {E}")

x = torch.randn(6, d)  # [T, d]
with torch.no_grad():
    scores, virtual, _ = layer.retrieval(x)  # [T, m, 1], [T, m]
s = scores[..., 0]  # [T, m] one core -> one score per slot
W = layer.proj.weight.T.reshape(E, D_v, d)  # [E, D_v, d]: the Linear(E*D_v, d) is [W_1; ...; W_E]

# (a) materialised: build all E*N virtual rows, then read m of them
V_virtual = torch.einsum("nv,evd->end", layer.values, W).reshape(E * N, d)  # [E*N, d], row p*N + r = V[r] W_p
o_materialised = torch.einsum("tm,tmd->td", s, V_virtual[layer.shuffle[virtual]])  # [T, d]
torch.testing.assert_close(o_materialised, layer(x).output)
print("materialised virtual tables == umv2_ref UltraMem output")

# %% [markdown]
# ### Exercise 1 — implicit value expansion
#
# *Goal: read $E\cdot N$ virtual slots from $N$ stored rows — pool per block first, project each
# block after.*
#
# Write `my_implicit_expansion(table, virtual, scores, shuffle, proj)`: `table [N, D]`,
# `virtual`, `scores` `[T, m]`, `shuffle [E*N]`, one projector per block `proj [E, D, d_out]`.
# Return $o = \sum_p W_p^\top V^\top \hat s_p$, shape `[T, d_out]`, **without building the virtual
# tables**: the checker refuses any tensor with $N\times d_{out}$ entries (a projected table $V W_p$),
# and calls of `expanded_lookup`. It names the usual slips, for example splitting $\pi(v)$ into
# (row, block) the wrong way round.

# %%
def my_implicit_expansion(table, virtual, scores, shuffle, proj):
    raise NotImplementedError  # your code here


check("nb03_implicit_expansion", my_implicit_expansion)

# %% [markdown]
# The implicit way on the layer — pool the physical rows of each block, then project each block:

# %%
# (b) implicit: pool physical rows per block, then project each block
phys = layer.shuffle[virtual]  # [T, m]
block, row = phys // N, phys % N  # [T, m] each
z = torch.einsum("tme,tm,tmv->tev", F.one_hot(block, E).float(), s, layer.values[row])  # [T, E, D_v]
o_implicit = torch.einsum("tev,evd->td", z, W)  # [T, d]

torch.testing.assert_close(o_materialised, o_implicit)
torch.testing.assert_close(z, expanded_lookup(layer.values, virtual, scores, layer.shuffle, E))
torch.testing.assert_close(o_implicit, layer(x).output)
print("materialised == implicit == umv2_ref UltraMem output")

# %% [markdown]
# Where the shuffle sends the grid: each cell of the $16\times16$ grid coloured by its virtual
# block $p$ (one colour per block), with one token's $m$ selected slots outlined. Blocks are scattered
# uniformly — a token's $m$ slots fall into several blocks, each projected by its own $W_p$. The bars
# are blocks, not slots: the norm of each block's pooled vector $V^\top\hat s_p$ for that token.

# %%
block_map = (layer.shuffle // N).reshape(cfg.n_keys, cfg.n_keys)  # [n, n] block of every virtual slot
fig = viz.key_score_grid(block_map, selected=virtual[0], categories=E, category_label="block p",
                         title="virtual block of every grid slot; token 0's slots outlined")
plt.show()
print("blocks of token 0's slots:", block[0].tolist())
fig = viz.contribution_norms(z[0].norm(dim=-1), labels=[f"block {p}" for p in range(E)], xlabel="virtual block p",
                             title="token 0: norm of each block's pooled vector", ylabel=r"$\|V^\top \hat s_p\|$")
plt.show()

# %% [markdown]
# ### Multi-core scoring slices the values
#
# With $c>1$ Tucker cores (notebook 02) each selected slot carries $c$ scores, and core $c$ weights
# its own slice of the value row (UltraMem Eqs. 16–17). The expansion is unchanged — it acts on the
# pooled vector — so only the pooling step changes:

# %%
cfg2 = UltraMemConfig(d_model=32, n_keys=16, d_key=16, rank=2, cores=2, topm=8, d_value=16, expand=4)
layer2 = UltraMem(cfg2)
with torch.no_grad():
    sc, vi, _ = layer2.retrieval(x)  # [T, m, 2], [T, m]
ph = layer2.shuffle[vi]
rows_sliced = layer2.values[ph % N].unflatten(-1, (2, D_v // 2))  # [T, m, c, D_v/c]
z2 = torch.einsum("tme,tmc,tmcv->tecv", F.one_hot(ph // N, E).float(), sc, rows_sliced).flatten(-2)  # [T, E, D_v]
torch.testing.assert_close(layer2.proj(z2.flatten(-2)), layer2(x).output)
print("per-core slices: inline == UltraMem(cores=2)")

# %% [markdown]
# ## 2. The cost argument
#
# Per token and layer, with $m$ selected slots:
#
# | | stored parameters | multiply-adds per token |
# |---|---|---|
# | materialised virtual tables | $E N D'$ | $m D'$ |
# | implicit expansion (UltraMem) | $N D_v + E D_v D'$ | $m D_v + E D_v D'$ |
#
# The implicit form pays $E D_v D'$ dense multiply-adds per token — $E$ small projections, the same
# for every token — to avoid **storing** $E N D'$ parameters (and reading them: memory layers are
# bound by memory traffic, docs/references.md §5.1). UltraMem Table 3 reports $E=4$ costing +6.6 % FLOPs for
# −0.017 validation loss. Below, these formulas for one layer of UltraMem-227M's size (docs/references.md §7.8):
# $N=808^2$ physical rows, $E=4$ (a $1616\times1616$ grid of virtual slots), $D_v=384$, $d=768$, $m=32$.

# %%
def expansion_costs(E, N, D_v, d, m):
    """(stored params, MACs per token) of the value path: materialised vs implicit vs shared projection."""
    return {
        "materialised": (E * N * d, m * d),
        "implicit, E projectors": (N * D_v + E * D_v * d, m * D_v + E * D_v * d),
        "implicit, one shared projector": (N * D_v + D_v * d, m * D_v + D_v * d),
    }


Dv_big, d_big, m_big = 384, 768, 32
N_phys = 808**2  # physical rows; with E = 4 the grid has (2 * 808)^2 virtual slots
for name, (p, macs) in expansion_costs(4, N_phys, Dv_big, d_big, m_big).items():
    print(f"{name:32}: {costs.format_count(p):>7} params stored, {costs.format_count(macs):>6} MACs per token")

# %% [markdown]
# The notebook's arithmetic and the package's closed forms must agree. `umv2_ref.costs` counts
# the whole layer (queries, keys, cores, norms too) and its formulas are tested against
# `sum(p.numel())` of real modules; the value path is the part above.

# %%
# D_k = 128 is an assumed key width: it changes only the retrieval part, not the value path
uc = costs.ultramem_cost(d=d_big, n_keys=2 * 808, d_key=128, rank=2, cores=2, topm=m_big, d_value=Dv_big, expand=4)
ours = expansion_costs(4, N_phys, Dv_big, d_big, m_big)["implicit, E projectors"]
retr = costs.tucker_retrieval_cost(d_big, 2 * 808, 128, 2, 2, m_big, per_rank_queries=False)
assert uc.params == retr.params + ours[0]
assert uc.macs == retr.macs + ours[1]
assert costs.module_cost(layer).params == costs.count_params(layer)  # formula == the real small layer
print(f"one UltraMem layer: {costs.format_count(uc.params)} params, {costs.format_count(uc.macs)} MACs per token; "
      f"values {costs.format_count(N_phys * Dv_big)} (x 4 layers = {costs.format_count(4 * N_phys * Dv_big)}, "
      f"UltraMem-227M's sparse parameters, docs/references.md §7.8)")

# %%
def show_costs(E=4, m=32):
    Es = torch.arange(1, 17)
    table = [expansion_costs(int(e), N_phys, Dv_big, d_big, m) for e in Es]
    names = list(table[0])
    for key, ylabel, title in ((0, "parameters stored", "storage: materialising grows with E N D'"),
                               (1, "MACs per token", f"compute per token, m = {m}: implicit pays E D_v D'")):
        fig = viz.line_plot(Es, {nm: [t[nm][key] for t in table] for nm in names}, xlabel="expansion E",
                            ylabel=ylabel, title=title)
        ax = fig.axes[0]
        for line, style in zip(ax.lines, ("-", "--", ":")):  # the two implicit curves nearly coincide
            line.set_linestyle(style)
            line.set_linewidth(2.0)
        ax.axvline(E, color="grey", ls="-.", lw=1, label=f"E = {E} (slider)")
        if key == 0:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        plt.show()
    return expansion_costs(E, N_phys, Dv_big, d_big, m)


c4 = show_costs(4, 32)
assert c4["implicit, E projectors"][0] < c4["materialised"][0] / 3  # 4x the slots for ~1/4 of the storage

# %%
# NBVAL_IGNORE_OUTPUT
interact(show_costs, E=(1, 16), m=(8, 256, 8));

# %% [markdown]
# ## 3. UltraMemV2: one shared projection
#
# UltraMemV2 (Sec. 3.3) observes that IVE is already a multi-head mechanism and simplifies it: **one**
# projector $W$ for every virtual block (Eq. 12):
#
# $$o = \sum_p W^\top V^\top\hat s_p = W^\top V^\top\Big(\sum_p \hat s_p\Big) = W^\top V^\top \hat s .$$
#
# With a shared $W$ the blocks can be **summed before** the one projection — and $\sum_p \hat s_p$ is just
# the score vector over *physical* rows, so the whole read is an ordinary weighted sum of the rows
# $\pi(v)\bmod N$. The paper's motivation: per-block projectors need a scatter by block (a
# "non-computational operation") that slows inference, and the parameters saved are better spent in
# the FFN (Fig. 3: −0.0026 loss, +0.7 Open-Benchmark at 430M/5B).
#
# ### Exercise 2 — the shared projection
#
# *Goal: see that one shared projector lets the blocks be summed first.*
#
# Write `my_shared_projection(table, virtual, scores, shuffle, blocks, w)` returning
# $W^\top\sum_p V^\top\hat s_p$, `[T, d_out]`, using the identity above (without `weighted_sum` or
# `expanded_lookup`). The checker names the usual slips, for example averaging the blocks.

# %%
def my_shared_projection(table, virtual, scores, shuffle, blocks, w):
    raise NotImplementedError  # your code here


check("nb03_shared_projection", my_shared_projection)

# %% [markdown]
# Three ways to compute it, equal:

# %%
W_shared = torch.randn(D_v, d) / D_v**0.5  # [D_v, d] one projector
z = expanded_lookup(layer.values, virtual, scores, layer.shuffle, E)  # [T, E, D_v] per-block pools

o_per_block = torch.einsum("tev,vd->td", z, W_shared)  # sum_p W^T (V^T s_p): E projections, same W
o_sum_first = z.sum(1) @ W_shared  # W^T (sum_p V^T s_p): sum the blocks, project once
o_physical = weighted_sum(layer.values, layer.shuffle[virtual] % N, s) @ W_shared  # plain lookup of rows pi(v) % N
torch.testing.assert_close(o_per_block, o_sum_first)
torch.testing.assert_close(o_per_block, o_physical)
print("shared projection == sum the virtual blocks first == plain weighted sum over physical rows")

# %% [markdown]
# So in UltraMemV2 the "expansion" survives only as **addressing**: the grid has $n^2$ slots, each
# physical row is reachable from $E$ grid positions, and the values are read once. In the layer
# this is `key_expand` (the official `mem_key_expand_time`, docs/references.md §6.3): a grid of $n^2$ slots
# over $(n/\text{key\_expand})^2$ rows, i.e. $E=\text{key\_expand}^2$.
#
# ### Exercise 3 — physical rows read
#
# *Goal: with expansion as addressing, several grid slots of one token can land on one physical row.*
#
# Write `my_distinct_rows(virtual, shuffle, n_rows)`: `virtual [T, m]` holds each token's $m$ distinct
# grid slots; return `[T]` int64, the number of **different** physical rows they read. (Rows read
# twice are read once, and their weights add.)

# %%
def my_distinct_rows(virtual, shuffle, n_rows):
    raise NotImplementedError  # your code here


check("nb03_distinct_rows", my_distinct_rows)

# %% [markdown]
# ### The UltraMemV2 layer end to end
#
# UltraMemV2 also changes what a slot *holds* (Sec. 3.4, Eq. 15, notebook 04 in depth): besides its
# value row $V[i]$ each slot has a **pre-value** row $P[i]$, and its weight is the retrieval score
# times a pre-score $a_i=\langle P[i], W_{pre}x\rangle$ (no activation):
#
# $$o = W_v\sum_{i\in\mathcal I}\big(\langle P[i], W_{pre}x\rangle\, s_i\big)\,V[i].$$
#
# Inline, with `key_expand=2` ($E=4$ virtual positions per physical row) and 2 cores, against the layer:

# %%
torch.manual_seed(0)
cfg_v2 = UltraMemV2Config(d_model=32, n_keys=16, d_key=16, rank=2, cores=2, topm=8, d_pre=16, d_value=16,
                          key_expand=2, value_std=0.5)
v2 = UltraMemV2(cfg_v2)
print(f"grid {cfg_v2.n_keys ** 2} slots over {cfg_v2.window} physical rows")
x = torch.randn(24, cfg_v2.d_model)  # [T, d]
with torch.no_grad():
    sc, vi, _ = v2.retrieval(x)  # [T, m, c], [T, m]
    rows = v2.shuffle[vi] % cfg_v2.window  # [T, m] fold the virtual grid onto the physical rows
    x_pre = v2.pre_proj(x)  # [T, D_p]  W_pre x
    a = torch.einsum("tmp,tp->tm", v2.pre_values[rows], x_pre)  # [T, m] pre-scores, no activation
    w = a[..., None] * sc  # [T, m, c]
    vals = v2.values[rows].unflatten(-1, (cfg_v2.cores, -1))  # [T, m, c, D_v/c] core c weights slice c
    z_v2 = torch.einsum("tmc,tmcv->tcv", w, vals).flatten(-2)  # [T, D_v]
    o_v2 = v2.out_proj(z_v2)  # [T, d] the one shared projection W_v
    ref = v2(x)
torch.testing.assert_close(o_v2, ref.output)
torch.testing.assert_close(z_v2, peer_values(x_pre, v2.pre_values, v2.values, rows, sc))
print("inline UltraMemV2 == umv2_ref UltraMemV2")

# %% [markdown]
# Which physical rows fire for which token, and with what weight $a_i\,s_i$ (summed over cores): weights
# are signed — a pre-score can be negative, so a slot can *subtract* its value. And with `key_expand=2`
# each physical row is reachable from $E=4$ grid positions, so a row can fire for tokens whose grid
# slots differ; the cell below the plots counts how often that happens in this batch.

# %%
fig = viz.slot_activations(rows[:10], w[:10], cfg_v2.window,
                           title="first 10 tokens: weight a_i s_i of each physical row")
plt.show()
fig = viz.value_distributions({"pre-scores a_i": a, "retrieval scores s_i (summed over cores)": sc.sum(-1)},
                              title="what multiplies each value row", xlabel="value")
plt.show()

# %%
slots_of_row = {}  # physical row -> the distinct grid slots through which this batch read it
for v, r in zip(vi.flatten().tolist(), rows.flatten().tolist()):
    slots_of_row.setdefault(r, set()).add(v)
shared = {r: sorted(v) for r, v in slots_of_row.items() if len(v) > 1}
print(f"{len(shared)} of the {len(slots_of_row)} physical rows read by these {x.shape[0]} tokens were reached "
      f"from two or more different grid slots")
for r, vs in list(shared.items())[:3]:
    print(f"  row {r}: grid slots {vs}")
assert all(int(v2.shuffle[v]) % cfg_v2.window == r for r, vs in shared.items() for v in vs)  # same row, really

# %% [markdown]
# ## 4. Parameter and compute accounting (docs/references.md §7.8–7.9)
#
# Per token and layer (one head, per-rank queries, prefilter $k=m$):
#
# $$\text{MACs} = \underbrace{2rdD_k}_{\text{queries}} + \underbrace{2n D_k r}_{\text{key scores}}
#   + \underbrace{2nr}_{\text{rank-1}} + \underbrace{c\,(m r^2 + m^2 r)}_{\text{rescoring}}
#   + \underbrace{dD_p}_{W_{pre}} + \underbrace{m(D_p+D_v)}_{\text{pre-scores, pooling}} + \underbrace{D_v d}_{W_v}.$$
#
# For the README model of the official code ($d=768$, $r=2$, $D_k=192$, $n=1138$, $m=32$, $D_p=D_v=192$)
# docs/references.md §7.9 gives ≈1.78M MACs per token and layer, against 5.75M for its shrunk SwiGLU FFN.
#
# ### Exercise 4 — MACs per token, any prefilter width
#
# *Goal: count an UltraMemV2 layer's compute per token term by term.*
#
# The formula above assumes the official prefilter width $k = m$. Write
# `my_v2_macs(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k)` returning the integer count for
# **any** number $k$ of candidates per axis (notebook 02: the $k\times k$ candidates are rescored with
# every core). Use no function of `umv2_ref.costs`.

# %%
def my_v2_macs(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k):
    raise NotImplementedError  # your code here


check("nb03_v2_macs", my_v2_macs)

# %% [markdown]
# The count for the README model ($k = m$), against the package:

# %%
d_, r_, Dk_, n_, c_, m_, Dp_, Dv_ = 768, 2, 192, 1138, 2, 32, 192, 192
macs_inline = (2 * r_ * d_ * Dk_ + 2 * n_ * Dk_ * r_ + 2 * n_ * r_ + c_ * (m_ * r_**2 + m_**2 * r_)
               + d_ * Dp_ + m_ * (Dp_ + Dv_) + Dv_ * d_)
v2_cost = costs.ultramemv2_cost(d_, n_, Dk_, r_, c_, m_, Dp_, Dv_)
assert macs_inline == v2_cost.macs
assert abs(macs_inline / 1.78e6 - 1) < 0.01
swiglu = 3 * 768 * 2496  # the README model's shrunk SwiGLU FFN
print(f"UltraMemV2 README layer: {costs.format_count(macs_inline)} MACs/token (SwiGLU FFN {costs.format_count(swiglu)}), "
      f"{m_ * (Dp_ + Dv_):,} value parameters read per token")

# sparse parameters of the papers' models (docs/references.md §7.8)
sparse = {"UltraMem-227M: 4 x 808^2 x 384": 4 * 808**2 * 384,
          "UltraMemV2-227M: 20 x 360^2 x (192 + 192)": 20 * 360**2 * (192 + 192),
          "UltraMemV2-1B/7B: 16 x 528^2 x (768 + 384)": 16 * 528**2 * (768 + 384)}
for name, p in sparse.items():
    print(f"{name:45} = {costs.format_count(p)}")
# the PEER ablation (UltraMemV2 Sec. 4.2.1) compares equal value reads and equal parameters:
assert 48 * 288 == 24 * (288 + 288)
assert abs(789**2 * 288 / (558**2 * 576) - 1) < 0.01

# %% [markdown]
# And the formulas count the real module: parameters of a built UltraMemV2 layer.

# %%
assert costs.module_cost(v2).params == costs.count_params(v2)
print(f"small layer: {costs.count_params(v2):,} parameters, {costs.module_cost(v2).macs:,} MACs per token")

# %% [markdown]
# ## Summary
#
# * IVE gives $E N$ virtual slots over $N$ stored rows: pool the physical rows per block, then apply
#   $E$ projections — "retrieve first, expand after" — for $E D_v D'$ dense MACs instead of $E N D'$
#   stored parameters.
# * With one shared projector (UltraMemV2 Eq. 12) the blocks sum before projecting; the read becomes a
#   plain weighted sum over physical rows, and expansion is only an addressing choice (`key_expand`).
# * UltraMemV2's slot weight is $\langle P[i], W_{pre}x\rangle\,s_i$; its cost per token is dominated by the
#   queries and the key scores, not by the values it reads.
#
# Next, **04**: the PEER-style values in depth.
