"""Exercises of notebook 08 (memory-intensive synthetic tasks).

* ``nb08_mqar_layout``: place zoology's MQAR pairs, queries and shifted labels
  (:func:`umv2_ref.synthetic.mqar_layout`).
* ``nb08_masked_metrics``: cross-entropy and accuracy over the scored positions only (targets
  -100 elsewhere), pooled over the whole batch as the training loop does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from umv2_ref.exercises.harness import Mistake, register
from umv2_ref.synthetic import IGNORE, mqar, mqar_layout

from . import uses_package

# ----------------------------------------------------------------------------------------------
# nb08_mqar_layout
# ----------------------------------------------------------------------------------------------


def _layout_inputs(gen: torch.Generator):
    B, P, V = 3, int(torch.randint(2, 5, (1,), generator=gen)), 64
    T = 4 * P + 2 * int(torch.randint(0, 4, (1,), generator=gen))
    keys = torch.rand(B, V // 2 - 1, generator=gen).argsort(1)[:, :P] + 1
    values = torch.rand(B, V // 2, generator=gen).argsort(1)[:, :P] + V // 2
    gaps = torch.rand(B, (T - 2 * P) // 2, generator=gen).argsort(1)[:, :P]
    return keys, values, gaps, T


def _layout_unshifted(keys, values, gaps, seq_len):
    inputs, targets = mqar_layout(keys, values, gaps, seq_len)
    shifted = torch.full_like(targets, IGNORE)
    shifted[:, 1:] = targets[:, :-1]
    return inputs, shifted


def _layout_gap_not_doubled(keys, values, gaps, seq_len):
    B, P = keys.shape
    seq = torch.zeros(B, seq_len + 1, dtype=torch.long)
    seq[:, 0:2 * P:2], seq[:, 1:2 * P:2] = keys, values
    seq.scatter_(1, 2 * P + gaps, keys)
    labels = torch.full_like(seq, IGNORE).scatter_(1, 2 * P + gaps + 1, values)
    return seq[:, :-1], labels[:, 1:]


def _layout_values_first(keys, values, gaps, seq_len):
    return mqar_layout(values, keys, gaps, seq_len)


register(
    "nb08_mqar_layout", mqar_layout, _layout_inputs,
    notebook="08", fn_name="my_mqar_layout",
    goal="Lay out multi-query associative recall exactly: context pairs, repeated keys, labels after the shift.",
    mistakes=[
        Mistake("unshifted_labels", _layout_unshifted,
                "your label sits one position after the repeated key; after the one-token shift the target "
                "at position t is the *next* token, so value j belongs on the position of its repeated key."),
        Mistake("gap_not_doubled", _layout_gap_not_doubled,
                "you put query j at 2P + g_j; queries occupy every other position after the context: 2P + 2 g_j."),
        Mistake("values_first", _layout_values_first,
                "you wrote the context as 'v k' pairs; MQAR's context is k1 v1 k2 v2 ..."),
        uses_package(lambda k, v, g, n: mqar_layout(k, v, g, n), mqar_layout, mqar,
                     instead="place the tokens with slicing and scatter_."),
    ],
    spec="keys, values, gaps [B, P] int64, seq_len int -> (inputs, targets) [B, T] int64: context k1 v1 .. kP vP, "
         "key j again at 2P + 2 gaps[j], zeros elsewhere; targets -100 except value j at its repeated key.",
    outputs=("inputs", "targets"),
    fingerprints=(r"scatter_\(\s*1\s*,\s*\w+\s*,\s*values\)",),
)


# ----------------------------------------------------------------------------------------------
# nb08_masked_metrics
# ----------------------------------------------------------------------------------------------


def _metrics_inputs(gen: torch.Generator):
    B, T, V = 3, 10, 7
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(V, (B, T), generator=gen)
    keep = torch.rand(B, T, generator=gen) < torch.tensor([0.2, 0.5, 0.9])[:, None]  # uneven per row
    keep[:, 0] = True
    return logits, torch.where(keep, targets, IGNORE)


def _metrics_reference(logits, targets):
    mask = targets != IGNORE  # [B, T]
    ce = F.cross_entropy(logits[mask], targets[mask])
    acc = (logits[mask].argmax(-1) == targets[mask]).double().mean()
    return ce, acc


def _metrics_per_row_mean(logits, targets):
    """Averages per sequence first (rows with few scored tokens then weigh too much)."""
    ces, accs = [], []
    for lg, tg in zip(logits, targets):
        m = tg != IGNORE
        ces.append(F.cross_entropy(lg[m], tg[m]))
        accs.append((lg[m].argmax(-1) == tg[m]).double().mean())
    return torch.stack(ces).mean(), torch.stack(accs).mean()


def _metrics_unmasked_accuracy(logits, targets):
    """Counts the unscored positions as wrong answers."""
    mask = targets != IGNORE
    ce = F.cross_entropy(logits[mask], targets[mask])
    return ce, ((logits.argmax(-1) == targets) & mask).double().mean()


def _metrics_unmasked_loss(logits, targets):
    mask = targets != IGNORE
    ce = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten())
    return ce, (logits[mask].argmax(-1) == targets[mask]).double().mean()


register(
    "nb08_masked_metrics", _metrics_reference, _metrics_inputs,
    notebook="08", fn_name="my_masked_metrics",
    goal="Average loss and accuracy over the scored positions of the whole batch, as training does.",
    mistakes=[
        Mistake("per_sequence_mean", _metrics_per_row_mean,
                "you averaged per sequence first, so a sequence with few scored tokens weighs as much as one "
                "with many; pool all scored positions of the batch, then average once."),
        Mistake("unscored_count_as_wrong", _metrics_unmasked_accuracy,
                "your accuracy divides by every position; the unscored ones (target -100) count neither as "
                "right nor as wrong."),
        Mistake("loss_on_unscored", _metrics_unmasked_loss,
                "your loss includes the unscored positions (with a made-up target); only positions with "
                "target != -100 are scored (F.cross_entropy's ignore_index=-100 does this)."),
    ],
    rtol=1e-9, atol=1e-12,
    spec="logits [B, T, V] float64, targets [B, T] int64 (-100 = not scored) -> (mean CE, accuracy) over all "
         "scored positions of the batch, as 0-dim float64 tensors.",
    outputs=("cross-entropy", "accuracy"),
    fingerprints=(r"logits\[\s*mask\s*\]",),
)
