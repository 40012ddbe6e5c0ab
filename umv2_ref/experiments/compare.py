"""Dense vs MoE vs memory LMs at matched activated parameters: a multi-seed head-to-head.

    python -m umv2_ref.experiments.compare --smoke --out runs/compare-smoke          # minutes, 2 cores
    python -m umv2_ref.experiments.compare --size h2h --recipes h2h --tasks text,facts-capacity \\
        --sweep 1e-3,3e-3,1e-2,3e-2 --seeds 3 --out runs/h2h                                # the README protocol

Trains every *recipe* of ``--recipes`` on every task of ``--tasks``.  A recipe is a named
configuration of :mod:`umv2_ref.configs` (all ~218k activated parameters, the sparse ones ~1.1M in
total) plus how its memory is initialised and how fast its value tables learn (:data:`RECIPES`):
every configuration name is a recipe of its own (1x value learning rate), and the head-to-head adds

* ``umv2-paper``: UltraMemV2 as the paper recommends -- Eq. 26 value init, constant 1x value LR
  (arXiv 2508.18756 App. A and Sec. 4.2.9);
* ``umv2-official``: the released code -- its init constants (sigma_V = 0.02) and a value LR
  decaying from 4x to 1x (UltraMem's schedule, arXiv 2411.12364);
* ``umv2-tiny``: what a sparse table needs at a tiny token budget -- sigma_V = 0.02 with the paper's
  other init choices and a constant 10x value LR (each row is read by few tokens per step, so its
  effective step is a fraction of the nominal one);
* ``ultramem-4x``: UltraMem v1 with its own 4x -> 1x value LR; ``pkm-10x``: PKM with the same 10x
  as ``umv2-tiny`` (equal treatment of the two sparse tables).

Protocol (the same for every recipe, so every model gets the same tuning effort):

1. ``--sweep LRS``: train each recipe once per learning rate with ``--sweep-seed`` (0) and pick the
   learning rate with the lowest loss on a *selection split* that the reported numbers never use
   (text: validation windows offset from the reported ones; synthetic tasks: evaluation examples
   drawn with another seed);
2. ``--seeds N``: train each recipe at its chosen learning rate with N further seeds (1..N after a
   sweep, 0..N-1 without one) and report the mean and the min-max spread on the fixed evaluation
   sets, plus the accuracy with every memory layer zeroed (where the knowledge lives).

Every run writes ``OUT/runs/<task>/<recipe>/lr<lr>-s<seed>/`` (the training checkpoint and
``result.json``, written atomically): an interrupted comparison continues where it stopped, and a
finished run is never trained twice.  Outputs: ``results.md`` (cost table, sweep table, results
with mean [min-max] per task), ``results.json`` and ``loss_<task>.png`` (mean and range over seeds).

Every run uses one thread (``torch.set_num_threads(1)``) and ``--jobs`` runs go in parallel, so
tokens/s compare like with like.  UltraMemV2's claims (arXiv 2508.18756, Table 2: parity with an
8-expert MoE, gains on multi-round memorisation and in-context learning) are at 2.5B activated
parameters and trillions of tokens; at this size they are a hypothesis to test, not an expectation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import synthetic
from ..configs import CONFIG_NAMES, get_config
from ..costs import format_count, model_costs
from ..model import TinyLM
from ..rundir import atomic_write
from ..train import TASK_NAMES, TrainConfig, train

# ---------------------------------------------------------------------------------------------
# What is compared: recipes and tasks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A named configuration plus its memory init and value learning rate."""

    name: str
    config: str  # a umv2_ref.configs name
    value_lr_mult: float = 1.0
    value_lr_schedule: str = "constant"  # or "decay": value_lr_mult -> 1x over the run
    model_overrides: tuple[tuple[str, object], ...] = ()  # ModelConfig fields, e.g. (("mem_init", "official"),)
    about: str = ""

    def train_fields(self) -> dict:
        return {"model": self.config, "value_lr_mult": self.value_lr_mult,
                "value_lr_schedule": self.value_lr_schedule, "model_overrides": dict(self.model_overrides)}


