"""umv2_ref.continual: read statistics, TF-IDF / KL rankings against brute force, frozen rows under
SGD and AdamW, LoRA, the finetuning loop; and the experiment at a tiny size (resumable, 3 seeds)."""
import copy
import json
import math
from collections import Counter

import pytest
import torch

from umv2_ref import continual as cl
from umv2_ref.configs import get_config
from umv2_ref.experiments import continual as X
from umv2_ref.model import TinyLM

SMALL = dict(mem_knum=16, mem_topk=8, max_seq_len=64)  # a fast UltraMemV2 for the tests


def tiny_model(name="ultramemv2", **overrides):
    torch.manual_seed(0)
    return TinyLM(get_config(name, **{**SMALL, **overrides})).eval()


def batches(n, B=3, T=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (B, T), generator=gen) for _ in range(n)]


def fact_batch(B=4, seed=0):
    task = X.fact_sets(64, seed=0, entity_tokens=16, seq_len=32)[1]
    return task.sample(B, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Read statistics
# ---------------------------------------------------------------------------------------------


def test_read_counts_are_the_physical_rows_each_layer_reads():
    model = tiny_model()
    x = batches(1)[0]
    out = model(x)
    counts = cl.read_counts(out.memory, cl.table_sizes(model))
    h = model.embed(x)
    for j, (block, layer) in enumerate(zip(model.blocks, model.memory)):
        h, xbar, _ = block(h)  # the memory reads the block's normalised FFN input
        _, virtual, _ = layer.retrieval(xbar)
        rows = layer.physical_rows(virtual)  # grid slot -> table row (shuffle, window, offset)
        want = Counter(rows.flatten().tolist())
        got = {i: int(c) for i, c in enumerate(counts[j].tolist()) if c}
        assert got == dict(want)
        h = h + layer(xbar).output
    assert all(c.sum() == x.numel() * model.cfg.mem_topk for c in counts)


def test_read_counts_where_keeps_only_the_chosen_positions():
    model = tiny_model()
    x = batches(1)[0]
    where = torch.zeros(x.shape, dtype=torch.bool)
    where[1, 3] = where[2, 7] = True
    out = model(x)
    counts = cl.read_counts(out.memory, cl.table_sizes(model), where)
    for c, mem in zip(counts, out.memory):
        want = Counter(mem.indices[1, 3].tolist()) + Counter(mem.indices[2, 7].tolist())
        assert {i: int(v) for i, v in enumerate(c.tolist()) if v} == dict(want)
    with pytest.raises(ValueError, match="where must be a bool tensor"):
        cl.read_counts(out.memory, cl.table_sizes(model), where.long())


def test_slot_stats_against_brute_force():
    model = tiny_model()
    docs = batches(5)
    stats = cl.slot_stats(model, docs)
    assert stats.n_docs == 5
    for j in range(len(model.memory)):
        total, df = Counter(), Counter()
        for d in docs:
            rows = model(d).memory[j].indices.flatten().tolist()
            total.update(rows)
            df.update(set(rows))
        assert {i: int(v) for i, v in enumerate(stats.counts[j].tolist()) if v} == dict(total)
        assert {i: int(v) for i, v in enumerate(stats.doc_freq[j].tolist()) if v} == dict(df)


# ---------------------------------------------------------------------------------------------
# Rankings
# ---------------------------------------------------------------------------------------------


def brute_tfidf(batch_rows, docs_rows, n):
    """TF-IDF from plain Python lists of read rows (the batch; one list per background document)."""
    tf = Counter(batch_rows)
    df = Counter(r for doc in docs_rows for r in set(doc))
    return [tf[i] / len(batch_rows) * math.log((len(docs_rows) + 1) / (df[i] + 1)) for i in range(n)]


def test_tfidf_matches_a_brute_force_count():
    gen = torch.Generator().manual_seed(1)
    n = 50
    docs = [torch.randint(0, n // 2, (int(torch.randint(5, 40, (1,), generator=gen)),), generator=gen).tolist() for _ in range(7)]
    batch = torch.randint(0, n, (60,), generator=gen).tolist()
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, torch.tensor(batch), torch.ones(len(batch), dtype=torch.float64))
    df = torch.zeros(n, dtype=torch.float64)
    for doc in docs:
        df[sorted(set(doc))] += 1
    got = cl.tfidf_scores(counts, df, len(docs))
    torch.testing.assert_close(got, torch.tensor(brute_tfidf(batch, docs, n), dtype=torch.float64))
    # a row every background document reads scores 0; a row no document reads has the largest idf
    assert got[df == len(docs)].abs().max() == 0 if (df == len(docs)).any() else True
    unseen = (df == 0) & (counts > 0)
    assert unseen.any()
    assert torch.allclose(got[unseen] / (counts[unseen] / counts.sum()), torch.tensor(math.log(len(docs) + 1), dtype=torch.float64))


def test_kl_terms_sum_to_the_kl_divergence_and_unread_rows_score_zero():
    gen = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 4, (30,), generator=gen).double() * (torch.rand(30, generator=gen) < 0.5)
    background = torch.randint(0, 50, (30,), generator=gen).double()
    scores = cl.kl_scores(batch, background, smoothing=0.5)
    p = batch / batch.sum()
    q = (background + 0.5) / (background + 0.5).sum()
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0)
    assert math.isclose(scores.sum().item(), kl, rel_tol=1e-12)
    assert bool((scores[batch == 0] == 0).all())


