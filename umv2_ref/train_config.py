"""``TrainConfig``: one training run, validated when it is built.

Each field's ``metadata["help"]`` is its documentation and the ``--help`` text of its command-line
flag (``umv2_ref.cli`` builds one flag per field, ``seq_len`` -> ``--seq-len``).  A bad value raises
``ValueError`` naming the field and its flag, before any work starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from . import synthetic
from .checks import require_positive_int
from .model import MODEL_KINDS

TASK_NAMES = ("text",) + tuple(synthetic.TASKS)
VALUE_LR_SCHEDULES = ("constant", "decay")
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit


def _field(default, help: str, **metadata):
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def flag(name: str) -> str:
    """The command-line flag of a field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def describe(name: str) -> str:
    """How errors name a field: ``TrainConfig.seq_len (--seq-len)``."""
    return f"TrainConfig.{name} ({flag(name)})"


@dataclass
class TrainConfig:
    """One training run.  ``batch_size`` is the global batch (split across DDP ranks)."""

    model: str = _field("ultramemv2", f"{', '.join(MODEL_KINDS)} or a umv2_ref.configs name (moe = moe-8of64)")
    task: str = _field("text", "text (byte-level LM) or a synthetic memory task", choices=TASK_NAMES)
    steps: int = _field(200, "optimiser steps of the whole run")
    seed: int = _field(0, "seed of the weights, the data order and every RNG (0 <= seed < 2**32)")
    batch_size: int = _field(16, "global batch (split across torchrun processes)")
    seq_len: int | None = _field(None, "tokens per example (default: 64 for text, the task's own length otherwise)")
    lr: float = _field(3e-3, "peak AdamW learning rate")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices and memory values; not norms, biases, Tucker cores)")
    warmup: int | None = _field(None, "linear-warmup steps, 0..steps (default: steps // 10, at least 1)")
    min_lr_frac: float = _field(0.1, "cosine floor as a fraction of lr, in [0, 1] (UltraMem Table 4: 0.1)")
    grad_clip: float = _field(1.0, "gradient-norm clipping threshold")
    value_lr_mult: float = _field(1.0, "learning-rate multiplier of memory values / pre-values (UltraMem: 4)")
    value_lr_schedule: str = _field("constant", "decay: the multiplier falls to 1x over the run (UltraMem)",
                                    choices=VALUE_LR_SCHEDULES)
    eval_every: int = _field(50, "evaluate, write metrics and checkpoint every this many steps")
    eval_batches: int = _field(8, "validation batches per evaluation")
    eval_batch_size: int = _field(32, "examples per validation batch")
    text_file: str | None = _field(None, "train on this file's bytes instead of the bundled corpus (task text)")
    out: str | None = _field(None, "run directory for checkpoint.pt and metrics (default: keep results in memory)")
    resume: bool = _field(False, "continue the run in --out from its checkpoint.pt")
    overwrite: bool = _field(False, "start afresh even if --out holds a checkpoint")
    stop_at: int | None = _field(None, "save a checkpoint and stop after this step (a scripted interruption)")
    progress: bool = _field(True, "show a progress bar")
    model_overrides: dict = _field({}, "ModelConfig fields to change, as a JSON object")
    task_overrides: dict = _field({}, "synthetic task fields to change, as a JSON object")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size"):
            require_positive_int(describe(name), getattr(self, name))
        for name in ("seq_len", "stop_at"):
            if getattr(self, name) is not None:
                require_positive_int(describe(name), getattr(self, name))
        self._check_choices()
        self._check_numbers()
        for name in ("text_file", "out"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{describe(name)} must be a non-empty path, got {value!r}")
        if self.text_file is not None and self.task != "text":
            raise ValueError(f"{describe('text_file')} is for task 'text', got task {self.task!r}")
        for name in ("resume", "overwrite", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{describe(name)} must be True or False, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError(f"{describe('resume')} and {describe('overwrite')} exclude each other")
        if self.resume and self.out is None:
            raise ValueError(f"{describe('resume')} needs {flag('out')} (the directory holding checkpoint.pt)")
        for name in ("model_overrides", "task_overrides"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{describe(name)} must be a dict (JSON object) of field names, got {value!r}")
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"{describe('stop_at')} must be in [1, steps={self.steps}], got {self.stop_at}")
        if self.warmup is None:
            self.warmup = max(1, self.steps // 10)

    def _check_choices(self) -> None:
        from .configs import CONFIG_NAMES

        if self.model not in MODEL_KINDS + tuple(CONFIG_NAMES):
            raise ValueError(f"{describe('model')}: model must be one of {MODEL_KINDS} or {CONFIG_NAMES}, "
                             f"got {self.model!r}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{describe(f.name)} must be one of {choices}, got {getattr(self, f.name)!r}")

    def _check_numbers(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"{describe('seed')} must be an int in [0, 2**32), got {self.seed!r}")
        if self.warmup is not None and (isinstance(self.warmup, bool) or not isinstance(self.warmup, int)
                                        or not 0 <= self.warmup <= self.steps):
            raise ValueError(f"{describe('warmup')} must be an int in [0, steps={self.steps}], got {self.warmup!r}")
        ranges = {"lr": (0, math.inf, False), "value_lr_mult": (0, math.inf, False), "grad_clip": (0, math.inf, False),
                  "weight_decay": (0, math.inf, True), "min_lr_frac": (0, 1, True)}
        for name, (lo, hi, lo_ok) in ranges.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not (lo <= value if lo_ok else lo < value) or value > hi:
                bound = f"[{lo}, {hi}]" if hi != math.inf else (f">= {lo}" if lo_ok else f"> {lo}")
                raise ValueError(f"{describe(name)} must be a finite number {bound}, got {value!r}")
