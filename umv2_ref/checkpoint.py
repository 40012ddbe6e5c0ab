"""Training checkpoints: their content, their checks, the RNG state, and loading a trained model.

A checkpoint (``checkpoint.pt`` in a run directory) is one ``torch.save`` dict:

* ``format``: :data:`FORMAT_VERSION`;
* ``identity``: ``{"train": ..., "model": ..., "task": ...}``, the configuration that must match
  for the run to be resumed (``model`` is ``dataclasses.asdict(ModelConfig)``);
* ``step``: optimiser steps done;  ``model`` / ``optimizer``: their ``state_dict()``;
* ``rng``: the torch, numpy, python and data-generator RNG states (:func:`rng_state`);
* ``results``: the history and metrics so far;
* ``sha256``: :func:`content_digest` of everything above (tensor bytes, dtypes and shapes, every
  number and string), so that flipped bits anywhere, tensor data included, are detected.

It is read with ``torch.load(..., weights_only=True)`` only (no pickled code runs), and every way a
file can be wrong (missing, truncated, bit rot, wrong types, another configuration, a step outside
``[0, steps]``) raises :class:`CheckpointError`.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from .model import ModelConfig, TinyLM
from .rundir import atomic_write, torch_bytes

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 2  # 2: with the sha256 content digest
REQUIRED = {"format": int, "identity": dict, "step": int, "model": dict, "optimizer": dict, "rng": dict,
            "results": dict, "sha256": str}
RNG_KEYS = ("torch", "numpy", "python", "data")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, malformed, or from another configuration."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint file where one was expected (also a ``FileNotFoundError``)."""


# ---------------------------------------------------------------------------------------------
# Content digest
# ---------------------------------------------------------------------------------------------


def content_digest(obj: object) -> str:
    """SHA-256 of a checkpoint's content: tensors (dtype, shape, bytes), dicts in order, sequences,
    and plain scalars by type and ``repr`` (exact for floats).  A tuple and a list hash alike."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _atom(h, tag: str, payload: bytes) -> None:
    h.update(f"{tag}{len(payload)}:".encode())
    h.update(payload)


def _feed(h, obj: object) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        _atom(h, "T", f"{t.dtype}{tuple(t.shape)}".encode())
        _atom(h, "B", t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        _atom(h, "D", str(len(obj)).encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        _atom(h, "L", str(len(obj)).encode())
        for item in obj:
            _feed(h, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        _atom(h, type(obj).__name__, repr(obj).encode())
    else:
        raise TypeError(f"cannot digest a {type(obj).__name__} in a checkpoint")


def weights_only(ckpt: dict) -> dict:
    """``ckpt`` without its optimiser state and results, resealed: loads with :func:`load_model`, a
    third of the size, but cannot resume training (what ``data/models`` ships)."""
    return sealed({**ckpt, "optimizer": {"state": {}, "param_groups": []}, "results": {}})


def sealed(ckpt: dict) -> dict:
    """``ckpt`` with its ``sha256`` digest (of everything else) set."""
    body = {k: v for k, v in ckpt.items() if k != "sha256"}
    return {**body, "sha256": content_digest(body)}


# ---------------------------------------------------------------------------------------------
# RNG state (torch, numpy, python, the data generator)
# ---------------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(), "data": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore :func:`rng_state`; a malformed state raises :class:`CheckpointError`."""
    try:
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(tuple(state["python"]))
        generator.set_state(state["data"])
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise CheckpointError(f"checkpoint has a malformed RNG state ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------------------------


def make_checkpoint(identity: dict, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rng: dict, results: dict) -> dict:
    """The dict :func:`save_checkpoint` writes (see the module docstring), without its digest."""
    return {"format": FORMAT_VERSION, "identity": identity, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng, "results": results}


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Seal ``ckpt`` with its digest and write it atomically (the previous file stays until the
    new one is complete)."""
    atomic_write(Path(path), torch_bytes(sealed(ckpt)))


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself, or ``path / checkpoint.pt`` when ``path`` is a run directory."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely and check its structure and digest; :class:`CheckpointError`
    (:class:`MissingCheckpointError` when there is no file) otherwise."""
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
    problem = structure_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not a umv2_ref.train checkpoint: {problem}")
    try:
        digest = content_digest({k: v for k, v in ckpt.items() if k != "sha256"})
    except TypeError as err:
        raise CheckpointError(f"checkpoint {path} is not a umv2_ref.train checkpoint: {err}") from None
    if digest != ckpt["sha256"]:
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check: its content changed after it was "
                              "written (damaged file or edited)")
    return ckpt


def structure_problem(ckpt: object) -> str | None:
    """What is wrong with the shape of a loaded checkpoint (``None`` when nothing is)."""
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}, not a dict"
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        return f"format {ckpt.get('format')!r}, missing {missing}"
    if ckpt["format"] != FORMAT_VERSION:
        return f"format {ckpt['format']!r}, expected {FORMAT_VERSION}"
    wrong = [f"{k} is a {type(ckpt[k]).__name__}, not {t.__name__}" for k, t in REQUIRED.items()
             if not isinstance(ckpt[k], t) or isinstance(ckpt[k], bool)]
    if wrong:
        return "; ".join(wrong)
    if ckpt["step"] < 0:
        return f"step {ckpt['step']} is negative"
    if not all(isinstance(ckpt["identity"].get(p), dict) for p in ("train", "model", "task")):
        return "identity needs train, model and task dicts"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        return "model must map parameter names to tensors"
    if not isinstance(ckpt["optimizer"].get("state"), dict) or not isinstance(ckpt["optimizer"].get("param_groups"), list):
        return "optimizer needs a state dict and a param_groups list"
    if set(ckpt["rng"]) != set(RNG_KEYS):
        return f"rng must hold exactly {list(RNG_KEYS)}, got {sorted(ckpt['rng'])}"
    return None


def check_resumable(ckpt: dict, identity: dict, steps: int, path: Path) -> None:
    """The checkpoint belongs to the run described by ``identity`` and its step is in ``[0, steps]``."""
    diffs = [f"{part}.{key}: checkpoint {ckpt['identity'][part].get(key)!r} vs now {value!r}"
             for part in identity for key, value in identity[part].items()
             if ckpt["identity"].get(part, {}).get(key) != value]
    diffs += [f"{part}.{key}: only in checkpoint" for part in identity for key in ckpt["identity"].get(part, {})
              if key not in identity[part]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} comes from a different configuration:\n  " + "\n  ".join(diffs))
    if not 0 <= ckpt["step"] <= steps:
        raise CheckpointError(f"checkpoint {path} is at step {ckpt['step']}, outside this run's [0, steps={steps}]")


# ---------------------------------------------------------------------------------------------
# A trained model back from its run
# ---------------------------------------------------------------------------------------------


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
