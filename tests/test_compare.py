"""The comparison experiment at its CI size: multi-seed tables, the learning-rate sweep, resumable runs."""
import json

import pytest

from umv2_ref.experiments import compare


def test_tiny_compare_writes_results(tmp_path):
    compare.main(["--tiny", "--models", "dense,moe-2of16,ultramemv2", "--tasks", "text,facts", "--jobs", "1",
                  "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    for name in ("dense", "moe-2of16", "ultramemv2"):
        assert f"| {name} |" in table
    assert "`text`: final validation loss" in table and "`facts`: final validation loss" in table
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 6 and all(r["final"]["step"] == compare.SIZES["tiny"]["*"].steps for r in runs)
    assert (tmp_path / "loss_text.png").stat().st_size > 0 and (tmp_path / "loss_facts.png").stat().st_size > 0


def test_seeds_and_sweep_report_mean_and_spread_and_resume(tmp_path):
    args = ["--tiny", "--recipes", "dense,umv2-tiny", "--tasks", "facts-capacity", "--sweep", "1e-3,3e-3",
            "--seeds", "2", "--jobs", "1", "--out", str(tmp_path)]
    compare.main(args)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["seeds"] == [1, 2] and len(data["sweep"]) == 4 and len(data["runs"]) == 4
    for r in data["sweep"]:
        assert r["seed"] == 0 and set(r["selection"]) == {"loss", "acc"}
    for key, lr in data["meta"]["chosen_lr"].items():  # the chosen lr has the lowest selection loss
        task, recipe = key.split("/")
        losses = {r["lr"]: r["selection"]["loss"] for r in data["sweep"] if r["recipe"] == recipe}
        assert lr == min(losses, key=losses.get)
    summary = data["summary"]["facts-capacity/umv2-tiny"]
    assert summary["loss"]["n"] == 2 and summary["loss"]["min"] <= summary["loss"]["mean"] <= summary["loss"]["max"]
    assert "knockout_memory" in summary and "knockout_memory" not in data["summary"]["facts-capacity/dense"]
    table = (tmp_path / "results.md").read_text()
    assert "mean [min–max] over 2 seeds" in table and "Learning-rate sweep" in table and " [" in table
    result = next((tmp_path / "runs").rglob("result.json"))
    stamp = result.stat().st_mtime_ns
    compare.main(args)  # everything is read back, nothing retrained
    assert result.stat().st_mtime_ns == stamp


def test_compare_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="recipes"):
        compare.compare(models=("gpt",), tasks=("text",), size="tiny")
    with pytest.raises(ValueError, match="tasks"):
        compare.compare(models=("dense",), tasks=("copy",), size="tiny")
    with pytest.raises(ValueError, match="sweep needs out"):
        compare.compare(models=("dense",), tasks=("text",), size="tiny", sweep=(1e-3,), seeds=1)
    with pytest.raises(ValueError, match="sweep_seed"):
        compare.compare(models=("dense",), tasks=("text",), size="tiny", sweep=(1e-3,), seeds="0,1", out=tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        compare.parse_seeds(0, False)


def test_spread_and_format():
    s = compare.spread([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["min"] == 0.5 and s["max"] == 0.7 and s["n"] == 3
    assert compare.fmt_spread(s) == "0.600 [0.500–0.700]"


def test_readme_head_to_head_is_the_committed_summary():
    """README's tables are rendered from data/h2h_summary.json (no hand-copied numbers), >= 3 seeds each."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "data" / "h2h_summary.json").read_text())
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- h2h:begin -->")[1].split("<!-- h2h:end -->")[0].strip()
    assert block == compare.summary_tables(summary)
    assert set(summary["results"]) == {"text", "facts-capacity"}
    for task, table in summary["results"].items():
        assert set(table) == set(compare.RECIPE_GROUPS["h2h"]), task
        for recipe, entry in table.items():
            assert entry["loss"]["n"] >= 3 and entry["acc"]["min"] <= entry["acc"]["mean"] <= entry["acc"]["max"]
            assert 0 not in entry["seeds"], f"{task}/{recipe}: seed 0 chose the lr and is not reported"


def test_a_finished_run_of_another_length_is_refused(tmp_path):
    size = compare.size_for("tiny", "text")
    compare.run_one("dense", "text", size, 0, 3e-3, out=tmp_path, analysis=False)
    with pytest.raises(ValueError, match="another run length"):
        compare.run_one("dense", "text", compare.Size(5, 4, 5, 1, 8), 0, 3e-3, out=tmp_path, analysis=False)
