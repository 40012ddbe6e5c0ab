# %% [markdown]
# # 04 — What a slot *returns*: PEER experts and UltraMemV2's "FFN values"
#
# Notebooks 01–03 answered *which* slots a token reads: product keys, Tucker-decomposed retrieval
# and value expansion all end with two tensors per token, the chosen slot ids `indices [T, m]` and
# their retrieval scores `scores [T, m]` (or `[T, m, c]` with several Tucker cores).  This notebook
# is about what happens next, i.e. what a slot *contributes* once it is chosen.
#
# 1. **PKM** reads a constant vector per slot.  **PEER** (He 2024, arXiv 2407.04153) turns every slot
#    into a one-neuron MLP, $e_i(x) = \sigma(u_i^\top x)\,v_i$.
# 2. **UltraMemV2** (arXiv 2508.18756, §3.4, Eqs. 13–15) keeps PEER's two vectors per slot
#    (a *pre-value* and a *value*) but **drops the activation**, arguing that top-m selection already
#    plays the role of SwiGLU's gate.
# 3. **Multi-core scoring**: with $c$ Tucker cores every slot gets $c$ scores, and score $c$ weights
#    *channel slice* $c$ of the value row.
# 4. We then look at the value activations of a layer: which slots fire for which inputs, how the
#    pre-scores are distributed and how much each selected slot adds to the output.
#
# Every mechanism is first written inline in plain torch and then asserted equal to `umv2_ref`, the
# package the later notebooks and the Triton kernels use, so this notebook and the package cannot drift.
# Shapes: `T` tokens, `d` model width, `N` slots, `m` (or `k`) slots read per token.

# %%
from umv2_ref.notebook import setup

SMOKE = setup()

# %%
import torch
import torch.nn.functional as F
from ipywidgets import interact
from torch.testing import assert_close

from umv2_ref import PEER, PKMConfig, UltraMemV2, UltraMemV2Config, values, viz
from umv2_ref.exercises import check
from umv2_ref.retrieval import tucker_topk

# %% [markdown]
# ## 1. From constant values to single-neuron experts (PEER)
#
# A PKM layer (notebook 01) returns $m(x) = \sum_{i \in I(x)} g_i\, V[i]$: slot $i$ holds a
# constant vector, and the input only decides *whether* it is read ($i \in I(x)$) and *how much*
# ($g_i$, the softmax of the retrieval scores).  Two different inputs that pick the same slot get
# the same vector, up to scale.
#
# PEER makes each slot a tiny expert with a *down* vector $u_i$ and an *up* vector $v_i$, i.e. an MLP
# with a single hidden neuron (docs/references.md §3.1):
#
# $$e_i(x) = \sigma(u_i^\top x)\, v_i, \qquad f(x) = \sum_{h=1}^{H} \sum_{i \in I^h(x)} g^h_i(x)\, \sigma(u_i^\top x)\, v_i ,$$
#
# with $\sigma$ = GELU and $g$ the router's softmax weights.  Now a slot's contribution depends on
# the input *twice*: through the router (which slots, how much) and through the neuron's
# pre-activation $u_i^\top x$, which can even flip the sign of $v_i$.  PKM is the special case
# $\sigma(u_i^\top x) \equiv 1$.

# %% [markdown]
# ### Exercise 1 — PEER's output
#
# *Goal: write PEER's value path — each selected slot is a one-neuron MLP $\mathrm{gelu}(u_i^\top x)\,v_i$,
# weighted by the router.*
#
# Given `x [T, d]`, expert tables `u, v [N, d]`, selected experts `idx [T, k]` and router weights
# `g [T, k]`, return $\sum_i g_i\,\mathrm{gelu}(u_i^\top x)\,v_i$, shape `[T, d]`, without
# `values.peer_values`. The checker compares with the reference on random inputs and names the usual
# slips (forgetting the activation, applying it *after* the router weight, ...).
# Solution: `notebooks/solutions/nb04_peer_expert.py`.

# %%
def peer_expert(x, u, v, idx, g):
    # x [T, d]; u, v [N, d]; idx, g [T, k]  ->  [T, d]
    raise NotImplementedError


check("nb04_peer_expert", peer_expert)

# %% [markdown]
# Made-up retrieval results for the demonstrations below: random indices and softmax weights stand in
# for the product-key search of notebook 01.

