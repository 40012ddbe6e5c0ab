# %% [markdown]
# # 09 · Continual learning: teach a memory new facts without erasing old ones
#
# *Lin et al., "Continual Learning via Sparse Memory Finetuning", arXiv 2510.15103 (Meta FAIR, 2025);
# Goyal et al., "Improving Sparse Memory Finetuning", arXiv 2604.05248 (2026).*
#
# A trained language model that learns something new by ordinary finetuning tends to **forget**
# what it knew: the gradient of the new data moves weights that every input uses. Lin et al.
# finetune a model with a memory layer on new facts and measure held-out NaturalQuestions F1
# before and after (Sec. 4). At the same level of learning the new facts, F1 dropped by
#
# | finetuning | held-out F1 drop |
# |---|---:|
# | full finetuning | 89 % |
# | LoRA | 71 % |
# | **sparse memory finetuning** | **11 %** |
#
# The idea is a property only memory layers have: every token reads a handful of $m$ rows out of
# $N$, so a new fact touches few rows — and if those rows are rarely read by anything else, they
# can be rewritten without disturbing anything else. Sparse memory finetuning updates, for each
# batch, only the $t$ rows this batch reads *much more than the pretraining data does*, ranked by
# TF-IDF; everything else is frozen.
#
# This notebook rebuilds the method on a tiny UltraMemV2 and tests it:
#
# 1. pretrain on text plus a set **A** of facts, then teach a disjoint set **B**;
# 2. count which memory rows text, A and B read — how much do they overlap?
# 3. TF-IDF slot ranking by hand (asserted against `umv2_ref.continual`), and the KL rule of the
#    follow-up as an exercise;
# 4. freezing rows for real: why zeroing gradients is not enough under AdamW (exercise);
# 5. finetune with every method and measure learning (B accuracy) against forgetting (A accuracy,
#    text loss), live for one seed, then the 3-seed experiment;
# 6. a slider over $t$ and what the tiny-scale result does and does not show.
#
# `SMOKE` (set by the test command) shrinks every run to a few steps.

# %%
from umv2_ref.notebook import setup

SMOKE = setup()

# %%
import copy
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from ipywidgets import interact

import umv2_ref
from umv2_ref import continual as cl
from umv2_ref import data as text_data
from umv2_ref.exercises import check
from umv2_ref.experiments import continual as X

torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared CPU

# %% [markdown]
# ## 1. Two fact sets, one text corpus
#
# The facts task of notebook 08 stores a random table of facts `(e1, e2) -> a` in the weights:
# a sequence holds `FACT e1 e2 a` four-token facts amid filler, and the model is scored on predicting
# `a` at `e2` — nothing in the context gives it away. `X.fact_sets` draws **one** table of
# $2n$ distinct entity pairs and splits it in half: set A is learned in pretraining (together with the
# bundled text corpus), set B is the new knowledge. No entity pair is in both sets, but both use the
# same entity *tokens*, so B is new combinations of familiar tokens — as new facts about known names are.
#
# The live run below uses a quick size (one seed); section 8 shows the full experiment (3 seeds).

# %%
S = X.Settings(n_facts=64, pretrain_steps=15, text_batch=4, facts_batch=4, background_docs=4, finetune_steps=4,
               finetune_batch=4, eval_every=2, eval_facts=8, eval_text=4, seeds=(0,), t_sweep=()) if SMOKE else \
    X.Settings(n_facts=256, pretrain_steps=250, text_batch=8, facts_batch=8, background_docs=32, finetune_steps=60,
               finetune_batch=16, eval_every=15, eval_facts=64, eval_text=32, seeds=(0,), t_sweep=())
task_a, task_b = X.fact_sets(S.n_facts, seed=0, entity_tokens=S.entity_tokens, seq_len=S.seq_len)
pairs_a = {tuple(e) for e in task_a.entities.tolist()}
pairs_b = {tuple(e) for e in task_b.entities.tolist()}
assert not pairs_a & pairs_b
x, y = task_b.sample(1, torch.Generator().manual_seed(0))
print(f"{len(pairs_a)} facts in A, {len(pairs_b)} in B, {len(pairs_a & pairs_b)} entity pairs shared")
print("a B sequence:", x[0, :24].tolist())
print("scored at   :", ["." if v == -100 else v for v in y[0, :24].tolist()])

