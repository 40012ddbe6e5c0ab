"""Exercises of notebook 09 (continual learning with sparse memory finetuning).

* ``nb09_kl_scores``: the KL slot-selection rule (arXiv 2604.05248, our reading): each row's term
  ``p log(p / q)`` of ``KL(batch reads || smoothed background reads)``
  (:func:`umv2_ref.continual.kl_scores`).
* ``nb09_sparse_adamw_step``: one AdamW step that updates only the selected rows of a memory
  table and leaves every other row -- parameters *and* optimiser moments -- bitwise unchanged,
  what :func:`umv2_ref.continual.step_keeping_rows` achieves around ``torch.optim.AdamW``.
"""
from __future__ import annotations

import torch

from ..continual import kl_scores
from .harness import register

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


def _kl_unsmoothed(batch, background, smoothing):
    """Smooths only the numerator of q (q does not sum to 1)."""
    p = batch / batch.sum()
    q = (background + smoothing) / background.sum()
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))


def _kl_reversed(batch, background, smoothing):
    """KL(q || p) terms: the background's surprise at the batch, restricted to read rows."""
    p = batch / batch.sum()
    q = (background + smoothing) / (background + smoothing).sum()
    return torch.where(p > 0, q * torch.log(q / p), torch.zeros_like(p))


def _kl_log_ratio_only(batch, background, smoothing):
    """Ranks by log(p / q) without the weight p (a row read once can outrank a row read often)."""
    p = batch / batch.sum()
    q = (background + smoothing) / (background + smoothing).sum()
    return torch.where(p > 0, torch.log(p / q), torch.zeros_like(p))


register(
    "nb09_kl_scores",
    kl_scores,
    _kl_inputs,
    wrong=[_kl_unsmoothed, _kl_reversed, _kl_log_ratio_only],
    rtol=1e-9,
    atol=1e-12,
    description="batch [N], background [N] float64 read counts, smoothing > 0 -> [N] float64: "
    "p_i log(p_i / q_i) with p = batch / sum, q = (background + smoothing) / sum(background + smoothing); 0 where p_i = 0.",
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


def _step_reference(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """AdamW (decoupled weight decay, bias correction with the table's step count) on the rows in ``keep``."""
    b1, b2 = betas
    k = keep[:, None]  # [N, 1]
    m = torch.where(k, b1 * exp_avg + (1 - b1) * grad, exp_avg)  # [N, D]
    v = torch.where(k, b2 * exp_avg_sq + (1 - b2) * grad * grad, exp_avg_sq)  # [N, D]
    update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    new_p = torch.where(k, p * (1 - lr * weight_decay) - lr * update, p)
    return new_p, m, v


def _step_masked_gradient_only(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """Zeroes the gradient of the frozen rows and runs plain AdamW: decay and momentum still move them."""
    b1, b2 = betas
    g = grad * keep[:, None]
    m, v = b1 * exp_avg + (1 - b1) * g, b2 * exp_avg_sq + (1 - b2) * g * g
    update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    return p * (1 - lr * weight_decay) - lr * update, m, v


def _step_decay_everywhere(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """Masks the Adam update but applies the weight decay to every row."""
    new_p, m, v = _step_reference(p, grad, exp_avg, exp_avg_sq, keep, step, lr, 0.0, betas, eps)
    return new_p * (1 - lr * weight_decay), m, v


def _step_no_bias_correction(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """Forgets Adam's bias correction of the two moments."""
    return _step_reference(p, grad, exp_avg, exp_avg_sq, keep, 10_000, lr, weight_decay, betas, eps)


register(
    "nb09_sparse_adamw_step",
    _step_reference,
    _step_inputs,
    wrong=[_step_masked_gradient_only, _step_decay_everywhere, _step_no_bias_correction],
    rtol=1e-9,
    atol=1e-12,
    description="p, grad, exp_avg, exp_avg_sq [N, D] float64, keep [N] bool, step (int, this step's count), lr, "
    "weight_decay -> (p, exp_avg, exp_avg_sq) after one AdamW step (betas 0.9, 0.95, eps 1e-8) on the kept rows only.",
)
