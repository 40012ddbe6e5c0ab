"""Continual learning: learn a new fact set B without forgetting fact set A or the text (notebook 09).

    python -m umv2_ref.experiments.continual --smoke --out runs/continual-smoke   # ~1-2 min, CI size
    python -m umv2_ref.experiments.continual --out runs/continual                 # the full matrix
    python -m umv2_ref.experiments.continual --out runs/continual --report-only   # re-aggregate

The protocol of Lin et al. (arXiv 2510.15103, Sec. 4), at classroom scale:

1. **pretrain** a memory model (default: a tiny UltraMemV2, 4 blocks of d = 64, a memory of 96^2 rows
   read 32 at a time in every block, with the value init sigma_V = 0.02 and a 10x value learning
   rate that make its tables store facts) on a mix of
   the bundled text corpus and fact set A (``synthetic.FactMemorisation``);
2. **finetune** a copy on fact set B only -- facts about entity pairs that set A never uses -- with
   each method: full finetuning (AdamW), LoRA on attention and FFN (AdamW), all memory tables
   (AdamW), and sparse memory finetuning (top-t rows by TF-IDF or by the KL rule, SGD or AdamW);
3. **measure** learning (B accuracy) and forgetting (A accuracy drop, text validation-loss
   increase) every ``eval_every`` steps, for every seed (each seed re-draws the facts, the model
   and the data order).

Tuning (``--tune``, seed 0, 100 steps): every method gets the same learning-rate grid, 3 points
10x apart, and the selected rate is, for every method alike, the one with the highest final B
accuracy (among rates within 0.02 of it, the one that forgets fewer A facts; on a full tie, the
larger rate); while the selected rate is the largest of the grid, one 10x larger is tried too (at
most twice).  The main experiment
(seeds 1-3, never used for tuning) runs every method at its selected rate (``SELECTED_LR``).

Outputs in ``--out``: ``continual.json`` (per method ``learned``, ``forgot_facts``, ``forgot_text``
as mean/min/max/std over seeds, the per-seed values, the curves, the settings; forgetting at matched
B accuracy; the t sweep; the pretrained models' evaluation with and without their memories),
``results.md`` and ``forgetting.png``.  Each pretrained model and each
finetuning run is written to ``--out`` as soon as it finishes, so an interrupted run resumes where
it stopped (``--out`` again).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import continual as cl
from .. import data as text_data
from .. import synthetic
from ..configs import get_config
from ..layers import UltraMemV2, refresh_rank1
from ..model import TinyLM
from ..optim import cosine_lr, param_groups
from ..rundir import atomic_write, torch_bytes
from ..train import set_lr

IGNORE = synthetic.IGNORE


@dataclass(frozen=True)
class Method:
    """A finetuning method: a name, its :class:`~umv2_ref.continual.FinetuneConfig` fields and LR grid."""

    name: str
    config: dict
    lrs: tuple[float, ...]
    label: str = ""


# Learning rates: the tuning run (``--tune``: seed 0, 100 steps) tries 3 rates 10x apart around
# TUNE_CENTERS for every method (plus up to two 10x larger ones while the largest wins) and keeps, for
# every method alike, the rate with the highest final B accuracy (among rates within 0.02 of it, the
# one that forgets fewer A facts): SELECTED_LR.
TUNE_CENTERS = {"full": 1e-3, "lora": 1e-3, "values": 1e-3, "sparse-tfidf-sgd": 100.0, "sparse-tfidf-adamw": 1e-3,
                "sparse-kl-sgd": 100.0}
SELECTED_LR = {"full": 1e-3, "lora": 1e-2, "values": 1e-2, "sparse-tfidf-sgd": 100.0, "sparse-tfidf-adamw": 1.0,
               "sparse-kl-sgd": 100.0}
METHOD_SPECS = (
    ("full", dict(method="full", optimizer="adamw"), "full finetuning (AdamW)"),
    ("lora", dict(method="lora", optimizer="adamw"), "LoRA r=4, attention + FFN (AdamW)"),
    ("values", dict(method="values", optimizer="adamw"), "all memory tables (AdamW)"),
    ("sparse-tfidf-sgd", dict(method="sparse", optimizer="sgd", rule="tfidf"), "sparse, TF-IDF top-t (SGD)"),
    ("sparse-tfidf-adamw", dict(method="sparse", optimizer="adamw", rule="tfidf"), "sparse, TF-IDF top-t (AdamW)"),
    ("sparse-kl-sgd", dict(method="sparse", optimizer="sgd", rule="kl"), "sparse, KL top-t (SGD)"),
)


def default_methods(tune: bool = False) -> tuple[Method, ...]:
    """The compared methods at their selected learning rate, or (``tune``) with the tuning grid."""
    def grid(center: float) -> tuple[float, ...]:
        return tuple(float(f"{center * 10.0 ** i:.3g}") for i in (-1, 0, 1))

    return tuple(Method(name, config, grid(TUNE_CENTERS[name]) if tune else (SELECTED_LR[name],), label)
                 for name, config, label in METHOD_SPECS)


@dataclass
class Settings:
    """Everything one experiment depends on (recorded in ``continual.json``)."""

    model: str = "ultramemv2"
    # Pinned sizes (the tiny UltraMemV2 with knum 96: m/N = 32/9216 per layer, D_k 8, D_p:D_v 8:16, FFN 136),
    # so that later changes to the named configuration do not change this experiment.
    model_overrides: dict = field(default_factory=lambda: dict(
        d_ff=136, mem_knum=96, mem_d_key=8, mem_topk=32, mem_d_pre=8, mem_d_value=16))
    value_std: float = 0.02  # UltraMemV2 value / pre-value init (the official code's constant)
    n_facts: int = 512  # facts per set; A and B use disjoint entity pairs (all 32^2 pairs in use)
    entity_tokens: int = 32  # entity alphabet: 2 * n_facts <= entity_tokens ** 2
    seq_len: int = 64
    pretrain_steps: int = 400
    text_batch: int = 8  # text rows per pretraining step
    facts_batch: int = 16  # fact-set-A rows per pretraining step
    lr: float = 3e-3  # pretraining AdamW, warmup + cosine
    value_lr_mult: float = 10.0  # pretraining: memory tables' learning-rate multiplier
    weight_decay: float = 0.1
    background_docs: int = 64  # background documents (pretraining-mix batches) for the slot statistics
    finetune_steps: int = 150
    finetune_batch: int = 16  # fact-set-B rows per finetuning step
    t: int = 64  # sparse: rows per memory layer per batch
    t_sweep: tuple[int, ...] = (16, 256)  # extra t values for the sparse TF-IDF SGD method (selected LR)
    eval_every: int = 25
    eval_facts: int = 64  # fixed evaluation sequences per fact set (8 facts each)
    eval_text: int = 32  # fixed validation windows of the text
    seeds: tuple[int, ...] = (1, 2, 3)  # seed 0 is the tuning seed
    tune: bool = False  # True: every method's tuning grid instead of its selected learning rate
    matched_targets: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)

    def __post_init__(self) -> None:
        if 2 * self.n_facts > self.entity_tokens ** 2:
            raise ValueError(f"Settings: 2 * n_facts = {2 * self.n_facts} exceeds entity_tokens^2 = {self.entity_tokens ** 2}")
        if len(self.seeds) == 0:
            raise ValueError("Settings.seeds is empty")


SMOKE = Settings(pretrain_steps=40, background_docs=8, finetune_steps=12, eval_every=6, eval_facts=32,
                 eval_text=16, t_sweep=(16,), text_batch=8, facts_batch=8, finetune_batch=8)
TUNE = Settings(seeds=(0,), tune=True, finetune_steps=100, t_sweep=())


# ---------------------------------------------------------------------------------------------
# Data: two disjoint fact sets, the text, fixed evaluation sets
# ---------------------------------------------------------------------------------------------


def fact_sets(n_facts: int, seed: int, **task_fields) -> tuple[synthetic.FactMemorisation, synthetic.FactMemorisation]:
    """Fact sets A and B: one ``FactMemorisation`` table of ``2 n_facts`` distinct entity pairs, split in half.

    Both halves keep the task's layout and ``sample`` (they are shallow copies whose fact table
    is one half); no entity pair appears in both, so B cannot be answered from A.
    """
    full = synthetic.FactMemorisation(n_facts=2 * n_facts, fact_seed=seed, **task_fields)
    halves = []
    for part in (slice(0, n_facts), slice(n_facts, 2 * n_facts)):
        half = copy.copy(full)
        half.n_facts, half.entities, half.attributes = n_facts, full.entities[part], full.attributes[part]
        halves.append(half)
    return halves[0], halves[1]


@dataclass
class EvalSets:
    facts_a: tuple[Tensor, Tensor]  # [n, T] inputs, targets
    facts_b: tuple[Tensor, Tensor]
    text: list[tuple[Tensor, Tensor]]


def eval_sets(s: Settings, task_a, task_b, seed: int) -> EvalSets:
    text = text_data.load().eval_batches("val", 1, s.eval_text, s.seq_len)
    return EvalSets(synthetic.eval_set(task_a, s.eval_facts, seed=10_000 + seed),
                    synthetic.eval_set(task_b, s.eval_facts, seed=20_000 + seed), text)


@torch.no_grad()
def scored_metrics(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 64) -> tuple[float, float]:
    """``(mean CE, accuracy)`` over the scored positions of ``(x, y)``, in chunks of ``chunk`` rows."""
    ce, correct, count = 0.0, 0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk]).logits  # [b, T, V]
        mask = y[i:i + chunk] != IGNORE
        ce += F.cross_entropy(logits[mask].float(), y[i:i + chunk][mask], reduction="sum").item()
        correct += (logits[mask].argmax(-1) == y[i:i + chunk][mask]).sum().item()
        count += int(mask.sum())
    return ce / count, correct / count


def evaluate(model: nn.Module, sets: EvalSets) -> dict:
    was_training = model.training
    model.eval()
    _, acc_a = scored_metrics(model, *sets.facts_a)
    _, acc_b = scored_metrics(model, *sets.facts_b)
    text_loss = sum(scored_metrics(model, x, y)[0] for x, y in sets.text) / len(sets.text)
    model.train(was_training)
    return {"acc_a": acc_a, "acc_b": acc_b, "text_loss": text_loss}


@torch.no_grad()
def memory_knockout(model: nn.Module, sets: EvalSets) -> dict:
    """:func:`evaluate` with every memory layer's output set to zero (where does the model keep facts?)."""
    def zero(module, args, out):
        return replace(out, output=torch.zeros_like(out.output))

    handles = [layer.register_forward_hook(zero) for layer in model.memory]
    try:
        return evaluate(model, sets)
    finally:
        for h in handles:
            h.remove()