def test_top_t_picks_read_rows_best_first_with_ties_to_the_lower_row():
    scores = torch.tensor([0.5, 0.9, 0.9, 0.1, 2.0, 0.7], dtype=torch.float64)
    batch = torch.tensor([1.0, 2.0, 1.0, 3.0, 0.0, 1.0], dtype=torch.float64)  # row 4 is not read
    assert cl.top_t(scores, batch, 3).tolist() == [1, 2, 5]
    assert cl.top_t(scores, batch, 100).tolist() == [1, 2, 5, 0, 3]  # only the 5 read rows
    with pytest.raises(ValueError, match="t must be a positive int"):
        cl.top_t(scores, batch, 0)


def test_select_rows_uses_the_chosen_rule_per_layer():
    model = tiny_model()
    stats = cl.slot_stats(model, batches(4))
    counts = cl.batch_counts(model, fact_batch()[0])
    tfidf = cl.select_rows(counts, stats, 5, "tfidf")
    kl = cl.select_rows(counts, stats, 5, "kl", smoothing=1.0)
    for j, c in enumerate(counts):
        assert tfidf[j].tolist() == cl.top_t(cl.tfidf_scores(c, stats.doc_freq[j], stats.n_docs), c, 5).tolist()
        assert kl[j].tolist() == cl.top_t(cl.kl_scores(c, stats.counts[j], 1.0), c, 5).tolist()
    with pytest.raises(ValueError, match="rule must be one of"):
        cl.select_rows(counts, stats, 5, "bm25")