# %%
T, d, N, k = 6, 8, 64, 4
x = torch.randn(T, d)  # [T, d] token inputs
U = torch.randn(N, d) / d**0.5  # [N, d] down vectors u_i
V = torch.randn(N, d) / d**0.5  # [N, d] up vectors v_i
idx = torch.randint(0, N, (T, k))  # [T, k] "retrieved" experts
g = torch.randn(T, k).softmax(-1)  # [T, k] router weights
f = values.peer_values(x, U, V, idx, g, activation="gelu")  # [T, d] PEER's value path
print("PEER output:", tuple(f.shape))

# %% [markdown]
# **PEER is a dynamically assembled MLP.**  PEER's paper describes the multi-head layer as
# assembling, per token, an MLP with $H\cdot k$ hidden neurons out of a shared pool of $N$ neurons.
# The cleanest way to see it: if a token "selected" all $N$ experts with weight 1, the layer would
# be exactly a dense GELU MLP $V^\top \mathrm{gelu}(U x)$ with $N$ hidden units.  Retrieval keeps only
# $k \ll N$ of them, chosen per token, so the compute per token is that of a $k$-neuron MLP while the
# parameters are those of an $N$-neuron one.

# %%
every_slot = torch.arange(N).expand(T, N)  # [T, N] select everything
dense_mlp = F.gelu(x @ U.T) @ V  # [T, N] -> [T, d]
assert_close(values.peer_values(x, U, V, every_slot, torch.ones(T, N), activation="gelu"), dense_mlp)
print("PEER with all N experts selected and g = 1 is a dense GELU MLP with N hidden units")

# %% [markdown]
# The same computation inside the actual `umv2_ref.PEER` layer: product-key retrieval with $H$
# heads (notebook 01) returns softmax weights and slot ids for all heads flattened to `[T, H*k]`;
# the expert tables are the parameters `pre_values` ($u$) and `values` ($v$).  We use `eval()` so the
# query BatchNorm uses its running statistics and two calls see the same normalisation.

# %%
peer_cfg = PKMConfig(d_model=16, n_keys=8, d_key=8, heads=2, topk=4)  # N = 64 experts, 2 heads x 4
peer = PEER(peer_cfg).eval()
xp = torch.randn(T, 16)  # [T, d]
with torch.no_grad():
    w_peer, idx_peer = peer.retrieval(xp)  # [T, H*k] each
    a_peer = torch.einsum("tkd,td->tk", peer.pre_values[idx_peer], xp)  # [T, H*k]
    f_peer = torch.einsum("tk,tkd->td", w_peer * F.gelu(a_peer), peer.values[idx_peer])  # [T, d]
    assert_close(f_peer, peer(xp).output)
print("inline PEER == umv2_ref.PEER;", "slots per token:", idx_peer.shape[-1])

# %% [markdown]
# ### Exercise 2 — several heads, one softmax each
#
# *Goal: route PEER with $H$ heads — a softmax per head over its own $k$ scores, all heads summed.*
#
# `peer.retrieval` hands back weights that are already normalised. Start one step earlier: given
# `x [T, d]`, `u, v [N, d]`, each head's selected experts `idx [T, H, k]` and their **raw** retrieval
# scores `scores [T, H, k]`, return PEER's output `[T, d]` (the formula at the top of this section,
# with $g^h$ the router's softmax).

# %%
def peer_multihead(x, u, v, idx, scores):
    # x [T, d]; u, v [N, d]; idx, scores [T, H, k]  ->  [T, d]
    raise NotImplementedError


check("nb04_peer_multihead", peer_multihead)