def mix_batch(s: Settings, task_a, generator: torch.Generator, text_rows: int, fact_rows: int) -> tuple[Tensor, Tensor]:
    """``text_rows`` text windows stacked on ``fact_rows`` fact-set-A sequences: ``[B, T]`` each."""
    xt, yt = text_data.load().get_batch("train", text_rows, s.seq_len, generator)
    xf, yf = task_a.sample(fact_rows, generator)
    return torch.cat([xt, xf]), torch.cat([yt, yf])


# ---------------------------------------------------------------------------------------------
# Pretraining on text + facts A
# ---------------------------------------------------------------------------------------------


def build_model(s: Settings) -> TinyLM:
    model = TinyLM(get_config(s.model, vocab_size=text_data.VOCAB_SIZE, **s.model_overrides))
    with torch.no_grad():
        for layer in model.memory:
            if isinstance(layer, UltraMemV2):
                for table in layer.tables():
                    nn.init.normal_(table, std=s.value_std)
    return model


def pretrain(s: Settings, task_a, seed: int, progress: bool = True) -> tuple[TinyLM, dict]:
    """AdamW, warmup + cosine, 10x value LR; loss = text CE + facts-A CE (each a mean over its scored tokens)."""
    torch.manual_seed(seed)
    model = build_model(s)
    optimizer = torch.optim.AdamW(param_groups(model, s.lr, s.weight_decay, s.value_lr_mult), betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, s.pretrain_steps // 10)
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(s.pretrain_steps), desc=f"pretrain seed {seed}", disable=not progress, leave=False):
        set_lr(optimizer, cosine_lr(step, s.pretrain_steps, warmup, s.lr), s.value_lr_mult)
        x, y = mix_batch(s, task_a, generator, s.text_batch, s.facts_batch)
        logits = model(x).logits  # [B, T, V]
        text_ce = F.cross_entropy(logits[:s.text_batch].flatten(0, 1), y[:s.text_batch].flatten())
        facts_ce = F.cross_entropy(logits[s.text_batch:].flatten(0, 1), y[s.text_batch:].flatten(), ignore_index=IGNORE)
        loss = text_ce + facts_ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        refresh_rank1(model)
        losses.append((text_ce.item(), facts_ce.item()))
    model.eval()
    return model, {"train_losses": losses, "seconds": time.perf_counter() - start}


