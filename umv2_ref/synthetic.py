"""Seed-deterministic synthetic tasks that stress memory: in-context recall and parametric facts.

Every task is a small dataclass with ``sample(batch_size, generator) -> (inputs, targets)``,
both ``int64 [B, T]``.  ``targets[b, t]`` is the token the model should predict *at* position
``t`` (the next token, i.e. after the one-token shift) or ``-100`` where nothing is scored, so a
language model trains on them with the ordinary ``cross_entropy(..., ignore_index=-100)`` and
accuracy is measured at the scored positions only.  All randomness comes from the caller's
``torch.Generator``; nothing is downloaded.

=============  ==================================================  =============================
task           what must be remembered                             where the memory lives
=============  ==================================================  =============================
``mqar``       key->value pairs given earlier in the context       in context (attention)
``recall``     pairs stated in earlier dialogue rounds             in context, across segments
``icl``        a per-sequence label mapping shown by examples      in context + learned clusters
``facts``      a fixed key->value table shared by all sequences    in the parameters
=============  ==================================================  =============================

MQAR follows zoology's definition (Arora et al. 2023, arXiv 2312.04927); the three others are
defined here.  UltraMemV2 (arXiv 2508.18756, Table 2) reports its largest long-context gains on
multi-round memorisation and in-context learning; ``facts`` is the parametric-capacity probe
memory layers are built for (a capacity probe after Allen-Zhu & Li, arXiv 2404.05405).

``python -m umv2_ref.synthetic --write-eval data/`` writes the fixed evaluation sets
(``data/eval_<task>.npy``, int16 ``[2, N, T]`` = inputs, targets) whose SHA-256 are listed in
``data/README.md``.
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IGNORE = -100
EVAL_SEED = 1234  # generator seed of the evaluation sets (training streams use the run's seed)
EVAL_EXAMPLES = 256
SEP, QUERY, FACT = 0, 1, 1  # special tokens of recall (SEP, QUERY) and facts (FACT)


def _distinct(batch_size: int, low: int, high: int, count: int, generator: torch.Generator) -> Tensor:
    """``[B, count]`` distinct integers per row from ``[low, high)`` (a random permutation's prefix)."""
    if count > high - low:
        raise ValueError(f"cannot draw {count} distinct tokens from [{low}, {high})")
    return torch.rand(batch_size, high - low, generator=generator).argsort(dim=1)[:, :count] + low


def _uniform(shape: tuple[int, ...], low: int, high: int, generator: torch.Generator) -> Tensor:
    return torch.randint(low, high, shape, generator=generator)


def mqar(batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int, generator: torch.Generator,
         power_a: float = 0.01, random_non_queries: bool = True) -> tuple[Tensor, Tensor]:
    """Multi-query associative recall as zoology defines it (``multiquery_ar``, one pass).

    1. Per example, ``num_kv_pairs`` distinct keys from ``[1, V/2)`` and distinct values from
       ``[V/2, V)``; the context is ``k1 v1 k2 v2 ...`` (``2 * num_kv_pairs`` tokens).
    2. The remaining ``space = (T - context) / 2`` query slots: each key is re-inserted once, at
       ``context + 2 * gap`` with distinct gaps drawn from the power law
       ``p(i) ~ a * i^(a - 1)``, ``i = 1..space`` (``a = 0.01`` favours short gaps, ``1`` is uniform).
    3. Targets are -100 except at each query key, where the target is its value (the label sits
       on the key itself after the one-token shift).
    4. With ``random_non_queries`` the remaining zeros of the input become random tokens in ``[0, V)``.

    zoology also asserts ``vocab_size > seq_len``, which its own docstring example (vocab 12,
    length 16) violates; only enough distinct keys is required here.

    Worked example (``vocab_size=12, num_kv_pairs=2, seq_len=16, random_non_queries=False``,
    generator seeded with 0)::

        position:  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
        inputs  :  3 11  4  9  3  0  0  0  4  0  0  0  0  0  0  0
        targets :  .  .  .  . 11  .  .  .  9  .  .  .  .  .  .  .

    Keys 3 and 4 (from [1, 6)) carry values 11 and 9 (from [6, 12)); the queries sit at positions
    4 and 8 (gaps 0 and 2), each predicting its value; every other target is -100 (shown as ".").
    """
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size={vocab_size} has fewer than num_kv_pairs={num_kv_pairs} distinct keys")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs={num_kv_pairs} needs seq_len >= {4 * num_kv_pairs}, got {seq_len}")
    context, half = 2 * num_kv_pairs, vocab_size // 2
    keys = _distinct(batch_size, 1, half, num_kv_pairs, generator)  # [B, P]
    values = _distinct(batch_size, half, vocab_size, num_kv_pairs, generator)  # [B, P]
    space = (seq_len - context) // 2
    i = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * i ** (power_a - 1)  # [space] power law over gaps 0..space-1
    gaps = torch.multinomial((p / p.sum()).expand(batch_size, space), num_kv_pairs, generator=generator)  # [B, P]
    inputs, targets = mqar_layout(keys, values, gaps, seq_len)
    if random_non_queries:
        noise = torch.randint(0, vocab_size, inputs.shape, generator=generator)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, targets


