"""umv2_ref.train: exact resume, checkpoint errors, CLI, metrics files, value-lr groups, Ctrl-C."""
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umv2_ref.optim import value_lr_multiplier
from umv2_ref.checkpoint import rng_state
from umv2_ref.model import ModelConfig, TinyLM
from umv2_ref.train import (CheckpointError, TaskData, TrainConfig, build_parser, config_from, evaluate, load_model,
                            make_checkpoint, save_checkpoint, train)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=4, seq_len=32, eval_every=3, eval_batches=1, eval_batch_size=4, progress=False)


def losses(results):
    return [r["loss"] for r in results["history"]["train"]]


def env():
    return {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("model,task", [("ultramemv2", "text"), ("moe-2of16", "icl")])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, model, task):
    base = dict(SMALL, model=model, task=task, steps=8, value_lr_mult=4.0, value_lr_schedule="decay")
    full = train(TrainConfig(**base, out=str(tmp_path / "a")))
    first = train(TrainConfig(**base, out=str(tmp_path / "b"), stop_at=4))
    assert len(first["history"]["train"]) == 4 and not first["interrupted"]
    resumed = train(TrainConfig(**base, out=str(tmp_path / "b"), resume=True))
    assert losses(resumed) == losses(full)  # exact float equality, step by step
    assert [r["grad_norm"] for r in resumed["history"]["train"]] == [r["grad_norm"] for r in full["history"]["train"]]
    assert resumed["final"]["loss"] == full["final"]["loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved_run(tmp_path):
    cfg = dict(SMALL, model="dense", task="mqar", steps=3)
    train(TrainConfig(**cfg, out=str(tmp_path)))
    return cfg, tmp_path


def test_mismatched_checkpoint_is_refused(saved_run):
    cfg, out = saved_run
    with pytest.raises(CheckpointError, match=r"train\.lr: checkpoint 0\.003 vs now 0\.001"):
        train(TrainConfig(**{**cfg, "lr": 1e-3}, out=str(out), resume=True))
    with pytest.raises(CheckpointError, match="model"):
        train(TrainConfig(**{**cfg, "model": "pkm"}, out=str(out), resume=True))
    with pytest.raises(CheckpointError, match="task.num_kv_pairs"):
        train(TrainConfig(**cfg, task_overrides={"num_kv_pairs": 2}, out=str(out), resume=True))


def test_truncated_or_foreign_checkpoint_is_refused(saved_run):
    cfg, out = saved_run
    path = out / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        train(TrainConfig(**cfg, out=str(out), resume=True))
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a umv2_ref.train checkpoint"):
        train(TrainConfig(**cfg, out=str(out), resume=True))


def test_checkpoint_is_never_silently_overwritten_or_invented(saved_run, tmp_path_factory):
    cfg, out = saved_run
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(**cfg, out=str(out)))
    train(TrainConfig(**cfg, out=str(out), overwrite=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**cfg, out=str(tmp_path_factory.mktemp("empty")), resume=True))
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files behind


@pytest.mark.parametrize("schedule", ["constant", "decay"])
def test_value_param_group_gets_lr_times_multiplier_every_step(schedule):
    steps, mult = 6, 3.0
    res = train(TrainConfig(**SMALL, model="pkm", task="text", steps=steps, value_lr_mult=mult,
                            value_lr_schedule=schedule))
    for i, rec in enumerate(res["history"]["train"]):
        expected = mult if schedule == "constant" else value_lr_multiplier(i, steps, start=mult)
        assert rec["value_lr"] == pytest.approx(rec["lr"] * expected, rel=1e-12)


def test_metrics_files_and_memory_metrics(tmp_path):
    res = train(TrainConfig(**SMALL, model="ultramemv2", task="facts", steps=3, out=str(tmp_path)))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3] and [int(r["step"]) for r in val_rows] == [0, 3]
    assert all(float(r["tokens_per_s"]) > 0 for r in train_rows)
    for key in ("mem_usage", "mem_kl", "mem_dead", "mem_score_top1", "mem_score_topm", "mem_sv_ratio"):
        assert val_rows[-1][key] != "", key
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["model_config"]["ffn"] == "ultramemv2" and len(summary["memory"]) == 4
    layer = summary["memory"][0]
    assert 0 < layer["usage"] <= 1 and layer["kl"] >= 0 and len(layer["tucker_sv"]) == 2
    assert res["usage_history"][-1][0] == 3 and len(res["usage_history"][-1][1]) == 4


