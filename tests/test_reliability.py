"""Run directories and checkpoints under stress: one writer per --out, signals, temp files, disk
full, planted symlinks, bit rot and malformed or edited checkpoints (issue 12, findings 1-6, 8)."""
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from umv2_ref import rundir
from umv2_ref.checkpoint import CheckpointError, content_digest, read_checkpoint, sealed
from umv2_ref.cli import main
from umv2_ref.model import ModelConfig, TinyLM
from umv2_ref.rundir import DiskFullError, RunDirError, RunLock, atomic_write
from umv2_ref.train import TrainConfig, load_model, train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_layers": 1, "d_model": 32, "n_heads": 2}
TINY = dict(model="dense", task="text", batch_size=2, seq_len=16, eval_every=2, eval_batches=1, eval_batch_size=2,
            progress=False, model_overrides=TINY_MODEL)
TINY_ARGS = ["--model", "dense", "--task", "text", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
             "--eval-batch-size", "2", "--model-overrides", json.dumps(TINY_MODEL)]


def env():
    return {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(*args):
    return [sys.executable, "-m", "umv2_ref.train", *TINY_ARGS, *map(str, args)]


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory whose checkpoint is at step 2 of 4."""
    out = tmp_path / "run"
    train(TrainConfig(**TINY, steps=4, stop_at=2, out=str(out)))
    return out


# ---------------------------------------------------------------------------------------------
# 1. One writer per run directory
# ---------------------------------------------------------------------------------------------


def test_a_held_run_directory_refuses_a_second_writer_naming_the_holder(run_dir, capsys):
    with RunLock(run_dir):
        for extra in ({}, {"resume": True}):
            with pytest.raises(RunDirError, match=f"in use by another training run \\(process {os.getpid()}"):
                train(TrainConfig(**TINY, steps=4, out=str(run_dir), **extra))
        assert main(["--out", str(run_dir), "--resume", *TINY_ARGS, "--steps", "4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"process {os.getpid()}" in err[0]
    assert read_checkpoint(run_dir / "checkpoint.pt")["step"] == 2  # untouched
    train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))  # free again once released
    assert not (run_dir / rundir.LOCK).exists()  # released at the end of the run


def test_two_runs_started_together_into_one_out_exactly_one_is_refused(tmp_path):
    out = tmp_path / "same"
    procs = [subprocess.Popen(cli("--steps", 40, "--eval-every", 40, "--seed", seed, "--out", out),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for seed in (0, 1)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results  # exactly one refused, with a one-line error
    winner = [seed for seed, (code, _) in zip((0, 1), results) if code == 0][0]
    loser_err = [err for code, err in results if code == 2][0]
    assert "error:" in loser_err and "Traceback" not in loser_err
    assert read_checkpoint(out / "checkpoint.pt")["identity"]["train"]["seed"] == winner
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == winner


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from umv2_ref.rundir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=env())
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=f"process {holder.pid}"):
        train(TrainConfig(**TINY, steps=2, out=str(out)))
    holder.kill()  # SIGKILL: no clean-up ran, the lock file still names it
    holder.wait()
    assert (out / rundir.LOCK).read_text().strip() == str(holder.pid)
    res = train(TrainConfig(**TINY, steps=2, out=str(out)))
    assert res["final"]["step"] == 2 and not (out / rundir.LOCK).exists()


def test_the_lock_is_released_when_a_run_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def broken_step(*args, **kwargs):
        raise FloatingPointError("injected")

    monkeypatch.setattr("umv2_ref.train.train_step", broken_step)
    with pytest.raises(FloatingPointError):
        train(TrainConfig(**TINY, steps=2, out=str(out)))
    monkeypatch.undo()
    assert not (out / rundir.LOCK).exists()
    train(TrainConfig(**TINY, steps=2, out=str(out)))


# ---------------------------------------------------------------------------------------------
# 2. SIGTERM saves like SIGINT
# ---------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli("--steps", 100000, "--eval-every", 100000, "--out", out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    for line in proc.stderr:
        if line.startswith("training dense/text"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing this step" in err and "--resume" in err
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] >= 1 and len(ckpt["results"]["history"]["train"]) == ckpt["step"]
    assert not (out / rundir.LOCK).exists() and temp_files(out) == []


# ---------------------------------------------------------------------------------------------
# 3, 5, 6. Temporary files, a full disk, planted symlinks, one writer for every file
# ---------------------------------------------------------------------------------------------


def test_every_file_a_run_writes_goes_through_the_atomic_writer(tmp_path, monkeypatch):
    written = set()
    original = rundir.atomic_write

    def recording(path, data):
        written.add(Path(path).name)
        original(path, data)

    monkeypatch.setattr(rundir, "atomic_write", recording)
    monkeypatch.setattr("umv2_ref.checkpoint.atomic_write", recording)
    out = tmp_path / "run"
    train(TrainConfig(**TINY, steps=2, out=str(out)))
    assert written == {p.name for p in out.iterdir()} == {"checkpoint.pt", "metrics.csv", "metrics.json",
                                                          "usage_counts.pt"}


def test_planted_symlinks_never_redirect_a_write(tmp_path):
    out, precious = tmp_path / "shared", tmp_path / "precious.txt"
    out.mkdir()
    precious.write_text("precious\n")
    for name in ("checkpoint.pt", "metrics.csv", "metrics.json", "usage_counts.pt"):
        os.symlink(precious, out / f".{name}.tmp{os.getpid()}")  # the temp names of the old code
    os.symlink(precious, out / "metrics.json")  # a symlink as the target itself is replaced, not followed
    train(TrainConfig(**TINY, steps=2, out=str(out)))
    assert precious.read_text() == "precious\n"
    assert not (out / "metrics.json").is_symlink() and json.loads((out / "metrics.json").read_text())
    assert temp_files(out) == []
    os.symlink(precious, out / rundir.LOCK)
    with pytest.raises(RunDirError, match="symbolic link"):
        train(TrainConfig(**TINY, steps=2, out=str(out), overwrite=True))
    assert precious.read_text() == "precious\n"


def test_temp_files_are_exclusive_unpredictable_and_removed_on_failure(tmp_path, monkeypatch):
    target, precious = tmp_path / "file.bin", tmp_path / "precious.txt"
    target.write_bytes(b"old")
    precious.write_text("precious\n")
    assert rundir._temp_path(target) != rundir._temp_path(target)
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: "0" * 16)  # make the name guessable ...
    os.symlink(precious, rundir._temp_path(target))  # ... and plant a symlink there
    with pytest.raises(FileExistsError):
        atomic_write(target, b"new")  # O_EXCL | O_NOFOLLOW: refused, never followed
    assert precious.read_text() == "precious\n" and target.read_bytes() == b"old"
    monkeypatch.undo()
    for exc in (OSError(errno.EIO, "I/O error"), KeyboardInterrupt()):
        def fail_halfway(fd, data, exc=exc):
            os.write(fd, data[: len(data) // 2])
            raise exc

        monkeypatch.setattr(rundir, "_write_all", fail_halfway)
        with pytest.raises(type(exc)):
            atomic_write(target, b"new content")
        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()] == []


def test_disk_full_is_one_line_naming_the_path_and_free_space_and_keeps_the_checkpoint(run_dir, monkeypatch, capsys):
    def no_space(fd, data):
        os.write(fd, data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "_write_all", no_space)
    with pytest.raises(DiskFullError, match=r"no space left to write .*checkpoint\.pt \(.* MiB free\)"):
        train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))
    assert main(["--out", str(run_dir), "--resume", *TINY_ARGS, "--steps", "4", "--eval-every", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MiB free" in err[0] and "checkpoint.pt" in err[0]
    assert read_checkpoint(run_dir / "checkpoint.pt")["step"] == 2  # the previous checkpoint, intact
    assert temp_files(run_dir) == [] and not (run_dir / rundir.LOCK).exists()
    monkeypatch.undo()
    assert train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))["final"]["step"] == 4


def test_temp_files_of_dead_processes_are_removed_at_start(run_dir):
    dead = dead_pid()
    stale = [f".checkpoint.pt.{dead}.0123456789abcdef.tmp", f".checkpoint.pt.tmp{dead}", f".metrics.csv.tmp{dead}"]
    live = ".checkpoint.pt.1.0123456789abcdef.tmp"  # PID 1 is alive: not ours to remove
    for name in stale + [live]:
        (run_dir / name).write_bytes(b"x" * 1000)
    train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))
    assert temp_files(run_dir) == [live]


# ---------------------------------------------------------------------------------------------
# 4. Checksummed, validated checkpoints
# ---------------------------------------------------------------------------------------------


def flip_tensor_bits(path: Path, n: int = 8) -> None:
    """XOR 0x01 into ``n`` bytes in the middle of the largest tensor-data member of the zip archive."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    middle = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(n):
        raw[middle + i] ^= 0x01
    path.write_bytes(raw)


def test_bit_flips_inside_tensor_data_are_refused(run_dir):
    path = run_dir / "checkpoint.pt"
    flip_tensor_bits(path)
    torch.load(path, weights_only=True)  # the file still loads: only the digest tells
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(run_dir)


def rewrite(path: Path, edit, reseal: bool = True) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt = edit(ckpt)
    torch.save(sealed(ckpt) if reseal and isinstance(ckpt, dict) else ckpt, path)


@pytest.mark.parametrize("step,match", [(-3, "negative"), (100, "outside this run's")])
def test_edited_steps_are_refused(run_dir, step, match):
    path = run_dir / "checkpoint.pt"
    rewrite(path, lambda c: {**c, "step": step}, reseal=False)
    with pytest.raises(CheckpointError, match="SHA-256|negative"):  # an edit without a new digest
        train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))
    rewrite(path, lambda c: c)  # with a recomputed digest: the step check itself refuses
    with pytest.raises(CheckpointError, match=match):
        train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))