# %% [markdown]
# ## 2. UltraMemV2: FFN values without an activation (Eqs. 13–15)
#
# UltraMemV2 adopts PEER's idea with three changes (§3.4; docs/references.md §6.4):
#
# * the input is first projected to a small width, $\tilde x = W_{pre}\,\bar x \in \mathbb R^{D_p}$, and
#   each slot holds a **pre-value** $P[i] \in \mathbb R^{D_p}$ (PEER's $u_i$) and a **value**
#   $V[i] \in \mathbb R^{D_v}$ (PEER's $v_i$), followed by one shared output projection $W$;
# * the retrieval scores $\hat s$ are raw Tucker scores (no softmax);
# * the activation on the pre-score is **removed**.
#
# The paper motivates the last point by putting the PEER form next to a SwiGLU FFN (Eqs. 13–14):
#
# $$\underbrace{o = W^\top V^\top\big(\sigma(P\tilde x) \otimes \hat s\big)}_{\text{PEER form}}
# \qquad\text{vs.}\qquad
# \underbrace{o = W_3^\top\big(W_2 x \otimes \sigma(W_1 x)\big)}_{\text{SwiGLU}} .$$
#
# Matching terms: $V \leftrightarrow W_3$ (the down projection's rows), $P\tilde x \leftrightarrow W_2 x$
# (the linear "up" branch) and $\hat s \leftrightarrow \sigma(W_1 x)$ (the gate).  In SwiGLU only the
# gate branch is non-linear; the PEER form puts a non-linearity on *both* branches: $\sigma$ on the
# pre-scores, and top-m selection, which is itself a (hard, sparse) non-linearity of the scores.
# "Applying the activation to two parallel results simultaneously is lossy", so UltraMemV2 keeps the
# linear branch linear:
#
# $$\boxed{\,o = W^\top V^\top\big((P\tilde x) \otimes \hat s\big)\,} \qquad (\text{Eq. 15})$$
#
# Per token and selected slot $i$: pre-score $a_i = \langle P[i], \tilde x\rangle$, weight
# $w_i = a_i\,\hat s_i$, pooled $z = \sum_i w_i V[i] \in \mathbb R^{D_v}$, output $o = W_v z$.
#
# The analogy is exact, not just suggestive: a "memory" that selects **all** $N$ slots, with
# $P = W_2$, $V = W_3^\top$, $\tilde x = x$ and scores $\hat s = \mathrm{silu}(W_1 x)$, *is* a SwiGLU
# with inner width $N$.  UltraMemV2 is therefore a SwiGLU whose inner width is huge and whose gate is
# replaced by "the top-m retrieval scores, zero elsewhere".

# %%
d_ff = 32
W1, W2, W3 = torch.randn(d_ff, d) / d**0.5, torch.randn(d_ff, d) / d**0.5, torch.randn(d, d_ff) / d_ff**0.5
swiglu = (F.silu(x @ W1.T) * (x @ W2.T)) @ W3.T  # [T, d]

gate = F.silu(x @ W1.T)  # [T, d_ff] plays the retrieval scores s_i
as_memory = values.peer_values(x, W2, W3.T.contiguous(), torch.arange(d_ff).expand(T, d_ff), gate)  # no activation
assert_close(as_memory, swiglu)
print("Eq. 15 with every slot selected and s = silu(W1 x) reproduces SwiGLU exactly")

# %% [markdown]
# Now the real layer.  `umv2_ref.UltraMemV2` with a single Tucker core ($c = 1$) gives one score per
# slot, so Eq. 15 applies as written.  The layer maps *virtual* grid slots to *physical* table rows
# (`physical_rows`, the shuffle of notebook 03); the value path only ever sees physical rows.

# %%
cfg1 = UltraMemV2Config(d_model=32, n_keys=8, d_key=16, rank=2, cores=1, topm=6, d_pre=8, d_value=16)
mem1 = UltraMemV2(cfg1)
xm = F.rms_norm(torch.randn(T, 32), (32,))  # [T, d] memory input (a normalised hidden state)

with torch.no_grad():
    s1, virtual1, _ = mem1.retrieval(xm)  # [T, m, 1] scores, [T, m] virtual slot ids
    rows1 = mem1.physical_rows(virtual1)  # [T, m] physical table rows
    x_pre = xm @ mem1.pre_proj.weight.T  # [T, D_p]   x~ = W_pre x
    a1 = torch.einsum("tmp,tp->tm", mem1.pre_values[rows1], x_pre)  # [T, m] pre-scores, no activation
    w1 = a1 * s1[..., 0]  # [T, m]    w_i = a_i * s_i
    z1 = torch.einsum("tm,tmv->tv", w1, mem1.values[rows1])  # [T, D_v]
    o1 = z1 @ mem1.out_proj.weight.T  # [T, d]
    assert_close(o1, mem1(xm).output)
print("inline Eq. 15 == umv2_ref.UltraMemV2 (c = 1):", tuple(o1.shape))