def test_config_json_flags_and_errors(tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"steps": 7, "lr": 1e-3, "model_overrides": {"n_layers": 2}}))
    cfg = config_from(build_parser().parse_args(["--config", str(cfg_file), "--lr", "5e-4", "--task", "icl"]))
    assert (cfg.steps, cfg.lr, cfg.task, cfg.model_overrides) == (7, 5e-4, "icl", {"n_layers": 2})
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        config_from({"stpes": 3})
    with pytest.raises(ValueError, match="model must be one of"):
        train(TrainConfig(**SMALL, model="transformer", steps=1))
    with pytest.raises(ValueError, match="model_overrides has unknown"):
        train(TrainConfig(**SMALL, steps=1, model_overrides={"width": 3}))
    with pytest.raises(ValueError, match="max_seq_len"):
        train(TrainConfig(**{**SMALL, "seq_len": 512}, steps=1))
    with pytest.raises(ValueError, match="value_lr_schedule"):
        TrainConfig(value_lr_schedule="linear")


def test_cli_run_writes_files_and_resumes(tmp_path):
    (tmp_path / "small.json").write_text(json.dumps({"eval_batches": 1, "eval_batch_size": 4}))
    cmd = [sys.executable, "-m", "umv2_ref.train", "--model", "dense", "--task", "recall", "--steps", "4",
           "--batch-size", "4", "--eval-every", "2", "--config", str(tmp_path / "small.json"), "--out", str(tmp_path)]
    first = subprocess.run(cmd + ["--stop-at", "2"], capture_output=True, text=True, env=env(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    rest = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env(), cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert "step 4: val loss" in rest.stdout
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in summary["history"]["train"]] == [1, 2, 3, 4]
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint.pt", "metrics.csv", "metrics.json"}


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    (tmp_path / "small.json").write_text(json.dumps({"eval_batches": 1, "eval_batch_size": 4}))
    cmd = [sys.executable, "-m", "umv2_ref.train", "--model", "dense", "--task", "text", "--steps", "100000",
           "--batch-size", "2", "--seq-len", "16", "--eval-every", "100000", "--config", str(tmp_path / "small.json"),
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    for line in proc.stderr:
        if line.startswith("training dense/text"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 1 and len(ckpt["results"]["history"]["train"]) == ckpt["step"]
    assert "--resume" in err


# ---------------------------------------------------------------------------------------------
# load_model: a trained model back from its run directory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "ultramemv2"])
def test_load_model_round_trip_gives_bitwise_identical_logits(tmp_path, kind):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, ffn=kind)
    model = TinyLM(cfg)
    with torch.no_grad():  # move away from the initial weights, so a fresh build would not match
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    optimizer = torch.optim.AdamW(model.parameters())
    identity = {"train": {}, "model": dataclasses.asdict(cfg), "task": {}}
    rng = rng_state(torch.Generator())
    save_checkpoint(tmp_path / "checkpoint.pt", make_checkpoint(identity, 0, model, optimizer, rng, {}))
    tokens = torch.randint(64, (3, 16))
    rng_before = torch.get_rng_state()
    loaded = load_model(tmp_path)  # the run directory ...
    assert torch.equal(torch.get_rng_state(), rng_before)  # ... building it left the caller's RNG alone
    assert isinstance(loaded, TinyLM) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
        assert torch.equal(load_model(tmp_path / "checkpoint.pt")(tokens).logits, model(tokens).logits)  # ... or the file


def test_load_model_reproduces_the_runs_final_evaluation(saved_run):
    cfg, out = saved_run
    model = load_model(out)
    scalars, _, _ = evaluate(model, TaskData(TrainConfig(**cfg)).eval_batches())
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert scalars["loss"] == final["loss"] and scalars["acc"] == final["acc"]  # bitwise


def test_load_model_refuses_bad_paths_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path)  # a directory without checkpoint.pt
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_model(tmp_path / "garbage.pt")
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_model(tmp_path / "run")  # its checkpoint.pt is a directory
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a umv2_ref.train checkpoint"):
        load_model(tmp_path / "list.pt")


class _Payload:
    """Unpickling this object would run ``os.mkdir(marker)``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_load_model_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"format": 1, "identity": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused unread"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()
