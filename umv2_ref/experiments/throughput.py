"""Training throughput of every tiny configuration on this machine (CPU by default).

    python -m umv2_ref.experiments.throughput                       # all configs, batch 16 x 64 tokens
    python -m umv2_ref.experiments.throughput --configs dense ultramemv2 --steps 20

One training step = forward, :func:`~umv2_ref.model.lm_loss`, backward, ``AdamW.step()`` (the
:func:`umv2_ref.optim.param_groups` groups) and :func:`~umv2_ref.layers.refresh_rank1`, as in
``umv2_ref.train``.  Every model runs in the same process on the same random tokens; after
``--warmup`` untimed steps the medians of ``--steps`` timed steps give the step's process CPU time
(``time.process_time``: other jobs on a shared machine disturb it far less than wall time; with
several threads it sums them) and its wall time, hence tokens/s; the configs take turns step by
step, so a change in machine load hits all of them alike (the load average is printed before and
after).  The overhead column is ``CPU time / dense CPU time``: the dense model has the same
activated parameters as every other configuration (``umv2_ref.configs``), so it is the price of
sparsity at equal activated size.  Not a timed test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from tqdm import tqdm

from ..configs import CONFIG_NAMES, get_config
from ..costs import format_count, model_costs
from ..layers import refresh_rank1
from ..model import TinyLM, lm_loss
from ..optim import param_groups


class Trainer:
    """One config's model and optimiser; :meth:`step` runs and times one training step."""

    def __init__(self, name: str, seq: int):
        torch.manual_seed(0)
        self.model = TinyLM(get_config(name, max_seq_len=seq))
        self.opt = torch.optim.AdamW(param_groups(self.model, lr=1e-3))

    def step(self, tokens: torch.Tensor) -> tuple[float, float]:
        """One step on ``tokens [B, T+1]``; returns its (process CPU, wall-clock) seconds."""
        cpu, wall = time.process_time(), time.perf_counter()
        loss, _ = lm_loss(self.model(tokens[:, :-1]), tokens[:, 1:])  # inputs, targets [B, T]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        refresh_rank1(self.model)
        return time.process_time() - cpu, time.perf_counter() - wall


def median_step_times(names: list[str], tokens: torch.Tensor, steps: int,
                      warmup: int) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds per training step of each config, timed round-robin (one step of
    each config per round) so that a change in machine load hits every config alike."""
    trainers = {name: Trainer(name, tokens.shape[1] - 1) for name in names}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for step in tqdm(range(warmup + steps), desc="rounds", leave=False):
        for name, trainer in trainers.items():
            seconds = trainer.step(tokens)
            if step >= warmup:
                times[name].append(seconds)
    return {name: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t)) for name, t in times.items()}


def machine() -> str:
    """One line naming the machine and the torch threading setup."""
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, {platform.system()} {platform.release()}, load average {load}")


def throughput_table(names: list[str], batch: int, seq: int, steps: int, warmup: int) -> str:
    """Markdown table of median step CPU and wall time, tokens/s and CPU-time overhead vs ``dense``."""
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(0))  # [B, T+1]
    median = median_step_times(names, tokens, steps, warmup)
    dense = median.get("dense", (None, None))[0]
    rows = ["| config | total params | activated | step CPU (ms) | step wall (ms) | tokens/s (wall) | "
            "CPU time / dense |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        costs = model_costs(TinyLM(get_config(name)))
        cpu, wall = median[name]
        ratio = f"{cpu / dense:.2f}x" if dense else "-"
        rows.append(f"| {name} | {format_count(costs.params)} | {format_count(costs.active)} | "
                    f"{1e3 * cpu:.1f} | {1e3 * wall:.1f} | {batch * seq / wall:,.0f} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIG_NAMES), choices=CONFIG_NAMES)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"Training throughput (forward + backward + AdamW), batch {args.batch} x {args.seq} tokens, "
          f"median of {args.steps} steps after {args.warmup} warmup.\nMachine: {machine()}\n")
    print(throughput_table(args.configs, args.batch, args.seq, args.steps, args.warmup))
    print(f"\nAfter: {machine()}")


if __name__ == "__main__":
    main()
