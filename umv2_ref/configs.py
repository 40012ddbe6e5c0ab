"""Named tiny configurations, matched on activated AND total parameters.

Default text setup: byte-level vocabulary (256), d_model 64, 4 layers of 4 heads, context 256 --
small enough to train a few hundred steps on a 2-core CPU.

Matching (:data:`TARGET_ACTIVE`, :data:`TARGET_TOTAL`, tolerance :data:`TOLERANCE`, checked by
``tests/test_configs.py``): every configuration activates ~217.7k parameters per token (the dense
model's size, embedding included), and every sparse configuration holds ~1.10M parameters in total
(~5x the dense model), both within 2%.  Sizes were chosen with the formulas of
:mod:`umv2_ref.costs`:

* ``moe-2of16`` / ``moe-8of64``: expert width 84 / 20 (the 64-expert router costs 4k activated
  parameters per layer, so the two MoEs cannot both hit both targets exactly: -0.9% / +1.9% active,
  +1.7% / -1.6% total).
* ``pkm``, ``peer``: the memory replaces the FFN of block 2 (XLM placement); the key and head sizes
  restore the activated count, ``mem_knum`` (keys per axis, knum^2 value rows) sets the total.
* ``memoryplus``: memories replace the FFNs of blocks 1 and 3 and share one value table (the Memory+
  paper's shared pool, ``mem_share_values``); each has its own query, keys and gating.
* ``ultramem``: one skip-layer memory (read block 1, add after block 2) with two heads that share a
  query and read 8 slots each (the official v1 layout, 2 x m); its per-head keys cost ``D_k = 12``
  and every FFN shrinks to 120.
* ``ultramemv2``: a memory in every block in parallel with a SwiGLU shrunk to 108 (1.7d), knum 68,
  ``D_k=16``, ``D_p:D_v = 16:32``, top-m 32.  ``ultramemv2-shared``: the same pool shared with
  ``share_ratio=0.5`` (every layer reads a window of 96^2 rows of the 4*68^2-row pool, docs/references.md
  Sec. 6.8); its larger key tables cost a slightly smaller FFN (98).

``python -m umv2_ref.configs`` prints :func:`comparison_table` for all of them.
"""
from __future__ import annotations

from dataclasses import replace

from .costs import ModelCosts, format_count, model_costs
from .model import ModelConfig, TinyLM

TARGET_ACTIVE = 217_664  # the dense model's parameters (all active)
TARGET_TOTAL = 1_100_000  # total parameters of every sparse configuration
TOLERANCE = 0.02  # relative; achieved worst case: moe-8of64 active +1.9%

BASE = dict(d_model=64, n_layers=4, n_heads=4, max_seq_len=256)

_CONFIGS: dict[str, dict] = {
    "dense": dict(ffn="dense"),  # d_ff = default 176 (8d/3 rounded up to 8)
    "moe-2of16": dict(ffn="moe", n_experts=16, moe_topk=2, d_expert=84),
    "moe-8of64": dict(ffn="moe", n_experts=64, moe_topk=8, d_expert=20),
    "pkm": dict(ffn="pkm", memory_layers="2", mem_knum=118, mem_heads=4, mem_d_key=40, mem_topk=8),
    "memoryplus": dict(ffn="memoryplus", memory_layers="1,3", mem_knum=118, mem_heads=4, mem_d_key=32,
                       mem_topk=8, mem_d_value=64, mem_share_values=True),
    "peer": dict(ffn="peer", memory_layers="2", mem_knum=84, mem_heads=8, mem_d_key=16, mem_topk=16),
    "ultramem": dict(ffn="ultramem", d_ff=120, memory_layers="1:2", mem_knum=166, mem_heads=2, mem_d_key=12,
                     mem_topk=8, mem_d_value=32, mem_expand=4, mem_tucker_penalty=0.001),
    "ultramemv2": dict(ffn="ultramemv2", d_ff=108, mem_knum=68, mem_d_key=16, mem_topk=32, mem_d_pre=16,
                       mem_d_value=32),
    "ultramemv2-shared": dict(ffn="ultramemv2", d_ff=98, mem_knum=68, mem_d_key=16, mem_topk=32, mem_d_pre=16,
                              mem_d_value=32, share_ratio=0.5),
}
CONFIG_NAMES = tuple(_CONFIGS)


def get_config(name: str, vocab_size: int = 256, **overrides) -> ModelConfig:
    """The named configuration; ``overrides`` replace any :class:`ModelConfig` field (e.g. ``max_seq_len``).

    Widths already resolved (``d_ff``, ``d_expert``, ``mem_d_value``) keep their values when
    ``d_model`` is overridden; the parameter matching holds for the defaults only.
    """
    if name not in _CONFIGS:
        raise ValueError(f"config name must be one of {CONFIG_NAMES}, got {name!r}")
    cfg = ModelConfig(vocab_size=vocab_size, **BASE, **_CONFIGS[name])
    return replace(cfg, **overrides) if overrides else cfg


def config_costs(name: str, vocab_size: int = 256) -> ModelCosts:
    """:func:`~umv2_ref.costs.model_costs` of the built model."""
    return model_costs(TinyLM(get_config(name, vocab_size)))


def comparison_table(names: tuple[str, ...] | list[str] = CONFIG_NAMES, vocab_size: int = 256) -> str:
    """Markdown table: total / activated parameters, MACs per token, bf16 parameter bytes read per
    token in a decode step of batch 1 and 64 (docs/references.md Sec. 7.9 conventions, see umv2_ref.costs)."""
    rows = ["| config | total params | activated / token | MACs / token | bytes / token, B=1 | bytes / token, B=64 |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        c = config_costs(name, vocab_size)
        cells = [c.params, c.active, c.macs, c.bytes_per_token(1), c.bytes_per_token(64)]
        rows.append(f"| {name} | " + " | ".join(format_count(v) for v in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(comparison_table())
    print(f"\nMatching targets: {format_count(TARGET_ACTIVE)} activated (all configs), {format_count(TARGET_TOTAL)} "
          f"total (sparse configs), tolerance {TOLERANCE:.0%}.  Bytes: bf16 parameters read per token in one decode "
          "step (dense weights and full key tables once per step, distinct experts / value rows under uniform "
          "routing).  MACs exclude the context-dependent attention scores.")