def background_stats(s: Settings, model: TinyLM, task_a, seed: int) -> cl.SlotStats:
    """Slot statistics over ``background_docs`` fresh pretraining-mix batches (one batch = one document)."""
    generator = torch.Generator().manual_seed(30_000 + seed)
    docs = (mix_batch(s, task_a, generator, s.text_batch, s.facts_batch)[0] for _ in range(s.background_docs))
    return cl.slot_stats(model, docs)


# ---------------------------------------------------------------------------------------------
# One seed: pretrain (or load), then every finetuning run (each saved when done)
# ---------------------------------------------------------------------------------------------


def _atomic_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (:func:`umv2_ref.rundir.atomic_write`)."""
    atomic_write(path, json.dumps(obj, indent=1).encode())


def pretrained(s: Settings, seed: int, out: Path | None, progress: bool = True) -> tuple[TinyLM, dict]:
    """The pretrained model of ``seed``: loaded from ``out/pretrain/seed<seed>`` if saved there, else trained (and saved)."""
    task_a, task_b = fact_sets(s.n_facts, seed, entity_tokens=s.entity_tokens, seq_len=s.seq_len)
    folder = out / "pretrain" / f"seed{seed}" if out is not None else None
    identity = {"settings": _pretrain_identity(s), "seed": seed}
    if folder is not None and (folder / "info.json").exists():
        info = json.loads((folder / "info.json").read_text())
        if info["identity"] != identity:
            raise ValueError(f"{folder} holds a model pretrained with other settings; use another --out")
        model = build_model(s)
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        return model.eval(), info
    cpu0 = time.process_time()
    model, record = pretrain(s, task_a, seed, progress)
    sets = eval_sets(s, task_a, task_b, seed)
    info = {"identity": identity, "seconds": record["seconds"], "cpu_seconds": time.process_time() - cpu0,
            "final_train_losses": record["train_losses"][-1], "eval": evaluate(model, sets),
            "memory_off": memory_knockout(model, sets)}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "model.pt", torch_bytes(model.state_dict()))
        _atomic_json(folder / "info.json", info)
    return model, info


def _pretrain_identity(s: Settings) -> dict:
    keep = ("model", "model_overrides", "value_std", "n_facts", "entity_tokens", "seq_len", "pretrain_steps",
            "text_batch", "facts_batch", "lr", "value_lr_mult", "weight_decay")
    return {k: getattr(s, k) for k in keep}


def run_plan(s: Settings, methods: tuple[Method, ...]) -> list[tuple[str, Method, dict]]:
    """``(run name, method, FinetuneConfig fields)`` for every run of one seed (the t sweep needs the
    selected LR of ``sparse-tfidf-sgd``, so it is planned separately by :func:`t_sweep_plan`)."""
    plan = []
    for m in methods:
        for lr in m.lrs:
            fields = dict(m.config, lr=lr, steps=s.finetune_steps, t=s.t, eval_every=s.eval_every)
            plan.append((f"{m.name}_lr{lr:g}", m, fields))
    return plan


def finetune_run(s: Settings, model: TinyLM, fields: dict, seed: int, background: cl.SlotStats, sets: EvalSets,
                 task_b, keep_model: bool = False) -> dict:
    """One finetuning run on a copy of ``model``; returns its record (history of A/B accuracy, text loss).

    With ``keep_model`` the finetuned copy is returned too, as ``record["model"]`` (not JSON).
    """
    cfg = cl.FinetuneConfig(**fields)
    student = copy.deepcopy(model)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(40_000 + seed)  # the same B batches for every method
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = cl.finetune(student, cfg, lambda: task_b.sample(s.finetune_batch, generator), background,
                         evaluate=lambda m: evaluate(m, sets))
    result.update(seed=seed, cpu_seconds=time.process_time() - cpu0, seconds=time.perf_counter() - wall0)
    if keep_model:
        result["model"] = student
    return result


def run_seed(s: Settings, methods: tuple[Method, ...], seed: int, out: Path | None, progress: bool = True,
             extra: list[tuple[str, dict]] = (), cache: dict | None = None) -> dict[str, dict]:
    """Every planned run of one seed (skipping runs already saved in ``out``); ``{run name: record}``.

    ``cache`` (a dict) keeps the pretrained model between calls when nothing is saved to disk.
    """
    cache = {} if cache is None else cache
    if seed not in cache:
        cache[seed] = pretrained(s, seed, out, progress)
    model, info = cache[seed]
    task_a, task_b = fact_sets(s.n_facts, seed, entity_tokens=s.entity_tokens, seq_len=s.seq_len)
    sets = eval_sets(s, task_a, task_b, seed)
    background = None
    folder = out / "runs" / f"seed{seed}" if out is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    plan = [(name, fields) for name, _, fields in run_plan(s, methods)] + list(extra)
    records = {}
    for name, fields in tqdm(plan, desc=f"finetune seed {seed}", disable=not progress, leave=False):
        path = folder / f"{name}.json" if folder is not None else None
        if path is not None and path.exists():
            records[name] = json.loads(path.read_text())
            continue
        if background is None:
            background = background_stats(s, model, task_a, seed)
        records[name] = finetune_run(s, model, fields, seed, background, sets, task_b)
        if path is not None:
            _atomic_json(path, records[name])
    records["_pretrain"] = info
    return records


# ---------------------------------------------------------------------------------------------
# Aggregation: learning, forgetting, matched B accuracy
# ---------------------------------------------------------------------------------------------


def curve(record: dict) -> dict[str, list[float]]:
    """Per evaluation step: B accuracy learned, A accuracy drop, text-loss increase (relative to step 0)."""
    h = record["history"]
    a0, t0 = h[0]["acc_a"], h[0]["text_loss"]
    return {"step": [e["step"] for e in h], "learned": [e["acc_b"] for e in h],
            "forgot_facts": [a0 - e["acc_a"] for e in h], "forgot_text": [e["text_loss"] - t0 for e in h]}


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "std": float(np.std(values)), "n": len(values)}


def at_learning(c: dict, target: float) -> dict | None:
    """Forgetting where B accuracy first reaches ``target`` (linear interpolation between evaluations)."""
    xs = c["learned"]
    keys = ("step", "forgot_facts", "forgot_text")
    if xs[0] >= target:
        return {k: c[k][0] for k in keys}
    for i in range(1, len(xs)):
        if xs[i] >= target:
            w = (target - xs[i - 1]) / (xs[i] - xs[i - 1])
            return {k: c[k][i - 1] + w * (c[k][i] - c[k][i - 1]) for k in keys}
    return None


def summarise(s: Settings, methods: tuple[Method, ...], runs: dict[int, dict[str, dict]]) -> dict:
    """``continual.json``: per method the selected LR's final learning and forgetting over seeds, and more."""
    seeds = sorted(runs)
    out = {"methods": {}, "lr_grid": {}, "matched": {}, "t_sweep": {}, "pretrain": {}}
    for m in methods:
        per_lr = {}
        for lr in m.lrs:
            finals = [curve(runs[sd][f"{m.name}_lr{lr:g}"]) for sd in seeds]
            per_lr[lr] = {k: spread([c[k][-1] for c in finals]) for k in ("learned", "forgot_facts", "forgot_text")}
        top = max(per_lr[lr]["learned"]["mean"] for lr in m.lrs)
        near = [lr for lr in m.lrs if per_lr[lr]["learned"]["mean"] >= top - 0.02]
        best = min(near, key=lambda lr: (per_lr[lr]["forgot_facts"]["mean"], -lr))  # full tie: the larger rate
        chosen = {sd: runs[sd][f"{m.name}_lr{best:g}"] for sd in seeds}
        per_seed = {str(sd): {k: v[-1] for k, v in curve(r).items()} | {"rows_touched": r["rows_touched"],
                                                                   "cpu_seconds": r["cpu_seconds"]}
                    for sd, r in chosen.items()}
        out["methods"][m.name] = {
            "label": m.label, **per_lr[best],
            "seeds": per_seed,
            "settings": {**chosen[seeds[0]]["config"], "lr_grid": list(m.lrs),
                         "selection": "the grid LR with the highest mean final B accuracy; among LRs within 0.02 "
                                      "of it, the one with the least A forgetting"},
            "curves": {str(sd): curve(r) for sd, r in chosen.items()},
        }
        out["lr_grid"][m.name] = {f"{lr:g}": v for lr, v in per_lr.items()}
        for target in s.matched_targets:
            points = [at_learning(curve(r), target) for r in chosen.values()]
            reached = [p for p in points if p is not None]
            entry = {"seeds_reached": len(reached)}
            if len(reached) == len(points):
                entry.update({k: spread([p[k] for p in reached]) for k in ("step", "forgot_facts", "forgot_text")})
            out["matched"].setdefault(f"{target:g}", {})[m.name] = entry
    for name in {n for r in runs.values() for n in r if n.startswith("t-sweep_")}:
        finals = [curve(runs[sd][name]) for sd in seeds if name in runs[sd]]
        out["t_sweep"][name.split("_t", 1)[1]] = {k: spread([c[k][-1] for c in finals])
                                                  for k in ("learned", "forgot_facts", "forgot_text")}
    for sd in seeds:
        out["pretrain"][str(sd)] = runs[sd]["_pretrain"]
    return out


