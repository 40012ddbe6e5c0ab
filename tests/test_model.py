"""TinyLM: every feed-forward variant runs, is causal, and wires its memory where configured."""
import math

import pytest
import torch
import torch.nn.functional as F

from umv2_ref.layers import UltraMemV2, refresh_rank1
from umv2_ref.model import (
    MODEL_KINDS,
    MoE,
    ModelConfig,
    TinyLM,
    apply_rotary,
    default_d_ff,
    lm_loss,
    load_balancing_loss,
    memory_config,
    memory_placements,
    rotary_tables,
)

VOCAB = 48


def tiny(ffn: str, **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, ffn=ffn, mem_knum=8,
                mem_topk=4, mem_d_key=16, mem_d_value=16, n_experts=8, moe_topk=2)
    return ModelConfig(**{**base, **kw})


VARIANTS = [(kind, {}) for kind in MODEL_KINDS] + [("ultramemv2", {"share_ratio": 0.5})]


@pytest.mark.parametrize("kind,extra", VARIANTS, ids=[k + ("-shared" if e else "") for k, e in VARIANTS])
def test_forward_backward_every_variant(kind, extra):
    model = TinyLM(tiny(kind, **extra))
    tokens = torch.randint(0, VOCAB, (2, 12))
    out = model(tokens)
    assert out.logits.shape == (2, 12, VOCAB)
    assert len(out.memory) == len(model.placements)
    loss, parts = lm_loss(out, tokens)
    assert math.isfinite(parts["loss"]) and parts["ce"] > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    refresh_rank1(model)  # the training-loop hook works on every variant


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(kind):
    model = TinyLM(tiny(kind))
    tokens = torch.randint(0, VOCAB, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (tokens[:, 7] + 1) % VOCAB
    a, b = model(tokens).logits, model(changed).logits  # [2, 12, V]
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4  # the change does propagate forward


def test_rotary_preserves_norms_and_makes_scores_relative():
    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(8), torch.randn(8)
    at = lambda x, t: apply_rotary(x.view(1, 1, 1, 8), cos[t:t + 1], sin[t:t + 1]).flatten()  # noqa: E731
    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close(at(q, 5) @ at(k, 2), at(q, 9) @ at(k, 6))  # depends on 5-2 = 9-6 only


# --- MoE -----------------------------------------------------------------------------------------


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-slot loop: the obvious reference for the vectorised dispatch."""
    probs = moe.router(x).softmax(-1)  # [T, E]
    gates, ids = probs.topk(moe.topk, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(moe.topk):
            e = ids[t, s]
            hidden = F.silu(x[t] @ moe.w_gate[e]) * (x[t] @ moe.w_up[e])
            out[t] += gates[t, s] * (hidden @ moe.w_down[e])
    return out


@pytest.mark.parametrize("n_experts,topk", [(16, 2), (8, 8), (4, 1)])
def test_moe_dispatch_equals_a_per_token_loop(n_experts, topk):
    moe = MoE(d_model=12, n_experts=n_experts, topk=topk, d_expert=5, aux_weight=0.0)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(3, 7, 12, requires_grad=True)
    y, aux = moe(x)
    assert aux == {}
    torch.testing.assert_close(y.reshape(-1, 12), naive_moe(moe, x.reshape(-1, 12)), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_load_balancing_loss_on_a_hand_example():
    # 2 tokens, 4 experts, top-1: assignments hit experts 0 and 0 -> f = [1, 0, 0, 0]
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]])
    ids = torch.tensor([[0], [0]])
    # P = [0.6, 0.2, 0.1, 0.1]; loss = 4 * (1 * 0.6) = 2.4
    torch.testing.assert_close(load_balancing_loss(probs, ids), torch.tensor(2.4))
    uniform = torch.full((4, 4), 0.25)
    torch.testing.assert_close(load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])),
                               torch.tensor(1.0))


def test_aux_losses_reach_lm_loss_and_carry_gradient():
    cfgs = [tiny("moe", moe_aux_weight=0.5), tiny("ultramem", mem_tucker_penalty=0.01),
            tiny("ultramemv2", mem_balance_loss=0.1)]
    expected = ["moe_balance", "tucker_penalty", "key_balance"]
    tokens = torch.randint(0, VOCAB, (2, 12))
    for cfg, kind in zip(cfgs, expected):
        model = TinyLM(cfg)
        with torch.no_grad():  # a core spectrum with lambda_2 > tau, so the Tucker penalty is active
            for m in model.memory:
                m.retrieval.cores.copy_(torch.eye(cfg.mem_rank).expand_as(m.retrieval.cores))
        out = model(tokens)
        assert out.aux_losses and all(key.endswith(kind) for key in out.aux_losses)
        loss, parts = lm_loss(out, tokens)
        aux = sum(out.aux_losses.values())
        torch.testing.assert_close(loss, F.cross_entropy(out.logits.reshape(-1, VOCAB), tokens.reshape(-1)) + aux)
        assert parts[kind] == pytest.approx(aux.item(), rel=1e-5) and parts[kind] > 0
        aux.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0


def test_lm_loss_ignores_masked_targets():
    model = TinyLM(tiny("dense"))
    tokens = torch.randint(0, VOCAB, (2, 10))
    targets = tokens.clone()
    targets[:, :5] = -100
    out = model(tokens)
    loss, _ = lm_loss(out, targets)
    ref = F.cross_entropy(out.logits[:, 5:].reshape(-1, VOCAB), tokens[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)


# --- placement -------------------------------------------------------------------------------------


def record_io(model: TinyLM):
    """Hooks recording the FFN inputs, memory inputs/outputs and each block's input and output."""
    log = {"ffn_in": {}, "mem_in": {}, "mem_out": {}, "block_in": {}, "block_out": {}}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: log["block_in"].__setitem__(i, args[0]))
        block.register_forward_hook(lambda m, args, out, i=i: log["block_out"].__setitem__(i, out[0]))
        if block.ffn is not None:
            block.ffn.register_forward_pre_hook(lambda m, args, i=i: log["ffn_in"].__setitem__(i, args[0]))
    for j, mem in enumerate(model.memory):
        mem.register_forward_pre_hook(lambda m, args, j=j: log["mem_in"].__setitem__(j, args[0]))
        mem.register_forward_hook(lambda m, args, out, j=j: log["mem_out"].__setitem__(j, out.output))
    return log


