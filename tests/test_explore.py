"""umv2_ref.explore: the slot-contribution contract for every layer kind, knock-outs, slot contexts,
text generation and the CLI."""
from pathlib import Path

import pytest
import torch

from umv2_ref import explore
from umv2_ref.layers import PEER, PKM, MemoryPlus, PKMConfig, UltraMem, UltraMemConfig, UltraMemV2, UltraMemV2Config
from umv2_ref.model import ModelConfig, TinyLM

VOCAB = 48
KINDS = ("pkm", "peer", "memoryplus", "ultramem", "ultramemv2")


def tiny(ffn: str, **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, ffn=ffn, mem_knum=8,
                mem_topk=4, mem_d_key=16, mem_d_value=16, n_experts=8, moe_topk=2)
    return ModelConfig(**{**base, **kw})


def perturb_(model: torch.nn.Module) -> None:
    """Move every parameter off its init (biases, gains and cores too), as training would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


LAYERS = {
    "pkm": lambda: PKM(PKMConfig(d_model=24, n_keys=6, d_key=8, heads=2, topk=3, query_norm="layer")),
    "peer": lambda: PEER(PKMConfig(d_model=24, n_keys=6, d_key=8, heads=3, topk=2, query_norm="layer")),
    "memoryplus": lambda: MemoryPlus(PKMConfig(d_model=24, n_keys=6, d_key=8, heads=2, topk=3, d_value=12,
                                               query_norm="layer", key_norm="layer")),
    "ultramem": lambda: UltraMem(UltraMemConfig(d_model=24, n_keys=8, d_key=8, topm=6, d_value=12, expand=4)),
    "ultramem-3heads": lambda: UltraMem(UltraMemConfig(d_model=24, n_keys=8, d_key=8, topm=4, heads=3, d_value=12,
                                                       expand=4)),
    "ultramemv2": lambda: UltraMemV2(UltraMemV2Config(d_model=24, n_keys=8, d_key=8, topm=6, d_pre=6, d_value=12)),
    "ultramemv2-1core": lambda: UltraMemV2(UltraMemV2Config(d_model=24, n_keys=8, d_key=8, topm=6, cores=1,
                                                            d_pre=6, d_value=12, activation="gelu")),
}


@pytest.mark.parametrize("name", LAYERS)
def test_slot_contributions_add_up_to_the_layer_output(name):
    layer = LAYERS[name]().eval()
    perturb_(layer)
    x = torch.randn(3, 5, 24)
    dec = explore.decompose(layer, x)
    out = layer(x)
    S = out.indices.shape[-1]
    assert dec.contributions.shape == (3, 5, S, 24) and dec.residual.shape == (3, 5, 24)
    torch.testing.assert_close(dec.contributions.sum(-2) + dec.residual, out.output, rtol=1e-5, atol=1e-5)
    assert torch.equal(dec.indices, out.indices)
    if name == "memoryplus":  # the output bias is the residual
        assert dec.residual.abs().max() > 0
    else:
        assert dec.residual.abs().max() == 0


def test_contributions_match_a_slot_by_slot_recomputation():
    """UltraMemV2: each slot's term equals W_v applied to (pre-score x per-core score) times its value row."""
    layer = LAYERS["ultramemv2"]().eval()
    perturb_(layer)
    x = torch.randn(7, 24, dtype=torch.float64)
    layer.double().requires_grad_(False)
    dec = explore.decompose(layer, x)
    pre_values, values = layer.tables()
    x_pre = layer.pre_proj(x)
    c = dec.scores.shape[-1]
    for t in range(7):
        for s in range(dec.indices.shape[1]):
            row = int(dec.indices[t, s])
            pre = float((pre_values[row] @ x_pre[t]).detach())
            scale = torch.repeat_interleave(dec.scores[t, s], values.shape[1] // c)  # [D_v]
            expect = layer.out_proj.weight @ (pre * scale * values[row])
            torch.testing.assert_close(dec.contributions[t, s], expect)
            assert dec.pre_scores[t, s].item() == pytest.approx(pre)
            assert layer.physical_rows(dec.grid_rows[t, s] * layer.cfg.n_keys + dec.grid_cols[t, s]) == row


@pytest.mark.parametrize("kind", KINDS + ("ultramemv2-shared",))
def test_trace_contract_for_every_layer_kind_in_a_model(kind):
    extra = {"share_ratio": 0.5} if kind.endswith("shared") else {}
    model = TinyLM(tiny(kind.split("-")[0], **extra))
    perturb_(model)
    tokens = torch.randint(0, VOCAB, (12,))
    records = explore.trace(model, tokens)
    out = model.eval()(tokens[None])
    assert len(records) == len(model.memory) == len(out.memory)
    for rec, mem in zip(records, out.memory):
        T, S = rec.indices.shape
        assert T == 12 and rec.contributions.shape == (12, S, 32) and rec.output.shape == (12, 32)
        torch.testing.assert_close(rec.contributions.sum(1) + rec.residual, rec.output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.output, mem.output[0])
        assert torch.equal(rec.indices, mem.indices[0])
        assert (rec.pre_scores is not None) == (rec.kind in ("peer", "ultramemv2"))
        assert rec.grid(3).shape == (rec.n_keys, rec.n_keys)
        assert set(rec.norms(3)) == {"memory", "ffn", "stream"}
        if rec.kind in ("pkm", "peer", "memoryplus"):
            assert torch.equal(rec.indices, rec.grid_rows * rec.n_keys + rec.grid_cols)
            grid = rec.grid(3, head=int(rec.heads[3, 0]))  # the top slot of head h has the head's top score
            assert grid.max() == pytest.approx(float(grid[rec.grid_rows[3, 0], rec.grid_cols[3, 0]]))


def test_trace_refuses_a_decomposition_that_does_not_add_up(monkeypatch):
    model = TinyLM(tiny("pkm"))
    real = explore.decompose

    def broken(layer, x):
        dec = real(layer, x)
        dec.contributions = dec.contributions * 1.01
        return dec

    monkeypatch.setattr(explore, "decompose", broken)
    with pytest.raises(RuntimeError, match="do not add up"):
        explore.trace(model, torch.randint(0, VOCAB, (6,)))


def test_trace_input_errors():
    model = TinyLM(tiny("ultramemv2"))
    for bad in (torch.zeros(2, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(5)):
        with pytest.raises(ValueError, match="tokens"):
            explore.trace(model, bad)


def test_direct_logits_sum_to_the_memory_outputs_direct_effect():
    model = TinyLM(tiny("ultramemv2"))
    perturb_(model)
    tokens = torch.randint(0, VOCAB, (10,))
    rec = explore.trace(model, tokens)[2]
    targets = torch.randint(0, VOCAB, (10,))
    dla = explore.direct_logits(model, rec, targets)  # [T, S]
    direct = (rec.output / rec.final_rms[:, None] * model.norm.weight * model.embed.weight[targets]).sum(-1)
    torch.testing.assert_close(dla.sum(1), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ultramemv2", "moe", "pkm"])
def test_knockout_zeroes_branches_and_restores_the_model(kind):
    model = TinyLM(tiny(kind)).eval()
    perturb_(model)
    x = torch.randint(0, VOCAB, (4, 12))
    y = torch.randint(0, VOCAB, (4, 12))
    y[:, :3] = -100
    before = model(x).logits
    intact = explore.knockout_eval(model, [(x, y)])
    if len(model.memory):
        with explore.knockout(model, memory="all"), explore.capture(model) as cap:
            model(x)
        assert all(out.output.abs().max() == 0 for out in cap.memory_out.values())
        assert explore.knockout_eval(model, [(x, y)], memory=0)["loss"] != pytest.approx(intact["loss"])
    with explore.knockout(model, ffn="all"), explore.capture(model) as cap:
        model(x)
    assert cap.ffn_out and all(v.abs().max() == 0 for v in cap.ffn_out.values())
    torch.testing.assert_close(model(x).logits, before)  # hooks are gone
    if kind == "pkm":
        with pytest.raises(ValueError, match="no FFN"):
            explore.knockout_eval(model, [(x, y)], ffn=2)
    with pytest.raises(ValueError, match="memory"):
        explore.knockout_eval(model, [(x, y)], memory=7)


def test_top_contexts_are_the_strongest_reads_of_the_row():
    model = TinyLM(tiny("ultramemv2"))
    perturb_(model)
    corpus = torch.randint(0, VOCAB, (6, 16))
    indices, strength = explore.slot_reads(model, 1, corpus, batch_size=4)
    row = int(indices[2, 5, 0])
    hits = explore.top_contexts(model, 1, row, corpus, k=5, width=4)
    assert hits and [h["strength"] for h in hits] == sorted((h["strength"] for h in hits), reverse=True)
    brute = max(float(strength[n, t][indices[n, t] == row].max()) for n in range(6) for t in range(16)
                if (indices[n, t] == row).any())
    assert hits[0]["strength"] == pytest.approx(brute)
    for h in hits:  # each reported position really reads the row (checked against trace of that sequence)
        rec = explore.trace(model, corpus[h["seq"]])[1]
        assert row in rec.indices[h["pos"]].tolist()
        assert h["context"].split()[-1] == str(int(corpus[h["seq"], h["pos"]]))


def test_generate_is_seed_deterministic_and_respects_the_context_length():
    model = TinyLM(tiny("ultramemv2")).eval()
    prompt = torch.randint(0, VOCAB, (2, 20))  # longer than max_seq_len=16: cropped, never an error
    a = model.generate(prompt, 6, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 26) and a.dtype == torch.long and torch.equal(a, b) and torch.equal(a[:, :20], prompt)
    c = model.generate(prompt, 6, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)
    greedy = model.generate(prompt[:, :5], 3, temperature=0)
    assert torch.equal(greedy, model.generate(prompt[:, :5], 3, top_k=1))
    assert greedy[0, 5] == model(prompt[:1, :5]).logits[0, -1].argmax()
    assert torch.equal(model.generate(prompt, 0), prompt)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=VOCAB + 1), "top_k"), (dict(generator=3), "generator"),
])
def test_generate_errors_name_the_argument(kwargs, match):
    model = TinyLM(tiny("dense"))
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **args)
    with pytest.raises(ValueError, match="tokens"):
        model.generate(torch.full((1, 3), VOCAB), 2)


