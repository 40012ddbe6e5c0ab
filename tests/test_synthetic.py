"""umv2_ref.synthetic: task definitions, label positions, determinism and the committed eval sets."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from umv2_ref import synthetic
from umv2_ref.synthetic import IGNORE, QUERY, SEP

DATA = Path(__file__).resolve().parents[1] / "data"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def docstring_rows(doc: str, name: str) -> list[int]:
    line = next(ln for ln in doc.splitlines() if ln.strip().startswith(name))
    return [IGNORE if tok == "." else int(tok) for tok in line.split(":", 1)[1].split()]


def test_mqar_reproduces_the_docstring_example():
    x, y = synthetic.mqar(1, 16, 12, 2, gen(0), random_non_queries=False)
    assert x[0].tolist() == docstring_rows(synthetic.mqar.__doc__, "inputs")
    assert y[0].tolist() == docstring_rows(synthetic.mqar.__doc__, "targets")
    assert docstring_rows(synthetic.mqar.__doc__, "position") == list(range(16))


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_structure(random_non_queries):
    V, T, P = 256, 64, 4
    x, y = synthetic.mqar(32, T, V, P, gen(1), random_non_queries=random_non_queries)
    assert x.shape == y.shape == (32, T)
    keys, values = x[:, 0:2 * P:2], x[:, 1:2 * P:2]
    assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
    for b in range(32):
        assert len(set(keys[b].tolist())) == P
        scored = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert len(scored) == P and all(p >= 2 * P and p % 2 == 0 for p in scored)
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert sorted(x[b, scored].tolist()) == sorted(pairs)  # every key is queried once
        for p in scored:
            assert y[b, p] == pairs[int(x[b, p])]
    if not random_non_queries:
        assert ((x == 0) | (y != IGNORE) | (torch.arange(T) < 2 * P)).all()


def test_mqar_power_law_prefers_short_gaps():
    def mean_first_query(a):
        _, y = synthetic.mqar(256, 64, 256, 4, gen(2), power_a=a)
        return (y != IGNORE).float().argmax(1).float().mean()

    assert mean_first_query(0.01) < mean_first_query(1.0)


def test_mqar_errors_name_the_argument():
    with pytest.raises(ValueError, match="seq_len"):
        synthetic.mqar(1, 15, 256, 2, gen())
    with pytest.raises(ValueError, match="num_kv_pairs"):
        synthetic.mqar(1, 16, 256, 5, gen())
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic.mqar(1, 64, 6, 4, gen())


def test_recall_questions_refer_to_earlier_rounds():
    task = synthetic.MultiRoundRecall()
    x, y = task.sample(16, gen(3))
    L = task.seq_len // task.rounds
    assert (x[:, ::L] == SEP).all()
    for b in range(16):
        stated = {}  # key -> (value, round)
        for r in range(task.rounds):
            for i in range(task.pairs_per_round):
                stated[int(x[b, r * L + 1 + 2 * i])] = (int(x[b, r * L + 2 + 2 * i]), r)
        scored = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert len(scored) == (task.rounds - 1) * task.queries_per_round
        for p in scored:
            value, round_stated = stated[int(x[b, p])]
            assert x[b, p - 1] == QUERY and y[b, p] == value and round_stated < p // L


def test_icl_scores_only_clusters_already_labelled():
    task = synthetic.ICLLabelMapping()
    x, y = task.sample(16, gen(4))
    mappings = set()
    for b in range(16):
        seen = {}
        xs, ys = x[b, 0::2].tolist(), x[b, 1::2].tolist()
        for i, (tok, label) in enumerate(zip(xs, ys)):
            cluster = (tok - task.first_input) // task.cluster_size
            scored = bool(y[b, 2 * i] != IGNORE)
            assert scored == (cluster in seen)  # first example of a cluster is not scored
            assert seen.setdefault(cluster, label) == label  # one label per cluster in a sequence
            if scored:
                assert y[b, 2 * i] == label
        assert (y[b, 1::2] == IGNORE).all()
        mappings.add(tuple(sorted(seen.items())))
    assert len(mappings) > 1  # the mapping changes from sequence to sequence


def test_facts_table_is_fixed_and_scored_at_the_second_entity_token():
    task = synthetic.FactMemorisation()
    table = {tuple(e): int(a) for e, a in zip(task.entities.tolist(), task.attributes)}
    assert len(table) == task.n_facts
    for seed in (5, 6):
        x, y = task.sample(8, gen(seed))
        scored = (y != IGNORE).nonzero().tolist()
        assert len(scored) == 8 * task.facts_per_seq
        for b, p in scored:
            assert x[b, p - 2] == synthetic.FACT
            assert y[b, p] == table[(int(x[b, p - 1]), int(x[b, p]))] == x[b, p + 1]
    again = synthetic.FactMemorisation()
    assert torch.equal(again.entities, task.entities) and torch.equal(again.attributes, task.attributes)
    assert not torch.equal(synthetic.FactMemorisation(fact_seed=1).attributes, task.attributes)
    assert task.one_token_baseline() < 0.15  # both entity tokens are needed to recall the attribute


def test_capacity_facts_preset():
    """The head-to-head's capacity-limited table: 8192 distinct facts, 128 attributes, 57 kbit."""
    task = synthetic.capacity_facts()
    assert (task.n_facts, task.entity_tokens, task.n_attributes) == (8192, 96, 128)
    assert task.bits() == pytest.approx(8192 * 7)
    assert len({tuple(e) for e in task.entities.tolist()}) == 8192
    e0, a0, _ = task.ranges
    assert int(task.entities.min()) >= e0 and int(task.entities.max()) < a0 <= int(task.attributes.min())
    assert task.one_token_baseline() < 0.1  # one entity token alone does not give the attribute
    x, y = task.sample(4, gen(3))
    assert ((y != IGNORE).sum(1) == task.facts_per_seq).all()
    assert synthetic.capacity_facts(n_facts=100).n_facts == 100  # overrides replace a field
    assert synthetic.CAPACITY_FACTS == {"n_facts": 8192, "entity_tokens": 96}