def test_ultramemv2_memory_in_every_block_parallel_to_the_ffn():
    model = TinyLM(tiny("ultramemv2", d_ff=40))
    assert model.placements == [(i, i) for i in range(4)]
    assert all(isinstance(m, UltraMemV2) for m in model.memory)
    assert all(b.ffn is not None and b.ffn.gate.out_features == 40 for b in model.blocks)
    log = record_io(model)
    model(torch.randint(0, VOCAB, (2, 12)))
    for i in range(4):
        assert log["mem_in"][i] is log["ffn_in"][i]  # the same normalised tensor feeds both
        if i + 1 < 4:  # x_{l+1} = (h + FFN(xbar)) + Mem(xbar)
            torch.testing.assert_close(log["block_in"][i + 1], log["block_out"][i] + log["mem_out"][i])


def test_ultramem_skip_layer_reads_block_a_and_adds_after_block_b():
    model = TinyLM(tiny("ultramem", memory_layers="0:2"))
    log = record_io(model)
    model(torch.randint(0, VOCAB, (2, 12)))
    assert log["mem_in"][0] is log["ffn_in"][0]
    torch.testing.assert_close(log["block_in"][1], log["block_out"][0])  # nothing added after block 0
    torch.testing.assert_close(log["block_in"][3], log["block_out"][2] + log["mem_out"][0])


@pytest.mark.parametrize("kind", ["pkm", "memoryplus", "peer"])
def test_product_key_memories_replace_the_ffn_of_their_blocks(kind):
    model = TinyLM(tiny(kind, memory_layers="1,3"))
    assert [b.ffn is None for b in model.blocks] == [False, True, False, True]
    log = record_io(model)
    model(torch.randint(0, VOCAB, (2, 12)))
    torch.testing.assert_close(log["block_in"][2], log["block_out"][1] + log["mem_out"][0])
    torch.testing.assert_close(log["mem_in"][0], model.blocks[1].ffn_norm(log["block_out"][1]))


@pytest.mark.parametrize("kind,spec,bad", [
    ("pkm", "1:2", "'a' block indices"), ("ultramem", "2", "'a:b' pairs"), ("ultramem", "3:1", "a <= b"),
    ("ultramemv2", "1", "every block"), ("dense", "1", "must be ''"), ("pkm", "1,1", "twice"),
    ("pkm", "x", "non-integer"),
])
def test_bad_memory_layers_raise(kind, spec, bad):
    with pytest.raises(ValueError, match=bad):
        tiny(kind, memory_layers=spec)


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="ffn"):
        tiny("mlp")
    with pytest.raises(ValueError, match="n_heads"):
        tiny("dense", n_heads=3)
    with pytest.raises(ValueError, match="share_ratio"):
        tiny("pkm", share_ratio=0.5)
    cfg = tiny("moe")
    assert cfg.d_ff == default_d_ff(32) == 88 and cfg.d_expert == 44
    assert memory_placements(tiny("pkm")) == [(2, 2)] and memory_placements(tiny("ultramem")) == [(1, 2)]
    with pytest.raises(ValueError, match="max_seq_len"):
        TinyLM(cfg)(torch.zeros(1, 17, dtype=torch.long))


