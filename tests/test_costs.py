"""Cost formulas: parameter counts equal the real modules; docs/references.md Sec. 7.8-7.9 worked numbers."""
import pytest
import torch

from umv2_ref.costs import (
    attention_cost,
    count_params,
    expected_distinct,
    memoryplus_cost,
    model_costs,
    module_cost,
    moe_cost,
    pkm_cost,
    swiglu_cost,
    ultramem_cost,
    ultramemv2_cost,
)
from umv2_ref.layers import (
    PEER,
    PKM,
    MemoryPlus,
    PKMConfig,
    UltraMem,
    UltraMemConfig,
    UltraMemV2,
    UltraMemV2Config,
    ValuePool,
    ring_layout,
)
from umv2_ref.model import MODEL_KINDS, CausalSelfAttention, ModelConfig, MoE, SwiGLU, TinyLM

D = 24


def built_layers():
    """One of every layer type, in several shapes (norm kinds, per-rank queries, key expansion, pools)."""
    pk = lambda **kw: PKMConfig(d_model=D, n_keys=6, d_key=8, heads=2, topk=3, **kw)  # noqa: E731
    tucker = dict(d_model=D, n_keys=8, d_key=6, rank=3, cores=2, topm=4)
    pool = ValuePool(rows=200, d_pre=6, d_value=10)
    yield CausalSelfAttention(ModelConfig(vocab_size=8, d_model=D, n_heads=2))
    yield SwiGLU(D, 40)
    yield MoE(D, n_experts=5, topk=2, d_expert=7, aux_weight=0.0)
    for norm in ("layer", "rms", "batch", None):
        yield PKM(pk(query_norm=norm))
        yield PEER(pk(query_norm=norm))
    yield PKM(pk(key_norm="layer"))
    yield MemoryPlus(pk(d_value=16, key_norm="rms"))
    yield UltraMem(UltraMemConfig(**tucker, d_value=10, expand=4, norm="layer"))
    for heads in (2, 3):  # pairs of heads share a query: 1 and 2 query groups
        yield UltraMem(UltraMemConfig(**tucker, d_value=10, expand=4, heads=heads))
    yield UltraMem(UltraMemConfig(**tucker, d_value=10, expand=4, heads=2, per_rank_queries=True))
    yield UltraMemV2(UltraMemV2Config(**tucker, d_pre=6, d_value=10))
    yield UltraMemV2(UltraMemV2Config(**tucker, d_pre=6, d_value=10, per_rank_queries=False, key_expand=2))
    yield UltraMemV2(UltraMemV2Config(**tucker, d_pre=6, d_value=10), pool=pool, offset=64)
    yield pool


@pytest.mark.parametrize("layer", list(built_layers()), ids=lambda m: type(m).__name__)
def test_formula_param_count_equals_the_real_module(layer):
    cost = module_cost(layer)
    assert cost.params == count_params(layer)
    # a layer reading a shared pool uses rows it does not own
    assert cost.active <= cost.params or isinstance(layer, UltraMemV2)
    assert cost.active == cost.step_params + cost.picks * cost.unit_params


@pytest.mark.parametrize("kind,extra", [(k, {}) for k in MODEL_KINDS] + [("ultramemv2", {"share_ratio": 0.5})])
def test_model_costs_count_every_parameter_once(kind, extra):
    model = TinyLM(ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=2, ffn=kind, mem_knum=8,
                               mem_topk=4, mem_d_key=16, mem_d_value=16, **extra))
    costs = model_costs(model)
    assert costs.params == count_params(model)
    if kind == "dense":
        assert costs.active == costs.params
        assert costs.bytes_per_token(1) == 2 * costs.params  # batch 1 reads every weight once
        assert costs.bytes_per_token(64) == pytest.approx(2 * costs.params / 64)
    else:
        assert costs.active < costs.params


def test_module_cost_refuses_unknown_modules():
    with pytest.raises(ValueError, match="no formula for Linear"):
        module_cost(torch.nn.Linear(2, 2))


def test_expected_distinct_units():
    assert expected_distinct(4, 2, 1) == pytest.approx(2)  # one token reads exactly its picks
    assert expected_distinct(4, 2, 2) == pytest.approx(3)  # 4 (1 - (1/2)^2)
    assert expected_distinct(16, 2, 10_000) == pytest.approx(16)  # saturates at N
    assert expected_distinct(10**9, 32, 64) == pytest.approx(64 * 32, rel=1e-5)  # ~B m when B m << N
    with pytest.raises(ValueError, match="batch"):
        expected_distinct(4, 2, 0)