def t_sweep_runs(s: Settings, lr: float) -> list[tuple[str, dict]]:
    """Extra runs of sparse TF-IDF SGD at the other ``t`` values (at a given LR)."""
    base = dict(method="sparse", optimizer="sgd", rule="tfidf", lr=lr, steps=s.finetune_steps, eval_every=s.eval_every)
    return [(f"t-sweep_t{t}", dict(base, t=t)) for t in s.t_sweep if t != s.t]


# ---------------------------------------------------------------------------------------------
# Report: Markdown table and the forgetting-vs-learning plot
# ---------------------------------------------------------------------------------------------


def _fmt(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} [{d['min']:.{digits}f}, {d['max']:.{digits}f}]"


def results_markdown(summary: dict) -> str:
    n = len(next(iter(summary["methods"].values()))["seeds"])
    lines = [f"Final values at the selected learning rate, mean [min, max] over {n} seeds:", "",
             "| method | lr | B accuracy (learned) | A accuracy drop | text loss increase |", "|---|---:|---:|---:|---:|"]
    for name, m in summary["methods"].items():
        lines.append(f"| {m['label'] or name} | {m['settings']['lr']:g} | {_fmt(m['learned'])} | "
                     f"{_fmt(m['forgot_facts'])} | {_fmt(m['forgot_text'])} |")
    if any(len(g) > 1 for g in summary["lr_grid"].values()):
        lines += ["", "Every learning rate of the grid (final values):", "",
                  "| method | lr | B accuracy | A accuracy drop | text loss increase |", "|---|---:|---:|---:|---:|"]
        for name, grid in summary["lr_grid"].items():
            for lr, e in grid.items():
                lines.append(f"| {name} | {lr} | {_fmt(e['learned'])} | {_fmt(e['forgot_facts'])} | {_fmt(e['forgot_text'])} |")
    for target, by in summary["matched"].items():
        lines += ["", f"At matched learning (B accuracy first reaching {target}): A accuracy drop / text loss increase", "",
                  "| method | seeds reached | step | A accuracy drop | text loss increase |", "|---|---:|---:|---:|---:|"]
        for name, e in by.items():
            if "forgot_facts" in e:
                lines.append(f"| {name} | {e['seeds_reached']} | {e['step']['mean']:.0f} | {_fmt(e['forgot_facts'])} | "
                             f"{_fmt(e['forgot_text'])} |")
            else:
                lines.append(f"| {name} | {e['seeds_reached']} | – | not reached by every seed | – |")
    return "\n".join(lines)