# %% [markdown]
# **Pretraining.** AdamW with warmup and cosine decay on batches of text windows stacked on
# fact-A sequences; the loss is the text cross-entropy plus the fact cross-entropy. The model is the
# tiny UltraMemV2 of this project with a memory in each of its 4 blocks, $N = 96^2 = 9216$ rows per
# memory, $m = 32$ read per token. Notebook 08's facts diagnosis found that with the paper's value init
# and learning rate the value tables barely move in a short run and the facts land in the FFN, so —
# as the diagnosis recommends — values start at $\sigma_V = 0.02$ and learn 10× faster than the rest.

# %%
model, info = X.pretrained(S, seed=0, out=None, progress=not SMOKE)
sets = X.eval_sets(S, task_a, task_b, seed=0)
before = info["eval"]
print(f"after pretraining ({S.pretrain_steps} steps, {info['seconds']:.0f} s): A accuracy {before['acc_a']:.3f}, "
      f"B accuracy {before['acc_b']:.3f} (chance {1 / (256 - 64):.3f}), text loss {before['text_loss']:.3f}")
assert before["acc_b"] < 0.1 and math.isfinite(before["text_loss"])

# %% [markdown]
# ## 2. Which rows does the new data read?
#
# Every memory layer returns the physical table rows it read, `MemoryOutput.indices [B, T, m]`.
# `cl.read_counts` turns them into reads per row. We count three populations: all positions of
# text windows, the scored `e2` positions of A facts, and those of B facts. If B read
# rows that text and A never touch, rewriting them would be free; the overlap says how far from free it is.

# %%
gen = torch.Generator().manual_seed(1)
x_text = text_data.load().get_batch("val", 32 if not SMOKE else 4, S.seq_len, gen)[0]
x_a, y_a = task_a.sample(32 if not SMOKE else 4, gen)
x_b, y_b = task_b.sample(S.finetune_batch, gen)
reads_text = cl.batch_counts(model, x_text)
reads_a = cl.batch_counts(model, x_a, where=y_a != -100)  # only the scored e2 positions
reads_b = cl.batch_counts(model, x_b, where=y_b != -100)
reads_batch = cl.batch_counts(model, x_b)  # every position of the B batch: what the ranking sees
for j in range(len(model.memory)):
    b_rows = reads_b[j] > 0
    share_text = reads_b[j][reads_text[j] > 0].sum() / reads_b[j].sum()
    share_a = reads_b[j][reads_a[j] > 0].sum() / reads_b[j].sum()
    print(f"layer {j}: B facts read {int(b_rows.sum()):5d} distinct rows of {reads_b[j].numel()}; "
          f"{share_text:.0%} of their reads land on rows text also reads, {share_a:.0%} on rows A facts read")

# %% [markdown]
# ## 3. TF-IDF over row reads, by hand
#
# Sparse memory finetuning ranks rows the way a search engine ranks words (Lin et al., Sec. 3): a
# **batch** of new data is a document, a **row** is a term. With $c(i)$ the reads of row $i$ in the
# batch and $\mathrm{df}(i)$ the number of background documents — batches of the *pretraining* data —
# that read row $i$ at least once, out of $|D|$:
#
# $$\mathrm{tf}(i) = \frac{c(i)}{\sum_j c(j)},\qquad
#   \mathrm{idf}(i) = \log\frac{|D| + 1}{\mathrm{df}(i) + 1},\qquad
#   \text{score}(i) = \mathrm{tf}(i)\,\mathrm{idf}(i).$$
#
# The $t$ rows with the highest score (among the rows the batch reads) are updated; all other
# parameters of the model stay frozen. A row that every pretraining batch reads has
# $\mathrm{idf} \approx 0$ — the filler tokens of the fact sequences and the common text rows never get
# updated, however often the batch reads them. Below, the background corpus is `S.background_docs`
# fresh pretraining batches (text + A facts), each a document; we compute the document frequency
# by brute force and check the package.

# %%
background = X.background_stats(S, model, task_a, seed=0)
gen_bg = torch.Generator().manual_seed(30_000)  # the generator background_stats uses for seed 0
docs = [X.mix_batch(S, task_a, gen_bg, S.text_batch, S.facts_batch)[0] for _ in range(S.background_docs)]
layer, t = 0, S.t
df = torch.zeros(reads_batch[layer].numel(), dtype=torch.float64)
for doc in docs:  # a document counts once per row, however often it reads it
    df[model(doc).memory[layer].indices.unique()] += 1
torch.testing.assert_close(df, background.doc_freq[layer])

