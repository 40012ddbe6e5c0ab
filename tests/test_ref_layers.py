"""Layers: one regression test per pitfall of docs/references.md §8, value sharing, and runnable configs."""
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
# Value sharing across layers (official share_ratio ring, docs/references.md §6.8)
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


# ---------------------------------------------------------------------------------------------
# UltraMem v1 heads (official layout): per-head keys and cores, pairs of heads share a query
# ---------------------------------------------------------------------------------------------

F64 = torch.float64


def brute_force_ultramem(layer: UltraMem, x: torch.Tensor) -> torch.Tensor:
    """Every head scans the full grid token by token, slot by slot, with explicit norms; values summed per block."""
    cfg, ret = layer.cfg, layer.retrieval
    n, r, dk, E, N, c = cfg.n_keys, cfg.rank, cfg.d_key, cfg.expand, cfg.n_rows, cfg.cores
    keys = ret.key_norm.weight * F.rms_norm(ret.keys, (dk,))  # [H, 2, n, r, D_k]
    q = (x @ ret.query.weight.T).view(len(x), cfg.query_groups, 2, dk)  # [T, G, 2, D_k]
    q = ret.query_norm.weight * F.rms_norm(q, (dk,))
    out = []
    for t in range(len(x)):
        z = torch.zeros(E, cfg.d_value, dtype=x.dtype)
        for h in range(cfg.heads):
            row_q, col_q = q[t, h // 2, 0], q[t, h // 2, 1]  # heads 2g and 2g+1 read query g
            grid = torch.zeros(c, n, n, dtype=x.dtype)
            for i in range(n):
                for j in range(n):
                    s_row = torch.stack([row_q @ keys[h, 0, i, a] for a in range(r)])  # [r]
                    s_col = torch.stack([col_q @ keys[h, 1, j, b] for b in range(r)])  # [r]
                    for k in range(c):
                        grid[k, i, j] = s_row @ ret.cores[h, k] @ s_col
            for slot in grid.sum(0).flatten().argsort(descending=True)[: cfg.topm].tolist():
                p = int(layer.shuffle[slot])
                block, row = p // N, p % N
                per_core = grid[:, slot // n, slot % n].repeat_interleave(cfg.d_value // c)  # [D_v]
                z[block] += per_core * layer.values[row]
        out.append(layer.proj(z.flatten()))
    return torch.stack(out)


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_ultramem_heads_match_brute_force_in_float64(heads):
    torch.manual_seed(heads)
    cfg = UltraMemConfig(d_model=12, n_keys=6, d_key=8, rank=2, cores=2, topm=4, d_value=8, expand=4, heads=heads,
                         exact_topk=True)
    layer = UltraMem(cfg).double()
    x = torch.randn(5, 12, dtype=F64)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out.output, brute_force_ultramem(layer, x), rtol=1e-10, atol=1e-12)
    assert out.indices.shape == (5, heads * 4) and out.scores.shape == (5, heads * 4, 2)
    assert layer.retrieval.query.weight.shape == ((heads + 1) // 2 * 2 * 8, 12)  # one query per head pair


def test_ultramem_prefilter_matches_the_exact_search_per_head():
    """With k = n the prefilter sees every pair, so each head's picks equal its exact top-m (own cores, own u, v)."""
    torch.manual_seed(0)
    cfg = dict(d_model=12, n_keys=6, d_key=8, topm=4, d_value=8, heads=3)
    approx = UltraMem(UltraMemConfig(**cfg, prefilter_k=6)).double()
    exact = UltraMem(UltraMemConfig(**cfg, exact_topk=True)).double()
    exact.load_state_dict(approx.state_dict())
    x = torch.randn(7, 12, dtype=F64)
    with torch.no_grad():
        a, b = approx(x), exact(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.output, b.output)


def test_ultramem_heads_own_their_keys_and_cores_and_pairs_share_a_query():
    torch.manual_seed(0)
    layer = UltraMem(UltraMemConfig(d_model=12, n_keys=6, d_key=8, topm=4, d_value=8, heads=3))
    ret, x = layer.retrieval, torch.randn(5, 12)
    assert ret.keys.shape == (3, 2, 6, 2, 8) and ret.cores.shape == (3, 2, 2, 2)
    for h in range(3):  # one SVD of each head's summed cores
        u, v = rank1_factors(ret.cores[h])
        assert torch.equal(ret.rank1_u[h], u) and torch.equal(ret.rank1_v[h], v)
    s_row, s_col = ret.axis_scores(x)  # [T, H, n, r]
    with torch.no_grad():
        ret.query.weight[16:].add_(torch.randn(16, 12))  # query group 1 (head 2 only)
        ret.keys[0].add_(torch.randn(2, 6, 2, 8))  # head 0's keys
    new_row, new_col = ret.axis_scores(x)
    torch.testing.assert_close(new_row[:, 1], s_row[:, 1])  # head 1 shares head 0's query, not its keys
    assert (new_row[:, 0] - s_row[:, 0]).abs().max() > 1e-2 and (new_col[:, 2] - s_col[:, 2]).abs().max() > 1e-2
    with torch.no_grad():
        ret.cores[1].add_(torch.randn(2, 2, 2))
    before = ret.rank1_u.clone()
    ret.refresh_rank1()
    assert torch.equal(ret.rank1_u[0], before[0]) and torch.equal(ret.rank1_u[2], before[2])
    u1, _ = rank1_factors(ret.cores[1])
    torch.testing.assert_close(ret.rank1_u[1].abs(), u1.abs())  # head 1 refreshed (sign kept smooth)


def test_ultramem_aux_losses_average_over_heads():
    torch.manual_seed(0)
    layer = UltraMem(UltraMemConfig(d_model=12, n_keys=6, d_key=8, topm=4, d_value=8, heads=2, tucker_penalty=0.5))
    ret = layer.retrieval
    with torch.no_grad():
        ret.cores.copy_(torch.eye(2).expand_as(ret.cores) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    aux = layer(torch.randn(3, 12)).aux_losses
    expected = 0.5 * (tucker_rank_penalty(ret.cores[0]) + tucker_rank_penalty(ret.cores[1])) / 2
    torch.testing.assert_close(aux["tucker_penalty"], expected)


# ---------------------------------------------------------------------------------------------
# Memory+ value sharing across memory layers (the paper's shared pool)
# ---------------------------------------------------------------------------------------------


def test_memoryplus_layers_share_one_value_table_by_default():
    from umv2_ref.costs import count_params, model_costs
    from umv2_ref.model import ModelConfig, TinyLM

    base = dict(vocab_size=32, d_model=16, n_layers=4, n_heads=2, ffn="memoryplus", memory_layers="1,3",
                mem_knum=6, mem_topk=3, mem_d_key=8, mem_d_value=16)
    shared, separate = TinyLM(ModelConfig(**base)), TinyLM(ModelConfig(**base, mem_share_values=False))
    assert [k for k in shared.state_dict() if k.endswith("values")] == ["value_pool.values"]
    assert [k for k in separate.state_dict() if k.endswith("values")] == ["memory.0.values", "memory.1.values"]
    assert count_params(separate) - count_params(shared) == 36 * 16
    for model in (shared, separate):
        assert model_costs(model).params == count_params(model)
    x = torch.randn(2, 5, 16)
    outs = [layer(x) for layer in shared.memory]
    grads = [torch.autograd.grad(o.output.square().sum(), shared.value_pool.values)[0] for o in outs]
    for o, g in zip(outs, grads):  # each layer's gradient lands on exactly the rows it read from the one table
        assert set(g.abs().sum(-1).nonzero().flatten().tolist()) == set(o.indices.flatten().tolist())
    with pytest.raises(ValueError, match="mem_share_values=False is for ffn='memoryplus'"):
        ModelConfig(**{**base, "ffn": "pkm"}, mem_share_values=False)


def test_memoryplus_refuses_a_table_of_the_wrong_shape():
    from umv2_ref.layers import ValueTable

    cfg = PKMConfig(d_model=16, n_keys=6, d_key=8, topk=3, d_value=16)
    with pytest.raises(ValueError, match=r"shared table must be \[n_keys\^2, d_value\] = \[36, 16\]"):
        MemoryPlus(cfg, table=ValueTable(36, 8))
    table = ValueTable(36, 16)
    assert MemoryPlus(cfg, table=table).table() is table.values