# %% [markdown]
# Two consequences worth keeping in mind:
#
# * **A slot can add or subtract its value.**  Retrieval scores of the selected slots are mostly
#   positive (they are the top of the grid), but the pre-score $a_i$ is a signed linear function of
#   the input.  The same slot adds $+|a_i s_i| V[i]$ for one token and $-|a_i s_i| V[i]$ for another.
# * **Per token, Eq. 15 is linear in $\tilde x$** once the slots and scores are fixed.  All the
#   non-linearity of the layer lives in the retrieval: which slots win and their scores.
#
# Where the layer sits: in every transformer block, next to a shrunk FFN and reading the same
# normalised input (notebook 06 trains this).  Shapes for a batch of $T$ tokens:

# %%
import matplotlib.pyplot as plt

fig = viz.ultramemv2_block_diagram()
plt.show()

# %% [markdown]
# ## 3. Multi-core scoring: one score per core, one channel slice per core
#
# With $c$ Tucker cores (UltraMem's multi-core scoring, docs/references.md §5.6), TDQKR produces one grid
# per core, $G_c[i,j] = S_{row}[i]^\top C_c\, S_{col}[j]$.  The **ranking** uses the sum over cores, but
# the **pooling** does not collapse them: the value row is split into $c$ contiguous slices of
# width $D_v/c$, and core $c$'s score weights slice $c$:
#
# $$z[\text{slice}_c] = \sum_{i} a_i\, \hat s^{(c)}_i\; V[i, \text{slice}_c], \qquad
# V[i] = \big[V[i,\text{slice}_1];\dots;V[i,\text{slice}_c]\big].$$
#
# So `scores` has shape `[T, m, c]`.  UltraMemV2's paper does not mention it, but the released code
# keeps two cores and this slicing (docs/references.md §8 item 4).  Each core's score then controls its own part
# of every value row, at no extra lookup cost: the same $m$ rows are read either way.
#
# Written with an explicit loop over cores:

# %%
cfg2 = UltraMemV2Config(d_model=32, n_keys=8, d_key=16, rank=2, cores=2, topm=6, d_pre=8, d_value=16)
mem2 = UltraMemV2(cfg2)
with torch.no_grad():
    s2, virtual2, _ = mem2.retrieval(xm)  # [T, m, c]
    rows2 = mem2.physical_rows(virtual2)  # [T, m]
    a2 = torch.einsum("tmp,tp->tm", mem2.pre_values[rows2], mem2.pre_proj(xm))  # [T, m]
    width = cfg2.d_value // cfg2.cores  # channels per core
    slices = []
    for c in range(cfg2.cores):
        v_c = mem2.values[rows2][..., c * width:(c + 1) * width]  # [T, m, D_v/c] slice c of each row
        slices.append(torch.einsum("tm,tmv->tv", a2 * s2[..., c], v_c))  # [T, D_v/c]
    z2 = torch.cat(slices, dim=-1)  # [T, D_v]
    assert_close(z2, values.peer_values(mem2.pre_proj(xm), mem2.pre_values, mem2.values, rows2, s2))
    assert_close(z2 @ mem2.out_proj.weight.T, mem2(xm).output)
print("scores", tuple(s2.shape), "-> pooled", tuple(z2.shape), "; inline multi-core pooling == umv2_ref")

# %% [markdown]
# If all cores gave the same score, slicing would change nothing: the multi-core rule reduces to
# single-core pooling with that score.  A quick check of this sanity property:

# %%
same = s2[..., :1].expand_as(s2)  # [T, m, c] every core gives core 1's score
with torch.no_grad():
    multi = values.peer_values(mem2.pre_proj(xm), mem2.pre_values, mem2.values, rows2, same)
    single = values.peer_values(mem2.pre_proj(xm), mem2.pre_values, mem2.values, rows2, same[..., 0])
assert_close(multi, single)

# %% [markdown]
# ### Exercise 3 — multi-core FFN values, without a loop
#
# *Goal: pool UltraMemV2's values with per-core channel slices for any number of cores, in vectorised
# tensor code.*
#
# Implement the pooled vector $z$ of Eq. 15 with per-core channel slices **without a Python loop over
# the cores** (hint: `unflatten` the value rows to `[T, m, c, D_v/c]`).  Arguments: `x_pre [T, D_p]`,
# `pre_table [N, D_p]`, `table [N, D_v]`, `indices [T, m]`, `scores [T, m, c]`; return `z [T, D_v]`.
# The checker runs c = 2, 3, 4 and 8 and counts the tensor operations your function performs: a loop
# over the cores shows up as more operations for more cores. It also refuses `values.peer_values`.