c = reads_batch[layer]
tf = c / c.sum()
idf = torch.log(torch.tensor(len(docs) + 1.0, dtype=torch.float64) / (df + 1))
score = tf * idf
ranked = torch.sort(torch.where(c > 0, score, -math.inf), descending=True, stable=True).indices[:t]
torch.testing.assert_close(score, cl.tfidf_scores(c, background.doc_freq[layer], background.n_docs))
assert ranked.tolist() == cl.select_rows(reads_batch, background, t, "tfidf")[layer].tolist()
print(f"layer {layer}: the batch reads {int((c > 0).sum())} rows; top-{t} by TF-IDF selected")
print(f"  selected rows: reads in the batch {c[ranked].mean():.1f} on average (all read rows: {c[c > 0].mean():.1f}); "
      f"background documents reading them {df[ranked].mean():.1f} of {len(docs)} (all read rows: {df[c > 0].mean():.1f})")

# %% [markdown]
# Where do the selected rows sit? Each dot is a row the B batch reads: how many background documents
# read it (x) against how often the batch reads it (y). The TF-IDF selection (orange) takes rows
# the batch reads often *and* the background rarely; the rows every document reads (right edge) are
# never chosen, even the most-read ones.

# %%
def selection_scatter(layer, t):
    """Rows the B batch reads: document frequency vs batch reads, the top-t by TF-IDF highlighted."""
    c, d = reads_batch[layer], background.doc_freq[layer]
    rows = (c > 0).nonzero().flatten()
    chosen = cl.select_rows(reads_batch, background, t, "tfidf")[layer]
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(rows))
    ax.scatter(d[rows] + jitter, c[rows], s=6, alpha=0.4, color="tab:blue", label="read by the B batch")
    ax.scatter(d[chosen], c[chosen], s=14, color="tab:orange", label=f"top-{t} by TF-IDF")
    ax.set(xlabel=f"background documents that read the row (of {background.n_docs})", ylabel="reads in the B batch",
           yscale="log", title=f"layer {layer}: which rows sparse finetuning may update")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


fig = selection_scatter(0, S.t)
plt.show()

# %% [markdown]
# ### Exercise 1 — the KL rule of the follow-up
#
# *Goal: rank memory rows by their term of KL(batch reads ‖ background reads), the follow-up's slot rule.*
#
# Goyal et al. (arXiv 2604.05248) replace TF-IDF by a rule derived from the Kullback–Leibler
# divergence: rows the batch reads *surprisingly often* relative to the background distribution
# should be updated. We read it as ranking every row by its term of
# $\mathrm{KL}(p\,\|\,q) = \sum_i p(i) \log \frac{p(i)}{q(i)}$, with $p$ the batch's read distribution
# and $q$ the background's **total reads** (not document counts), smoothed so that rows the background
# never read stay finite:
#
# $$p(i) = \frac{c(i)}{\sum_j c(j)},\qquad q(i) = \frac{b(i) + \alpha}{\sum_j (b(j) + \alpha)},\qquad
#   \text{score}(i) = p(i)\log\frac{p(i)}{q(i)}\quad(0 \text{ where } p(i) = 0).$$
#
# Write it. The checker knows three mistakes: a $q$ that does not sum to 1, the reversed divergence,
# and the bare log-ratio without the weight $p(i)$ in front (one read of a never-seen row would then
# beat everything).

# %%
def my_kl_scores(batch, background, smoothing):
    raise NotImplementedError  # your code: return the per-row KL terms, [N] float64


check("nb09_kl_scores", my_kl_scores)

# %% [markdown]
# How different are the two selections? TF-IDF looks at *how many documents* read a row, the KL rule
# at *how much* the background reads it in total.

# %%
for j in range(len(model.memory)):
    a = set(cl.select_rows(reads_batch, background, S.t, "tfidf")[j].tolist())
    b = set(cl.select_rows(reads_batch, background, S.t, "kl")[j].tolist())
    print(f"layer {j}: TF-IDF and KL agree on {len(a & b)} of their {S.t} rows")

# %% [markdown]
# ## 4. Freezing rows for real
#
# The obvious implementation — zero the gradient of every unselected row, then call the optimiser —
# is exact for plain SGD and **wrong for AdamW**:
#
# * decoupled weight decay shrinks *every* row at every step, gradient or not;
# * a row selected at an earlier step has a non-zero first moment and keeps moving after it leaves
#   the selection.
#
# `cl.step_keeping_rows(optimizer, masks)` wraps the step: it copies the unselected rows of every table
# and of its optimiser state, and writes them back afterwards, so frozen rows keep their parameters
# *and* their moments (a lazily updated sparse AdamW). The tests check bitwise equality for SGD and
# AdamW, PKM, PEER, Memory+, UltraMem and UltraMemV2 (with and without a shared value pool). Here is the leak:

