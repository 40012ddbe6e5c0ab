"""Train a tiny LM (dense, MoE or a memory model) on text or a synthetic memory task.

    python -m umv2_ref.train --model ultramemv2 --task text --steps 300 --out runs/umv2
    python -m umv2_ref.train --model pkm --task facts --steps 500 --out runs/pkm-facts
    python -m umv2_ref.train --out runs/umv2 --steps 300 --resume          # continue after Ctrl-C
    torchrun --standalone --nproc_per_node=2 -m umv2_ref.train --model moe --steps 100

From Python (notebooks): ``results = train(TrainConfig(model="ultramemv2", steps=100))``, and
``model = load_model("runs/umv2")`` for the trained model.

What one optimiser step does (nanoGPT-style loop):

1. learning rate: linear warmup + cosine to ``min_lr_frac * lr`` (:func:`umv2_ref.optim.cosine_lr`);
   memory values / pre-values get ``lr * value_lr_mult`` through their own AdamW parameter group,
   constant (UltraMemV2 Sec. 4.2.9 recommends 1x) or decaying to 1x (UltraMem's 4x -> 1x,
   :func:`umv2_ref.optim.value_lr_multiplier`);
2. a *global* batch is drawn from the data generator; under ``torchrun`` every rank draws the same
   global batch and keeps its shard, so the run matches a single process on the same batch;
3. loss = cross-entropy over scored targets + the model's (already weighted) auxiliary losses;
4. backward, gradient clipping, ``AdamW.step()``, then :func:`umv2_ref.layers.refresh_rank1`
   (the TDQKR prefilter's rank-1 factors follow the updated Tucker cores).

Every ``eval_every`` steps: validation loss and accuracy at the scored positions, memory metrics
(slot usage, KL to uniform, dead slots, top-1 / top-m score means, Tucker singular values), the
metrics files ``metrics.csv`` / ``metrics.json`` and a checkpoint ``checkpoint.pt`` (model,
optimiser, step, history, the RNG states of torch, numpy, python and the data generator, the
config and a SHA-256 of it all).  ``--resume`` continues bit-for-bit on CPU; a checkpoint from a
different run configuration, or a damaged or edited file, is refused with a ``CheckpointError``.
SIGINT (Ctrl-C) or SIGTERM finishes the current step, saves a checkpoint and exits (130 / 143).

The pieces: :mod:`umv2_ref.train_config` (``TrainConfig`` and its checks), :mod:`umv2_ref.cli`
(the command line), :mod:`umv2_ref.checkpoint` (checkpoint content, checks, ``load_model``) and
:mod:`umv2_ref.rundir` (the run directory: lock, atomic writes, metrics files).  This module is
the loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import costs
from . import data as text_data
from . import synthetic
from .checkpoint import (CHECKPOINT, CheckpointError, MissingCheckpointError, check_resumable, load_model,
                         make_checkpoint, read_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .cli import build_parser, config_from, main
from .layers import TuckerRetrieval, UltraMemV2, refresh_rank1
from .metrics import UsageTracker, score_means, tucker_singular_values
from .model import ModelConfig, TinyLM
from .optim import cosine_lr, is_memory_value, param_groups, value_lr_multiplier
from .rundir import RunLock, open_run_dir, write_metrics, write_usage
from .train_config import TASK_NAMES, VALUE_LR_SCHEDULES, TrainConfig

__all__ = ["TrainConfig", "CheckpointError", "TASK_NAMES", "VALUE_LR_SCHEDULES", "train", "prepare", "Run",
           "load_model", "evaluate", "TaskData", "build_parser", "config_from", "main", "make_checkpoint",
           "save_checkpoint"]

KIND_TO_CONFIG = {"moe": "moe-8of64"}  # --model moe means the 8-of-64 expert setting
RESUMED_RESULTS = ("history", "usage_history", "final", "memory")  # results carried by a checkpoint
# TrainConfig fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("out", "resume", "stop_at", "eval_every", "progress", "overwrite")


# ---------------------------------------------------------------------------------------------
# Data: one interface for text and synthetic tasks
# ---------------------------------------------------------------------------------------------


class TaskData:
    """``train_batch(B, generator)`` and fixed ``eval_batches()`` for text or a synthetic task.

    Everything that could refuse (file, split sizes, task fields, evaluation size) is checked here,
    before training starts.
    """

    def __init__(self, cfg: TrainConfig):
        self.name = cfg.task
        self.n_eval = cfg.eval_batches * cfg.eval_batch_size
        self.eval_batch_size = cfg.eval_batch_size
        if cfg.task == "text":
            if cfg.task_overrides:
                raise ValueError(f"task_overrides are for synthetic tasks, got {cfg.task_overrides} with task='text'")
            self.text = text_data.load(cfg.text_file)
            self.seq_len, self.vocab_size = cfg.seq_len or 64, text_data.VOCAB_SIZE
            self.text.check_seq_len(self.seq_len)
            self.config = {"corpus": self.text.name, "sha256": self.text.sha256, "seq_len": self.seq_len}
            return
        overrides = dict(cfg.task_overrides)
        fields = {f.name for f in dataclasses.fields(synthetic.TASKS[cfg.task])}
        if set(overrides) - fields:
            raise ValueError(f"task_overrides has unknown {cfg.task} fields {sorted(set(overrides) - fields)}; "
                             f"known: {sorted(fields)}")
        if cfg.seq_len is not None:
            overrides.setdefault("seq_len", cfg.seq_len)
        self.task = synthetic.make_task(cfg.task, **overrides)
        self.seq_len, self.vocab_size = self.task.seq_len, self.task.vocab_size
        self.config = synthetic.task_config(self.task)
        if self.n_eval > synthetic.EVAL_EXAMPLES:
            raise ValueError(f"eval_batches * eval_batch_size = {self.n_eval} exceeds the "
                             f"{synthetic.EVAL_EXAMPLES} evaluation examples")

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.name == "text":
            return self.text.get_batch("train", batch_size, self.seq_len, generator)
        return self.task.sample(batch_size, generator)

    def eval_batches(self) -> list[tuple[Tensor, Tensor]]:
        """Text: evenly spaced validation windows.  Tasks: a prefix of the fixed evaluation set."""
        if self.name == "text":
            n_batches = self.n_eval // self.eval_batch_size
            return self.text.eval_batches("val", n_batches, self.eval_batch_size, self.seq_len)
        x, y = synthetic.eval_set(self.task)
        x, y = x[:self.n_eval], y[:self.n_eval]
        return [(x[i:i + self.eval_batch_size], y[i:i + self.eval_batch_size]) for i in range(0, self.n_eval, self.eval_batch_size)]


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedules
# ---------------------------------------------------------------------------------------------


def build_model_config(cfg: TrainConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    """``cfg.model`` (a kind or a configs.py name) at ``vocab_size`` with ``cfg.model_overrides``."""
    from .configs import get_config

    name = KIND_TO_CONFIG.get(cfg.model, cfg.model)
    unknown = set(cfg.model_overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"model_overrides has unknown ModelConfig fields {sorted(unknown)}")
    mcfg = get_config(name, vocab_size=vocab_size, **cfg.model_overrides)
    if seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}; "
                         "raise it with model_overrides={'max_seq_len': ...}")
    return mcfg


def lr_at(cfg: TrainConfig, step: int) -> tuple[float, float]:
    """``(base lr, value-lr multiplier)`` for optimiser step ``step`` (0-based)."""
    lr = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr_frac)
    if cfg.value_lr_schedule == "decay":
        return lr, value_lr_multiplier(step, cfg.steps, start=cfg.value_lr_mult)
    return lr, cfg.value_lr_mult


def set_lr(optimizer: torch.optim.Optimizer, lr: float, value_mult: float) -> None:
    for group in optimizer.param_groups:
        if group["name"] == "memory_values":
            group["lr_mult"] = value_mult
        group["lr"] = lr * group["lr_mult"]


def count_params(model: TinyLM) -> dict[str, int]:
    """Total parameters and the memory-table share (values / pre-values), deduplicated."""
    tables = sum(p.numel() for name, p in model.named_parameters() if is_memory_value(name))
    return {"params": costs.count_params(model), "table_params": tables}


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------


def loss_terms(out, targets: Tensor, n_scored: int, world: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss to backprop, summed CE of this shard, summed aux)``.

    CE is summed over this rank's scored targets and divided by the *global* count times ``1/world``
    so that DDP's gradient average equals the single-process mean over the global batch exactly.
    """
    logits = out.logits  # [b, T, V]
    ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=synthetic.IGNORE, reduction="sum")
    aux = sum(out.aux_losses.values(), ce_sum.new_zeros(()))
    return ce_sum * (world / n_scored) + aux, ce_sum.detach(), aux.detach()


