"""Train one :func:`umv2_ref.explore.pretrained` run and ship it, weights only, under ``data/models``.

A shipped run is found by ``pretrained`` under the same directory name it would cache it under
(``<recipe>-<task>-<hash of the training config>``), so a notebook that asks for it loads it in a
second instead of training on a learner's machine; a changed recipe or size changes the name and
the shipped copy is simply not used (tests/test_explore.py checks that notebook 08's run is there).

    python tools/ship_model.py --recipe umv2-tiny --size facts --lr 0.003 --seed 1

writes ``data/models/<name>/`` (``checkpoint.pt`` without optimiser state, ``metrics.json``,
``pretrained.json``) and rewrites ``data/models/SHA256SUMS`` over every shipped file.  Training runs
in a temporary directory; nothing under ``data/`` changes until it has finished.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from umv2_ref import explore  # noqa: E402
from umv2_ref.checkpoint import read_checkpoint, weights_only  # noqa: E402
from umv2_ref.rundir import atomic_write, torch_bytes  # noqa: E402

SUMS = "SHA256SUMS"


def write_sums(models: Path) -> Path:
    """``SHA256SUMS`` (``sha256sum`` format, paths relative to ``models``) over every shipped file."""
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(models).as_posix()}"
             for f in sorted(models.rglob("*")) if f.is_file() and f.name != SUMS]
    atomic_write(models / SUMS, ("\n".join(lines) + "\n").encode())
    return models / SUMS


def ship(recipe: str, size: str, models: Path, command: str, **fields) -> Path:
    """Train the run, write ``models/<name>/`` (weights only) and ``SHA256SUMS``; ``command`` is recorded."""
    name = explore.run_name(recipe, size, **fields)
    with tempfile.TemporaryDirectory(prefix="umv2-ship-") as tmp:
        _, results = explore.pretrained(recipe, size, cache_dir=tmp, shipped=False, **fields)
        run = Path(tmp) / name
        dest = models / name
        staging = models / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        atomic_write(staging / "checkpoint.pt", torch_bytes(weights_only(read_checkpoint(run / "checkpoint.pt"))))
        shutil.copy(run / "metrics.json", staging / "metrics.json")
        done = json.loads((run / "pretrained.json").read_text())
        done["config"]["out"] = None  # the temporary directory it was trained in
        done["command"] = command
        done["torch"] = torch.__version__
        (staging / "pretrained.json").write_text(json.dumps(done, indent=1, default=str) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    write_sums(models)
    print(f"shipped {dest} (trained {results['train_wall_s']:.0f} s; final {results['final']})")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="a umv2_ref.experiments.compare recipe, e.g. umv2-tiny")
    parser.add_argument("--size", required=True, choices=sorted(explore.QUICK), help="an explore.QUICK preset")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the preset's)")
    parser.add_argument("--out", type=Path, default=explore.SHIPPED_DIR, help="where shipped models live")
    args = parser.parse_args(argv)
    fields = {k: v for k, v in (("lr", args.lr), ("seed", args.seed)) if v is not None}
    command = "python tools/ship_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    ship(args.recipe, args.size, args.out, command, **fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