def test_cli_prints_one_table_per_layer(capsys):
    assert explore.main(["--model", "ultramemv2", "--untrained", "--text", "hi there", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("memory layer") == 4 and "|mem|" in text and "(ultramemv2" in text
    assert len([line for line in text.splitlines() if line[:4].strip().isdigit()]) == 4 * len("hi there")


def test_explorer_widget_redraws():
    pytest.importorskip("ipywidgets")
    import matplotlib.pyplot as plt

    model = TinyLM(tiny("ultramemv2", vocab_size=256, max_seq_len=32))
    corpus = torch.randint(0, 256, (3, 16))
    box = explorer_box = explore.explorer(model, text="abc def", corpus=corpus)
    text, (pos, layer, slot), out = explorer_box.children[0], box.children[1].children, box.children[2]
    assert pos.max == len("abc def") - 1
    layer.value, pos.value, slot.value = 2, 1, 3
    text.value = "hello"
    assert pos.max == 4 and out.outputs is not None
    fig, info = explore.show(model, torch.tensor([104, 105]), 1, layer=3, corpus=corpus)
    assert "row" in info and fig.axes
    plt.close("all")


def test_pretrained_trains_once_then_loads_the_same_model(tmp_path, capsys):
    kw = dict(size="smoke", cache_dir=tmp_path, progress=False, steps=2, eval_every=2)
    model, results = explore.pretrained("ultramemv2", **kw)
    assert not model.training and results["final"]["step"] == 2
    (entry,) = tmp_path.iterdir()
    stamp = (entry / "pretrained.json").stat().st_mtime_ns
    again, _ = explore.pretrained("ultramemv2", **kw)  # loaded, not retrained
    assert (entry / "pretrained.json").stat().st_mtime_ns == stamp
    tokens = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(model(tokens).logits, again(tokens).logits, rtol=0, atol=0)
    capsys.readouterr()
    ckpt = entry / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a damaged cache entry is retrained, with a message
    third, results = explore.pretrained("ultramemv2", **kw)
    assert "does not load" in capsys.readouterr().err and results["train_wall_s"] > 0
    torch.testing.assert_close(model(tokens).logits, third(tokens).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="recipe"):
        explore.pretrained("gpt", **kw)
    assert explore.main(["--checkpoint", str(entry), "--text", "ab", "--layers", "1"]) == 0
    assert capsys.readouterr().out.count("memory layer") == 1


def test_tools_ship_model_writes_a_weights_only_run_that_pretrained_loads_without_training(tmp_path, monkeypatch):
    import hashlib
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import ship_model

    kw = dict(steps=2, eval_every=2, seed=3)
    monkeypatch.setattr(explore, "SHIPPED_DIR", tmp_path / "models")
    dest = ship_model.ship("ultramemv2", "smoke", tmp_path / "models", "python tools/ship_model.py (test)", **kw)
    assert dest.name == explore.run_name("ultramemv2", "smoke", **kw)
    trained, _ = explore.pretrained("ultramemv2", "smoke", cache_dir=tmp_path / "cache", progress=False,
                                    shipped=False, **kw)  # the same run, trained again: deterministic
    import umv2_ref.train

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained() trained although the run is shipped")

    monkeypatch.setattr(umv2_ref.train, "train", no_training)
    model, results = explore.pretrained("ultramemv2", "smoke", cache_dir=tmp_path / "empty", progress=False, **kw)
    assert results["shipped"] == str(dest) and results["train_wall_s"] == 0.0 and not model.training
    tokens = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(model(tokens).logits, trained(tokens).logits, rtol=0, atol=0)
    assert json.loads((dest / "pretrained.json").read_text())["command"] == "python tools/ship_model.py (test)"
    ckpt = torch.load(dest / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"] == {"state": {}, "param_groups": []}  # weights only
    sums = dict(reversed(line.split("  ")) for line in (tmp_path / "models" / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {f"{dest.name}/{f}" for f in ("checkpoint.pt", "metrics.json", "pretrained.json")}
    assert all(hashlib.sha256((tmp_path / "models" / f).read_bytes()).hexdigest() == h for f, h in sums.items())


def test_notebook_08s_facts_model_is_shipped_intact_and_trained():
    """Notebook 08 asks pretrained() for the head-to-head's umv2-tiny on the capacity facts (chosen
    rate, seed 1): it must be in data/models under its current config hash, match SHA256SUMS, and
    answer facts far above chance (an untrained model scores about 1/256)."""
    import hashlib
    import json

    from umv2_ref import synthetic

    root = Path(__file__).resolve().parents[1]
    lr = json.loads((root / "data" / "h2h_summary.json").read_text())["meta"]["chosen_lr"]["facts-capacity/umv2-tiny"]
    name = explore.run_name("umv2-tiny", "facts", lr=lr, seed=1)
    models = root / "data" / "models"
    assert (models / name / "pretrained.json").is_file(), f"{name} is not shipped: run tools/ship_model.py (data/README.md)"
    for line in (models / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split("  ")
        assert hashlib.sha256((models / path).read_bytes()).hexdigest() == digest, f"{path} changed after shipping"
    model, results = explore.pretrained("umv2-tiny", "facts", cache_dir=None, progress=False, lr=lr, seed=1)
    assert results["shipped"] == str(models / name)
    x, y = synthetic.eval_set(synthetic.capacity_facts(), n=64)
    acc = explore.knockout_eval(model, [(x[:32], y[:32]), (x[32:], y[32:])])["acc"]
    assert acc > 0.25, acc


def test_fact_slots_pick_the_slot_with_the_largest_direct_effect():
    model = TinyLM(tiny("ultramemv2"))
    perturb_(model)
    x = torch.randint(0, VOCAB, (3, 12))
    y = torch.full((3, 12), -100)
    y[0, 4], y[2, 7], y[2, 9] = 5, 11, 3
    found = explore.fact_slots(model, x, y, batch_size=2)
    assert [(f["seq"], f["pos"]) for f in found] == [(0, 4), (2, 7), (2, 9)]
    for f in found:  # brute force through trace + direct_logits of that sequence
        targets = torch.full((12,), f["target"])
        effects = torch.stack([explore.direct_logits(model, r, targets)[f["pos"]]
                               for r in explore.trace(model, x[f["seq"]])])  # [L, S]
        assert f["effect"] == pytest.approx(float(effects.max()), rel=1e-4, abs=1e-6)
        assert f["memory_effect"] == pytest.approx(float(effects.sum()), rel=1e-4, abs=1e-5)
        layer, s = divmod(int(effects.argmax()), effects.shape[1])
        assert (f["layer"], f["query"][-1]) == (layer, int(x[f["seq"], f["pos"]]))


def test_trace_panel_outlines_the_read_cells():
    import matplotlib.pyplot as plt

    from umv2_ref import viz

    grid = torch.randn(6, 6)
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([1, 2, 3])
    fig = viz.trace_panel(grid, rows, cols, torch.rand(3, 2), torch.randn(3), torch.rand(3),
                          {"memory": 0.3, "ffn": float("nan"), "stream": 1.0}, highlight=1)
    patches = [p for p in fig.axes[0].patches if p.get_gid() in ("selected", "highlight")]
    cells = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)): p.get_gid() for p in patches}
    assert cells == {(0, 1): "selected", (2, 2): "highlight", (5, 3): "selected"}
    plt.close(fig)
    with pytest.raises(ValueError, match="grid"):
        viz.trace_panel(torch.zeros(3, 4), rows, cols, torch.rand(3), None, torch.rand(3), {})


def test_seed_curves_zoom_on_the_end_and_seed_bars_mark_chance():
    import matplotlib.pyplot as plt

    from umv2_ref import viz

    steps = [0, 100, 200, 300]
    fig = viz.seed_curves({"a": (steps, [[5.0, 2.0, 1.6, 1.5], [5.2, 2.1, 1.7, 1.55]]), "b": (steps, [[5.0, 2.2, 1.8, 1.7]])})
    low, high = fig.axes[0].get_ylim()
    assert high < 3 and low < 1.5  # the step-0 loss of 5 is outside the zoomed range; the ends are inside
    assert any("end 1.525" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    plt.close(fig)
    fig = viz.seed_bars({"m": {"t": {"mean": 0.5, "min": 0.4, "max": 0.7}}}, ylabel="acc", chance={"t": 0.01})
    assert [c for c in fig.axes[0].collections if c.get_gid() == "chance"]
    plt.close(fig)