def memory_tables(model: TinyLM) -> list[int]:
    """Rows of the table each memory layer's ``MemoryOutput.indices`` address."""
    return [layer.tables()[1].shape[0] if isinstance(layer, UltraMemV2) else layer.values.shape[0]
            for layer in model.memory]


@torch.no_grad()
def evaluate(model: TinyLM, batches: list[tuple[Tensor, Tensor]]) -> tuple[dict, list[dict], list[Tensor]]:
    """Validation loss / accuracy at scored positions and per-memory-layer metrics.

    Returns ``(scalars, per-layer metric dicts, per-layer slot-count vectors)``.
    """
    was_training = model.training
    model.eval()
    trackers = [UsageTracker(n) for n in memory_tables(model)]
    scores = [{"top1": 0.0, "topm": 0.0} for _ in trackers]
    ce, correct, count = 0.0, 0, 0
    for x, y in batches:
        out = model(x)
        mask = y != synthetic.IGNORE  # [b, T]
        ce += F.cross_entropy(out.logits[mask].float(), y[mask], reduction="sum").item()
        correct += (out.logits[mask].argmax(-1) == y[mask]).sum().item()
        count += int(mask.sum())
        for j, mem in enumerate(out.memory):
            trackers[j].update(mem.indices, mem.scores)
            for key, value in score_means(mem.scores, mem.indices).items():
                scores[j][key] += value / len(batches)
    model.train(was_training)
    layers = []
    for j, (tracker, layer) in enumerate(zip(trackers, model.memory)):
        stats = {**tracker.summary(), **{f"score_{k}": v for k, v in scores[j].items()}}
        retrieval = getattr(layer, "retrieval", None)
        if isinstance(retrieval, TuckerRetrieval):
            stats["tucker_sv"] = tucker_singular_values(retrieval.cores).tolist()
        layers.append(stats)
    scalars = {"loss": ce / count, "acc": correct / count}
    if layers:
        scalars.update({f"mem_{k}": float(np.mean([s[k] for s in layers])) for k in ("usage", "kl", "dead", "score_top1", "score_topm")})
        if "tucker_sv" in layers[0]:
            scalars["mem_sv_ratio"] = float(np.mean([s["tucker_sv"][0] / max(s["tucker_sv"][-1], 1e-12) for s in layers]))
    return scalars, layers, [t.counts.clone() for t in trackers]


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun + gloo on CPU) and signals
# ---------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """``(rank, world)``; starts a gloo (CPU) or nccl (CUDA) process group under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_sum(value: Tensor, world: int) -> Tensor:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_max(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor(float(value))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (``kill``, ``docker stop``, Slurm) sets a flag checked between steps;
    a second signal aborts immediately."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step and saving a checkpoint (signal again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, world: int) -> int:
        """The signal number when any rank was signalled (so that all ranks stop after the same step), else 0."""
        return int(all_max(self.signum, world))


