# %% [markdown]
# # 06 · UltraMemV2 inside a tiny language model
#
# *Huang, Bao, Min et al., "UltraMemV2: Memory Networks Scaling to 120B Parameters with Superior
# Long-Context Learning", arXiv 2508.18756 (ByteDance Seed, 2025).*
#
# Notebooks 01–05 built the UltraMemV2 **layer**: Tucker-decomposed retrieval (02), value
# expansion (03), PEER-style "FFN values" (04) and the variance-matched initialisation (05). This
# notebook puts the layer where the paper puts it — in **every** transformer block, next to a
# shrunk feed-forward network — and trains the resulting language model against a dense model and a
# mixture-of-experts (MoE) with the same number of *activated* parameters.
#
# What you will do:
#
# 1. write the UltraMemV2 block by hand and check it against `umv2_ref.model.TinyLM`;
# 2. read the cost table: parameters, activated parameters, MACs and bytes read per token;
# 3. train dense, MoE and UltraMemV2 on the CPython documentation text (bytes) and compare loss curves;
# 4. watch which memory slots get used as training goes on.
#
# `SMOKE` (set by the test command) shrinks every run to a few dozen steps; with `SMOKE = False`
# the runs take a few minutes on a laptop.

# %%
from umv2_ref.notebook import setup

SMOKE = setup()

# %%
# The UltraMemV2 block as a diagram (shapes for a batch of T tokens): the memory layer runs in
# parallel with a shrunk FFN on the same normalised input, in every block.
import matplotlib.pyplot as plt

from umv2_ref import viz

viz.ultramemv2_block_diagram()
plt.show()

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from ipywidgets import interact

from umv2_ref import configs, viz
from umv2_ref.exercises import check
from umv2_ref.model import TinyLM
from umv2_ref.optim import cosine_lr, value_lr_multiplier
from umv2_ref.train import TrainConfig, train

# %% [markdown]
# ## 1. The block: memory in parallel with the FFN
#
# UltraMemV2's first change to UltraMem (paper §3.2, change 1) is placement: *every* block gets a
# memory layer, and the released code feeds it **the same normalised tensor as the FFN** and adds
# its output next to the FFN's (docs/references.md §6.2):
#
# $$h_l = x_l + \mathrm{Attn}\big(\mathrm{Norm}_1(x_l)\big),\qquad \bar x_l = \mathrm{Norm}_2(h_l),\qquad
#   x_{l+1} = h_l + \mathrm{FFN}(\bar x_l) + \mathrm{Mem}_l(\bar x_l).$$
#
# The memory behaves like a huge sparse "shared expert" branch. To keep the compute per token
# equal to the dense model, the FFN shrinks (here from 176 to 108 hidden units, $1.7d$; the
# paper's 227M model shrinks its SwiGLU to $3.25d$, docs/references.md §6.2). The memory itself is
#
# $$\mathrm{Mem}(\bar x) = W_v \sum_{i\in \mathrm{TopM}} \big(\langle P_i,\, W_{pre}\bar x\rangle\, s_i\big)\, V_i
#   \qquad\text{(Eq. 15: PEER-style values without activation)}$$
#
# with scores $s_i$ from Tucker-decomposed query–key retrieval (notebook 02). Below we rebuild the
# forward pass of a whole `TinyLM` from its parts and compare with the package.

# %%
vocab = 256
cfg = configs.get_config("ultramemv2", vocab_size=vocab)
model = TinyLM(cfg).eval()
tokens = torch.randint(vocab, (2, 24), generator=torch.Generator().manual_seed(0))  # [B, T]


def umv2_forward(model, tokens):
    """TinyLM.forward written out: x_{l+1} = h + FFN(xbar) + Mem(xbar) in every block."""
    x = model.embed(tokens)  # [B, T, d]
    for block, memory in zip(model.blocks, model.memory):
        h = x + block.attn(block.attn_norm(x))  # [B, T, d] attention sub-layer
        xbar = block.ffn_norm(h)  # [B, T, d] the FFN input, read by the memory too
        x = h + block.ffn(xbar) + memory(xbar).output  # [B, T, d] parallel branches
    return model.norm(x) @ model.embed.weight.T  # [B, T, V] tied output head


with torch.no_grad():
    torch.testing.assert_close(umv2_forward(model, tokens), model(tokens).logits)
print(f"{cfg.n_layers} blocks, each: attention + SwiGLU(d_ff={cfg.d_ff}) + UltraMemV2 "
      f"({cfg.mem_knum}^2 = {cfg.mem_knum ** 2:,} slots, top-m = {cfg.mem_topk})")