@pytest.mark.parametrize("call,match", [
    (lambda: cl.tfidf_scores(torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 2), "same shape"),
    (lambda: cl.tfidf_scores(torch.ones(3, dtype=torch.float64), torch.full((3,), 5.0, dtype=torch.float64), 2),
     "doc_freq cannot exceed n_docs=2"),
    (lambda: cl.tfidf_scores(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 2), "no reads"),
    (lambda: cl.kl_scores(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 0.0), "smoothing"),
    (lambda: cl.kl_scores(-torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)), "non-negative"),
    (lambda: cl.FinetuneConfig(method="prefix"), "method must be one of"),
    (lambda: cl.FinetuneConfig(optimizer="adam"), "optimizer must be one of"),
    (lambda: cl.FinetuneConfig(t=0), "t must be a positive int"),
    (lambda: cl.FinetuneConfig(lr=0.0), "lr must be positive"),
    (lambda: cl.value_tables(TinyLM(get_config("dense"))), "no memory layer"),
    (lambda: X.Settings(n_facts=600, entity_tokens=32), "exceeds entity_tokens"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Frozen rows: SGD, AdamW (weight decay, momentum), a shared value pool
# ---------------------------------------------------------------------------------------------


def run_sparse(model, optimizer, steps=4, t=6, pre_values=True, lr=None):
    """Sparse finetuning of ``model``; returns the state before every step and the rows each step updated."""
    stats = cl.slot_stats(model, batches(3))
    lr = lr if lr is not None else (5.0 if optimizer == "sgd" else 0.05)
    cfg = cl.FinetuneConfig(method="sparse", optimizer=optimizer, lr=lr, steps=steps, t=t, pre_values=pre_values,
                            weight_decay=0.5)
    states = [copy.deepcopy(model.state_dict())]
    rows = []
    data = iter([fact_batch(seed=i) for i in range(steps)])

    def on_step(step, r):
        rows.append(r)
        states.append(copy.deepcopy(model.state_dict()))

    cl.finetune(model, cfg, lambda: next(data), stats, on_step=on_step)
    return states, rows


def table_names(model):
    names = {}
    for j, (pre, values) in enumerate(cl.value_tables(model)):
        for kind, table in (("values", values), ("pre_values", pre)):
            if table is None:
                continue
            name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is table)
            names.setdefault(name, []).append((j, kind))
    return names


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("config", ["ultramemv2", "ultramemv2-shared", "pkm", "peer", "memoryplus", "ultramem"])
def test_sparse_step_changes_only_the_selected_rows(optimizer, config):
    overrides = {} if config.startswith("ultramemv2") else dict(mem_knum=16, mem_topk=4)
    model = tiny_model(config, **overrides)
    states, rows = run_sparse(model, optimizer)
    names = table_names(model)
    for step, selected in enumerate(rows):
        before, after = states[step], states[step + 1]
        for key in before:
            if key not in names:
                assert torch.equal(before[key], after[key]), f"step {step + 1}: {key} changed"
                continue
            allowed = torch.zeros(before[key].shape[0], dtype=torch.bool)
            for j, kind in names[key]:
                allowed[selected[j]] = True  # union over the layers sharing this table
            changed = (before[key] != after[key]).any(-1)
            assert not bool((changed & ~allowed).any()), f"step {step + 1}: unselected rows of {key} moved"
        moved = [(before[k] != after[k]).any(-1).sum().item() for k in names if k.endswith("values")]
        assert sum(moved) > 0  # the selected rows did learn


def test_gradient_masking_alone_does_not_freeze_rows_under_adamw():
    """Why step_keeping_rows exists: weight decay and AdamW's momentum move rows whose gradient is zero."""
    model = tiny_model()
    _, values = cl.value_tables(model)[0]
    model.requires_grad_(False)
    values.requires_grad_(True)
    opt = torch.optim.AdamW([values], lr=0.05, weight_decay=0.5)
    first, second = torch.zeros(values.shape[0], dtype=torch.bool), torch.zeros(values.shape[0], dtype=torch.bool)
    first[:10], second[10:20] = True, True
    for keep in (first, second):
        before = values.detach().clone()
        opt.zero_grad()
        model(fact_batch()[0]).logits.square().mean().backward()
        cl.mask_gradients_({values: keep})
        opt.step()
        moved = (values.detach() != before).any(-1)
        assert bool(moved[~keep].any())  # weight decay (step 1) and momentum (step 2) leak
    before = values.detach().clone()  # the same step inside step_keeping_rows leaks nothing
    opt.zero_grad()
    model(fact_batch()[0]).logits.square().mean().backward()
    cl.mask_gradients_({values: first})
    with cl.step_keeping_rows(opt, {values: first}):
        opt.step()
    assert not bool((values.detach() != before).any(-1)[~first].any())


def test_the_sparse_adamw_exercise_is_what_step_keeping_rows_does_to_adamw():
    from umv2_ref.exercises import REGISTRY

    _step_reference = REGISTRY["nb09_sparse_adamw_step"].reference

    gen = torch.Generator().manual_seed(5)
    table = torch.nn.Parameter(torch.randn(12, 4, generator=gen, dtype=torch.float64))
    opt = torch.optim.AdamW([table], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    p, m, v = table.detach().clone(), torch.zeros(12, 4, dtype=torch.float64), torch.zeros(12, 4, dtype=torch.float64)
    for step in range(1, 4):
        keep = torch.rand(12, generator=gen) < 0.5
        table.grad = torch.randn(12, 4, generator=gen, dtype=torch.float64)
        p, m, v = _step_reference(p, table.grad * keep[:, None], m, v, keep, step, 0.01, 0.1)
        cl.mask_gradients_({table: keep})
        with cl.step_keeping_rows(opt, {table: keep}):
            opt.step()
        torch.testing.assert_close(table.detach(), p, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[table]["exp_avg"], m, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[table]["exp_avg_sq"], v, rtol=1e-12, atol=1e-15)


def test_finetune_values_and_lora_touch_only_their_parameters():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    x, y = fact_batch()
    cl.finetune(model, cl.FinetuneConfig(method="values", optimizer="adamw", lr=0.01, steps=2, pre_values=False),
                lambda: (x, y))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"memory.{j}.values" for j in range(4)}

    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    cl.finetune(model, cl.FinetuneConfig(method="lora", optimizer="adamw", lr=0.01, steps=2), lambda: (x, y))
    after = model.state_dict()
    assert all(torch.equal(before[k.replace(".base.", ".")], after[k]) for k in after if "lora_" not in k)
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if k.endswith("lora_b"))


