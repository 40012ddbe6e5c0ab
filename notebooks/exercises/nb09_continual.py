"""Exercises of notebook 09 (continual learning with sparse memory finetuning).

* ``nb09_kl_scores``: the KL slot-selection rule (arXiv 2604.05248, as notebook 09 reads it): each
  row's term ``p log(p / q)`` of ``KL(batch reads || smoothed background reads)``
  (:func:`umv2_ref.continual.kl_scores`).
* ``nb09_sparse_adamw_step``: one AdamW step that updates only the selected rows of a memory table
  and leaves every other row -- parameters *and* optimiser moments -- bitwise unchanged, which is
  what :func:`umv2_ref.continual.step_keeping_rows` achieves around ``torch.optim.AdamW``.
"""
from __future__ import annotations

import torch

from umv2_ref.continual import kl_scores, tfidf_scores
from umv2_ref.exercises.harness import Mistake, register

from . import uses_package

# ----------------------------------------------------------------------------------------------
# nb09_kl_scores
# ----------------------------------------------------------------------------------------------


def _kl_inputs(gen: torch.Generator):
    n = int(torch.randint(20, 60, (1,), generator=gen))
    batch = torch.randint(0, 5, (n,), generator=gen).double() * (torch.rand(n, generator=gen) < 0.4)
    batch[0] = 3.0  # at least one read
    background = torch.randint(0, 40, (n,), generator=gen).double() * (torch.rand(n, generator=gen) < 0.8)
    smoothing = float(torch.rand(1, generator=gen)) + 0.1
    return batch, background, smoothing


def _kl_q_not_normalised(batch, background, smoothing):
    p = batch / batch.sum()
    q = (background + smoothing) / background.sum()
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))


def _kl_reversed(batch, background, smoothing):
    p = batch / batch.sum()
    q = (background + smoothing) / (background + smoothing).sum()
    return torch.where(p > 0, q * torch.log(q / p), torch.zeros_like(p))


def _kl_log_ratio_only(batch, background, smoothing):
    p = batch / batch.sum()
    q = (background + smoothing) / (background + smoothing).sum()
    return torch.where(p > 0, torch.log(p / q), torch.zeros_like(p))


register(
    "nb09_kl_scores", kl_scores, _kl_inputs,
    notebook="09", fn_name="my_kl_scores",
    goal="Rank memory rows by their term of KL(batch reads || background reads), the follow-up's slot rule.",
    mistakes=[
        Mistake("q_not_normalised", _kl_q_not_normalised,
                "your q divides the smoothed counts by the unsmoothed total, so it does not sum to 1; add the "
                "smoothing to every row before normalising (divide by sum(background + smoothing))."),
        Mistake("reversed_divergence", _kl_reversed,
                "you computed q log(q / p), the terms of KL(q || p); the rule asks how surprising the batch's "
                "reads are under the background, KL(p || q) = sum p log(p / q)."),
        Mistake("log_ratio_without_weight", _kl_log_ratio_only,
                "you ranked by log(p / q) alone; without the weight p a row read once but never by the "
                "background outranks the rows the batch reads most. Each term is p(i) log(p(i) / q(i))."),
        uses_package(lambda b, bg, s: kl_scores(b, bg, s), kl_scores, tfidf_scores,
                     instead="write the two distributions and the terms with tensor arithmetic."),
    ],
    rtol=1e-9, atol=1e-12,
    spec="batch [N], background [N] float64 read counts, smoothing > 0 -> [N] float64: p_i log(p_i / q_i) with "
         "p = batch / sum(batch), q = (background + smoothing) / sum(background + smoothing); 0 where p_i = 0.",
    outputs=("scores",),
    fingerprints=(r"log\(\s*p\s*/\s*q\s*\)",),
)


# ----------------------------------------------------------------------------------------------
# nb09_sparse_adamw_step
# ----------------------------------------------------------------------------------------------


def _step_inputs(gen: torch.Generator):
    n, d = int(torch.randint(6, 20, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
    p = torch.randn(n, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(n, d, generator=gen, dtype=torch.float64)
    exp_avg = 0.1 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # earlier steps left momentum
    exp_avg_sq = 0.01 * torch.rand(n, d, generator=gen, dtype=torch.float64)
    keep = torch.rand(n, generator=gen) < 0.4
    keep[0], keep[-1] = True, False
    step = int(torch.randint(1, 50, (1,), generator=gen))
    return p, grad, exp_avg, exp_avg_sq, keep, step, 0.01, 0.1


def sparse_adamw_step(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """AdamW (decoupled weight decay, bias correction with the table's step count) on the rows in ``keep``."""
    b1, b2 = betas
    k = keep[:, None]  # [N, 1]
    m = torch.where(k, b1 * exp_avg + (1 - b1) * grad, exp_avg)  # [N, D]
    v = torch.where(k, b2 * exp_avg_sq + (1 - b2) * grad * grad, exp_avg_sq)  # [N, D]
    update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    new_p = torch.where(k, p * (1 - lr * weight_decay) - lr * update, p)
    return new_p, m, v


def _step_masked_gradient_only(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay):
    b1, b2, eps = 0.9, 0.95, 1e-8
    g = grad * keep[:, None]
    m, v = b1 * exp_avg + (1 - b1) * g, b2 * exp_avg_sq + (1 - b2) * g * g
    update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    return p * (1 - lr * weight_decay) - lr * update, m, v


def _step_decay_everywhere(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay):
    new_p, m, v = sparse_adamw_step(p, grad, exp_avg, exp_avg_sq, keep, step, lr, 0.0)
    return new_p * (1 - lr * weight_decay), m, v


def _step_no_bias_correction(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay):
    return sparse_adamw_step(p, grad, exp_avg, exp_avg_sq, keep, 10_000, lr, weight_decay)


register(
    "nb09_sparse_adamw_step", sparse_adamw_step, _step_inputs,
    notebook="09", fn_name="my_sparse_adamw_step",
    goal="Take an AdamW step on the selected rows only, leaving every other row and its moments untouched.",
    mistakes=[
        Mistake("gradient_masking_only", _step_masked_gradient_only,
                "you zeroed the frozen rows' gradients and ran plain AdamW: their moments still decay, their "
                "old momentum and the weight decay still move them. Update m, v and p only where keep is True."),
        Mistake("decay_on_every_row", _step_decay_everywhere,
                "your Adam update is masked but the decoupled weight decay p * (1 - lr * wd) shrinks every row; "
                "a frozen row must not change at all, so apply the decay to the kept rows only."),
        Mistake("no_bias_correction", _step_no_bias_correction,
                "you left out Adam's bias correction: divide m by (1 - beta1^step) and v by (1 - beta2^step), "
                "with step this step's count, before forming the update."),
    ],
    rtol=1e-9, atol=1e-12,
    spec="p, grad, exp_avg, exp_avg_sq [N, D] float64, keep [N] bool, step int (this step's count), lr, weight_decay "
         "-> (p, exp_avg, exp_avg_sq) after one AdamW step (betas 0.9, 0.95, eps 1e-8) on the kept rows only.",
    outputs=("p", "exp_avg", "exp_avg_sq"),
    fingerprints=(r"1\s*-\s*lr\s*\*\s*weight_decay",),
)
