"""The command line of ``python -m umv2_ref.train``: one flag per :class:`TrainConfig` field.

The flags are built from the dataclass fields (name, type, choices and the ``help`` metadata), so
every field is reachable: ``seq_len`` -> ``--seq-len N``, booleans -> ``--resume`` /
``--no-resume``, dicts -> a JSON object (``--model-overrides '{"n_layers": 2}'``).  ``--config
FILE`` reads a JSON object of fields; flags given on the command line win over it.

A user mistake (a bad flag or value, a missing or unusable file, ``--out`` in use or not
writable, a checkpoint that cannot be resumed) prints one ``error:`` line and exits with 2; a
full disk prints one line and exits with 1; an interruption (SIGINT/SIGTERM) saves and exits with
128 + the signal number (130 / 143).  Anything else is a bug and keeps its full traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from .checkpoint import CheckpointError
from .rundir import DiskFullError, RunDirError
from .train_config import TrainConfig, flag

PROG = "python -m umv2_ref.train"
USAGE_ERRORS = (ValueError, CheckpointError, RunDirError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``PROG: error: ...``, exit 2) instead of the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _parse_type(annotation) -> type:
    """``int | None`` -> int; the parser type of a field."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field; unset flags fall back to ``--config``, then the defaults."""
    from . import train as train_module

    p = ArgumentParser(prog=PROG, description=train_module.__doc__.split("\n")[0],
                       epilog="Exit status: 0 done, 1 disk full, 2 usage error, 130/143 interrupted (saved).")
    p.add_argument("--config", metavar="FILE", help="JSON object of TrainConfig fields (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _parse_type(hints[f.name])
        help_text = f.metadata["help"]
        if f.default not in (None, dataclasses.MISSING) and "default" not in help_text:
            help_text += f" (default: {f.default})"
        if kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is dict:
            p.add_argument(flag(f.name), type=json_object, metavar="JSON", help=help_text)
        else:
            p.add_argument(flag(f.name), type=kind, choices=f.metadata.get("choices"), help=help_text)
    return p


def config_from(config: TrainConfig | dict | list[str] | argparse.Namespace | None) -> TrainConfig:
    """A :class:`TrainConfig` from itself, a dict of fields, CLI arguments or parsed arguments."""
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
            raise FileNotFoundError(f"--config {path} does not exist or is not a file")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {path} is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {path} must hold a JSON object of TrainConfig fields")
    values.update({k: v for k, v in vars(config).items() if v is not None and k != "config"})
    return config_from(values)


def fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, train; returns the exit status (see the module docstring)."""
    import torch.distributed as dist

    from .train import prepare

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from(args)
        run = prepare(cfg)  # everything that can refuse: config, data, model, --out, lock, checkpoint
    except USAGE_ERRORS as err:
        return fail(" ".join(str(err).split()), 2)
    try:
        results = run.fit()
    except DiskFullError as err:
        return fail(str(err.strerror), 1)
    finally:
        run.close()
    if int(os.environ.get("RANK", "0")) == 0 and "final" in results:
        final = results["final"]
        print(f"step {final['step']}: val loss {final['loss']:.4f}, acc {final['acc']:.3f}, "
              f"{results['tokens_per_s']:.0f} tokens/s")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 128 + results["signal"] if results["interrupted"] and results.get("signal") else 0
