"""Cross-check on small models: every memory layer trained with backend="triton" follows backend="torch".

A tiny UltraMemV2 stack (2 layers with residuals + a linear head, built here, independent of any
model module) is trained for a few Adam steps from identical weights with each backend; losses and
gradients must agree step by step.  PKM, PEER and Memory+ get one forward/backward each.
"""
import copy

import pytest
import torch
import torch.nn as nn

import kernels  # noqa: F401  (registers the "triton" backend)
from umv2_ref import PEER, PKM, MemoryPlus, PKMConfig, UltraMemV2, UltraMemV2Config, refresh_rank1


class TinyStack(nn.Module):
    """x -> x + UltraMemV2_1(x) -> ... -> linear head (logits over `classes`)."""

    def __init__(self, cfg: UltraMemV2Config, layers: int = 2, classes: int = 5):
        super().__init__()
        self.layers = nn.ModuleList(UltraMemV2(cfg) for _ in range(layers))
        self.head = nn.Linear(cfg.d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x).output  # [B, S, d]
        return self.head(x)  # [B, S, classes]


def set_backend(model: nn.Module, name: str) -> None:
    for module in model.modules():
        if hasattr(module, "cfg"):
            module.cfg.backend = name


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        refresh_rank1(model)
    return torch.stack(losses), grads


@pytest.mark.parametrize("algo", ["atomic", "sorted"])
def test_ultramemv2_stack_trains_identically(algo):
    cfg = UltraMemV2Config(d_model=16, n_keys=8, d_key=8, rank=2, cores=2, topm=6, prefilter_k=4,
                           d_pre=10, d_value=12, backend="torch")
    torch_model = TinyStack(cfg)
    triton_model = copy.deepcopy(torch_model)
    set_backend(triton_model, "triton")
    x, y = torch.randn(2, 9, 16), torch.randint(0, 5, (2, 9))  # 18 tokens
    want_loss, want_grads = train(torch_model, x, y, steps=3)
    with kernels.table_grad(algo):
        got_loss, got_grads = train(triton_model, x, y, steps=3)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert want_loss[-1] < want_loss[0]
    for got, want in zip(got_grads, want_grads):
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layer_cls", [PKM, PEER, MemoryPlus])
def test_product_key_layers_match(layer_cls):
    cfg = PKMConfig(d_model=12, n_keys=6, d_key=8, heads=2, topk=3, query_norm="layer", backend="torch")
    ref = layer_cls(cfg)
    fused = copy.deepcopy(ref)
    set_backend(fused, "triton")
    x = torch.randn(3, 5, 12)
    want, got = ref(x).output, fused(x).output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    names = [name for name, _ in ref.named_parameters()]
    want_grads = torch.autograd.grad(want, list(ref.parameters()), g)
    got_grads = torch.autograd.grad(got, list(fused.parameters()), g)
    for name, a, b in zip(names, got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