RECIPES: dict[str, Recipe] = {name: Recipe(name, name, about="the named configuration, 1x value LR")
                              for name in CONFIG_NAMES}
RECIPES.update({
    "umv2-paper": Recipe("umv2-paper", "ultramemv2", about="paper: Eq. 26 value init, constant 1x value LR"),
    "umv2-official": Recipe("umv2-official", "ultramemv2", 4.0, "decay", (("mem_init", "official"),),
                            about="official code: its init (sigma_V 0.02), value LR 4x -> 1x"),
    "umv2-tiny": Recipe("umv2-tiny", "ultramemv2", 10.0, "constant", (("mem_value_std", 0.02),),
                        about="tiny budget: sigma_V 0.02, constant 10x value LR"),
    "ultramem-4x": Recipe("ultramem-4x", "ultramem", 4.0, "decay", about="UltraMem v1, its own value LR 4x -> 1x"),
    "pkm-10x": Recipe("pkm-10x", "pkm", 10.0, about="PKM with the tiny-budget constant 10x value LR"),
})
RECIPE_GROUPS = {
    # the README's head-to-head: eight recipes, each with the same 4-rate sweep and 3 seeds
    "h2h": ("dense", "moe-2of16", "pkm", "pkm-10x", "ultramem-4x", "umv2-paper", "umv2-official", "umv2-tiny"),
    "default": ("dense", "moe-2of16", "moe-8of64", "pkm", "ultramem", "ultramemv2"),
}
MODELS = RECIPE_GROUPS["default"]  # the single-recipe-per-config default of earlier versions


@dataclass(frozen=True)
class TaskSpec:
    """A training task of :mod:`umv2_ref.train` with field overrides of its synthetic generator."""

    name: str
    task: str
    overrides: tuple[tuple[str, object], ...] = ()


TASK_SPECS: dict[str, TaskSpec] = {t: TaskSpec(t, t) for t in TASK_NAMES}
TASK_SPECS["facts-capacity"] = TaskSpec("facts-capacity", "facts", tuple(synthetic.CAPACITY_FACTS.items()))
TASKS = tuple(TASK_SPECS)


@dataclass(frozen=True)
class Size:
    """Run length of one (recipe, task) pair."""

    steps: int
    batch_size: int
    eval_every: int
    eval_batches: int
    eval_batch_size: int


SIZES: dict[str, dict[str, Size]] = {  # per task; "*" applies to tasks not listed
    "tiny": {"*": Size(steps=4, batch_size=4, eval_every=2, eval_batches=1, eval_batch_size=8)},  # CI: seconds
    "smoke": {"*": Size(steps=60, batch_size=16, eval_every=20, eval_batches=2, eval_batch_size=32)},
    "full": {"*": Size(steps=1500, batch_size=32, eval_every=100, eval_batches=8, eval_batch_size=32)},
    "h2h": {"text": Size(steps=300, batch_size=16, eval_every=50, eval_batches=8, eval_batch_size=32),
            "*": Size(steps=400, batch_size=32, eval_every=100, eval_batches=8, eval_batch_size=32)},
}


def size_for(size: str | Size | dict, task: str) -> Size:
    """The :class:`Size` of ``task`` under a size name, a Size, or a ``{task or "*": Size}`` dict."""
    if isinstance(size, Size):
        return size
    table = SIZES[size] if isinstance(size, str) else size
    return table.get(task, table["*"])


