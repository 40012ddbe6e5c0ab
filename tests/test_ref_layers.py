"""Layers: one regression test per pitfall of anchors.md Sec. 7, value sharing, and runnable configs."""
import pytest
import torch
import torch.nn.functional as F

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
from umv2_ref.optim import param_groups
from umv2_ref.retrieval import key_balance_loss, rank1_factors, tucker_rank_penalty
from umv2_ref.values import expanded_lookup, peer_values, weighted_sum

V2 = dict(d_model=16, n_keys=8, d_key=8, topm=4, d_pre=8, d_value=8)


# ---------------------------------------------------------------------------------------------
# Pitfall 1: the normalised keys are the ones used
# ---------------------------------------------------------------------------------------------


def test_tucker_scores_use_normalised_keys():
    layer = UltraMemV2(UltraMemV2Config(**V2, norm="rms"))
    ret, x = layer.retrieval, torch.randn(5, 16)
    s_row, s_col = ret.axis_scores(x)
    q = ret.query(x).unflatten(-1, (2, 2, 8))  # [T, axis, rank, D_k]
    gain = ret.cfg.norm_gain
    manual_row = torch.einsum("trd,nrd->tnr", gain * F.rms_norm(q[:, 0], (8,)), gain * F.rms_norm(ret.keys[0], (8,)))
    torch.testing.assert_close(s_row, manual_row)
    with torch.no_grad():
        ret.keys.mul_(10.0)  # raw keys x10: scores must not move
    torch.testing.assert_close(ret.axis_scores(x)[1], s_col, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ret.key_norm.weight.mul_(2.0)  # key gain x2: scores double
    torch.testing.assert_close(ret.axis_scores(x)[0], 2 * s_row, rtol=1e-5, atol=1e-6)


def test_pkm_scores_use_normalised_keys():
    layer = PKM(PKMConfig(d_model=16, n_keys=6, d_key=32, heads=2, topk=3, key_norm="layer", query_norm="layer"))
    ret, x = layer.retrieval, torch.randn(5, 16)
    s_row, _ = ret.axis_scores(x)
    with torch.no_grad():
        ret.keys.mul_(10.0).add_(3.0)  # LayerNorm removes scale and shift (up to its eps)
    torch.testing.assert_close(ret.axis_scores(x)[0], s_row, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Pitfall 2: the prefilter uses one SVD of sum_c C_c
# ---------------------------------------------------------------------------------------------


def test_layer_prefilter_factors_come_from_the_summed_core():
    layer = UltraMemV2(UltraMemV2Config(**{**V2, "d_value": 9}, cores=3))
    u, v = rank1_factors(layer.retrieval.cores)
    assert torch.equal(layer.retrieval.rank1_u, u) and torch.equal(layer.retrieval.rank1_v, v)
    U, _, Vh = torch.linalg.svd(layer.retrieval.cores.detach().double().sum(0))
    torch.testing.assert_close(torch.outer(u, v).double(), torch.outer(U[:, 0], Vh[0]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pitfall 3: colliding contributions are summed, never overwritten
# ---------------------------------------------------------------------------------------------


def test_ive_collisions_on_one_row_and_block_are_summed():
    table = torch.randn(4, 6)
    shuffle = torch.tensor([0, 5, 2, 3, 4, 5, 6, 7])  # virtual 1 and 5 both map to block 1, row 1
    scores = torch.tensor([[0.7, 0.2]])
    out = expanded_lookup(table, torch.tensor([[1, 5]]), scores, shuffle, blocks=2)  # [1, E, D]
    torch.testing.assert_close(out[0, 1], 0.9 * table[1])
    torch.testing.assert_close(out[0, 0], torch.zeros(6))


def test_duplicate_rows_are_summed_in_the_value_paths():
    table, pre, x = torch.randn(5, 4), torch.randn(5, 3), torch.randn(1, 3)
    idx, w = torch.tensor([[2, 2, 0]]), torch.tensor([[0.5, 0.25, 1.0]])
    torch.testing.assert_close(weighted_sum(table, idx, w)[0], 0.75 * table[2] + table[0])
    a = pre @ x[0]  # [N] pre-scores
    expected = (0.75 * a[2]) * table[2] + a[0] * table[0]
    torch.testing.assert_close(peer_values(x, pre, table, idx, w)[0], expected)


def test_ultramemv2_key_expansion_aliases_are_summed():
    """key_expand=2: four virtual slots per physical row, so selected slots can share a row."""
    torch.manual_seed(0)
    layer = UltraMemV2(UltraMemV2Config(**{**V2, "n_keys": 16, "topm": 16}, key_expand=2, cores=1))  # 64 rows
    x = torch.randn(64, 16)
    out = layer(x)
    assert any(len(set(r.tolist())) < 16 for r in out.indices)  # collisions happened
    pre_values, values = layer.tables()
    a = (pre_values[out.indices] * layer.pre_proj(x)[:, None, :]).sum(-1)  # [T, m]
    z = torch.stack([sum(a[t, i] * out.scores[t, i, 0] * values[out.indices[t, i]] for i in range(16))
                     for t in range(64)])  # loop over slots: every alias adds
    torch.testing.assert_close(out.output, layer.out_proj(z), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pitfall 4: value learning rate through parameter groups (Adam ignores gradient scale)
# ---------------------------------------------------------------------------------------------


def adam_step(layer: UltraMemV2, groups: list[dict], grad_scale: float = 1.0) -> dict[str, float]:
    """One AdamW step on a fixed loss; returns the largest |update| per parameter name."""
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW(groups)
    layer(torch.randn(32, 16)).output.pow(2).sum().backward()
    for p in layer.parameters():
        if p.grad is not None:
            p.grad.mul_(grad_scale)
    opt.step()
    return {n: (p.detach() - before[n]).abs().max().item() for n, p in layer.named_parameters()}


def test_value_lr_multiplier_lives_in_a_param_group():
    torch.manual_seed(0)
    layer = UltraMemV2(UltraMemV2Config(**V2))
    groups = param_groups(layer, lr=1e-3, weight_decay=0.0, value_lr_mult=10.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["memory_values"]["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in by_name["memory_values"]["params"]} == {id(layer.values), id(layer.pre_values)}
    moved = adam_step(layer, groups)
    assert moved["values"] == pytest.approx(1e-2, rel=1e-3)  # first Adam step: |update| = lr * mult
    assert moved["pre_values"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["pre_proj.weight"] == pytest.approx(1e-3, rel=1e-3)


def test_scaling_value_gradients_does_not_change_the_adam_step():
    torch.manual_seed(0)
    layer = UltraMemV2(UltraMemV2Config(**V2))
    moved = adam_step(layer, param_groups(layer, lr=1e-3, weight_decay=0.0), grad_scale=10.0)
    assert moved["values"] == pytest.approx(1e-3, rel=1e-3)  # a x10 gradient hook would be a no-op


# ---------------------------------------------------------------------------------------------
# Pitfall 5: auxiliary losses reach the loss
# ---------------------------------------------------------------------------------------------


def test_tucker_penalty_and_balance_loss_reach_the_gradients():
    layer = UltraMemV2(UltraMemV2Config(**V2, tucker_penalty=0.5, balance_loss=0.1))
    ret = layer.retrieval
    with torch.no_grad():
        ret.cores.copy_(torch.tensor([[[1.0, 0.2], [0.1, 0.3]], [[0.8, 0.0], [0.3, 0.4]]]))  # lambda_2 > tau
    x = torch.randn(20, 16)
    _, virtual, aux = ret(x)
    s_row, s_col = ret.axis_scores(x)
    expected = 0.1 * key_balance_loss(s_row @ ret.rank1_u, s_col @ ret.rank1_v, virtual // 8, virtual % 8)
    torch.testing.assert_close(aux["key_balance"], expected)
    out = layer(x)
    assert set(out.aux_losses) == {"tucker_penalty", "key_balance"}
    sum(out.aux_losses.values()).backward()
    (penalty_grad,) = torch.autograd.grad(0.5 * tucker_rank_penalty(ret.cores), ret.cores)
    assert penalty_grad.abs().sum() > 0
    torch.testing.assert_close(ret.cores.grad, penalty_grad)  # the balance loss does not touch the cores
    assert ret.keys.grad is not None and ret.keys.grad.abs().sum() > 0  # the balance loss reaches the keys


def test_zero_weights_leave_no_aux_losses():
    out = UltraMemV2(UltraMemV2Config(**V2))(torch.randn(4, 16))
    assert out.aux_losses == {}


# ---------------------------------------------------------------------------------------------
# Pitfall 6: fp32 references; the value paths need no embedding_bag (whose bf16 backward failed)
# ---------------------------------------------------------------------------------------------


def test_value_paths_backward_in_bfloat16():
    table = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(3, 4, dtype=torch.bfloat16, requires_grad=True)
    weighted_sum(table, torch.randint(0, 10, (3, 4)), weights).sum().backward()
    assert weights.grad.dtype == torch.bfloat16 and table.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Pitfall 7: PEER experts are initialised explicitly, N(0, 1/d) not N(0, 1)
# ---------------------------------------------------------------------------------------------


def test_peer_experts_have_explicit_small_init():
    layer = PEER(PKMConfig(d_model=64, n_keys=16, d_key=16))
    for table in (layer.pre_values, layer.values):
        assert table.std().item() == pytest.approx(64**-0.5, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Pitfall 8: every layer runs forward and backward from its config, with leading batch dims
# ---------------------------------------------------------------------------------------------

RUNNABLE = {
    "pkm": lambda: PKM(PKMConfig(d_model=16, n_keys=8, d_key=8)),
    "peer": lambda: PEER(PKMConfig(d_model=16, n_keys=8, d_key=8)),
    "memory_plus": lambda: MemoryPlus(PKMConfig(d_model=16, n_keys=8, d_key=8, key_norm="layer", d_value=32)),
    "ultramem": lambda: UltraMem(UltraMemConfig(d_model=16, n_keys=8, d_key=8, tucker_penalty=1e-3)),
    "ultramemv2": lambda: UltraMemV2(UltraMemV2Config(**V2, balance_loss=1e-3)),
    "ultramemv2_exact": lambda: UltraMemV2(UltraMemV2Config(**V2, exact_topk=True, per_rank_queries=False)),
}


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_layer_runs_forward_and_backward(name):
    layer = RUNNABLE[name]()
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = layer(x)
    assert out.output.shape == x.shape and out.indices.shape[:2] == (2, 3)
    (out.output.sum() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
    assert x.grad.abs().sum() > 0 and layer.values.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# UltraMemV2: separate queries per Tucker rank
# ---------------------------------------------------------------------------------------------


def test_each_rank_and_axis_reads_its_own_query():
    """query_proj rows are laid out [axis, rank, D_k]: perturbing the (row, rank 1) block moves only S_row[..., 1]."""
    layer = UltraMemV2(UltraMemV2Config(**V2))
    ret, x = layer.retrieval, torch.randn(6, 16)
    s_row, s_col = ret.axis_scores(x)
    with torch.no_grad():
        ret.query.weight[8:16].add_(torch.randn(8, 16))  # axis 0 (row), rank 1
    new_row, new_col = ret.axis_scores(x)
    torch.testing.assert_close(new_row[..., 0], s_row[..., 0])
    torch.testing.assert_close(new_col, s_col)
    assert (new_row[..., 1] - s_row[..., 1]).abs().max() > 1e-2


def test_shared_query_feeds_every_rank():
    layer = UltraMemV2(UltraMemV2Config(**V2, per_rank_queries=False))
    ret, x = layer.retrieval, torch.randn(6, 16)
    assert ret.query.weight.shape == (2 * 8, 16)
    s_row, _ = ret.axis_scores(x)
    with torch.no_grad():
        ret.query.weight[:8].add_(torch.randn(8, 16))  # the one row query
    new_row, _ = ret.axis_scores(x)
    assert ((new_row - s_row).abs().amax(dim=(0, 1)) > 1e-2).all()  # both ranks move


# ---------------------------------------------------------------------------------------------
# Value sharing across layers (official share_ratio ring, anchors.md Sec. 4)
# ---------------------------------------------------------------------------------------------


def test_ring_layout_readme_example():
    rows, n_l, offsets = ring_layout(n_layers=20, knum=360, share_ratio=0.5)
    assert rows == 2_592_000 and n_l == 1138 and n_l**2 == 1_295_044
    assert offsets[:3] == [0, 129_600, 259_200] and len(offsets) == 20
    assert all(b - a == 129_600 for a, b in zip(offsets, offsets[1:]))


def test_ring_layout_extremes():
    rows, n_l, offsets = ring_layout(20, 360, 1 / 20)
    assert n_l == 360 and all(off + n_l**2 == nxt for off, nxt in zip(offsets, offsets[1:]))  # disjoint windows
    rows, n_l, _ = ring_layout(20, 360, 1.0)
    assert n_l**2 <= rows < (n_l + 1) ** 2  # one window covers (almost) the whole pool


def test_last_layer_window_wraps_around_the_pool():
    rows, n_l, offsets = ring_layout(n_layers=4, knum=4, share_ratio=0.5)  # A = 64, window 5^2 = 25
    pool = ValuePool(rows, 8, 8)
    layer = UltraMemV2(UltraMemV2Config(**{**V2, "n_keys": n_l}), pool=pool, offset=offsets[-1])
    read = layer(torch.randn(512, 16)).indices.unique()
    window = {(offsets[-1] + i) % rows for i in range(n_l**2)}  # 48..63 and 0..8
    assert set(read.tolist()) <= window and (read < 9).any()


# ---------------------------------------------------------------------------------------------
# Default query/key norm gains: official v1 D_k^-0.33, official V2 D_k^-0.4
# ---------------------------------------------------------------------------------------------


def test_default_norm_gain_follows_the_official_code_of_each_version():
    v1 = UltraMem(UltraMemConfig(d_model=16, n_keys=8, d_key=16))
    v2 = UltraMemV2(UltraMemV2Config(**{**V2, "d_key": 16}))
    assert v1.cfg.norm_gain == pytest.approx(16**-0.33) and v2.cfg.norm_gain == pytest.approx(16**-0.4)
    for layer in (v1, v2):
        for norm in (layer.retrieval.query_norm, layer.retrieval.key_norm):
            torch.testing.assert_close(norm.weight, torch.full((16,), layer.cfg.norm_gain))
    assert UltraMemConfig(d_model=16, n_keys=8, norm_gain=0.5).norm_gain == 0.5  # an explicit gain is kept
