"""Named tiny configurations: matched on activated and total parameters, and what their names say."""
import pytest
import torch

from umv2_ref.configs import (
    CONFIG_NAMES,
    TARGET_ACTIVE,
    TARGET_TOTAL,
    TOLERANCE,
    comparison_table,
    get_config,
)
from umv2_ref.costs import count_params, model_costs
from umv2_ref.layers import UltraMemV2
from umv2_ref.model import TinyLM

REQUIRED = ("dense", "moe-2of16", "moe-8of64", "pkm", "memoryplus", "peer", "ultramem", "ultramemv2")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: TinyLM(get_config(name)) for name in CONFIG_NAMES}


def test_every_required_variant_is_named():
    assert set(REQUIRED) <= set(CONFIG_NAMES)


def test_activated_and_total_parameters_are_matched(models):
    for name, model in models.items():
        costs = model_costs(model)
        assert costs.params == count_params(model)
        assert abs(costs.active / TARGET_ACTIVE - 1) <= TOLERANCE, (name, costs.active)
        if name == "dense":
            assert costs.params == costs.active == TARGET_ACTIVE
        else:
            assert abs(costs.params / TARGET_TOTAL - 1) <= TOLERANCE, (name, costs.params)
            assert costs.params > 4 * costs.active  # genuinely sparse


def test_configs_are_what_their_names_say(models):
    for name in ("moe-2of16", "moe-8of64"):
        cfg = models[name].cfg
        assert f"{cfg.moe_topk}of{cfg.n_experts}" in name
    v2 = models["ultramemv2"]
    assert v2.placements == [(i, i) for i in range(4)] and v2.value_pool is None
    assert all(isinstance(m, UltraMemV2) for m in v2.memory)
    shared = models["ultramemv2-shared"]
    assert shared.value_pool is not None and shared.cfg.share_ratio == 0.5
    assert models["ultramem"].placements == [(1, 2)] and models["ultramem"].memory[0].cfg.heads == 2
    for name in ("pkm", "peer"):
        assert models[name].blocks[2].ffn is None and len(models[name].memory) == 1
    plus = models["memoryplus"]
    assert [b.ffn is None for b in plus.blocks] == [False, True, False, True] and len(plus.memory) == 2
    assert all(m.table() is plus.value_pool.values for m in plus.memory)  # one shared value table
    assert all(m.cfg.d_model == 64 and m.cfg.n_layers == 4 and m.cfg.vocab_size == 256 for m in models.values())


def test_every_config_runs(models):
    tokens = torch.randint(0, 256, (1, 16))
    for name, model in models.items():
        assert model(tokens).logits.shape == (1, 16, 256), name


def test_get_config_overrides_and_errors():
    cfg = get_config("moe-2of16", vocab_size=100, max_seq_len=64)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.n_experts) == (100, 64, 16)
    with pytest.raises(ValueError, match="config name"):
        get_config("moe-4of32")


def test_comparison_table_has_one_row_per_config():
    table = comparison_table(["dense", "moe-8of64"])
    lines = table.splitlines()
    assert lines[0].startswith("| config | total params | activated") and "B=64" in lines[0]
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["dense", "moe-8of64"]
    assert "| 218k | 218k |" in lines[2]  # dense: total == activated
