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
# 3. train (once; later runs load the cached models) dense, MoE and UltraMemV2 on the CPython
#    documentation text (bytes) and compare their loss curves;
# 4. sample text from each model;
# 5. open the trained UltraMemV2 and look, token by token, at what its memory reads and adds: the key
#    grid, scores, pre-scores, each slot's contribution, and the corpus contexts that use a slot;
# 6. knock out the memory and the FFNs to see where the model keeps what it learned.
#
# `SMOKE` (set by the test command) shrinks every run to a few dozen steps. At the quick size
# (`SMOKE = False`) the first run trains three models for 200 steps each — a few minutes on a 2-core
# CPU; the cell prints how long it took — and caches them under `build/models`; every later run
# loads them in seconds. Nothing larger is ever trained silently.

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

from umv2_ref import configs, data, explore, viz
from umv2_ref.exercises import check
from umv2_ref.model import TinyLM
from umv2_ref.optim import cosine_lr, value_lr_multiplier

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
# equal to the dense model, the FFN shrinks (here from 176 to 136 hidden units, $2.1d$; the
# paper's released 227M configuration uses a SwiGLU of $3.25d$, docs/references.md §6.2). The memory itself is
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
assert (configs.get_config("dense").d_ff, cfg.d_ff) == (176, 136)  # the widths the text above quotes
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

# %%
costs = {name: configs.config_costs(name) for name in names}
share = lambda c: sum(v.macs for k, v in c.parts.items() if k.startswith("memory")) / sum(  # noqa: E731
    v.macs for k, v in c.parts.items() if k.startswith("memory") or k.endswith((".ffn", ".attn")))
b64 = {name: c.bytes_per_token(64) / costs["dense"].bytes_per_token(64) for name, c in costs.items()}
display(Markdown(
    f"At batch 64 the 16-expert MoE reads {b64['moe-2of16']:.1f}× the dense model's bytes per token and the "
    f"64-expert one {b64['moe-8of64']:.1f}× (each step touches most experts), while UltraMemV2 reads "
    f"{b64['ultramemv2']:.1f}× (its 4 key tables plus the value rows the batch picks) — the paper's "
    f"\"significantly lower memory access\" (§1, §4.2.8). UltraMemV2's memory branches take "
    f"{share(costs['ultramemv2']):.0%} of the body's multiply-accumulates; the paper's best share is about 17 % "
    "(Table 4). At batch 1 every model is dominated by its dense weights."))

# %% [markdown]
# ## 3. Training dense vs MoE vs UltraMemV2 (or loading them)
#
# Same data (bytes of the bundled documentation text), seed, optimiser (AdamW, warmup + cosine,
# `umv2_ref.optim`), learning rate $3\cdot10^{-3}$, steps and batch for all three. The loop is
# `umv2_ref.train.train`; it calls `refresh_rank1` after every optimiser step so the retrieval's
# rank-1 prefilter follows the trained Tucker cores (notebook 02).
#
# `explore.pretrained(recipe)` trains a model the first time and saves the run under
# `build/models/<recipe>-text-<hash of its settings>`; later calls load it with
# `umv2_ref.train.load_model`. A *recipe* is a configuration of `umv2_ref.configs` plus how its
# memory is initialised and how fast its value tables learn. For UltraMemV2 we use `umv2-tiny`:
# the released code's value init ($\sigma_V = 0.02$) and a constant $10\times$ learning rate on the
# values and pre-values. A value row is read by only a few tokens per step, so at a budget of a few
# hundred steps it barely moves at $1\times$; the multi-seed head-to-head in the README compares this
# recipe with the paper's (Eq. 26 init, $1\times$) and the official code's ($4\times \to 1\times$).

# %%
UMV2 = "umv2-tiny"  # or "umv2-paper" / "umv2-official" (see umv2_ref.experiments.compare.RECIPES)
recipes = {"dense": "dense", "MoE 2-of-16": "moe-2of16", "UltraMemV2": UMV2}
size = "smoke" if SMOKE else "text"  # smoke: 20 steps of 8 x 64 bytes; text: 200 steps of 16 x 64 bytes
models, runs = {}, {}
for label, recipe in recipes.items():
    models[label], runs[label] = explore.pretrained(recipe, size=size, cache_dir=None if SMOKE else explore.CACHE_DIR,
                                                   progress=not SMOKE)
for label, res in runs.items():
    print(f"{label:12s} final validation loss {res['final']['loss']:.3f}  next-byte accuracy "
          f"{res['final']['acc']:.3f}  ({res['tokens_per_s']:,.0f} training tokens/s)")
print(f"training took {sum(r.get('train_wall_s', 0.0) for r in runs.values()):.0f} s the first time "
      "(0 s means every model came from the cache)")

# %%
curves = {label: ([v["step"] for v in r["history"]["val"]], [[v["loss"] for v in r["history"]["val"]]])
          for label, r in runs.items()}
