"""Two-process DistributedDataParallel (torchrun, gloo on CPU) matches one process on the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, out: Path, nproc: int) -> list[float]:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")  # the console script; same entry point as the module
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    launcher += ["--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "umv2_ref.train", *args, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == nproc
    return [r["loss"] for r in summary["history"]["train"]]


@pytest.mark.slow
@pytest.mark.parametrize("model,task", [("dense", "text"), ("ultramemv2", "icl")])
def test_two_process_ddp_matches_single_process(tmp_path, model, task):
    args = ["--model", model, "--task", task, "--steps", "4", "--batch-size", "8", "--seq-len", "32",
            "--eval-every", "4"]
    single = run(args, tmp_path / "single", 1)
    ddp = run(args, tmp_path / "ddp", 2)
    assert len(ddp) == len(single) == 4
    for a, b in zip(single, ddp):
        assert abs(a - b) <= 1e-4 * abs(a), (single, ddp)