# %%
def multicore_values(x_pre, pre_table, table, indices, scores):
    # x_pre [T, D_p]; pre_table [N, D_p]; table [N, D_v]; indices [T, m]; scores [T, m, c] -> [T, D_v]
    raise NotImplementedError


check("nb04_multicore_values", multicore_values)

# %% [markdown]
# ## 4. Looking at value activations
#
# A slightly larger layer ($N = 256$ slots, $m = 8$, two cores) and inputs with structure: four
# "topics" (random centres), eight noisy tokens around each.  Tokens of the same topic should read
# overlapping sets of slots; tokens of different topics should not.  The layer is untrained, so
# everything below is what the *initialisation* and the retrieval geometry produce.

# %%
cfg = UltraMemV2Config(d_model=64, n_keys=16, d_key=32, rank=2, cores=2, topm=8, d_pre=16, d_value=32)
mem = UltraMemV2(cfg)
topics, per_topic = 4, 8
centres = torch.randn(topics, cfg.d_model)  # [4, d]
tokens = centres[:, None] + 0.5 * torch.randn(topics, per_topic, cfg.d_model)  # [4, 8, d]
xs = F.rms_norm(tokens.reshape(-1, cfg.d_model), (cfg.d_model,))  # [32, d], sorted by topic
topic_of = torch.arange(topics).repeat_interleave(per_topic)  # [32]

with torch.no_grad():
    out = mem(xs)
    rows, scores = out.indices, out.scores  # [32, m], [32, m, c]
    x_pre = mem.pre_proj(xs)  # [32, D_p]
    pre = torch.einsum("tmp,tp->tm", mem.pre_values[rows], x_pre)  # [32, m] pre-scores a_i
    weights = pre[..., None] * scores  # [32, m, c] w_i per core

# %% [markdown]
# **Which slots fire for which inputs.**  Rows are tokens (grouped by topic, 8 per topic, separated by
# lines), columns the slots any token selected, in the order in which tokens first read them; colour is
# the weight $w_i = a_i \hat s_i$ (summed over cores).  Note the block structure: each topic has its own
# few columns (the overlap printed below the plot puts a number on it).  Within one topic a shared slot mostly keeps
# its sign (similar inputs give similar pre-scores $a_i$), but its sign is not a property of the slot:
# a slot read by two topics can be added by one and subtracted by the other.

# %%
fig = viz.slot_activations(rows, weights, n_slots=cfg.window, groups=topic_of, order="first_use",
                           title="weights w_i = a_i s_i (tokens grouped by topic)")

# %%
sets = [set(r.tolist()) for r in rows]
pairs = [(i, j) for i in range(len(sets)) for j in range(len(sets)) if i < j]


def mean_overlap(same_topic):
    """Mean fraction of shared slots over token pairs from the same (or different) topics."""
    chosen = [(i, j) for i, j in pairs if bool(topic_of[i] == topic_of[j]) == same_topic]
    return sum(len(sets[i] & sets[j]) / cfg.topm for i, j in chosen) / len(chosen)


within, across = mean_overlap(True), mean_overlap(False)
print(f"mean fraction of shared slots: same topic {within:.2f}, different topics {across:.2f}")
assert within > 3 * across, "tokens of one topic should share far more slots than tokens of different topics"

# %% [markdown]
# **Pre-score distributions.**  The retrieval scores of the selected slots are positive (they are
# the top of the grid).  Their mean is not 1 here (printed below, and in the legend): this layer keeps the
# released code's constant query/key norm gain $D_k^{-0.4}$, and notebook 05 shows how to *calibrate*
# that gain so that the mean becomes 1, as the paper's initialisation assumes.  The pre-scores $a_i$
# live on a much smaller scale and are symmetric around 0, so about half of the selected slots
# *subtract* their value; the weight $w_i$ inherits the sign of $a_i$.  GELU applied to the same
# pre-scores (the PEER form) would be almost linear here, $\mathrm{gelu}(a) \approx a/2$ for small
# $|a|$, which is one more reason the activation buys little at this point of the network.  How large
# these numbers are is set entirely by the initialisation; notebook 05 derives them.