@pytest.mark.parametrize("name", sorted(synthetic.TASKS))
def test_tasks_are_seed_deterministic(name):
    task = synthetic.make_task(name)
    a, b, c = task.sample(4, gen(7)), task.sample(4, gen(7)), task.sample(4, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == a[1].dtype == torch.long and a[0].shape == (4, task.seq_len)
    assert int(a[0].min()) >= 0 and int(a[0].max()) < task.vocab_size


def test_task_config_errors():
    with pytest.raises(ValueError, match="task must be one of"):
        synthetic.make_task("copy")
    with pytest.raises(ValueError, match="queries_per_round"):
        synthetic.MultiRoundRecall(pairs_per_round=2, queries_per_round=3)
    with pytest.raises(ValueError, match="seq_len"):
        synthetic.ICLLabelMapping(seq_len=63)
    with pytest.raises(ValueError, match="n_facts"):
        synthetic.FactMemorisation(n_facts=10**6)


def readme_digests() -> dict[str, str]:
    text = (DATA / "README.md").read_text()
    return dict(re.findall(r"\| (eval_\w+\.npy) \|[^\n]*`([0-9a-f]{64})`", text))


def test_committed_eval_sets_match_regeneration_and_readme(tmp_path):
    listed = readme_digests()
    assert set(listed) == {f"eval_{name}.npy" for name in synthetic.TASKS}
    regenerated = synthetic.write_eval_sets(tmp_path)
    for name, digest in regenerated.items():
        committed = DATA / name
        assert committed.stat().st_size < 200_000
        assert hashlib.sha256(committed.read_bytes()).hexdigest() == digest == listed[name], name
        x, y = synthetic.load_eval_set(committed)
        task = synthetic.make_task(name[len("eval_"):-len(".npy")])
        ex, ey = synthetic.eval_set(task)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert np.load(DATA / "eval_mqar.npy").dtype == np.int16