# %%
demo = copy.deepcopy(model)
_, table = cl.value_tables(demo)[0]
demo.requires_grad_(False)
table.requires_grad_(True)
opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.1)
keep_first, keep_second = (torch.zeros(table.shape[0], dtype=torch.bool) for _ in range(2))
keep_first[:100], keep_second[100:200] = True, True
for name, wrap in (("gradient masking only", False), ("step_keeping_rows", True)):
    with torch.no_grad():
        table.copy_(cl.value_tables(model)[0][1])
    opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.1)
    moved = []
    for keep in (keep_first, keep_second):
        start = table.detach().clone()
        opt.zero_grad()
        F.cross_entropy(demo(x_b).logits.flatten(0, 1), y_b.flatten(), ignore_index=-100).backward()
        cl.mask_gradients_({table: keep})
        with cl.step_keeping_rows(opt, {table: keep} if wrap else {}):
            opt.step()
        moved.append(int(((table.detach() != start).any(-1) & ~keep).sum()))
    print(f"{name:22s}: unselected rows that moved at step 1 / step 2: {moved[0]} / {moved[1]}")
    assert (moved == [0, 0]) == wrap

# %% [markdown]
# ### Exercise 2 — a sparse AdamW step
#
# *Goal: take an AdamW step on the selected rows only, leaving every other row and its moments untouched.*
#
# Write one AdamW step on a table that updates only the rows in `keep`, leaving the other rows'
# parameters **and** moments untouched. AdamW with $\beta = (0.9, 0.95)$, $\epsilon = 10^{-8}$, decoupled
# weight decay $\lambda$, and `step` = this step's count $s$:
#
# $$m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
#   p \leftarrow p(1 - \eta\lambda) - \eta\,\frac{m/(1-\beta_1^s)}{\sqrt{v/(1-\beta_2^s)} + \epsilon}.$$
#
# Return `(p, exp_avg, exp_avg_sq)`. The checker rejects the "mask the gradient only" version, weight
# decay on every row, and a step without bias correction. (The tests check that the reference is
# exactly what `step_keeping_rows` does around `torch.optim.AdamW`.)

# %%
def my_sparse_adamw_step(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay):
    raise NotImplementedError  # your code: return p, exp_avg, exp_avg_sq after the step


check("nb09_sparse_adamw_step", my_sparse_adamw_step)

# %% [markdown]
# ## 5. Learning B, forgetting A and the text — one seed, live
#
# Every method finetunes a copy of the pretrained model on batches of B facts only (no replay), with
# the learning rate the tuning run selected for it (section 8), and is evaluated on held-out
# sequences of A, B and the text's validation split every few steps:
#
# * **full**: every parameter, AdamW (the pretraining optimiser and groups);
# * **LoRA**: rank-4 adapters on the attention and FFN projections of every block, AdamW;
# * **values**: every row of every memory table (values and pre-values), AdamW;
# * **sparse**: the top-$t$ rows per memory layer and batch by TF-IDF, plain SGD (Lin et al. use SGD).

# %%
methods = {m.name: m for m in X.default_methods()}
live = ["full", "lora", "values", "sparse-tfidf-sgd"]
results = {}
for name in live:
    fields = dict(methods[name].config, lr=methods[name].lrs[0], steps=S.finetune_steps, t=S.t, eval_every=S.eval_every)
    results[name] = X.finetune_run(S, model, fields, 0, background, sets, task_b, keep_model=True)
    c = X.curve(results[name])
    print(f"{name:17s} lr {fields['lr']:<6g}: B accuracy {c['learned'][-1]:.3f}, A accuracy drop {c['forgot_facts'][-1]:+.3f}, "
          f"text loss {c['forgot_text'][-1]:+.3f}  ({results[name]['cpu_seconds']:.0f} s CPU)")

# %%
live_summary = {"methods": {n: {"label": methods[n].label, "curves": {"0": X.curve(r)}} for n, r in results.items()},
                "t_sweep": {}}
fig = X.forgetting_figure(live_summary)
fig.suptitle(f"live run, seed 0, {S.finetune_steps} steps (markers: every {S.eval_every} steps)", fontsize=9)
plt.show()
for r in results.values():
    assert all(0 <= v <= 1 for v in X.curve(r)["learned"])