# %%
fig = viz.value_distributions({"retrieval score s (sum of cores)": scores.sum(-1)},
                              title="retrieval scores of the selected slots", xlabel="score")
fig = viz.value_distributions(
    {"pre-score a": pre, "weight w = a s": weights.sum(-1), "gelu(a) (PEER form)": F.gelu(pre)},
    title="pre-scores and weights of the selected slots", xlabel="value")
frac_negative = (pre < 0).float().mean().item()
print(f"mean retrieval score of the selected slots: {scores.sum(-1).mean().item():.2f} "
      f"(uncalibrated norm gain D_k^-0.4 = {cfg.d_key ** -0.4:.3f}; notebook 05 tunes it to make this 1)")
print(f"fraction of selected slots with a negative pre-score: {frac_negative:.2f}")
assert 0.3 < frac_negative < 0.7 and bool((scores.sum(-1) > 0).all())

# %% [markdown]
# **Per-slot contribution norms.**  How much does each selected slot add to the pooled vector
# $z$?  Slot $i$ contributes the vector $[\,a_i \hat s^{(1)}_i V[i,\text{slice}_1]; \dots; a_i \hat s^{(c)}_i V[i,\text{slice}_c]\,]$;
# its norm is the contribution norm.
#
# ### Exercise 4 — contribution norms
#
# *Goal: measure how much each selected slot adds to the pooled vector — score, pre-score and value
# together.*
#
# Return the norm of every selected slot's contribution, `[T, m]`, with the same arguments as
# Exercise 3.  (Sanity check for yourself: their vector sum over `m` is $z$.)

# %%
def contribution_norms(x_pre, pre_table, table, indices, scores):
    # same arguments as multicore_values -> [T, m]
    raise NotImplementedError


check("nb04_contribution_norms", contribution_norms)

# %% [markdown]
# The reference version, and the bar plot for one token, slots in retrieval order (highest summed
# score first):

# %%
def slot_contributions(x_pre, pre_table, table, indices, scores):
    c = scores.shape[-1]
    a = torch.einsum("tmp,tp->tm", pre_table[indices], x_pre)  # [T, m]
    parts = (a[..., None] * scores)[..., None] * table[indices].unflatten(-1, (c, -1))  # [T, m, c, D_v/c]
    return parts.flatten(-2).norm(dim=-1)  # [T, m]


with torch.no_grad():
    norms = slot_contributions(x_pre, mem.pre_values, mem.values, rows, scores)  # [32, m]
    parts = (weights[..., None] * mem.values[rows].unflatten(-1, (cfg.cores, -1))).flatten(-2)  # [32, m, D_v]
    assert_close(parts.sum(1), values.peer_values(x_pre, mem.pre_values, mem.values, rows, scores))
token = 0
fig = viz.contribution_norms(norms[token], labels=[str(r) for r in rows[token].tolist()],
                             title=f"token {token}: contribution of each selected slot (retrieval order)")

# %% [markdown]
# The bars are far from sorted.  Retrieval ranks slots by their score, but a slot's contribution is
# score × |pre-score| × value norm, and at initialisation the last two vary much more than the scores
# of the $m$ selected slots do.  Averaged over tokens, higher-ranked slots do contribute more (their
# scores are larger), but per token the order is noisy:

# %%
by_rank = norms.mean(0)  # [m] mean contribution of the r-th ranked slot
spread = (scores.sum(-1).std(-1) / scores.sum(-1).mean(-1)).mean().item()
print("mean contribution by retrieval rank:", [f"{v:.2e}" for v in by_rank.tolist()])
print(f"relative spread of the selected scores per token: {spread:.2f}; "
      f"of the contribution norms: {(norms.std(-1) / norms.mean(-1)).mean().item():.2f}")
first_is_largest = (norms.argmax(-1) == 0).float().mean().item()
print(f"tokens whose largest contribution comes from the top-ranked slot: {first_is_largest:.0%}")
assert by_rank[:2].mean() > by_rank[-2:].mean() and first_is_largest < 0.5