def mqar_layout(keys: Tensor, values: Tensor, gaps: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Place MQAR's pairs and queries: keys, values, gaps ``[B, P]`` -> ``(inputs, targets)`` ``[B, T]``.

    Context ``k1 v1 ... kP vP``; key j again at ``2P + 2 * gaps[j]``; zeros elsewhere.  The
    unshifted labels carry value j one position after its query, so after the one-token shift
    (``inputs = seq[:, :-1]``, ``targets = labels[:, 1:]``) the target sits on the query key.
    """
    B, P = keys.shape
    context = 2 * P
    seq = torch.zeros(B, seq_len + 1, dtype=torch.long)  # [B, T+1] unshifted
    seq[:, 0:context:2], seq[:, 1:context:2] = keys, values
    seq.scatter_(1, context + 2 * gaps, keys)
    labels = torch.full_like(seq, IGNORE).scatter_(1, context + 2 * gaps + 1, values)  # [B, T+1]
    return seq[:, :-1].clone(), labels[:, 1:].clone()  # [B, T] after the one-token shift


@dataclass
class MQAR:
    """zoology's CPU-sized MQAR (``basic.py``): vocab 256, length 64, 4 key-value pairs."""

    seq_len: int = 64
    vocab_size: int = 256
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return mqar(batch_size, self.seq_len, self.vocab_size, self.num_kv_pairs, generator,
                    self.power_a, self.random_non_queries)


@dataclass
class MultiRoundRecall:
    """Recall across dialogue-like rounds: facts stated in one round are asked about in later ones.

    The sequence is ``rounds`` segments of ``seq_len // rounds`` tokens.  Round ``r`` is::

        SEP  k v  k v ... (pairs_per_round new pairs)  Q k v  Q k v ... (r >= 1)  filler ...

    * ``SEP = 0`` opens a round, ``Q = 1`` announces a question; keys come from
      ``[V/8, (V/8 + V)/2)``, values from the upper part, filler from ``[2, V/8)``.
    * Keys are distinct within a sequence; each pair's value is drawn independently.
    * Round ``r >= 1`` asks ``queries_per_round`` distinct keys stated in rounds ``< r`` (never
      the current one), so every answer needs information from an earlier segment.
    * Scored: the key after each ``Q``, whose target is its value.
    """

    seq_len: int = 128
    vocab_size: int = 256
    rounds: int = 4
    pairs_per_round: int = 3
    queries_per_round: int = 3

    def __post_init__(self) -> None:
        round_len = self.seq_len // self.rounds
        if 1 + 2 * self.pairs_per_round + 3 * self.queries_per_round > round_len:
            raise ValueError(f"MultiRoundRecall: a round of {round_len} tokens cannot hold "
                             f"{self.pairs_per_round} pairs and {self.queries_per_round} queries")
        if self.queries_per_round > self.pairs_per_round:
            raise ValueError("MultiRoundRecall: queries_per_round must be <= pairs_per_round (round 1 asks round 0)")
        if self.seq_len % self.rounds:
            raise ValueError(f"MultiRoundRecall: seq_len={self.seq_len} must be divisible by rounds={self.rounds}")

    @property
    def ranges(self) -> tuple[int, int, int]:
        """``(first key, first value, first filler)``: filler [2, k0), keys [k0, v0), values [v0, V)."""
        k0 = self.vocab_size // 8
        return k0, (k0 + self.vocab_size) // 2, 2

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        k0, v0, f0 = self.ranges
        B, R, P, Q = batch_size, self.rounds, self.pairs_per_round, self.queries_per_round
        L = self.seq_len // R
        keys = _distinct(B, k0, v0, R * P, generator).view(B, R, P)  # [B, R, P]
        values = _uniform((B, R, P), v0, self.vocab_size, generator)  # [B, R, P]
        inputs = _uniform((B, R, L), f0, k0, generator)  # [B, R, L] filler
        targets = torch.full((B, R, L), IGNORE, dtype=torch.long)
        inputs[:, :, 0] = SEP
        inputs[:, :, 1:1 + 2 * P:2], inputs[:, :, 2:2 + 2 * P:2] = keys, values
        q0 = 1 + 2 * P  # first question slot of a round
        for r in range(1, R):
            pick = torch.rand(B, r * P, generator=generator).argsort(dim=1)[:, :Q]  # [B, Q] earlier pairs
            qk = keys[:, :r].reshape(B, -1).gather(1, pick)  # [B, Q]
            qv = values[:, :r].reshape(B, -1).gather(1, pick)  # [B, Q]
            inputs[:, r, q0:q0 + 3 * Q:3] = QUERY
            inputs[:, r, q0 + 1:q0 + 1 + 3 * Q:3] = qk
            inputs[:, r, q0 + 2:q0 + 2 + 3 * Q:3] = qv
            targets[:, r, q0 + 1:q0 + 1 + 3 * Q:3] = qv
        return inputs.view(B, -1), targets.view(B, -1)


@dataclass
class ICLLabelMapping:
    """In-context learning of a label mapping, token-level (few-shot classification).

    Input tokens ``[16, 16 + n_clusters * cluster_size)`` form ``n_clusters`` fixed clusters of
    consecutive ids (cluster = ``(token - 16) // cluster_size``, the same for every sequence: it
    can be learned in the weights).  Each sequence picks ``n_way`` clusters and assigns them
    ``n_way`` distinct labels from the last ``n_labels`` tokens of the vocabulary -- a fresh mapping
    per sequence, so it can only be inferred from the demonstrations.  The sequence is
    ``seq_len / 2`` pairs ``x y`` with ``x`` a random member of one of the chosen clusters and
    ``y`` its cluster's label.  Scored: every ``x`` whose cluster already appeared earlier in the
    sequence (target ``y``); the first example of each cluster is unpredictable and not scored.
    """

    seq_len: int = 64
    vocab_size: int = 256
    n_clusters: int = 16
    cluster_size: int = 8
    n_way: int = 4
    n_labels: int = 16

    first_input: int = field(default=16, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.seq_len % 2:
            raise ValueError(f"ICLLabelMapping: seq_len must be even, got {self.seq_len}")
        if self.first_input + self.n_clusters * self.cluster_size > self.vocab_size - self.n_labels:
            raise ValueError("ICLLabelMapping: clusters and labels do not fit in vocab_size")
        if self.n_way > min(self.n_clusters, self.n_labels):
            raise ValueError(f"ICLLabelMapping: n_way={self.n_way} exceeds n_clusters or n_labels")

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        B, n = batch_size, self.seq_len // 2
        clusters = _distinct(B, 0, self.n_clusters, self.n_way, generator)  # [B, W]
        labels = _distinct(B, self.vocab_size - self.n_labels, self.vocab_size, self.n_way, generator)  # [B, W]
        way = _uniform((B, n), 0, self.n_way, generator)  # [B, n] which chosen cluster each pair shows
        member = _uniform((B, n), 0, self.cluster_size, generator)  # [B, n]
        x = self.first_input + clusters.gather(1, way) * self.cluster_size + member  # [B, n]
        y = labels.gather(1, way)  # [B, n]
        seen = torch.zeros(B, n, self.n_way, dtype=torch.bool)
        seen.scatter_(2, way[..., None], True)
        seen_before = (seen.cumsum(1) - seen.long()).gather(2, way[..., None]).squeeze(-1) > 0  # [B, n]
        inputs = torch.stack([x, y], dim=2).view(B, -1)  # [B, T] = x1 y1 x2 y2 ...
        targets = torch.full((B, n, 2), IGNORE, dtype=torch.long)
        targets[..., 0] = torch.where(seen_before, y, IGNORE)
        return inputs, targets.view(B, -1)


@dataclass
class FactMemorisation:
    """A fixed random table of ``n_facts`` facts ``(e1, e2) -> a``, stored in the parameters.

    The table is drawn once from ``fact_seed`` and shared by every training and evaluation
    sequence (Physics of LMs 3.3-style capacity probe; Allen-Zhu & Li, arXiv 2404.05405).  Entities are
    distinct pairs of tokens from a small alphabet of ``entity_tokens`` ids starting at ``V/8``,
    so every token takes part in many facts and the attribute depends on *both* (see
    :meth:`one_token_baseline`); attributes come from the tokens above the entity alphabet,
    filler from ``[2, V/8)``.  A sequence holds ``facts_per_seq`` facts ``FACT e1 e2 a``
    (``FACT = 1``), one at a random offset inside each of ``facts_per_seq`` equal segments, with
    filler around them.  Scored: the ``e2`` position, whose target is ``a`` -- nothing in the
    context reveals it, so accuracy measures memorisation.
    """

    seq_len: int = 64
    vocab_size: int = 256
    n_facts: int = 512
    facts_per_seq: int = 8
    entity_tokens: int = 32
    fact_seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len // self.facts_per_seq < 4:
            raise ValueError(f"FactMemorisation: {self.facts_per_seq} facts of 4 tokens do not fit in seq_len={self.seq_len}")
        e0, a0, _ = self.ranges
        if a0 >= self.vocab_size:
            raise ValueError(f"FactMemorisation: entity_tokens={self.entity_tokens} leaves no attribute tokens")
        if self.n_facts > self.entity_tokens**2:
            raise ValueError(f"FactMemorisation: n_facts={self.n_facts} exceeds the {self.entity_tokens ** 2} "
                             "possible entities (raise entity_tokens)")
        gen = torch.Generator().manual_seed(self.fact_seed)
        ids = torch.randperm(self.entity_tokens**2, generator=gen)[:self.n_facts]  # [F] distinct entities
        self.entities = torch.stack([ids // self.entity_tokens, ids % self.entity_tokens], dim=1) + e0  # [F, 2]
        self.attributes = torch.randint(a0, self.vocab_size, (self.n_facts,), generator=gen)  # [F]

    @property
    def ranges(self) -> tuple[int, int, int]:
        """``(first entity token, first attribute token, first filler token)``."""
        e0 = self.vocab_size // 8
        return e0, e0 + self.entity_tokens, 2

    def one_token_baseline(self) -> float:
        """Best accuracy of a predictor that sees only one entity token (majority attribute per token)."""
        best = 0.0
        for column in (0, 1):
            pairs = self.entities[:, column] * self.vocab_size + self.attributes  # [F] (token, attribute)
            counts = torch.bincount(pairs, minlength=self.vocab_size**2).view(self.vocab_size, -1)
            best = max(best, counts.max(1).values.sum().item() / self.n_facts)
        return best

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        e0, _, f0 = self.ranges
        B, K = batch_size, self.facts_per_seq
        seg = self.seq_len // K
        inputs = _uniform((B, self.seq_len), f0, e0, generator)  # [B, T] filler
        targets = torch.full((B, self.seq_len), IGNORE, dtype=torch.long)
        fact = _uniform((B, K), 0, self.n_facts, generator)  # [B, K] which facts
        start = torch.arange(K) * seg + _uniform((B, K), 0, seg - 3, generator)  # [B, K] FACT positions
        e = self.entities[fact]  # [B, K, 2]
        inputs.scatter_(1, start, FACT)
        inputs.scatter_(1, start + 1, e[..., 0])
        inputs.scatter_(1, start + 2, e[..., 1])
        inputs.scatter_(1, start + 3, self.attributes[fact])
        targets.scatter_(1, start + 2, self.attributes[fact])
        return inputs, targets


TASKS = {"mqar": MQAR, "recall": MultiRoundRecall, "icl": ICLLabelMapping, "facts": FactMemorisation}


def make_task(name: str, **overrides) -> MQAR | MultiRoundRecall | ICLLabelMapping | FactMemorisation:
    """A task by name with field overrides, e.g. ``make_task("facts", n_facts=1024)``."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**overrides)


def task_config(task: object) -> dict:
    """The task's constructor fields (what a checkpoint records)."""
    return {k: v for k, v in asdict(task).items() if k != "first_input"}


def eval_set(task: object, n: int = EVAL_EXAMPLES, seed: int = EVAL_SEED) -> tuple[Tensor, Tensor]:
    """The fixed evaluation examples of a task: ``n`` samples from a generator seeded with ``seed``."""
    return task.sample(n, torch.Generator().manual_seed(seed))


def eval_array(task: object, n: int = EVAL_EXAMPLES, seed: int = EVAL_SEED) -> np.ndarray:
    """:func:`eval_set` as the int16 array ``[2, n, T]`` (inputs, targets) stored in ``data/``."""
    x, y = eval_set(task, n, seed)
    return torch.stack([x, y]).numpy().astype(np.int16)


def write_eval_sets(out_dir: str | Path) -> dict[str, str]:
    """Write ``eval_<task>.npy`` for every task at its default config; returns ``{file: sha256}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name in TASKS:
        path = out_dir / f"eval_{name}.npy"
        np.save(path, eval_array(make_task(name)))
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def load_eval_set(path: str | Path) -> tuple[Tensor, Tensor]:
    """Read an ``eval_<task>.npy`` file back as int64 ``(inputs, targets)``."""
    array = torch.from_numpy(np.load(path)).long()  # [2, N, T]
    return array[0], array[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the fixed synthetic evaluation sets.")
    parser.add_argument("--write-eval", metavar="DIR", required=True, help="directory for eval_<task>.npy")
    args = parser.parse_args(argv)
    for name, digest in write_eval_sets(args.write_eval).items():
        print(f"{name}  {digest}")


if __name__ == "__main__":
    main()
