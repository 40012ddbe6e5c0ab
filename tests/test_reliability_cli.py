"""The training CLI and TrainConfig refuse nonsense before training, in one line (issue 12, finding 8;
issue 13: a flag for every TrainConfig field)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from umv2_ref.cli import build_parser, config_from, main
from umv2_ref.train import TrainConfig
from umv2_ref.train_config import flag

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", "dense", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
             "--eval-batch-size", "2", "--model-overrides", '{"n_layers": 1, "d_model": 32, "n_heads": 2}']


def run_main(argv):
    """``main(argv)``'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def test_every_trainconfig_field_has_a_flag_with_help():
    parser = build_parser()
    options = {action.dest: action for action in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in options, f.name
        assert flag(f.name) in options[f.name].option_strings
        assert f.metadata["help"] and f.metadata["help"] in options[f.name].help


def test_every_field_can_be_set_from_the_command_line(tmp_path):
    argv = ["--model", "pkm", "--task", "mqar", "--steps", "9", "--seed", "3", "--batch-size", "6",
            "--seq-len", "40", "--lr", "0.01", "--weight-decay", "0.2", "--warmup", "2", "--min-lr-frac", "0.3",
            "--grad-clip", "0.5", "--value-lr-mult", "4", "--value-lr-schedule", "decay", "--eval-every", "3",
            "--eval-batches", "2", "--eval-batch-size", "5", "--out", str(tmp_path), "--resume", "--no-overwrite",
            "--stop-at", "4", "--no-progress", "--model-overrides", '{"n_layers": 2}',
            "--task-overrides", '{"num_kv_pairs": 4}']
    cfg = config_from(build_parser().parse_args(argv))
    expected = dict(model="pkm", task="mqar", steps=9, seed=3, batch_size=6, seq_len=40, lr=0.01, weight_decay=0.2,
                    warmup=2, min_lr_frac=0.3, grad_clip=0.5, value_lr_mult=4.0, value_lr_schedule="decay",
                    eval_every=3, eval_batches=2, eval_batch_size=5, text_file=None, out=str(tmp_path), resume=True,
                    overwrite=False, stop_at=4, progress=False, model_overrides={"n_layers": 2},
                    task_overrides={"num_kv_pairs": 4})
    assert dataclasses.asdict(cfg) == expected
    assert set(expected) == {f.name for f in dataclasses.fields(TrainConfig)}  # every field was set
    text = tmp_path / "corpus.txt"
    assert config_from(build_parser().parse_args(["--text-file", str(text)])).text_file == str(text)


@pytest.mark.parametrize("argv,named", [
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "-4"], "--seq-len"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--out", ""], "--out"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "fast"], "--lr"),
    (["--warmup", "-3"], "--warmup"),
    (["--warmup", "500", "--steps", "10"], "--warmup"),
    (["--min-lr-frac", "1.5"], "--min-lr-frac"),
    (["--grad-clip", "0"], "--grad-clip"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--value-lr-mult", "0"], "--value-lr-mult"),
    (["--seed", "-1"], "--seed"),
    (["--stop-at", "0"], "--stop-at"),
    (["--stop-at", "300"], "--stop-at"),
    (["--model", "transformer"], "--model"),
    (["--task", "chess"], "--task"),
    (["--resume"], "--resume"),
    (["--resume", "--overwrite", "--out", "x"], "--overwrite"),
    (["--task", "mqar", "--text-file", "book.txt"], "--text-file"),
    (["--model-overrides", "[1]"], "--model-overrides"),
    (["--model-overrides", "{bad json"], "--model-overrides"),
    (["--model-overrides", '{"width": 3}'], "width"),
    (["--task", "mqar", "--task-overrides", '{"bogus": 1}'], "bogus"),
    (["--config", "missing.json"], "--config"),
    (["--text-file", "missing.txt"], "missing.txt"),
    (["--eval-batches", "300", "--task", "mqar"], "evaluation examples"),
    (["--seq-len", "600"], "max_seq_len"),
])
def test_user_mistakes_exit_2_with_one_line_naming_the_argument(tmp_path, monkeypatch, capsys, argv, named):
    monkeypatch.chdir(tmp_path)
    assert run_main(TINY_ARGS + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m umv2_ref.train: error:"), err
    assert named in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_unusable_text_files_and_out_directories_are_refused_before_training(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    cases = [(["--text-file", str(tmp_path)], "not a regular file"),
             (["--text-file", os.devnull], "not a regular file"),
             (["--out", str(tmp_path / "a_file")], "is not a directory"),
             (["--out", str(tmp_path / "a_file" / "sub")], "cannot create --out")]
    for argv, message in cases:
        assert run_main(TINY_ARGS + ["--steps", "1"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_out_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert run_main(TINY_ARGS + ["--steps", "1", "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot write to --out" in err and not any(out.iterdir())


def test_an_unwritable_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """The write probe of ``open_run_dir`` (a read-only file system looks like this to it)."""
    import umv2_ref.rundir as rundir

    def read_only(path):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(rundir, "_create_exclusive", read_only)
    assert run_main(TINY_ARGS + ["--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bugs_keep_their_traceback(monkeypatch):
    def bug(self):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr("umv2_ref.train.Run.fit", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(TINY_ARGS + ["--steps", "1"])


def test_the_real_cli_prints_one_line_and_exits_2():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "umv2_ref.train", "--seq-len", "0"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m umv2_ref.train: error: TrainConfig.seq_len (--seq-len) must be a positive int, got 0"]


def test_config_file_values_are_checked_like_flags(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": "10"}))
    assert run_main(["--config", str(path)]) == 2
    assert "--steps" in capsys.readouterr().err
    path.write_text("{not json")
    assert run_main(["--config", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