# %% [markdown]
# ### Interactive: how many slots does a token need?
#
# The slider sets $m$, the number of slots read (exact top-m over the full grid, so $m$ is not
# limited by the prefilter).  The bars are token `token`'s contribution norms; the title compares
# the output with $m$ slots to the output with 128 slots (cosine similarity and norm ratio).
#
# At $m = 8$ these bars are **not** the slots of the bar chart above, although it is the same token and
# the same layer.  The layer retrieves with the rank-1 prefilter of notebook 02, which at initialisation
# misses roughly half of the exact top-$m$ (the slots whose two rank-1 factors are negative); the slider
# reads the exact top-$m$ of the full grid.  The cell prints how many of the 8 slots the two agree on.
# Watch how slowly the cosine approaches 1: with raw scores and signed pre-scores, every extra slot
# still moves the output.  This fits one of the paper's findings: the number of *activated* slots
# (top-m) matters more than the total number of sparse parameters (docs/references.md §6.1).

# %%
with torch.no_grad():
    s_row, s_col = mem.retrieval.axis_scores(xs)  # [32, n, r] each
    x_pre_all = mem.pre_proj(xs)  # [32, D_p]


def memory_output_topm(m):
    """Exact top-m read: (output [T, d], contribution norms [T, m], physical rows [T, m])."""
    with torch.no_grad():
        sc, virtual = tucker_topk(s_row, s_col, mem.retrieval.cores, m, exact=True)  # [T, m, c], [T, m]
        rows_m = mem.physical_rows(virtual)
        z = values.peer_values(x_pre_all, mem.pre_values, mem.values, rows_m, sc)  # [T, D_v]
        return mem.out_proj(z), slot_contributions(x_pre_all, mem.pre_values, mem.values, rows_m, sc), rows_m


reference_out = memory_output_topm(128)[0]  # [T, d]


def show_topm(m=8, token=0):
    o, norms_m, rows_m = memory_output_topm(m)
    cos = F.cosine_similarity(o[token], reference_out[token], dim=0).item()
    ratio = (o[token].norm() / reference_out[token].norm()).item()
    viz.contribution_norms(norms_m[token], labels=[str(r) for r in rows_m[token].tolist()],
                           title=f"m = {m}: cos to m=128 output {cos:.2f}, norm ratio {ratio:.2f}")
    return {"m": m, "cosine_to_m128": round(cos, 3), "norm_ratio": round(ratio, 3)}


print(show_topm(8, 0))
exact8 = set(memory_output_topm(8)[2][0].tolist())  # token 0, exact top-8 over the full grid
layer8 = set(rows[0].tolist())  # token 0, what the layer's rank-1 prefilter returned
print(f"token 0: the layer (prefilter) and the exact top-8 share {len(exact8 & layer8)} of 8 slots; "
      f"over all {xs.shape[0]} tokens the prefilter found "
      f"{sum(len(set(e.tolist()) & set(r.tolist())) for e, r in zip(memory_output_topm(8)[2], rows)) / rows.numel():.0%}"
      f" of the exact top-8")
cosines = [F.cosine_similarity(memory_output_topm(m)[0], reference_out, dim=-1).mean().item() for m in (4, 16, 64)]
print("mean cosine to the m=128 output for m = 4, 16, 64:", [round(c, 2) for c in cosines])
assert cosines[0] < cosines[1] < cosines[2] < 1, "reading more slots should move the output towards the m=128 output"

# %%
# NBVAL_IGNORE_OUTPUT
interact(show_topm, m=(1, 64), token=(0, xs.shape[0] - 1));

# %% [markdown]
# ## Summary
#
# * PKM slots are constant vectors; PEER slots are one-neuron experts $\sigma(u_i^\top x) v_i$, so the
#   layer is a per-token MLP assembled from $H\cdot k$ of $N$ neurons.
# * UltraMemV2 keeps the pre-value/value pair, drops the activation (Eq. 15) and reads the pair as a
#   SwiGLU whose gate is the sparse top-m retrieval score; with every slot selected and a SiLU
#   "score" it *is* SwiGLU.
# * With $c$ cores, scores are `[T, m, c]` and core $c$ weights channel slice $c$ of every value row.
# * At initialisation, tokens with similar inputs share slots, pre-scores are signed and centred,
#   and contribution norms are not ordered by retrieval rank.
#
# How big $a_i$, $w_i$ and the layer output are at initialisation, and how to choose the value
# standard deviation so that the memory branch matches the FFN branch, is the subject of
# **notebook 05 (initialisation)**.
