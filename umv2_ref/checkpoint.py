"""Training checkpoints: what a checkpoint holds, how it is checked, and loading a trained model.

A checkpoint (``checkpoint.pt`` in a run directory) is one ``torch.save`` dict:

* ``format``: :data:`FORMAT_VERSION`;
* ``identity``: ``{"train": ..., "model": ..., "task": ...}``, the configuration that must match
  for the run to be resumed (``model`` is ``dataclasses.asdict(ModelConfig)``);
* ``step``: optimiser steps done;  ``model`` / ``optimizer``: their ``state_dict()``;
* ``rng``: the torch, numpy, python and data-generator RNG states;
* ``results``: the history and metrics so far.

It is read with ``torch.load(..., weights_only=True)`` only (no arbitrary pickle code runs).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .model import ModelConfig, TinyLM

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "identity", "step", "model", "optimizer", "rng", "results")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, malformed, or from another configuration."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint file where one was expected (also a ``FileNotFoundError``)."""


def make_checkpoint(identity: dict, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rng: dict, results: dict) -> dict:
    """The dict :func:`umv2_ref.train.save_checkpoint` writes (see the module docstring)."""
    return {"format": FORMAT_VERSION, "identity": identity, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng, "results": results}


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself, or ``path / checkpoint.pt`` when ``path`` is a run directory."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely and check its structure; :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise MissingCheckpointError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, a pickle refused by weights_only ...
        message = str(err)
        if "Weights only load failed" in message and "GLOBAL" in message:
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data and was "
                                  "refused unread (never load it with weights_only=False unless you trust its "
                                  "source)") from None
        reason = "not a valid torch file" if "Weights only load failed" in message else message.split("\n")[0]
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}: {reason})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is not a umv2_ref.train checkpoint (a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing or ckpt["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a umv2_ref.train checkpoint (format {ckpt.get('format')!r}, "
                              f"missing {missing})")
    identity = ckpt["identity"]
    if not (isinstance(identity, dict) and all(isinstance(identity.get(p), dict) for p in ("train", "model", "task"))):
        raise CheckpointError(f"checkpoint {path} has a malformed identity (need train/model/task dicts)")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"checkpoint {path} has a malformed model state (need a dict of tensors)")
    return ckpt


def model_from_checkpoint(ckpt: dict, where: str | Path = "checkpoint") -> TinyLM:
    """Rebuild the :class:`TinyLM` a checkpoint describes and load its weights (training mode)."""
    try:
        cfg = ModelConfig(**ckpt["identity"]["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: its model configuration does not build a ModelConfig ({err})") from None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; keep the caller's RNG untouched
        model = TinyLM(cfg)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where}: the weights do not fit the model they describe ({err})") from None
    return model


def load_model(path: str | Path) -> TinyLM:
    """The trained :class:`TinyLM` saved in a run directory (its ``checkpoint.pt``) or a checkpoint
    file, in eval mode on the CPU.  Any problem with the file raises :class:`CheckpointError`.

    >>> model = load_model("runs/umv2")          # doctest: +SKIP
    >>> logits = model(tokens).logits            # doctest: +SKIP
    """
    path = checkpoint_path(path)
    return model_from_checkpoint(read_checkpoint(path), path).eval()