def test_lora_starts_as_the_base_model_and_merges_exactly():
    model = tiny_model()
    x = batches(1)[0]
    ref = model(x).logits
    params = cl.add_lora(model, rank=3, alpha=6.0)
    assert len(params) == 2 * 5 * model.cfg.n_layers  # qkv, proj, gate, up, down in every block
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    lora = model.blocks[0].attn.qkv
    with torch.no_grad():
        lora.lora_b.normal_()
    x1 = torch.randn(5, lora.base.in_features)
    torch.testing.assert_close(lora(x1), x1 @ lora.merged_weight().T)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_full_finetuning_moves_every_trained_weight_and_reduces_the_loss():
    model = tiny_model()
    x, y = fact_batch()
    before = copy.deepcopy(model.state_dict())
    losses = []
    res = cl.finetune(model, cl.FinetuneConfig(method="full", optimizer="adamw", lr=3e-3, steps=6, eval_every=3), lambda: (x, y),
                      evaluate=lambda m: {"ce": torch.nn.functional.cross_entropy(m(x).logits.flatten(0, 1), y.flatten(),
                                                                                 ignore_index=-100).item()})
    losses = [h["ce"] for h in res["history"]]
    assert [h["step"] for h in res["history"]] == [0, 3, 6] and losses[-1] < losses[0]
    after = model.state_dict()
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="needs background="):
        cl.finetune(tiny_model(), cl.FinetuneConfig(method="sparse"), lambda: (x, y))


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def test_fact_sets_are_disjoint_and_sample_only_their_own_facts():
    a, b = X.fact_sets(100, seed=3, entity_tokens=16, seq_len=32)
    pairs = lambda t: {tuple(e) for e in t.entities.tolist()}  # noqa: E731
    assert len(pairs(a)) == len(pairs(b)) == 100 and not pairs(a) & pairs(b)
    x, y = b.sample(20, torch.Generator().manual_seed(0))
    pos = (y != -100).nonzero().tolist()  # scored e2 positions
    facts_b = {(*e, at) for e, at in zip(b.entities.tolist(), b.attributes.tolist())}
    assert all((x[i, j - 1].item(), x[i, j].item(), y[i, j].item()) in facts_b for i, j in pos)