fig = viz.seed_curves(curves, title="validation loss (bytes); y-axis zoomed on the later steps")
plt.show()

# %%
for res in runs.values():
    assert math.isfinite(res["final"]["loss"])
    assert res["final"]["loss"] < res["history"]["val"][0]["loss"]  # every model learned something
assert runs["UltraMemV2"]["params"]["table_params"] > 0 and runs["dense"]["params"]["table_params"] == 0
final = {label: r["final"]["loss"] for label, r in runs.items()}
speed = {label: r["tokens_per_s"] for label, r in runs.items()}
order = sorted(final, key=final.get)
display(Markdown(
    f"**What this run shows.** After {runs['dense']['final']['step']} steps the order is "
    + ", ".join(f"{label} ({final[label]:.3f})" for label in order)
    + f". UltraMemV2 ends {abs(final['UltraMemV2'] - final['dense']):.3f} "
    f"{'below' if final['UltraMemV2'] < final['dense'] else 'above'} the dense model and "
    f"{abs(final['UltraMemV2'] - final['MoE 2-of-16']):.3f} "
    f"{'below' if final['UltraMemV2'] < final['MoE 2-of-16'] else 'above'} the MoE. One seed cannot separate "
    "differences of a few hundredths: across seeds the same configuration moves by about that much (the "
    "README's multi-seed table gives the spread). It trains at "
    f"{speed['UltraMemV2']:,.0f} tokens/s against the dense model's {speed['dense']:,.0f} "
    f"({speed['dense'] / speed['UltraMemV2']:.1f}× slower per token on this CPU: four memory layers whose "
    "reference path gathers every read row)."))

# %% [markdown]
# The paper itself notes that UltraMemV2 "starts slowly": it trails the MoE early in training and
# catches up after hundreds of billions of tokens (§6.11, Limitations). A CPU notebook sees a few
# hundred thousand tokens, so treat these curves as a check that everything trains, not as a
# verdict on the architecture.
#
# ## 4. What do they write?
#
# `TinyLM.generate(prompt, max_new_tokens, temperature, top_k, generator)` samples one byte at a
# time from the softmax of the last position's logits (divided by the temperature, restricted to
# the `top_k` most likely bytes), feeding back at most `max_seq_len` bytes of context. A seeded
# generator makes the samples reproducible.

# %%
prompt = "The for statement"
for label, m in models.items():
    out = m.generate(data.encode(prompt)[None].long(), 100 if not SMOKE else 30, temperature=0.8, top_k=40,
                     generator=torch.Generator().manual_seed(0))
    print(f"--- {label} ---\n{data.decode(out[0])}\n")

# %% [markdown]
# Byte-level models this small learn spelling, indentation and the shape of the documentation
# before they learn meaning; expect plausible words, reST markup and code-like fragments.
#
# ## 5. Looking inside the trained memory
#
# `explore.trace(model, tokens)` runs the model once and returns, for each memory layer and every
# position: the rows it read and their grid cells (row key $i$, column key $j$), the per-core
# scores $s_{i,c}$, the pre-scores $\langle P_i, W_{pre}\bar x\rangle$, and each slot's
# contribution to the layer output in model space,
#
# $$c_i = W_v\big(\langle P_i, W_{pre}\bar x\rangle\, s_i \odot V_i\big),\qquad \sum_i c_i = \mathrm{Mem}(\bar x),$$
#
# where $s_i \odot V_i$ weights core $c$'s channel slice of $V_i$ by $s_{i,c}$. The sum is exact
# (`trace` checks it on every call), so the contributions are an honest split of what the memory
# added to the residual stream. The table below gives, for each position of a short text, the three
# slots with the largest contributions and the RMS of the memory branch against the FFN branch and
# the residual stream $h$ it is added to.

# %%
umv2 = models["UltraMemV2"]
text = "def greet(name):\n    return"
tokens = data.encode(text).long()
records = explore.trace(umv2, tokens)
print(explore.layer_table(records[0], tokens, top=3, decode=data.decode))
rms = np.array([[r.norms(t)["memory"] / r.norms(t)["ffn"] for t in range(len(tokens))] for r in records])  # [L, T]
for r in records:
    torch.testing.assert_close(r.contributions.sum(1) + r.residual, r.output)

# %%
display(Markdown(
    "Memory branch RMS relative to the FFN branch, averaged over this text's positions: "
    + ", ".join(f"block {j}: {rms[j].mean():.2f}" for j in range(len(records)))
    + f". In block {int(rms.mean(1).argmax())} the memory is the larger branch relative to its FFN; a ratio "
    "well below 1 everywhere would mean the memory adds little next to the FFN."))

# %% [markdown]
# **What a slot stores.** For a slot read at some position we can ask which positions of the
# validation text read it most strongly (the PKM paper's analysis of memory slots, arXiv
# 1907.05242 §4.5). A slot that stores something specific is read in similar contexts.

