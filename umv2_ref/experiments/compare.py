"""Dense vs MoE vs memory LMs at matched activated parameters, on text and the synthetic tasks.

    python -m umv2_ref.experiments.compare --smoke --out runs/compare-smoke      # <= 4 min, 2 cores
    python -m umv2_ref.experiments.compare --out runs/compare-full --jobs 4      # the full size

Trains every model of ``--models`` (default: dense, MoE with 2-of-16 and 8-of-64 experts, PKM,
UltraMem, UltraMemV2; all ~218k activated parameters and ~1.1M total, see ``umv2_ref.configs``)
on every task of ``--tasks`` (bundled text corpus, MQAR, multi-round recall, in-context label
mapping, fact memorisation; ``umv2_ref.data`` / ``umv2_ref.synthetic``) with the same optimiser,
schedule, seed and data order, then writes into ``--out``:

* ``results.md``: the cost table (parameters, activated parameters, MACs / token, bf16 bytes read
  per token in a decode step, measured training tokens/s) and the final validation loss and
  accuracy per task (accuracy at the scored positions; for text, next-byte accuracy);
* ``results.json``: every run's config, validation history and train losses;
* ``loss_<task>.png``: validation-loss curves of all models for each task.

Every run uses one thread (``torch.set_num_threads(1)``) and ``--jobs`` runs go in parallel, so
tokens/s compare like with like.  UltraMemV2's claims (arXiv 2508.18756, Table 2: parity with an
8-expert MoE, gains on multi-round memorisation and in-context learning) are at 2.5B activated
parameters and trillions of tokens; at this size they are a hypothesis to test, not an expectation.
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..configs import CONFIG_NAMES, config_costs
from ..costs import format_count
from ..train import TASK_NAMES, TrainConfig, train

MODELS = ("dense", "moe-2of16", "moe-8of64", "pkm", "ultramem", "ultramemv2")
TASKS = TASK_NAMES  # text, mqar, recall, icl, facts


@dataclass(frozen=True)
class Size:
    """Run length of every (model, task) pair."""

    steps: int
    batch_size: int
    eval_every: int
    eval_batches: int
    eval_batch_size: int


SIZES = {
    "tiny": Size(steps=4, batch_size=4, eval_every=2, eval_batches=1, eval_batch_size=8),  # CI: seconds
    "smoke": Size(steps=60, batch_size=16, eval_every=20, eval_batches=2, eval_batch_size=32),  # <= 4 min
    "full": Size(steps=1500, batch_size=32, eval_every=100, eval_batches=8, eval_batch_size=32),
}


def run_one(model: str, task: str, size: Size, seed: int, lr: float) -> dict:
    """Train one (model, task) pair on one thread; return the compact record the tables need."""
    torch.set_num_threads(1)
    cfg = TrainConfig(model=model, task=task, seed=seed, lr=lr, steps=size.steps, batch_size=size.batch_size,
                      eval_every=size.eval_every, eval_batches=size.eval_batches,
                      eval_batch_size=size.eval_batch_size, progress=False)
    res = train(cfg)
    return {"model": model, "task": task, "final": res["final"], "params": res["params"],
            "tokens_per_s": res["tokens_per_s"], "val": res["history"]["val"],
            "train_loss": [r["loss"] for r in res["history"]["train"]]}


def run_all(models: tuple[str, ...], tasks: tuple[str, ...], size: Size, seed: int, lr: float, jobs: int) -> list[dict]:
    """Every (model, task) pair, ``jobs`` at a time (separate processes), in a fixed order."""
    pairs = [(m, t) for t in tasks for m in models]
    bar = tqdm(total=len(pairs), desc="compare", unit="run")
    records = []
    if jobs == 1:
        for m, t in pairs:
            bar.set_postfix_str(f"{m}/{t}")
            records.append(run_one(m, t, size, seed, lr))
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, m, t, size, seed, lr) for m, t in pairs]
            for future in futures:
                records.append(future.result())
                bar.update()
    bar.close()
    return records


def cost_rows(models: tuple[str, ...]) -> dict[str, dict]:
    rows = {}
    for name in models:
        c = config_costs(name)
        rows[name] = {"params": c.params, "active": c.active, "macs": c.macs,
                      "bytes_b1": c.bytes_per_token(1), "bytes_b64": c.bytes_per_token(64)}
    return rows


def results_table(records: list[dict], costs: dict[str, dict]) -> str:
    """Markdown: one cost table and one results table (best value per task in bold)."""
    models = list(dict.fromkeys(r["model"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    by = {(r["model"], r["task"]): r for r in records}
    lines = ["| model | params | activated / token | MACs / token | bytes / token, B=1 | bytes / token, B=64 "
             "| train tokens/s (1 thread) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        c = costs[m]
        speed = np.median([by[m, t]["tokens_per_s"] for t in tasks if (m, t) in by])
        cells = [format_count(c[k]) for k in ("params", "active", "macs", "bytes_b1", "bytes_b64")]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {speed:,.0f} |")
    lines += ["", "Final validation loss / accuracy at the scored positions (best per task in bold):", "",
              "| model | " + " | ".join(f"{t} loss | {t} acc" for t in tasks) + " |",
              "|---|" + "---:|---:|" * len(tasks)]
    best = {t: (min(by[m, t]["final"]["loss"] for m in models), max(by[m, t]["final"]["acc"] for m in models))
            for t in tasks}
    for m in models:
        cells = []
        for t in tasks:
            loss, acc = by[m, t]["final"]["loss"], by[m, t]["final"]["acc"]
            cells.append(f"**{loss:.3f}**" if loss == best[t][0] else f"{loss:.3f}")
            cells.append(f"**{acc:.3f}**" if acc == best[t][1] else f"{acc:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, records: list[dict], costs: dict, meta: dict) -> str:
    """results.md, results.json and one loss-curve PNG per task; returns the Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import loss_curves

    out.mkdir(parents=True, exist_ok=True)
    table = results_table(records, costs)
    head = (f"# Memory-layer comparison ({meta['size']}: {meta['steps']} steps, batch {meta['batch_size']}, "
            f"seed {meta['seed']}, lr {meta['lr']})\n\n")
    (out / "results.md").write_text(head + table + "\n")
    (out / "results.json").write_text(json.dumps({"meta": meta, "costs": costs, "runs": records}, indent=1))
    for task in dict.fromkeys(r["task"] for r in records):
        curves = {r["model"]: ([v["step"] for v in r["val"]], [v["loss"] for v in r["val"]])
                  for r in records if r["task"] == task}
        fig = loss_curves(curves, title=f"{task}: validation loss")
        fig.savefig(out / f"loss_{task}.png", dpi=100)
        plt.close(fig)
    return table