# %% [markdown]
# ### Exercise 1 — the block from raw tensors
#
# *Goal: assemble an UltraMemV2 block from raw tensors — memory in parallel with the FFN, both reading
# RMSNorm(h).*
#
# Write the block output with plain tensor operations. The retrieval is already done: `rows[b, t]`
# holds the $m$ value rows token $(b, t)$ reads and `scores[b, t]` their scores $s_i$. Use
# $\mathrm{RMSNorm}(h) = h / \sqrt{\mathrm{mean}(h^2) + 10^{-6}}\cdot g$, a SwiGLU FFN
# $W_{down}(\mathrm{silu}(W_{gate}x)\odot W_{up}x)$ and Eq. 15 for the memory. The checker also
# knows three plausible mistakes: a *sequential* memory that reads the FFN's output, a memory that
# reads the un-normalised $h$, and PEER's GELU left on the pre-value scores.

# %%
def my_umv2_block(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    raise NotImplementedError  # your code: return x_{l+1}, shape [B, T, d]


check("nb06_umv2_block", my_umv2_block)

# %% [markdown]
# ## 2. What a token costs
#
# All configurations in `umv2_ref.configs` activate about 218k parameters per token (the dense
# model's size, embedding included) and the sparse ones hold about 1.1M in total. They differ in
# *how* they reach 1.1M: experts (MoE) or value rows (memory). The table counts per token the
# multiply-accumulates and the bf16 parameter **bytes read** in one decode step of batch $B$
# (docs/references.md §7.9): an MoE reads whole experts, a memory layer only the $m$ rows it picked — but
# every step it also reads all of its keys, whatever $B$.

# %%
names = ["dense", "moe-2of16", "moe-8of64", "ultramemv2"]
display(Markdown(configs.comparison_table(names)))

# %% [markdown]
# At batch 64 the MoEs read almost every expert each step, so their bytes per token are about
# 5× the dense model's; UltraMemV2 reads about 2.4× (its 4 key tables and the $64 \cdot 32$ value
# rows per layer) — the paper's "significantly lower memory access" (§1, §4.2.8). At batch 1
# every model is dominated by its dense weights.
#
# ## 3. Training dense vs MoE vs UltraMemV2
#
# Same data (bytes of the bundled documentation text), seed, optimiser (AdamW, warmup + cosine,
# `umv2_ref.optim`), steps and batch for all three. The loop is `umv2_ref.train.train`; it calls
# `refresh_rank1` after every optimiser step so the retrieval's rank-1 prefilter follows the
# trained Tucker cores (notebook 02).

# %%
steps = 30 if SMOKE else 600
common = dict(task="text", steps=steps, batch_size=8 if SMOKE else 16, seq_len=64, eval_every=10 if SMOKE else 50,
              eval_batches=1 if SMOKE else 8, eval_batch_size=16 if SMOKE else 32, progress=not SMOKE)
runs = {name: train(TrainConfig(model=name, **common)) for name in ("dense", "moe-8of64", "ultramemv2")}
for name, res in runs.items():
    print(f"{name:11s} final validation loss {res['final']['loss']:.3f}  next-byte accuracy "
          f"{res['final']['acc']:.3f}  ({res['tokens_per_s']:,.0f} tokens/s)")

# %%
fig = viz.loss_curves({name: ([v["step"] for v in r["history"]["val"]], [v["loss"] for v in r["history"]["val"]])
                       for name, r in runs.items()}, title="validation loss (bytes)", hline=math.log(vocab))
plt.show()

# %%
for res in runs.values():
    assert math.isfinite(res["final"]["loss"])
    assert res["final"]["loss"] < res["history"]["val"][0]["loss"]  # every model learned something
assert runs["ultramemv2"]["params"]["table_params"] > 0 and runs["dense"]["params"]["table_params"] == 0

# %% [markdown]
# How to read the curves: at this size and training length the differences between the three are
# small and mostly reflect how fast each one *starts*. The paper itself notes that UltraMemV2
# "starts slowly" — it trails the MoE early in training and catches up only after hundreds of
# billions of tokens (§6.11, Limitations). A CPU notebook sees the first few thousand tokens.
# `python -m umv2_ref.experiments.compare` runs the longer comparison.
#
# ## 4. Which memory slots are used?
#
# A memory layer only learns the rows it reads. If retrieval collapses onto a few slots, the
# rest of the table is dead weight (PKM's "dead keys", docs/references.md §2.3). The training loop counts
# the rows read on the validation batches at every evaluation (`usage_history`). Brightness is a
# slot's share of the reads relative to uniform use; black columns were never read.

# %%
usage = runs["ultramemv2"]["usage_history"]
eval_steps = [step for step, _ in usage]
counts = np.stack([layer_counts[0].numpy() for _, layer_counts in usage])  # [n_evals, n_slots] of layer 0
fig = viz.usage_heatmap(counts, eval_steps, title="UltraMemV2 layer 0: reads per slot")
plt.show()

# %%
final = runs["ultramemv2"]["memory"]
for j, layer in enumerate(final):
    print(f"layer {j}: {layer['usage']:.1%} of slots read (uniform random access would reach "
          f"{layer['uniform_usage']:.1%}), KL to uniform {layer['kl']:.2f}, "
          f"Tucker singular values {np.round(layer['tucker_sv'], 2)}")
assert all(0 < layer["usage"] <= 1 for layer in final)

# %% [markdown]
# Use the slider to look at the other layers, and switch off sorting to see the raw slot order.

# %%
def show_usage(layer=0, sort=True):
    c = np.stack([layer_counts[layer].numpy() for _, layer_counts in usage])
    fig = viz.usage_heatmap(c, eval_steps, title=f"UltraMemV2 layer {layer}: reads per slot", sort=sort)
    plt.show()


show_usage(layer=cfg.n_layers - 1)

# %%
# NBVAL_IGNORE_OUTPUT
interact(show_usage, layer=(0, cfg.n_layers - 1), sort=True);

# %% [markdown]
# ## 5. The learning-rate schedule, and the memory values' own rate
#
# All weights follow linear warmup and a cosine decay to $0.1\times$ (UltraMem Table 4). The
# memory values and pre-values sit in their own AdamW parameter group
# (`umv2_ref.optim.param_groups`): under Adam a gradient scale cancels out, so a different step
# size needs a different *learning rate*, not a scaled gradient. UltraMem multiplies it by a
# factor that decays from $\tau = 4$ to 1 (docs/references.md §7.10):
#
# $$\eta_V(t) = \eta(t)\,\Big(1 + (\tau - 1)\max\big(0,\ 1 - \tfrac{t}{T}\big)\Big),$$
#
# while UltraMemV2 ends up recommending a constant $1\times$ (§4.2.9: +0.4 points after 1.4T
# tokens). `python -m umv2_ref.train --value-lr-mult 4 --value-lr-schedule decay` selects UltraMem's.
#
# ### Exercise 2 — both learning rates at once
#
# *Goal: vectorise the two schedules — warmup + cosine for all weights, a decaying multiplier for the
# values.*
#
# Given integer `steps` (a tensor), `total`, `warmup`, `base_lr` and $\tau$ = `start`, return the
# tensors `(lr, value_lr)` (float64; float32 is accepted), with tensor operations rather than
# `cosine_lr` / `value_lr_multiplier`. Warmup is $\eta\,(t+1)/\text{warmup}$ for $t < \text{warmup}$;
# after it the cosine runs over the remaining steps, $\eta\,\big(0.1 + 0.9\cdot\tfrac12(1+\cos\pi p)\big)$
# with progress $p = \min\big(1, (t-\text{warmup})/(\text{total}-\text{warmup})\big)$.

# %%
def my_lr_schedule(steps, total, warmup, base_lr, start):
    raise NotImplementedError  # your code: return lr [S], value_lr [S]


check("nb06_lr_schedule", my_lr_schedule)

# %%
total, warm = 600, 60
t = np.arange(total)
lr = np.array([cosine_lr(int(s), total, warm, 3e-3) for s in t])
value_lr = lr * np.array([value_lr_multiplier(int(s), total, start=4.0) for s in t])
fig = viz.loss_curves({"dense weights": (t, lr), "values, UltraMem 4x -> 1x": (t, value_lr)},
                      title="learning rates", ylabel="learning rate")
plt.show()
assert value_lr[0] == 4 * lr[0] and abs(value_lr[-1] - lr[-1]) < 0.01 * lr[-1]

# %% [markdown]
# ## Summary
#
# * UltraMemV2 puts a memory layer in every block, in parallel with a shrunk FFN, reading the
#   same normalised input: $x_{l+1} = h + \mathrm{FFN}(\bar x) + \mathrm{Mem}(\bar x)$.
# * At equal activated parameters its bytes read per token grow far more slowly with the batch
#   than an MoE's — the paper's efficiency argument — while its MACs stay close to dense.
# * Tiny CPU runs cannot show the paper's parity with an 8-expert MoE: that appears after hundreds
#   of billions of tokens, and the paper reports a slow start. Watch slot usage: dead slots are
#   wasted parameters.
#
# Next: notebook 08 asks where memory should help — tasks that need many facts or long-range recall.