# %% [markdown]
# Read the plot from left to right: each marker is an evaluation, the curve moves right as B is
# learned and up as A or the text is forgotten. A method that learns B without forgetting hugs the
# x-axis.
#
# ## 6. What the new facts write to
#
# Which rows did sparse finetuning actually change, and who else reads them? Below: for one B fact,
# the rows its `e2` position reads in each memory layer, which of them the sparse run rewrote, and how
# often text and A facts read those rows.

# %%
sparse_model = results["sparse-tfidf-sgd"]["model"]
changed = [(v0 != v1).any(-1) for (_, v0), (_, v1) in zip(cl.value_tables(model), cl.value_tables(sparse_model))]
xb1, yb1 = task_b.sample(1, torch.Generator().manual_seed(7))
pos = int((yb1[0] != -100).nonzero()[0])
out = model(xb1)
for j, mem in enumerate(out.memory):
    rows = mem.indices[0, pos]  # [m] rows this token reads in layer j
    hit = changed[j][rows]
    print(f"layer {j}: fact ({xb1[0, pos - 1].item()}, {xb1[0, pos].item()}) -> {yb1[0, pos].item()} reads {len(rows)} rows, "
          f"{int(hit.sum())} rewritten; text reads of the rewritten rows: {reads_text[j][rows[hit]].sum():.0f}, "
          f"A-fact reads: {reads_a[j][rows[hit]].sum():.0f}")
print("rows rewritten per layer:", [int(ch.sum()) for ch in changed], "of", cl.table_sizes(model)[0])

# %% [markdown]
# ## 7. Slots updated per batch: a slider over $t$
#
# $t$ trades learning for forgetting: more rows per batch means more capacity for B and more chance
# of hitting rows that A or the text use. For the B batch of section 2, the slider shows how much of
# B's own reads (at the scored positions) the top-$t$ rows cover, and how much text and A read those
# rows — no training needed.