def compare(models: tuple[str, ...] = MODELS, tasks: tuple[str, ...] = TASKS, size: str = "smoke", seed: int = 0,
            lr: float = 3e-3, jobs: int = 1, out: str | Path | None = None, steps: int | None = None) -> dict:
    """Python entry point; returns ``{"records", "costs", "table"}`` (and writes ``out`` if given)."""
    for m in models:
        if m not in CONFIG_NAMES:
            raise ValueError(f"models: {m!r} is not one of {CONFIG_NAMES}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: {t!r} is not one of {TASKS}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    run_size = SIZES[size] if steps is None else replace(SIZES[size], steps=steps)
    records = run_all(tuple(models), tuple(tasks), run_size, seed, lr, jobs)
    costs = cost_rows(tuple(models))
    meta = {"size": size, "steps": run_size.steps, "batch_size": run_size.batch_size, "seed": seed, "lr": lr}
    table = write_outputs(Path(out), records, costs, meta) if out is not None else results_table(records, costs)
    return {"records": records, "costs": costs, "table": table}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m umv2_ref.experiments.compare", description=__doc__.split("\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_const", dest="size", const="smoke", help="<= 4 min on 2 CPU cores")
    group.add_argument("--tiny", action="store_const", dest="size", const="tiny", help="seconds (CI)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {CONFIG_NAMES}")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {TASKS}")
    p.add_argument("--steps", type=int, help="override the size's step count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/compare")
    p.set_defaults(size="full")
    args = p.parse_args(argv)
    result = compare(tuple(args.models.split(",")), tuple(args.tasks.split(",")), args.size, args.seed, args.lr,
                     args.jobs, args.out, args.steps)
    print(result["table"])
    print(f"\nwrote {args.out}/results.md, results.json and loss_<task>.png")


if __name__ == "__main__":
    main()