TINY = X.Settings(model_overrides=SMALL, n_facts=48, entity_tokens=16, seq_len=32, pretrain_steps=6, text_batch=2,
                  facts_batch=2, background_docs=2, finetune_steps=3, finetune_batch=2, t=8, t_sweep=(4,),
                  eval_every=2, eval_facts=8, eval_text=4)


def test_experiment_writes_the_summary_and_resumes(tmp_path, monkeypatch):
    summary = X.run(TINY, out=tmp_path, progress=False)
    data = json.loads((tmp_path / "continual.json").read_text())
    assert set(data["methods"]) == {m.name for m in X.default_methods()}
    for entry in data["methods"].values():
        for key in ("learned", "forgot_facts", "forgot_text"):
            assert {"mean", "min", "max", "std"} <= set(entry[key]) and entry[key]["n"] == 3
            assert entry[key]["min"] <= entry[key]["mean"] <= entry[key]["max"]
        assert set(entry["seeds"]) == {"1", "2", "3"} and "lr" in entry["settings"]
        for c in entry["curves"].values():
            assert c["forgot_facts"][0] == 0 and c["forgot_text"][0] == 0 and c["step"] == [0, 2, 3]
    assert set(data["t_sweep"]) == {"4"}
    assert (tmp_path / "forgetting.png").stat().st_size > 0 and "B accuracy" in (tmp_path / "results.md").read_text()
    assert summary["methods"]["full"]["learned"]["mean"] == data["methods"]["full"]["learned"]["mean"]

    def fail(*args, **kwargs):
        raise AssertionError("a saved run was recomputed")

    monkeypatch.setattr(X, "finetune_run", fail)
    monkeypatch.setattr(X, "pretrain", fail)
    again = X.run(TINY, out=tmp_path, progress=False)  # everything is on disk: nothing reruns
    assert again["methods"]["sparse-tfidf-sgd"]["seeds"] == summary["methods"]["sparse-tfidf-sgd"]["seeds"]
    with pytest.raises(ValueError, match="records other settings"):
        X.run(X.Settings(**{**TINY.__dict__, "t": 5}), out=tmp_path, progress=False)


def test_at_learning_interpolates_the_first_crossing():
    c = {"step": [0, 10, 20, 30], "learned": [0.0, 0.4, 0.8, 0.6], "forgot_facts": [0.0, 0.1, 0.3, 0.5],
         "forgot_text": [0.0, 1.0, 2.0, 3.0]}
    p = X.at_learning(c, 0.6)
    assert p == pytest.approx({"step": 15.0, "forgot_facts": 0.2, "forgot_text": 1.5})
    assert X.at_learning(c, 0.9) is None and X.at_learning(c, 0.0)["step"] == 0


def test_tuning_extends_a_grid_whose_largest_rate_wins():
    method = X.Method("m", {}, (0.1, 1.0))
    learned = {0.1: 0.2, 1.0: 0.5, 10.0: 0.9, 100.0: 0.8}  # 10 wins once added; 100 loses: stop there

    def record(lr):
        return {"history": [{"step": 0, "acc_a": 1.0, "acc_b": 0.0, "text_loss": 1.0},
                            {"step": 5, "acc_a": 0.9, "acc_b": learned[lr], "text_loss": 1.2}],
                "rows_touched": [], "cpu_seconds": 0.0, "config": {"lr": lr}}

    runs = {1: {f"m_lr{lr:g}": record(lr) for lr in (0.1, 1.0)} | {"_pretrain": {}}}
    fetched = []

    def fetch(m):
        fetched.append(m.lrs[0])
        runs[1][f"m_lr{m.lrs[0]:g}"] = record(m.lrs[0])

    s = X.Settings(seeds=(1,), matched_targets=())
    out = X.extend_grids(s, (method,), runs, fetch)
    assert fetched == [10.0, 100.0] and out[0].lrs == (0.1, 1.0, 10.0, 100.0)
    assert X.summarise(s, out, runs)["methods"]["m"]["settings"]["lr"] == 10.0
