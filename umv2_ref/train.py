"""Train a tiny LM (dense, MoE or a memory model) on text or a synthetic memory task.

    python -m umv2_ref.train --model ultramemv2 --task text --steps 300 --out runs/umv2
    python -m umv2_ref.train --model pkm --task facts --steps 500 --out runs/pkm-facts
    python -m umv2_ref.train --out runs/umv2 --steps 300 --resume          # continue after Ctrl-C
    torchrun --standalone --nproc_per_node=2 -m umv2_ref.train --model moe --steps 100

From Python (notebooks): ``results = train(TrainConfig(model="ultramemv2", steps=100))``.

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
metrics files ``metrics.csv`` / ``metrics.json`` and an atomic checkpoint ``checkpoint.pt`` (model,
optimiser, step, history, the RNG states of torch, numpy, python and the data generator, and the
config).  ``--resume`` continues bit-for-bit on CPU; a checkpoint from a different run
configuration, or a damaged file, is refused with an error.  Ctrl-C finishes the current step,
saves a checkpoint and exits.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
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
from .checkpoint import CHECKPOINT, CheckpointError, MissingCheckpointError, make_checkpoint, read_checkpoint
from .checkpoint import load_model  # noqa: F401  (public: umv2_ref.train.load_model)
from . import synthetic
from .layers import TuckerRetrieval, UltraMemV2, refresh_rank1
from .metrics import UsageTracker, score_means, tucker_singular_values
from .model import MODEL_KINDS, ModelConfig, TinyLM
from .optim import cosine_lr, is_memory_value, param_groups, value_lr_multiplier

TASK_NAMES = ("text",) + tuple(synthetic.TASKS)
VALUE_LR_SCHEDULES = ("constant", "decay")
KIND_TO_CONFIG = {"moe": "moe-8of64"}  # --model moe means the 8-of-64 expert setting
RESUMED_RESULTS = ("history", "usage_history", "final", "memory")  # results carried by a checkpoint
# TrainConfig fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("out", "resume", "stop_at", "eval_every", "progress", "overwrite")


@dataclass
class TrainConfig:
    """One training run.  ``batch_size`` is the global batch (split across DDP ranks)."""

    model: str = "ultramemv2"  # a MODEL_KINDS name or a umv2_ref.configs name
    task: str = "text"  # one of TASK_NAMES
    steps: int = 200
    seed: int = 0
    batch_size: int = 16
    seq_len: int | None = None  # None: 64 for text, the task's own length for synthetic tasks
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int | None = None  # None: steps // 10
    min_lr_frac: float = 0.1  # cosine floor (UltraMem Table 4)
    grad_clip: float = 1.0
    value_lr_mult: float = 1.0  # memory values / pre-values learning-rate multiplier
    value_lr_schedule: str = "constant"  # "decay": value_lr_mult -> 1x over the run (UltraMem)
    eval_every: int = 50
    eval_batches: int = 8
    eval_batch_size: int = 32
    text_file: str | None = None  # None: the bundled CPython documentation corpus
    out: str | None = None  # directory for metrics and checkpoints (None: keep results in memory)
    resume: bool = False
    overwrite: bool = False  # start afresh even if ``out`` holds a checkpoint
    stop_at: int | None = None  # save and exit after this step (a scripted interruption)
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields
    task_overrides: dict = field(default_factory=dict)  # synthetic task fields

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if self.task not in TASK_NAMES:
            raise ValueError(f"TrainConfig.task must be one of {TASK_NAMES}, got {self.task!r}")
        if self.value_lr_schedule not in VALUE_LR_SCHEDULES:
            raise ValueError(f"TrainConfig.value_lr_schedule must be one of {VALUE_LR_SCHEDULES}, "
                             f"got {self.value_lr_schedule!r}")
        if self.lr <= 0 or self.value_lr_mult <= 0:
            raise ValueError(f"TrainConfig.lr and value_lr_mult must be positive, got {self.lr}, {self.value_lr_mult}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"TrainConfig.stop_at must be in [1, steps={self.steps}], got {self.stop_at}")
        if self.warmup is None:
            self.warmup = max(1, self.steps // 10)


# ---------------------------------------------------------------------------------------------
# Data: one interface for text and synthetic tasks
# ---------------------------------------------------------------------------------------------


class TaskData:
    """``train_batch(B, generator)`` and fixed ``eval_batches()`` for text or a synthetic task."""

    def __init__(self, cfg: TrainConfig):
        self.name = cfg.task
        if cfg.task == "text":
            if cfg.task_overrides:
                raise ValueError(f"task_overrides are for synthetic tasks, got {cfg.task_overrides} with task='text'")
            self.text = text_data.load(cfg.text_file)
            self.seq_len, self.vocab_size = cfg.seq_len or 64, text_data.VOCAB_SIZE
            self.config = {"corpus": self.text.name, "sha256": self.text.sha256, "seq_len": self.seq_len}
        else:
            overrides = dict(cfg.task_overrides)
            if cfg.seq_len is not None:
                overrides.setdefault("seq_len", cfg.seq_len)
            self.task = synthetic.make_task(cfg.task, **overrides)
            self.seq_len, self.vocab_size = self.task.seq_len, self.task.vocab_size
            self.config = synthetic.task_config(self.task)
        self.n_eval = cfg.eval_batches * cfg.eval_batch_size
        self.eval_batch_size = cfg.eval_batch_size

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.name == "text":
            return self.text.get_batch("train", batch_size, self.seq_len, generator)
        return self.task.sample(batch_size, generator)

    def eval_batches(self) -> list[tuple[Tensor, Tensor]]:
        """Text: evenly spaced validation windows.  Tasks: a prefix of the fixed evaluation set."""
        if self.name == "text":
            n_batches = self.n_eval // self.eval_batch_size
            return self.text.eval_batches("val", n_batches, self.eval_batch_size, self.seq_len)
        if self.n_eval > synthetic.EVAL_EXAMPLES:
            raise ValueError(f"eval_batches * eval_batch_size = {self.n_eval} exceeds the "
                             f"{synthetic.EVAL_EXAMPLES} evaluation examples")
        x, y = synthetic.eval_set(self.task)
        x, y = x[:self.n_eval], y[:self.n_eval]
        return [(x[i:i + self.eval_batch_size], y[i:i + self.eval_batch_size]) for i in range(0, self.n_eval, self.eval_batch_size)]


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedules
# ---------------------------------------------------------------------------------------------


def build_model_config(cfg: TrainConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    """``cfg.model`` (a kind or a configs.py name) at ``vocab_size`` with ``cfg.model_overrides``."""
    from .configs import CONFIG_NAMES, get_config

    name = KIND_TO_CONFIG.get(cfg.model, cfg.model)
    if name not in CONFIG_NAMES:
        raise ValueError(f"model must be one of {MODEL_KINDS} or {CONFIG_NAMES}, got {cfg.model!r}")
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
# Checkpoints and metrics files (atomic: write a temporary file, then os.replace)
# ---------------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(), "data": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    generator.set_state(state["data"])


def run_identity(cfg: TrainConfig, model_cfg: ModelConfig, task_cfg: dict) -> dict:
    """What must match for a checkpoint to be resumed: run fields, model and task configs."""
    run = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {"train": run, "model": asdict(model_cfg), "task": task_cfg}


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, payload: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def load_checkpoint(path: Path, identity: dict) -> dict:
    """Read a checkpoint and check it belongs to this run; :class:`CheckpointError` otherwise."""
    try:
        ckpt = read_checkpoint(path)
    except MissingCheckpointError as err:
        raise MissingCheckpointError(f"--resume: {err}") from None
    diffs = [f"{part}.{key}: checkpoint {ckpt['identity'][part].get(key)!r} vs now {value!r}"
             for part in identity for key, value in identity[part].items()
             if ckpt["identity"][part].get(key) != value]
    diffs += [f"{part}.{key}: only in checkpoint" for part in identity for key in ckpt["identity"][part]
              if key not in identity[part]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} comes from a different configuration:\n  " + "\n  ".join(diffs))
    return ckpt


CSV_COLUMNS = ("step", "split", "loss", "aux", "acc", "lr", "value_lr", "grad_norm", "tokens_per_s",
               "mem_usage", "mem_kl", "mem_dead", "mem_score_top1", "mem_score_topm", "mem_sv_ratio")


def write_metrics(out: Path, results: dict) -> None:
    """``metrics.csv`` (one row per train step and per evaluation) and ``metrics.json`` (everything)."""
    rows = [{"split": "train", **r} for r in results["history"]["train"]]
    rows += [{"split": "val", **r} for r in results["history"]["val"]]
    rows.sort(key=lambda r: (r["step"], r["split"] == "val"))

    aux_kinds = sorted({k for r in rows for k in r if k.startswith("aux_")})

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS + tuple(aux_kinds), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "metrics.csv", write_csv)
    summary = {k: v for k, v in results.items() if k != "usage_history"}
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun + gloo on CPU)
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


class StopFlag:
    """Ctrl-C (SIGINT) sets a flag checked between steps; a second Ctrl-C aborts immediately."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, world: int) -> bool:
        """True when any rank was interrupted (so that all ranks stop after the same step)."""
        if world == 1:
            return self.requested
        return all_sum(torch.tensor(float(self.requested)), world).item() > 0


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def train(config: TrainConfig | dict | list[str] | argparse.Namespace | None = None) -> dict:
    """Run one training job; returns the results dict (also written to ``out/metrics.json``).

    Keys: ``config``, ``model_config``, ``task_config``, ``params``, ``history`` (``train``: one
    dict per step; ``val``: one per evaluation), ``final`` (last evaluation), ``memory`` (per-layer
    metrics of the last evaluation), ``usage_history`` (``[(step, [counts per layer])]``),
    ``tokens_per_s``, ``interrupted``.
    """
    cfg = config_from(config)
    rank, world = init_distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    taskdata = TaskData(cfg)
    model_cfg = build_model_config(cfg, taskdata.vocab_size, taskdata.seq_len)
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
    out = Path(cfg.out) if cfg.out else None
    start = restore(cfg, out, identity, model, optimizer, generator, results)
    ddp = wrap_ddp(model, world)
    eval_batches = taskdata.eval_batches() if rank == 0 else []
    tokens_per_step = cfg.batch_size * taskdata.seq_len

    def checkpoint(step: int) -> None:
        if out is not None and rank == 0:
            save_checkpoint(out / CHECKPOINT, make_checkpoint(
                identity, step, model, optimizer, rng_state(generator),
                {k: results[k] for k in RESUMED_RESULTS if k in results}))
            write_metrics(out, results)
        if world > 1:
            dist.barrier()

    def run_eval(step: int) -> None:
        if rank == 0:
            scalars, layers, counts = evaluate(model, eval_batches)
            results["history"]["val"].append({"step": step, **scalars})
            results["memory"], results["final"] = layers, {"step": step, **scalars}
            results["usage_history"].append((step, counts))

    if start == 0:
        run_eval(0)
    bar_kwargs = {} if cfg.progress and rank == 0 else {"disable": True}
    bar = tqdm(range(start, cfg.stop_at or cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.model}/{cfg.task}",
               dynamic_ncols=True, **bar_kwargs)
    done = saved = start
    with StopFlag() as stop:
        if rank == 0 and cfg.progress:
            print(f"training {cfg.model}/{cfg.task}: steps {start}..{cfg.steps} ({world} process(es), "
                  f"{results['params']['params']:,} parameters); Ctrl-C saves and stops", file=sys.stderr, flush=True)
        for step in bar:
            tick = time.perf_counter()
            record = train_step(cfg, ddp, model, optimizer, taskdata, generator, step, rank, world)
            record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - tick)
            results["history"]["train"].append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                run_eval(done)
                checkpoint(done)
                saved = done
            if stop.agreed(world):
                results["interrupted"] = True
                break
    bar.close()
    if saved != done:  # stopped between evaluations (stop_at or Ctrl-C): evaluate and save now
        run_eval(done)
        checkpoint(done)
    if results["interrupted"] and rank == 0:
        print(f"stopped at step {done}; continue with --resume --out {cfg.out}" if out else
              f"stopped at step {done} (no out= given, nothing saved)", file=sys.stderr)
    speeds = [r["tokens_per_s"] for r in results["history"]["train"][min(5, len(results["history"]["train"]) - 1):]]
    results["tokens_per_s"] = float(np.median(speeds)) if speeds else float("nan")
    if out is not None and rank == 0:
        write_metrics(out, results)
        torch.save(results["usage_history"], out / "usage_counts.pt")
    return results