def forgetting_figure(summary: dict):
    """Two panels, forgetting (A accuracy drop; text-loss increase) against learning (B accuracy).

    One curve per method as the finetuning steps go by (mean over seeds at each evaluation; the
    bars span min to max), plus the final points of sparse TF-IDF SGD at other ``t``.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in summary["methods"].items():
        curves = list(m["curves"].values())
        length = min(len(c["learned"]) for c in curves)
        x = np.array([c["learned"][:length] for c in curves])  # [seeds, evals]
        for ax, key in zip(axes, ("forgot_facts", "forgot_text")):
            y = np.array([c[key][:length] for c in curves])
            line, = ax.plot(x.mean(0), y.mean(0), marker="o", ms=3, label=m["label"] or name)
            ax.errorbar(x.mean(0)[-1], y.mean(0)[-1], xerr=[[x.mean(0)[-1] - x[:, -1].min()], [x[:, -1].max() - x.mean(0)[-1]]],
                        yerr=[[y.mean(0)[-1] - y[:, -1].min()], [y[:, -1].max() - y.mean(0)[-1]]], color=line.get_color(), capsize=3)
    if summary["t_sweep"]:
        ts = sorted(summary["t_sweep"], key=int)
        for ax, key in zip(axes, ("forgot_facts", "forgot_text")):
            ax.scatter([summary["t_sweep"][t]["learned"]["mean"] for t in ts], [summary["t_sweep"][t][key]["mean"] for t in ts],
                       marker="s", color="k", zorder=5, label="sparse TF-IDF SGD, other t (final)")
            for t in ts:
                ax.annotate(f"t={t}", (summary["t_sweep"][t]["learned"]["mean"], summary["t_sweep"][t][key]["mean"]), fontsize=8)
    axes[0].set(xlabel="B accuracy (learned)", ylabel="A accuracy drop (forgotten facts)", title="forgetting old facts")
    axes[1].set(xlabel="B accuracy (learned)", ylabel="text validation loss increase", title="forgetting the text")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run(s: Settings, methods: tuple[Method, ...] | None = None, out: str | Path | None = None,
        progress: bool = True, report_only: bool = False) -> dict:
    """The whole experiment; returns the summary (also written to ``out/continual.json`` when ``out``)."""
    methods = methods or default_methods(s.tune)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        settings_file = out / "settings.json"
        recorded = {"settings": asdict(s), "methods": [asdict(m) for m in methods]}
        recorded = json.loads(json.dumps(recorded))  # tuples -> lists, as read back
        if settings_file.exists() and json.loads(settings_file.read_text()) != recorded:
            raise ValueError(f"{settings_file} records other settings; use another --out")
        _atomic_json(settings_file, recorded)
    start, cpu0 = time.perf_counter(), time.process_time()
    cache: dict = {}
    runs = {sd: run_seed(s, methods, sd, out, progress, cache=cache) if not report_only else _load_seed(out, sd)
            for sd in s.seeds}
    def fetch(method: Method) -> None:
        for sd in s.seeds:
            if report_only:
                if f"{method.name}_lr{method.lrs[0]:g}" not in runs[sd]:
                    raise ValueError(f"report_only: run {method.name} at lr {method.lrs[0]:g} of seed {sd} is missing")
            else:
                runs[sd].update(run_seed(s, (method,), sd, out, progress, cache=cache))

    if s.tune:
        methods = extend_grids(s, methods, runs, fetch)
    if any(m.name == "sparse-tfidf-sgd" for m in methods) and s.t_sweep and not report_only:
        lr = summarise(s, methods, runs)["methods"]["sparse-tfidf-sgd"]["settings"]["lr"]
        for sd in s.seeds:
            runs[sd].update(run_seed(s, (), sd, out, progress, extra=t_sweep_runs(s, lr), cache=cache))
    summary = summarise(s, methods, runs)
    summary["settings"] = {**asdict(s), "methods": [asdict(m) for m in methods]}
    summary["compute"] = {"wall_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu0,
                          "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
                          "torch": torch.__version__}
    if out is not None:
        _atomic_json(out / "continual.json", summary)
        (out / "results.md").write_text(results_markdown(summary) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = forgetting_figure(summary)
        fig.savefig(out / "forgetting.png", dpi=110)
        plt.close(fig)
    return summary


MAX_EXTENSIONS = 2


def extend_grids(s: Settings, methods: tuple[Method, ...], runs: dict, fetch) -> tuple[Method, ...]:
    """Tuning: while a method's selected rate is the largest of its grid, also try one 10x larger.

    The same rule for every method, at most ``MAX_EXTENSIONS`` times; ``fetch(Method)`` runs (or
    loads) the new rate for every seed into ``runs``.
    """
    methods = list(methods)
    for _ in range(MAX_EXTENSIONS):
        summary = summarise(s, tuple(methods), runs)
        grown = False
        for i, m in enumerate(methods):
            if summary["methods"][m.name]["settings"]["lr"] == max(m.lrs):
                new = replace(m, lrs=(float(f"{max(m.lrs) * 10:.3g}"),))
                fetch(new)
                methods[i] = replace(m, lrs=m.lrs + new.lrs)
                grown = True
        if not grown:
            break
    return tuple(methods)


def _load_seed(out: Path | None, seed: int) -> dict[str, dict]:
    if out is None:
        raise ValueError("report_only needs out=")
    folder = out / "runs" / f"seed{seed}"
    records = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    records["_pretrain"] = json.loads((out / "pretrain" / f"seed{seed}" / "info.json").read_text())
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m umv2_ref.experiments.continual", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI): about a minute on 2 cores")
    p.add_argument("--tune", action="store_true", help="the learning-rate tuning run (seed 0, 3 rates 10x apart)")
    p.add_argument("--out", default="runs/continual")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--report-only", action="store_true", help="re-aggregate the runs saved in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    s = SMOKE if args.smoke else TUNE if args.tune else Settings()
    if args.seeds:
        s = replace(s, seeds=tuple(int(x) for x in args.seeds.split(",")))
    summary = run(s, out=args.out, progress=args.progress, report_only=args.report_only)
    print(results_markdown(summary))
    c = summary["compute"]
    print(f"\nwrote {args.out}/continual.json, results.md, forgetting.png "
          f"({c['wall_seconds']:.0f} s wall, {c['cpu_seconds']:.0f} s CPU, load {c['load_average'][0]:.1f})")


if __name__ == "__main__":
    main()
