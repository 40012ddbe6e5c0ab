"""The comparison experiment at its CI size writes its tables, JSON and loss curves."""
import json

from umv2_ref.experiments import compare


def test_tiny_compare_writes_results(tmp_path):
    compare.main(["--tiny", "--models", "dense,moe-2of16,ultramemv2", "--tasks", "text,facts", "--jobs", "1",
                  "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    for name in ("dense", "moe-2of16", "ultramemv2"):
        assert f"| {name} |" in table
    assert "text loss | text acc | facts loss | facts acc" in table
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 6 and all(r["final"]["step"] == compare.SIZES["tiny"].steps for r in runs)
    assert (tmp_path / "loss_text.png").stat().st_size > 0 and (tmp_path / "loss_facts.png").stat().st_size > 0


def test_compare_rejects_unknown_names():
    import pytest

    with pytest.raises(ValueError, match="models"):
        compare.compare(models=("gpt",), tasks=("text",), size="tiny")
    with pytest.raises(ValueError, match="tasks"):
        compare.compare(models=("dense",), tasks=("copy",), size="tiny")