# ---------------------------------------------------------------------------------------------
# A run: prepare (every check, before any training), fit (the loop), close (release --out)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything a prepared run needs; :func:`prepare` builds it, :meth:`fit` trains it."""

    cfg: TrainConfig
    rank: int
    world: int
    taskdata: TaskData
    model: TinyLM
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    identity: dict
    results: dict
    out: Path | None
    lock: RunLock | None
    start: int = 0

    def close(self) -> None:
        """Release the lock on ``out`` (idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def checkpoint(self, step: int) -> None:
        if self.out is not None and self.rank == 0:
            save_checkpoint(self.out / CHECKPOINT, make_checkpoint(
                self.identity, step, self.model, self.optimizer, rng_state(self.generator),
                {k: self.results[k] for k in RESUMED_RESULTS if k in self.results}))
            write_metrics(self.out, self.results)
        if self.world > 1:
            dist.barrier()

    def record_eval(self, step: int, batches: list) -> None:
        if self.rank == 0:
            scalars, layers, counts = evaluate(self.model, batches)
            self.results["history"]["val"].append({"step": step, **scalars})
            self.results["memory"], self.results["final"] = layers, {"step": step, **scalars}
            self.results["usage_history"].append((step, counts))

    def fit(self) -> dict:
        """Train from ``start`` to ``steps`` (or ``stop_at``, or a signal); returns the results dict."""
        cfg, results, rank, world = self.cfg, self.results, self.rank, self.world
        ddp = wrap_ddp(self.model, world)
        eval_batches = self.taskdata.eval_batches() if rank == 0 else []
        tokens_per_step = cfg.batch_size * self.taskdata.seq_len
        done = saved = self.start
        with StopFlag() as stop:  # also covers the final saves: a signal then only sets the flag
            if self.start == 0:
                self.record_eval(0, eval_batches)
            if rank == 0 and cfg.progress:
                print(f"training {cfg.model}/{cfg.task}: steps {self.start}..{cfg.steps} ({world} process(es), "
                      f"{results['params']['params']:,} parameters); Ctrl-C saves and stops", file=sys.stderr, flush=True)
            quiet = {} if cfg.progress and rank == 0 else {"disable": True}  # TQDM_DISABLE=1 still silences it
            bar = tqdm(range(self.start, cfg.stop_at or cfg.steps), initial=self.start, total=cfg.steps,
                       desc=f"{cfg.model}/{cfg.task}", dynamic_ncols=True, **quiet)
            for step in bar:
                tick = time.perf_counter()
                record = train_step(cfg, ddp, self.model, self.optimizer, self.taskdata, self.generator, step, rank, world)
                record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - tick)
                results["history"]["train"].append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                done = step + 1
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    self.record_eval(done, eval_batches)
                    self.checkpoint(done)
                    saved = done
                signum = stop.agreed(world)
                if signum:
                    results["interrupted"], results["signal"] = True, signum
                    break
            bar.close()
            if saved != done:  # stopped between evaluations (stop_at or a signal): evaluate and save now
                self.record_eval(done, eval_batches)
                self.checkpoint(done)
            if results["interrupted"] and rank == 0:
                print(f"stopped at step {done}; continue with --resume --out {cfg.out}" if self.out else
                      f"stopped at step {done} (no out= given, nothing saved)", file=sys.stderr)
            speeds = [r["tokens_per_s"] for r in results["history"]["train"][min(5, len(results["history"]["train"]) - 1):]]
            results["tokens_per_s"] = float(np.median(speeds)) if speeds else float("nan")
            if self.out is not None and rank == 0:
                write_metrics(self.out, results)
                write_usage(self.out, results["usage_history"])
        return results


def prepare(config: TrainConfig | dict | list[str] | argparse.Namespace | None = None) -> Run:
    """Validate everything and build the run: config, data, model, optimiser, the locked ``out``
    directory and, with ``resume``, the restored checkpoint.  Nothing is trained yet; every user
    mistake is refused here.  Call :meth:`Run.close` (or use :func:`train`) to release ``out``."""
    cfg = config_from(config)
    rank, world = init_distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    taskdata = TaskData(cfg)
    model_cfg = build_model_config(cfg, taskdata.vocab_size, taskdata.seq_len)
    out = Path(cfg.out) if cfg.out else None
    lock = open_run_dir(out) if out is not None and rank == 0 else None  # only rank 0 writes
    try:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = TinyLM(model_cfg)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, cfg.value_lr_mult), betas=(0.9, 0.95))
        generator = torch.Generator().manual_seed(cfg.seed)
        identity = run_identity(cfg, model_cfg, taskdata.config)
        results = {"config": asdict(cfg), "model_config": asdict(model_cfg), "task_config": taskdata.config,
                   "params": count_params(model), "world_size": world,
                   "history": {"train": [], "val": []}, "usage_history": [], "interrupted": False}
        start = restore(cfg, out, identity, model, optimizer, generator, results)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Run(cfg, rank, world, taskdata, model, optimizer, generator, identity, results, out, lock, start)


def train(config: TrainConfig | dict | list[str] | argparse.Namespace | None = None) -> dict:
    """Run one training job; returns the results dict (also written to ``out/metrics.json``).

    Keys: ``config``, ``model_config``, ``task_config``, ``params``, ``history`` (``train``: one
    dict per step; ``val``: one per evaluation), ``final`` (last evaluation), ``memory`` (per-layer
    metrics of the last evaluation), ``usage_history`` (``[(step, [counts per layer])]``),
    ``tokens_per_s``, ``interrupted`` (and ``signal``, its number, when a signal stopped it).
    """
    run = prepare(config)
    try:
        return run.fit()
    finally:
        run.close()


def run_identity(cfg: TrainConfig, model_cfg: ModelConfig, task_cfg: dict) -> dict:
    """What must match for a checkpoint to be resumed: run fields, model and task configs."""
    run = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {"train": run, "model": asdict(model_cfg), "task": task_cfg}


def restore(cfg: TrainConfig, out: Path | None, identity: dict, model: TinyLM, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, results: dict) -> int:
    """With ``cfg.resume`` load ``out``'s checkpoint into the model, optimiser, RNGs and results and
    return the step to continue from; 0 for a fresh run (which refuses to replace a checkpoint
    unless ``cfg.overwrite``)."""
    if out is None:
        return 0
    path = out / CHECKPOINT
    if not cfg.resume:
        if path.exists() and not cfg.overwrite:
            raise FileExistsError(f"{path} exists: pass --resume to continue it or --overwrite to start over")
        return 0
    try:
        ckpt = read_checkpoint(path)
    except MissingCheckpointError as err:
        raise MissingCheckpointError(f"--resume: {err}") from None
    check_resumable(ckpt, identity, cfg.steps, path)
    load_state(model, optimizer, ckpt)
    set_rng_state(ckpt["rng"], generator)
    results.update(ckpt["results"])
    return ckpt["step"]


def train_step(cfg: TrainConfig, ddp: nn.Module, model: TinyLM, optimizer: torch.optim.Optimizer,
               taskdata: TaskData, generator: torch.Generator, step: int, rank: int, world: int) -> dict:
    """One optimiser step on this rank's shard of the global batch; returns the step's log record."""
    lr, value_mult = lr_at(cfg, step)
    set_lr(optimizer, lr, value_mult)
    x, y = taskdata.train_batch(cfg.batch_size, generator)  # [B, T] global batch
    n_scored = int((y != synthetic.IGNORE).sum())
    shard = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    out = ddp(x[shard])  # LMOutput, logits [B/world, T, V]
    loss, ce_sum, aux = loss_terms(out, y[shard], n_scored, world)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} ({cfg.model}/{cfg.task})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    refresh_rank1(model)
    groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
    record = {"step": step + 1, "loss": all_sum(ce_sum, world).item() / n_scored,
              "aux": all_sum(aux, world).item() / world, "lr": groups["decay"],
              "value_lr": groups.get("memory_values", float("nan")), "grad_norm": grad_norm.item()}
    for key, value in out.aux_losses.items():  # "block0.moe_balance" -> aux_moe_balance, summed over layers
        name = "aux_" + key.split(".", 1)[1]
        record[name] = record.get(name, 0.0) + value.item()
    return record


def load_state(model: TinyLM, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    """Strict loads; any shape or key mismatch becomes a :class:`CheckpointError`."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"checkpoint does not fit this model/optimiser: {err}") from None


def has_unused_parameters(model: TinyLM, vocab_size: int) -> bool:
    """True when a probe forward/backward leaves some parameter without a gradient (e.g. a loss
    path that is switched off); DDP must then be told to look for unused parameters."""
    probe = torch.randint(vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))  # [2, 8]
    model.eval()  # no running-statistics updates from the probe
    out = model(probe)
    (out.logits.float().mean() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.train()
    return unused


def wrap_ddp(model: TinyLM, world: int) -> nn.Module:
    """DistributedDataParallel under torchrun (gradients averaged over ranks after backward).

    The MoE runs every expert as one batched matmul and the memory layers gather rows of their
    tables, so all parameters normally get a gradient every step (rows a step did not read get
    zeros); a model where a probe step leaves some parameter unused gets ``find_unused_parameters``.
    """
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, find_unused_parameters=has_unused_parameters(model, model.cfg.vocab_size))


if __name__ == "__main__":
    sys.exit(main())