# %%
corpus = data.load().eval_batches("val", 2 if SMOKE else 4, 32, 64)
corpus = torch.cat([x for x, _ in corpus])  # [N, 64] validation windows
pos, layer = len(tokens) - 1, 0
rec = records[layer]
best = int(rec.slot_norms[pos].argmax())
row = int(rec.indices[pos, best])
print(f"position {pos} ({data.decode(tokens[pos:pos + 1])!r}), memory layer {layer}: strongest slot = row {row}, "
      f"grid cell ({int(rec.grid_rows[pos, best])}, {int(rec.grid_cols[pos, best])})")
for hit in explore.top_contexts(umv2, layer, row, corpus, k=8, width=20, decode=data.decode):
    print(f"  {hit['strength']:.3f}  …{hit['context']!r}")

# %% [markdown]
# **The explorer.** Type a text, move the position slider, pick a memory layer and a slot rank: the
# left panel outlines the cells the token read on the key grid (the highlighted one is the chosen
# slot), the bars show each read slot's score per core, its pre-score and its contribution norm,
# and the last panel compares the memory branch with the FFN branch and the residual stream. Below
# the figure: the validation contexts that read the chosen slot most strongly. The static view
# first, then the live widget.

# %%
fig, info = explore.show(umv2, tokens, position=pos, layer=layer, corpus=corpus, decode=data.decode)
plt.show()
print(info)

# %%
# NBVAL_IGNORE_OUTPUT
explore.explorer(umv2, text=text, corpus=corpus)

# %% [markdown]
# ## 6. Where does the model keep what it learned?
#
# A knock-out sets one branch's output to zero at evaluation time (the routing still runs) and
# measures the validation loss again. If zeroing the memory barely changes the loss, the model
# learned to rely on its FFNs and attention instead.

# %%
val = data.load().eval_batches("val", 1 if SMOKE else 4, 32, 64)
rows_md = ["| model | intact | all memory layers zeroed | all FFNs zeroed |", "|---|---:|---:|---:|"]
ko = {}
for label, m in models.items():
    ko[label] = {"intact": explore.knockout_eval(m, val)["loss"],
                 "ffn": explore.knockout_eval(m, val, ffn="all")["loss"]}
    if len(m.memory):
        ko[label]["memory"] = explore.knockout_eval(m, val, memory="all")["loss"]
    rows_md.append(f"| {label} | {ko[label]['intact']:.3f} | {ko[label].get('memory', float('nan')):.3f} | "
                   f"{ko[label]['ffn']:.3f} |")
display(Markdown("Validation loss:\n\n" + "\n".join(rows_md)))
per_layer = [explore.knockout_eval(umv2, val, memory=j)["loss"] for j in range(len(umv2.memory))]
u = ko["UltraMemV2"]
display(Markdown(
    f"Zeroing all of UltraMemV2's memory layers raises its loss from {u['intact']:.3f} to {u['memory']:.3f}; "
    f"zeroing its FFNs instead gives {u['ffn']:.3f}. One memory layer at a time: "
    + ", ".join(f"block {j} → {v:.3f}" for j, v in enumerate(per_layer))
    + f". The memory that matters most sits in block {int(np.argmax(per_layer))}."))
assert u["memory"] > u["intact"] - 1e-6 or SMOKE

# %% [markdown]
# ## 7. The learning-rate schedule, and the memory values' own rate
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
# tokens), and the `umv2-tiny` recipe above uses a constant $10\times$ for a budget of a few hundred
# steps. `python -m umv2_ref.train --value-lr-mult 4 --value-lr-schedule decay` selects UltraMem's.
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
fig = viz.line_plot(t, {"dense weights": lr, "values, UltraMem 4x -> 1x": value_lr, "values, umv2-tiny 10x": 10 * lr},
                    xlabel="step", ylabel="learning rate", title="learning rates")
plt.show()
assert value_lr[0] == 4 * lr[0] and abs(value_lr[-1] - lr[-1]) < 0.01 * lr[-1]

# %% [markdown]
# ## Summary
#
# * UltraMemV2 puts a memory layer in every block, in parallel with a shrunk FFN, reading the
#   same normalised input: $x_{l+1} = h + \mathrm{FFN}(\bar x) + \mathrm{Mem}(\bar x)$.
# * At equal activated parameters its bytes read per token grow far more slowly with the batch
#   than an MoE's — the paper's efficiency argument — while its MACs stay close to dense.
# * A trained model is something to look at, not just a loss: `explore.trace` splits every memory
#   output exactly into per-slot contributions, `explore.top_contexts` shows what a slot is used
#   for, and knock-outs show which branch the model relies on.
# * One seed and a few hundred steps cannot rank architectures whose losses differ by hundredths;
#   the README's head-to-head uses several seeds and reports the spread.
#
# Next: notebook 07 builds the Triton kernels that make the memory's gathers fast on a GPU;
# notebook 08 then asks where a memory layer should win — many facts that a dense model of the same
# activated size cannot store.