def _without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


MALFORMED = {
    "a list": lambda c: [1, 2],
    "a tensor": lambda c: torch.zeros(3),
    "no identity": _without("identity"),
    "no digest": _without("sha256"),
    "identity without task": lambda c: {**c, "identity": {k: v for k, v in c["identity"].items() if k != "task"}},
    "identity a list": lambda c: {**c, "identity": [1]},
    "float step": lambda c: {**c, "step": 2.0},
    "bool step": lambda c: {**c, "step": True},
    "old format": lambda c: {**c, "format": 1},
    "model a list": lambda c: {**c, "model": [1]},
    "model with a non-tensor": lambda c: {**c, "model": {**c["model"], "embed.weight": 3}},
    "model missing a weight": lambda c: {**c, "model": {k: v for k, v in list(c["model"].items())[1:]}},
    "optimizer without param_groups": lambda c: {**c, "optimizer": {"state": {}}},
    "optimizer with other groups": lambda c: {**c, "optimizer": {"state": {}, "param_groups": []}},
    "rng without data": lambda c: {**c, "rng": {k: v for k, v in c["rng"].items() if k != "data"}},
    "rng torch state too short": lambda c: {**c, "rng": {**c["rng"], "torch": torch.zeros(3, dtype=torch.uint8)}},
    "rng numpy state garbage": lambda c: {**c, "rng": {**c["rng"], "numpy": ["MT19937", 3]}},
    "results a list": lambda c: {**c, "results": [1]},
    "a set inside": lambda c: {**c, "results": {**c["results"], "history": {1, 2}}},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_checkpoint_gives_a_checkpoint_error(run_dir, case):
    try:  # with a valid digest where one can be computed, so that the structure checks are what refuses
        rewrite(run_dir / "checkpoint.pt", MALFORMED[case], reseal=case != "no digest")
    except TypeError:  # a set cannot be digested: write it unsealed
        rewrite(run_dir / "checkpoint.pt", MALFORMED[case], reseal=False)
    with pytest.raises(CheckpointError):
        train(TrainConfig(**TINY, steps=4, out=str(run_dir), resume=True))


def test_the_digest_covers_tensor_bytes_dtypes_and_plain_values():
    base = {"w": torch.arange(4.0), "step": 2, "name": "x", "lr": 0.1}
    same = {"w": torch.arange(4.0), "step": 2, "name": "x", "lr": 0.1}
    assert content_digest(base) == content_digest(same)
    for changed in ({**base, "w": torch.arange(4.0).double()}, {**base, "w": torch.arange(4.0).reshape(2, 2)},
                    {**base, "step": 3}, {**base, "step": 2.0}, {**base, "lr": 0.1 + 1e-17 + 1e-16}):
        assert content_digest(changed) != content_digest(base)


# ---------------------------------------------------------------------------------------------
# 8. Token ids outside the vocabulary
# ---------------------------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_refused_naming_tokens():
    model = TinyLM(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2))
    for bad in (16, -1):
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, 16\)"):
            model(torch.tensor([[1, bad]]))
    assert model(torch.tensor([[0, 15]])).logits.shape == (1, 2, 16)