def test_decode_reads_moe_whole_experts_memory_single_rows():
    moe = moe_cost(64, n_experts=16, topk=2, d_expert=84)
    assert moe.params_read(1) == 64 * 16 + 2 * 3 * 64 * 84
    assert moe.params_read(64) == pytest.approx(64 * 16 + 16 * (1 - (14 / 16) ** 64) * 3 * 64 * 84)
    mem = ultramemv2_cost(64, 68, 16, 2, 2, 32, 16, 32)
    assert mem.params_read(1) == mem.step_params + 32 * 48  # full keys + dense weights + m rows
    assert mem.step_params >= 2 * 68 * 16 * 2  # the key tables are read every step


def test_closed_forms_of_papers_7_8():
    # MoE: 3 d D_e N_e + router d N_e
    assert moe_cost(768, 64, 8, 512).params == 3 * 768 * 512 * 64 + 768 * 64
    # Memory+-227M: 1138^2 x 768 = 994.6M
    mp = memoryplus_cost(768, 1138, heads=4, d_key=512, topk=32, d_value=768)
    assert mp.units * mp.unit_params == 1138**2 * 768 == pytest.approx(994.6e6, rel=1e-4)
    # UltraMemV2-227M: 20 x 360^2 x (192 + 192) = 995.3M; pool of 2,592,000 rows, windows of 1,295,044
    rows, n_l, offsets = ring_layout(20, 360, 0.5)
    assert (rows, n_l, n_l**2, offsets[1]) == (2_592_000, 1138, 1_295_044, 129_600)
    v2 = ultramemv2_cost(768, 360, 192, 2, 2, 32, 192, 192)
    assert 20 * (v2.params - v2.step_params) == rows * 384 == pytest.approx(995.3e6, rel=1e-4)
    # UltraMemV2-1B/7B: 16 x 528^2 x (768 + 384) = 5,138M
    big = ultramemv2_cost(2048, 528, 512, 2, 2, 128, 768, 384)
    assert 16 * big.units * big.unit_params == pytest.approx(5138e6, rel=1e-3)
    # V2 dense extras per layer (README): W_q 0.59M + keys 0.87M + cores 8 + W_pre 0.15M + W_v 0.15M (+ 2 D_k gains)
    readme = ultramemv2_cost(768, 1138, 192, 2, 2, 32, 192, 192)
    assert readme.step_params == 589_824 + 873_984 + 8 + 147_456 + 147_456 + 2 * 192
    # PEER ablation (Sec. 6.4): equal reads 48*288 = 24*(288+288) and ~179.3M value params each
    base = ultramem_cost(1152, 789, 344, 2, 2, 48, 288, expand=1)
    peer_like = ultramemv2_cost(1152, 558, 344, 2, 2, 24, 288, 288)
    assert base.picks * base.unit_params == peer_like.picks * peer_like.unit_params == 13_824
    for c in (base, peer_like):
        assert c.units * c.unit_params == pytest.approx(179.3e6, rel=1e-3)


def test_per_token_macs_of_papers_7_9():
    d, r, dk, n, m, dp, dv, c = 768, 2, 192, 1138, 32, 192, 192, 2
    per_rank = ultramemv2_cost(d, n, dk, r, c, m, dp, dv)
    formula = (2 * r * d * dk + 2 * n * dk * r + 2 * n * r + c * (m * r * r + m * m * r)
               + d * dp + m * (dp + dv) + dv * d)
    assert per_rank.macs == formula == 1_779_912  # "~1.78M MACs/token/layer with per-rank queries"
    assert ultramemv2_cost(d, n, dk, r, c, m, dp, dv, per_rank_queries=False).macs == pytest.approx(1.49e6, rel=5e-3)
    assert per_rank.picks * per_rank.unit_params == 12_288  # value reads per token per layer (24.6 KB bf16)
    assert swiglu_cost(768, 2496).macs == 5_750_784  # the shrunk SwiGLU, 5.75M
    H, dq, k, nk = 4, 512, 32, 512
    assert pkm_cost(d, nk, H, dq, k).macs == d * H * dq + H * nk * dq + H * k * k + H * k * d
    um = ultramem_cost(d, n, dk, r, c, m, dv, expand=4)
    assert um.macs == 2 * d * dk + 2 * n * dk * r + 2 * n * r + c * (m * r * r + m * m * r) + m * dv + 4 * dv * d
    assert attention_cost(d).macs == 4 * d * d