def restore(cfg: TrainConfig, out: Path | None, identity: dict, model: TinyLM, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, results: dict) -> int:
    """Prepare ``out``; with ``cfg.resume`` load its checkpoint into the model, optimiser, RNGs and
    results and return the step to continue from (0 for a fresh run)."""
    if out is None:
        if cfg.resume:
            raise ValueError("resume=True needs out= (the directory holding checkpoint.pt)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        if (out / CHECKPOINT).exists() and not cfg.overwrite:
            raise FileExistsError(f"{out / CHECKPOINT} exists: pass --resume to continue it or --overwrite to start over")
        return 0
    ckpt = load_checkpoint(out / CHECKPOINT, identity)
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
    except (RuntimeError, ValueError, KeyError) as err:
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


# ---------------------------------------------------------------------------------------------
# Configuration from the command line, a JSON file, a dict
# ---------------------------------------------------------------------------------------------


def config_from(config: TrainConfig | dict | list[str] | argparse.Namespace | None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        unknown = set(config) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return TrainConfig(**config)
    if config is None or isinstance(config, list):
        config = build_parser().parse_args(config)
    values = {}
    if config.config:
        path = Path(config.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"--config {path} must hold a JSON object of TrainConfig fields")
    values.update({k: v for k, v in vars(config).items() if v is not None and k != "config"})
    return config_from(values)


def build_parser() -> argparse.ArgumentParser:
    """CLI flags; unset flags fall back to the ``--config`` JSON, then to TrainConfig's defaults."""
    p = argparse.ArgumentParser(prog="python -m umv2_ref.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"{', '.join(MODEL_KINDS)} or a umv2_ref.configs name (moe = moe-8of64)")
    p.add_argument("--task", choices=TASK_NAMES)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="directory for metrics.csv/json and checkpoint.pt")
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", default=None, help="start afresh even if OUT has a checkpoint")
    p.add_argument("--config", help="JSON file of TrainConfig fields (model_overrides / task_overrides dicts too)")
    p.add_argument("--text-file", help="train on this UTF-8 text file instead of the bundled corpus")
    p.add_argument("--batch-size", type=int, help="global batch (split across torchrun processes)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--value-lr-mult", type=float, help="lr multiplier of memory values (UltraMem: 4)")
    p.add_argument("--value-lr-schedule", choices=VALUE_LR_SCHEDULES, help="decay: multiplier -> 1x (UltraMem)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--stop-at", type=int, help="save a checkpoint and exit after this step")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    results = train(build_parser().parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0 and "final" in results:
        final = results["final"]
        print(f"step {final['step']}: val loss {final['loss']:.4f}, acc {final['acc']:.3f}, "
              f"{results['tokens_per_s']:.0f} tokens/s")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 130 if results["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