def resolve_recipes(names) -> tuple[Recipe, ...]:
    """Recipe names (or group names of :data:`RECIPE_GROUPS`) -> recipes, in order, without repeats."""
    out: list[str] = []
    for name in names:
        out += RECIPE_GROUPS.get(name, (name,))
    unknown = [n for n in out if n not in RECIPES]
    if unknown:
        raise ValueError(f"recipes: {unknown} not among {tuple(RECIPES)} or the groups {tuple(RECIPE_GROUPS)}")
    return tuple(RECIPES[n] for n in dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# One run (resumable) and its evaluation splits
# ---------------------------------------------------------------------------------------------


def run_dir(out: Path, recipe: str, task: str, lr: float, seed: int) -> Path:
    return out / "runs" / task / recipe / f"lr{lr:g}-s{seed}"


def atomic_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (:func:`umv2_ref.rundir.atomic_write`)."""
    atomic_write(path, json.dumps(obj, indent=1).encode())


def train_config(recipe: Recipe, spec: TaskSpec, size: Size, seed: int, lr: float, out: Path | None) -> TrainConfig:
    return TrainConfig(task=spec.task, task_overrides=dict(spec.overrides), seed=seed, lr=lr, steps=size.steps,
                       batch_size=size.batch_size, eval_every=size.eval_every, eval_batches=size.eval_batches,
                       eval_batch_size=size.eval_batch_size, progress=False, out=str(out) if out else None,
                       **recipe.train_fields())


def selection_batches(spec: TaskSpec, size: Size, seq_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches for choosing a learning rate, disjoint from the reported evaluation.

    Text: as many validation windows as the reported evaluation, each starting half a spacing after
    one of the reported (evenly spaced) windows.  Synthetic tasks: the task's evaluation examples
    drawn with seed ``EVAL_SEED + 1``.
    """
    n, b = size.eval_batches * size.eval_batch_size, size.eval_batch_size
    if spec.task == "text":
        from .. import data as text_data

        T = seq_len or 64
        val = text_data.load().splits["val"]
        span = len(val) - T - 1
        starts = (torch.linspace(0, span, n) + span / max(1, n - 1) / 2).clamp(max=span).long()  # [n]
        chunk = val[starts[:, None] + torch.arange(T + 1)].long()  # [n, T+1]
        x, y = chunk[:, :-1], chunk[:, 1:]
    else:
        task = synthetic.make_task(spec.task, **dict(spec.overrides))
        x, y = synthetic.eval_set(task, n=n, seed=synthetic.EVAL_SEED + 1)
    return [(x[i:i + b], y[i:i + b]) for i in range(0, n, b)]


def report_batches(spec: TaskSpec, size: Size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reported evaluation batches (what ``umv2_ref.train`` evaluates on)."""
    from ..train import TaskData

    cfg = TrainConfig(task=spec.task, task_overrides=dict(spec.overrides), eval_batches=size.eval_batches,
                      eval_batch_size=size.eval_batch_size)
    return TaskData(cfg).eval_batches()


def analyse(directory: Path, spec: TaskSpec, size: Size, selection: bool) -> dict:
    """Evaluate a finished run's checkpoint: selection-split loss (sweeps) and knock-outs.

    Knock-outs (``umv2_ref.explore.knockout_eval``) on the reported evaluation: every memory layer
    zeroed, and every FFN zeroed, for the models that have them.
    """
    from ..explore import knockout_eval
    from ..train import load_model

    model = load_model(directory)
    extra: dict = {}
    if selection:
        extra["selection"] = knockout_eval(model, selection_batches(spec, size))
    batches = report_batches(spec, size)
    if len(model.memory):
        extra["knockout_memory"] = knockout_eval(model, batches, memory="all")
    if any(block.ffn is not None for block in model.blocks):
        extra["knockout_ffn"] = knockout_eval(model, batches, ffn="all")
    return extra


def run_one(recipe: Recipe | str, task: TaskSpec | str, size: Size, seed: int, lr: float,
            out: str | Path | None = None, selection: bool = False, analysis: bool = True) -> dict:
    """Train one (recipe, task, lr, seed) on one thread; return its compact record.

    With ``out`` the run lives in :func:`run_dir`: a finished run is read back instead of trained,
    an interrupted one resumes from its checkpoint, and the record is written to ``result.json``.
    ``analysis`` adds the selection-split evaluation (when ``selection``) and the knock-outs.
    """
    torch.set_num_threads(1)
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    spec = TASK_SPECS[task] if isinstance(task, str) else task
    directory = run_dir(Path(out), recipe.name, spec.name, lr, seed) if out is not None else None
    result_path = directory / "result.json" if directory else None
    changed = True
    if result_path is not None and result_path.exists():
        record, changed = json.loads(result_path.read_text()), False
        if record.get("size") != asdict(size):
            raise ValueError(f"{result_path} was trained with size {record.get('size')}, not {asdict(size)}; "
                             "use another --out for another run length")
    else:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        cfg = train_config(recipe, spec, size, seed, lr, directory)
        cfg.resume = directory is not None and (directory / "checkpoint.pt").exists()
        wall, cpu = time.perf_counter(), time.process_time()
        res = train(cfg)
        train_loss = [r["loss"] for r in res["history"]["train"]]
        record = {"recipe": recipe.name, "model": recipe.config, "task": spec.name, "seed": seed, "lr": lr,
                  "final": res["final"], "params": res["params"], "tokens_per_s": res["tokens_per_s"],
                  "val": res["history"]["val"], "train_loss": train_loss,
                  "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "resumed": cfg.resume, "size": asdict(size)}
    needs = analysis and directory is not None and (
        (selection and "selection" not in record) or not any(k.startswith("knockout") for k in record))
    if needs:
        extra = analyse(directory, spec, size, selection)
        record.update(extra)
        changed = changed or bool(extra)
    if result_path is not None and changed:
        atomic_json(result_path, record)
    return record


def run_many(jobs_list: list[tuple], jobs: int, desc: str = "compare") -> list[dict]:
    """``run_one(*args)`` for every entry, ``jobs`` at a time (separate processes), results in order."""
    bar = tqdm(total=len(jobs_list), desc=desc, unit="run")
    records = []
    if jobs == 1:
        for args in jobs_list:
            bar.set_postfix_str(f"{args[0] if isinstance(args[0], str) else args[0].name}/{args[1] if isinstance(args[1], str) else args[1].name}")
            records.append(run_one(*args))
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, *args) for args in jobs_list]
            for future in futures:
                records.append(future.result())
                bar.update()
    bar.close()
    return records


def run_all(models, tasks, size, seed: int = 0, lr: float = 3e-3, jobs: int = 1, out=None) -> list[dict]:
    """Every (recipe, task) pair at one seed and learning rate (notebook 08's quick comparison)."""
    recipes, specs = resolve_recipes(models), [TASK_SPECS[t] for t in tasks]
    return run_many([(r, s, size_for(size, s.name), seed, lr, out, False, out is not None)
                     for s in specs for r in recipes], jobs)


# ---------------------------------------------------------------------------------------------
# Summaries and tables
# ---------------------------------------------------------------------------------------------


def spread(values) -> dict:
    """``{"mean", "min", "max", "std", "n"}`` of a list of numbers (std with ddof=1; 0 for one value)."""
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        raise ValueError("spread needs at least one value")
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def fmt_spread(s: dict, digits: int = 3) -> str:
    """``0.812 [0.790–0.840]`` (mean [min–max])."""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def summarise(records: list[dict]) -> dict:
    """Group the report runs by (task, recipe): mean / spread of loss, accuracy and knock-outs."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["recipe"]), []).append(r)
    summary = {}
    for (task, recipe), runs in groups.items():
        entry = {"lr": sorted({r["lr"] for r in runs}), "seeds": sorted(r["seed"] for r in runs),
                 "loss": spread(r["final"]["loss"] for r in runs), "acc": spread(r["final"]["acc"] for r in runs),
                 "tokens_per_s": float(np.median([r["tokens_per_s"] for r in runs])),
                 "wall_s": float(sum(r.get("wall_s", 0.0) for r in runs)),
                 "cpu_s": float(sum(r.get("cpu_s", 0.0) for r in runs))}
        for key in ("knockout_memory", "knockout_ffn"):
            if all(key in r for r in runs):
                entry[key] = {m: spread(r[key][m] for r in runs) for m in ("loss", "acc")}
        summary[f"{task}/{recipe}"] = entry
    return summary


def choose_lrs(sweep_records: list[dict]) -> dict[tuple[str, str], float]:
    """The learning rate with the lowest selection-split loss per (task, recipe)."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in sweep_records:
        if "selection" not in r:
            raise RuntimeError(f"sweep run {r['task']}/{r['recipe']} lr {r['lr']:g} has no selection-split "
                               "evaluation; rerun the same command to add it")
        loss = r["selection"]["loss"]
        key = (r["task"], r["recipe"])
        if not math.isfinite(loss):
            continue
        if key not in best or loss < best[key][0]:
            best[key] = (loss, r["lr"])
    return {key: lr for key, (_, lr) in best.items()}


def cost_rows(recipes) -> dict[str, dict]:
    """Parameters, activated parameters, MACs, memory share of compute and decode bytes per recipe."""
    rows = {}
    for recipe in resolve_recipes(recipes):
        model = TinyLM(get_config(recipe.config, **dict(recipe.model_overrides)))
        c = model_costs(model)
        mem = sum(v.macs for k, v in c.parts.items() if k.startswith("memory"))
        body = sum(v.macs for k, v in c.parts.items() if k.startswith("memory") or k.endswith((".ffn", ".attn")))
        rows[recipe.name] = {"params": c.params, "active": c.active, "macs": c.macs, "memory_share": mem / body,
                             "bytes_b1": c.bytes_per_token(1), "bytes_b64": c.bytes_per_token(64)}
    return rows


def results_table(records: list[dict], costs: dict[str, dict], sweep: list[dict] | None = None) -> str:
    """Markdown: cost table, the learning-rate sweep (if any), then mean [min–max] per task."""
    summary = summarise(records)
    recipes = list(dict.fromkeys(r["recipe"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lines = ["| recipe | params | activated / token | MACs / token | memory share of MACs | bytes / token, B=1 "
             "| bytes / token, B=64 | train tokens/s (1 thread) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in recipes:
        c = costs[name]
        speed = np.median([summary[f"{t}/{name}"]["tokens_per_s"] for t in tasks if f"{t}/{name}" in summary])
        cells = [format_count(c[k]) for k in ("params", "active", "macs")] + [f"{c['memory_share']:.0%}"]
        cells += [format_count(c[k]) for k in ("bytes_b1", "bytes_b64")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed:,.0f} |")
    if sweep:
        lrs = sorted({r["lr"] for r in sweep})
        chosen = choose_lrs(sweep)
        for task in dict.fromkeys(r["task"] for r in sweep):
            by = {(r["recipe"], r["lr"]): r for r in sweep if r["task"] == task}
            lines += ["", f"Learning-rate sweep on `{task}` (seed {sweep[0]['seed']}, loss on the selection split; "
                      "chosen in bold):", "", "| recipe | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                      "|---|" + "---:|" * len(lrs)]
            for name in dict.fromkeys(r["recipe"] for r in sweep if r["task"] == task):
                cells = []
                for lr in lrs:
                    r = by.get((name, lr))
                    if r is None:
                        cells.append("–")
                        continue
                    loss = r["selection"]["loss"]
                    text = f"{loss:.3f}" if math.isfinite(loss) else "diverged"
                    cells.append(f"**{text}**" if chosen.get((task, name)) == lr else text)
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for task in tasks:
        n_seeds = sorted({len(summary[f"{task}/{m}"]["seeds"]) for m in recipes if f"{task}/{m}" in summary})
        lines += ["", f"`{task}`: final validation loss and accuracy at the scored positions, mean [min–max] over "
                  f"{'/'.join(map(str, n_seeds))} seeds; last columns: accuracy with every memory layer / every "
                  "FFN zeroed at evaluation:", "",
                  "| recipe | lr | loss | accuracy | acc, memory zeroed | acc, FFNs zeroed |", "|---|---:|---:|---:|---:|---:|"]
        best_loss = min(summary[f"{task}/{m}"]["loss"]["mean"] for m in recipes if f"{task}/{m}" in summary)
        for name in recipes:
            s = summary.get(f"{task}/{name}")
            if s is None:
                continue
            loss = fmt_spread(s["loss"])
            loss = f"**{loss}**" if s["loss"]["mean"] == best_loss else loss
            ko = [fmt_spread(s[k]["acc"]) if k in s else "–" for k in ("knockout_memory", "knockout_ffn")]
            lr = "/".join(f"{v:g}" for v in s["lr"])
            lines.append(f"| {name} | {lr} | {loss} | {fmt_spread(s['acc'])} | {ko[0]} | {ko[1]} |")
    return "\n".join(lines)


def compact_summary(records: list[dict], costs: dict, meta: dict, sweep: list[dict] | None = None) -> dict:
    """What the README and notebook 08 read (``summary.json``): per task and recipe the chosen lr,
    mean / spread of loss, accuracy and knock-outs, the mean validation curve with its range, and
    the sweep's selection losses.  No per-step training logs."""
    summary = summarise(records)
    results: dict[str, dict] = {}
    for key, entry in summary.items():
        task, recipe = key.split("/")
        runs = [r for r in records if r["task"] == task and r["recipe"] == recipe]
        curves = np.array([[v["loss"] for v in r["val"]] for r in runs])  # [seeds, evals]
        entry = {**entry, "curve": {"steps": [v["step"] for v in runs[0]["val"]], "mean": curves.mean(0).tolist(),
                                    "min": curves.min(0).tolist(), "max": curves.max(0).tolist()}}
        results.setdefault(task, {})[recipe] = entry
    table: dict[str, dict] = {}
    for r in sweep or []:
        if "selection" in r:
            table.setdefault(r["task"], {}).setdefault(r["recipe"], {})[f"{r['lr']:g}"] = r["selection"]["loss"]
    return {"meta": meta, "costs": costs, "results": results, "sweep": table}


def summary_tables(summary: dict) -> str:
    """The Markdown tables of a :func:`compact_summary` (what README.md embeds between its
    ``h2h:begin`` / ``h2h:end`` markers, checked by the tests): costs, the learning-rate sweep, and
    per task mean [min–max] of loss, accuracy and the knock-outs."""
    results, costs, sweep = summary["results"], summary["costs"], summary.get("sweep", {})
    recipes = list(dict.fromkeys(r for task in results.values() for r in task))
    lines = ["| recipe | total params | activated | memory share of MACs | train tokens/s (1 thread, loaded) |",
             "|---|---:|---:|---:|---:|"]
    for name in recipes:
        c = costs[name]
        speed = np.median([results[t][name]["tokens_per_s"] for t in results if name in results[t]])
        lines.append(f"| {name} | {format_count(c['params'])} | {format_count(c['active'])} | "
                     f"{c['memory_share']:.0%} | {speed:,.0f} |")
    for task, table in sweep.items():
        lrs = sorted({float(v) for row in table.values() for v in row})
        lines += ["", f"Learning-rate sweep, `{task}` (seed {summary['meta'].get('sweep_seed', 0)}, loss on the "
                  "selection split; chosen in bold):", "",
                  "| recipe | " + " | ".join(f"lr {v:g}" for v in lrs) + " |", "|---|" + "---:|" * len(lrs)]
        for name, row in table.items():
            best = min(row, key=row.get)
            cells = [("**{:.3f}**" if f"{v:g}" == best else "{:.3f}").format(row[f"{v:g}"]) if f"{v:g}" in row
                     else "–" for v in lrs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for task, table in results.items():
        seeds = sorted({v["loss"]["n"] for v in table.values()})
        best = min(v["loss"]["mean"] for v in table.values())
        lines += ["", f"`{task}`, mean [min–max] over {'/'.join(map(str, seeds))} seeds at each recipe's chosen "
                  "learning rate; the last two columns zero every memory layer / every FFN at evaluation:", "",
                  "| recipe | lr | loss | accuracy | acc, memory zeroed | acc, FFNs zeroed |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in table.items():
            loss = fmt_spread(v["loss"])
            ko = [fmt_spread(v[k]["acc"]) if k in v else "–" for k in ("knockout_memory", "knockout_ffn")]
            lines.append(f"| {name} | {'/'.join(f'{x:g}' for x in v['lr'])} | "
                         f"{f'**{loss}**' if v['loss']['mean'] == best else loss} | {fmt_spread(v['acc'])} | "
                         f"{ko[0]} | {ko[1]} |")
    return "\n".join(lines)


def machine() -> dict:
    """Where the numbers come from: CPU, threads, load average and the git commit (when available)."""
    import platform
    import subprocess

    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def write_outputs(out: Path, records: list[dict], costs: dict, meta: dict, sweep: list[dict] | None = None) -> str:
    """results.md, results.json and one loss-curve PNG per task; returns the Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import seed_curves

    out.mkdir(parents=True, exist_ok=True)
    table = results_table(records, costs, sweep)
    head = (f"# Memory-layer comparison (size {meta['size']}, seeds {meta['seeds']}"
            + (f", learning rates chosen from {meta['sweep']} on seed {meta['sweep_seed']}" if meta.get("sweep") else
               f", lr {meta['lr']}") + ")\n\n")
    (out / "results.md").write_text(head + table + "\n")
    atomic_json(out / "results.json", {"meta": meta, "costs": costs, "summary": summarise(records),
                                       "runs": records, "sweep": sweep or []})
    atomic_json(out / "summary.json", compact_summary(records, costs, meta, sweep))
    for task in dict.fromkeys(r["task"] for r in records):
        curves: dict[str, tuple] = {}
        for r in records:
            if r["task"] == task:
                steps, losses = curves.setdefault(r["recipe"], ([v["step"] for v in r["val"]], []))
                losses.append([v["loss"] for v in r["val"]])
        fig = seed_curves(curves, title=f"{task}: validation loss (mean and min–max over seeds)")
        fig.savefig(out / f"loss_{task}.png", dpi=100)
        plt.close(fig)
    return table


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def parse_seeds(seeds: int | str | list[int] | tuple[int, ...], after_sweep: bool) -> list[int]:
    """A count (seeds 1..N after a sweep, 0..N-1 otherwise) or an explicit comma list."""
    if isinstance(seeds, str):
        seeds = [int(s) for s in seeds.split(",")] if "," in seeds else int(seeds)
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        start = 1 if after_sweep else 0
        return list(range(start, start + seeds))
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    return seeds


def compare(models=MODELS, tasks=TASKS, size: str | Size | dict = "smoke", seed: int = 0, lr: float = 3e-3,
            jobs: int = 1, out: str | Path | None = None, steps: int | None = None, seeds=None,
            sweep: tuple[float, ...] | None = None, sweep_seed: int = 0) -> dict:
    """Python entry point; returns ``{"records", "sweep", "costs", "summary", "table"}``.

    ``models``: recipe or group names.  Without ``seeds`` one run per pair with ``seed`` (the
    earlier single-seed behaviour); ``seeds`` (a count or a list) gives the multi-seed report.
    ``sweep``: learning rates to try on ``sweep_seed`` first (needs ``out``: the choice is made from
    saved checkpoints, evaluated on the selection split).
    """
    recipes = resolve_recipes(models)
    for t in tasks:
        if t not in TASK_SPECS:
            raise ValueError(f"tasks: {t!r} is not one of {TASKS}")
    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    if sweep and out is None:
        raise ValueError("sweep needs out= (runs are evaluated on the selection split from their checkpoints)")
    if lr <= 0 or (sweep and any(v <= 0 for v in sweep)):
        raise ValueError(f"learning rates must be positive, got lr={lr}, sweep={sweep}")
    seed_list = parse_seeds(seeds, bool(sweep)) if seeds is not None else [seed]
    if sweep and sweep_seed in seed_list:
        raise ValueError(f"sweep_seed={sweep_seed} must not be one of the reported seeds {seed_list}")
    specs = [TASK_SPECS[t] for t in tasks]
    sizes = {s.name: size_for(size, s.name) if steps is None else replace(size_for(size, s.name), steps=steps)
             for s in specs}
    sweep_records: list[dict] = []
    chosen: dict[tuple[str, str], float] = {}
    if sweep:
        sweep_records = run_many([(r, s, sizes[s.name], sweep_seed, v, out, True, True)
                                  for s in specs for r in recipes for v in sweep], jobs, desc="lr sweep")
        chosen = choose_lrs(sweep_records)
    jobs_list = [(r, s, sizes[s.name], sd, chosen.get((s.name, r.name), lr), out, False, out is not None)
                 for s in specs for r in recipes for sd in seed_list]
    records = run_many(jobs_list, jobs)
    costs = cost_rows(tuple(r.name for r in recipes))
    meta = {"size": size if isinstance(size, str) else "custom", "sizes": {k: asdict(v) for k, v in sizes.items()},
            "seeds": seed_list, "lr": lr, "sweep": list(sweep) if sweep else None, "sweep_seed": sweep_seed,
            "recipes": {r.name: asdict(r) for r in recipes},
            "chosen_lr": {f"{t}/{m}": v for (t, m), v in chosen.items()},
            "train_wall_s": sum(r.get("wall_s", 0.0) for r in records + sweep_records),
            "train_cpu_s": sum(r.get("cpu_s", 0.0) for r in records + sweep_records),
            "runs": len(records) + len(sweep_records), **machine()}
    if out is not None:
        table = write_outputs(Path(out), records, costs, meta, sweep_records)
    else:
        table = results_table(records, costs, sweep_records)
    return {"records": records, "sweep": sweep_records, "costs": costs, "summary": summarise(records), "table": table}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m umv2_ref.experiments.compare", description=__doc__.split("\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_const", dest="size", const="smoke", help="minutes on 2 CPU cores")
    group.add_argument("--tiny", action="store_const", dest="size", const="tiny", help="seconds (CI)")
    group.add_argument("--size", choices=tuple(SIZES), help="run lengths: tiny, smoke, full, h2h (README protocol)")
    p.add_argument("--recipes", "--models", dest="recipes", default=",".join(MODELS),
                   help=f"comma-separated recipes {tuple(RECIPES)} or groups {tuple(RECIPE_GROUPS)}")
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated, from {TASKS}")
    p.add_argument("--steps", type=int, help="override the size's step count")
    p.add_argument("--seeds", help="number of seeds (1..N after a sweep, else 0..N-1) or a comma list")
    p.add_argument("--seed", type=int, default=0, help="the single seed when --seeds is not given")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate without --sweep")
    p.add_argument("--sweep", help="comma-separated learning rates tried on --sweep-seed; the best per recipe and task "
                                   "(selection split) is used for --seeds")
    p.add_argument("--sweep-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--render", metavar="SUMMARY", help="print the tables of a summary.json and exit (no training)")
    p.set_defaults(size="full")
    args = p.parse_args(argv)
    if args.render:
        print(summary_tables(json.loads(Path(args.render).read_text())))
        return
    sweep = tuple(float(v) for v in args.sweep.split(",")) if args.sweep else None
    result = compare(tuple(args.recipes.split(",")), tuple(args.tasks.split(",")), args.size, args.seed, args.lr,
                     args.jobs, args.out, args.steps, args.seeds, sweep, args.sweep_seed)
    print(result["table"])
    print(f"\nwrote {args.out}/results.md, results.json and loss_<task>.png")


if __name__ == "__main__":
    main()