def test_memory_config_maps_the_mem_fields_and_validates_them_early():
    pk = memory_config(tiny("peer", mem_heads=3))
    assert (pk.n_keys, pk.heads, pk.topk, pk.d_key, pk.d_value, pk.query_norm) == (8, 3, 4, 16, 32, "layer")
    v2 = memory_config(tiny("ultramemv2", mem_key_expand=2, mem_d_pre=8))
    assert (v2.n_keys, v2.window, v2.topm, v2.d_pre, v2.d_value) == (16, 64, 4, 8, 16)  # grid = 2 x window keys
    v1 = memory_config(tiny("ultramem", mem_expand=9))  # mem_knum = 8: 64 physical rows, grid 3 * 8 keys per axis
    assert (v1.n_keys, v1.n_rows, v1.expand, v1.heads) == (24, 64, 9, 2)
    with pytest.raises(ValueError, match="mem_expand must be a perfect square for ultramem"):
        tiny("ultramem", mem_expand=2)
    shared = TinyLM(tiny("ultramemv2", share_ratio=0.5, mem_key_expand=2))  # A = 4 * 8^2, n_l = isqrt(128) = 11
    assert shared.value_pool.values.shape[0] == 256
    assert [(m.cfg.n_keys, m.cfg.window, m.offset) for m in shared.memory] == [(22, 121, 64 * i) for i in range(4)]
    assert shared(torch.randint(0, VOCAB, (1, 8))).logits.shape == (1, 8, VOCAB)
    with pytest.raises(ValueError, match="topk must be <= n_keys"):
        tiny("pkm", mem_topk=9)
    with pytest.raises(ValueError, match="share_ratio must be in"):
        tiny("ultramemv2", share_ratio=1.5)


# --- value sharing ---------------------------------------------------------------------------------


def test_shared_value_pool_is_registered_once_and_gets_gradient_from_several_layers():
    model = TinyLM(tiny("ultramemv2", share_ratio=0.5))
    value_keys = [k for k in model.state_dict() if k.endswith("values")]
    assert value_keys == ["value_pool.pre_values", "value_pool.values"]
    assert sum(p is model.value_pool.values for p in model.parameters()) == 1
    x = torch.randn(4, 16, 32)  # the same input to two layers, so only their direct reads differ
    outs = [model.memory[i](x) for i in (0, 1)]
    rows = [set(o.indices.flatten().tolist()) for o in outs]
    common = rows[0] & rows[1]
    assert common, "overlapping windows (share 0.5) should share rows between layers 0 and 1"
    grads = [torch.autograd.grad(o.output.square().sum(), model.value_pool.values)[0] for o in outs]
    touched = [set(g.abs().sum(-1).nonzero().flatten().tolist()) for g in grads]
    assert touched == rows  # each layer's gradient lands on exactly the pool rows it read
    assert touched[0] & touched[1] == common


def test_init_scales():
    model = TinyLM(tiny("dense", d_model=64, n_heads=4, n_layers=8))
    std = math.sqrt(2 / (5 * 64))
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks[0].ffn.down.weight.std().item() == pytest.approx(std / 4, rel=0.05)  # 1/sqrt(2L) = 1/4
    v2 = TinyLM(tiny("ultramemv2"))
    assert v2.memory[0].retrieval.query_norm.weight[0].item() != pytest.approx(16**-0.4)  # calibrated gain


@pytest.mark.parametrize("kind,extra", VARIANTS, ids=[k + ("-shared" if e else "") for k, e in VARIANTS])
def test_every_variant_builds_and_trains_in_float64(kind, extra):
    """Under ``torch.set_default_dtype(torch.float64)`` every parameter and the logits are float64
    (regression: the UltraMemV2 init once forced its Monte-Carlo cores to float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = TinyLM(tiny(kind, **extra))
        tokens = torch.randint(0, VOCAB, (2, 9))
        out = model(tokens[:, :-1])
        loss, _ = lm_loss(out, tokens[:, 1:])
        loss.backward()
    finally:
        torch.set_default_dtype(previous)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert out.logits.dtype == torch.float64


def test_named_ultramemv2_config_builds_in_float64():
    from umv2_ref.configs import get_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = TinyLM(get_config("ultramemv2", max_seq_len=16))
        logits = model(torch.randint(0, 256, (1, 8))).logits
    finally:
        torch.set_default_dtype(previous)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