# %%
def show_t(t=64, rule="tfidf"):
    chosen = cl.select_rows(reads_batch, background, t, rule)
    cover = [reads_b[j][r].sum() / reads_b[j].sum() for j, r in enumerate(chosen)]
    text_share = [reads_text[j][r].sum() / reads_text[j].sum() for j, r in enumerate(chosen)]
    a_share = [reads_a[j][r].sum() / reads_a[j].sum() for j, r in enumerate(chosen)]
    fig, ax = plt.subplots(figsize=(6.2, 3.3))
    idx = np.arange(len(chosen))
    for k, (vals, label) in enumerate(((cover, "B reads covered"), (text_share, "text reads hit"), (a_share, "A-fact reads hit"))):
        ax.bar(idx + (k - 1) * 0.27, [float(v) for v in vals], 0.27, label=label)
    ax.set(xticks=idx, xticklabels=[f"layer {j}" for j in idx], ylabel="share of reads", ylim=(0, 1),
           title=f"top-{t} rows per layer by {rule}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


show_t(S.t)

# %%
# NBVAL_IGNORE_OUTPUT
interact(show_t, t=(4, 1024, 4), rule=["tfidf", "kl"]);

# %% [markdown]
# ## 8. The experiment: three seeds
#
# `python -m umv2_ref.experiments.continual --out runs/continual` runs the full protocol on seeds
# 1–3 (each seed re-draws the facts, the model and the data order): pretrain on text plus set A,
# then finetune a copy on set B with every method. The learning rates come from a separate tuning run
# on seed 0 (`--tune`, 100 finetuning steps): every method gets the same grid of 3 rates 10× apart
# (extended by 10× at most twice while its largest rate wins) and keeps the rate with the highest
# final B accuracy; among rates within 0.02 of it, the one that forgets fewer A facts. The summary
# of the run is stored in `notebooks/results/09_continual.json`; the cells below read it (nothing
# is retrained here) and print the settings it was run with.

# %%
summary = json.loads((Path(umv2_ref.__file__).parents[1] / "notebooks" / "results" / "09_continual.json").read_text())
st = summary["settings"]
print(f"seeds {st['seeds']}; {st['n_facts']} facts per set; pretraining {st['pretrain_steps']} steps of "
      f"{st['text_batch']} text + {st['facts_batch']} set-A rows; finetuning {st['finetune_steps']} steps of "
      f"{st['finetune_batch']} set-B rows; sparse methods update t = {st['t']} rows per memory layer and batch "
      f"(t sweep: {', '.join(map(str, st['t_sweep']))})")
pre = summary["pretrain"]
print("pretrained models, A accuracy / text loss: "
      + "; ".join(f"seed {k}: {v['eval']['acc_a']:.3f} / {v['eval']['text_loss']:.3f} "
                  f"(memory zeroed: {v['memory_off']['acc_a']:.3f} / {v['memory_off']['text_loss']:.3f})"
                  for k, v in pre.items()))
display(Markdown(X.results_markdown(summary)))
fig = X.forgetting_figure(summary)
plt.show()

# %%
M = summary["methods"]
f3 = lambda s: f"{s['mean']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"  # noqa: E731
first = str(min(float(k) for k in summary["matched"]))
at = summary["matched"][first]
reached = [k for k, v in at.items() if v["seeds_reached"] == len(st["seeds"])]
least = min(reached, key=lambda k: at[k]["forgot_facts"]["mean"])
sparse = "sparse-tfidf-sgd"
lines = [
    f"* **Full finetuning** learns B to {f3(M['full']['learned'])} and loses {f3(M['full']['forgot_facts'])} of "
    f"A accuracy; **LoRA** learns {f3(M['lora']['learned'])} and loses {f3(M['lora']['forgot_facts'])}.",
    f"* **All memory tables** learn B to {f3(M['values']['learned'])} while losing only "
    f"{f3(M['values']['forgot_facts'])} of A and {f3(M['values']['forgot_text'])} nats of text loss.",
    f"* **Sparse TF-IDF (SGD)** at t = {st['t']} forgets little ({f3(M[sparse]['forgot_facts'])} of A, "
    f"{f3(M[sparse]['forgot_text'])} of text loss) but learns only {f3(M[sparse]['learned'])} of B in "
    f"{st['finetune_steps']} steps.",
    f"* At matched learning (B accuracy first reaching {first}, reached by every seed of "
    f"{len(reached)} methods) the least A forgetting is {M[least]['label'] or least}'s "
    f"({f3(at[least]['forgot_facts'])}), against {f3(at['full']['forgot_facts'])} for full finetuning"
    + (f" and {f3(at[sparse]['forgot_facts'])} for sparse TF-IDF (SGD)." if sparse in reached else "."),
]
ts = summary["t_sweep"]
if ts:
    lines.append("* **The t sweep** (sparse TF-IDF, SGD): " + "; ".join(
        f"t = {t}: learns {f3(v['learned'])}, loses {f3(v['forgot_facts'])} of A"
        for t, v in sorted(ts.items(), key=lambda kv: int(kv[0]))) + ".")
adam = "sparse-tfidf-adamw"
lines.append(f"* **SGD against AdamW** for the same sparse TF-IDF updates: AdamW learns {f3(M[adam]['learned'])} "
             f"and loses {f3(M[adam]['forgot_facts'])} of A; SGD {f3(M[sparse]['learned'])} and "
             f"{f3(M[sparse]['forgot_facts'])}. The KL rule (SGD) learns {f3(M['sparse-kl-sgd']['learned'])} and "
             f"loses {f3(M['sparse-kl-sgd']['forgot_facts'])}.")
display(Markdown("**What the three seeds show.**\n\n" + "\n".join(lines)))

# %% [markdown]
# ## Summary
#
# * A memory layer makes knowledge *addressable*: a fact is read from a few rows, so finetuning can
#   be confined to the memory. In this experiment, updating only the memory tables learned the new
#   facts while keeping most of set A and of the text; full finetuning and LoRA, which change weights
#   every input uses, forgot far more (the table above, three seeds each; read the spreads).
# * What this tiny setting does **not** reproduce is the paper's central comparison, sparse against
#   all-memory finetuning: here the top-$t$ restriction mainly slows learning, and at matched
#   learning finetuning all memory tables forgot less. This notebook does not establish why. Section 2
#   prints how much the rows new facts read overlap with the rows set A reads (about 80 % of the reads
#   at the quick size), which leaves the TF-IDF ranking little room to find rows only B uses; the
#   paper's memory has millions of rows under a large, diverse pretraining corpus, a regime this
#   setting does not approach.
# * Lin et al. report SGD beating AdamW for the sparse updates; the comparison above is the same
#   question at this scale, and the KL rule of the follow-up (arXiv 2604.05248) is implemented,
#   tested and measured next to it.
# * None of this is measured on question answering or at scale: the numbers are held-out accuracy on
#   synthetic facts and the validation loss of a byte-level text model with about 1.1M parameters.
