"""The preconditioned gradient equals a dense computation, and the factors are on the per-example scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner


def _dense(
    a: torch.Tensor, g: torch.Tensor, mat: torch.Tensor, damping: float, factored: bool
) -> torch.Tensor:
    """vec^-1 of ((A + dA I)^-1 kron (G + dG I)^-1) vec(mat), column-major vec."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])) if factored else 1.0
    root = math.sqrt(damping)
    a_inv = torch.linalg.inv(a + pi * root * torch.eye(a.shape[0], dtype=a.dtype))
    g_inv = torch.linalg.inv(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype))
    vec = mat.t().reshape(-1)  # column-major
    out = torch.kron(a_inv, g_inv) @ vec
    return out.reshape(mat.shape[1], mat.shape[0]).t()


def _per_example_output_grads(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """d loss_i / d output_i for each example's own loss (no 1/n): the per-example Fisher's g."""
    outs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: outs.append(o))
    rows = []
    for i in range(x.shape[0]):
        outs.clear()
        loss = F.mse_loss(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        (grad,) = torch.autograd.grad(loss, outs[0])
        rows.append(grad.reshape(-1, grad.shape[-1]) if not isinstance(layer, nn.Conv2d) else grad)
    handle.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("factored", [True, False])
def test_linear_matches_dense_reference(method: str, factored: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    layer = model[0]
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    damping = 0.01
    kfac = KFACPreconditioner(
        model, KFACOptions(damping=damping, kl_clip=None, method=method, factored_damping=factored)
    )
    F.mse_loss(model(x), y, reduction="sum").div(x.shape[0]).backward()  # a per-example-mean loss
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).clone()
    kfac.step()

    # independent factors: A from the inputs, G from per-example losses (no 1/n, no rescaling)
    a_rows = torch.cat([x, torch.ones(16, 1, dtype=x.dtype)], dim=1)
    a = a_rows.t() @ a_rows / 16
    g_rows = _per_example_output_grads(model, layer, x, y)
    g = g_rows.t() @ g_rows / 16
    state = kfac.layers[0]
    torch.testing.assert_close(state.a_factor, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.g_factor, g, rtol=1e-10, atol=1e-12)

    expected = _dense(a, g, grad, damping, factored)
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_conv2d_matches_dense_reference() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    damping = 0.003
    kfac = KFACPreconditioner(model, KFACOptions(damping=damping, kl_clip=None))
    F.mse_loss(model(x), y, reduction="sum").div(6).backward()
    grad = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1).clone()
    kfac.step()

    # A from explicitly cut patches (not unfold): positions (i, j) of the 3x3 output grid
    padded = F.pad(x, (1, 1, 1, 1))
    patches = [
        torch.cat(
            [padded[b, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1), torch.ones(1, dtype=x.dtype)]
        )
        for b in range(6)
        for i in range(3)
        for j in range(3)
    ]
    a_rows = torch.stack(patches)
    a = a_rows.t() @ a_rows / a_rows.shape[0]
    # G: per-example output gradients summed over positions, divided by the examples
    g_maps = _per_example_output_grads(model, conv, x, y)  # (6, 3, 3, 3)
    g_rows = g_maps.permute(0, 2, 3, 1).reshape(-1, 3)
    g = g_rows.t() @ g_rows / 6
    state = kfac.layers[0]
    torch.testing.assert_close(state.a_factor, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.g_factor, g, rtol=1e-10, atol=1e-12)
    expected = _dense(a, g, grad, damping, True)
    got = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_float32_matches_float64_dense_reference() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x, y = torch.randn(32, 6), torch.randn(32, 4)
    kfac = KFACPreconditioner(model, KFACOptions(damping=0.01, kl_clip=None))
    F.mse_loss(model(x), y).backward()
    layer = model[2]
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).double()
    kfac.step()
    state = kfac.layers[1]
    expected = _dense(state.a_factor.double(), state.g_factor.double(), grad, 0.01, True)
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).double()
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_running_average_and_intervals() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 2))
    kfac = KFACPreconditioner(
        model,
        KFACOptions(damping=0.1, kl_clip=None, factor_decay=0.5, factor_update_steps=2, inv_update_steps=4),
    )
    seen = []
    for _ in range(5):
        x = torch.randn(8, 3)
        model.zero_grad()
        model(x).pow(2).mean().backward()
        seen.append(torch.cat([x, torch.ones(8, 1)], 1))
        kfac.step()
    # factor updates at steps 0, 2, 4: A = 0.5 * (0.5 * A0 + 0.5 * A2) + 0.5 * A4
    a0, a2, a4 = (r.t() @ r / 8 for r in (seen[0], seen[2], seen[4]))
    torch.testing.assert_close(kfac.layers[0].a_factor, 0.25 * a0 + 0.25 * a2 + 0.5 * a4)
    # decomposition at step 4 is of that factor
    d = kfac.layers[0].decomposition
    torch.testing.assert_close(
        d["qa"] @ torch.diag(d["da"]) @ d["qa"].t(), kfac.layers[0].a_factor, atol=1e-5, rtol=1e-5
    )


def test_loss_scale_is_divided_out_of_g() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4)
    factors = []
    for scale in (1.0, 1024.0):
        kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None))
        model.zero_grad()
        (model(x).pow(2).mean() * scale).backward()
        kfac.step(grad_scale=scale)
        factors.append(kfac.layers[0].g_factor.clone())
        kfac.remove_hooks()
    torch.testing.assert_close(factors[0], factors[1])


def test_kl_clip_scales_the_update() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4)
    model(x).pow(2).mean().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    free = KFACPreconditioner(model, KFACOptions(kl_clip=None, damping=0.01))
    model(x).pow(2).mean().backward()  # records the factors; gradients doubled, restore below
    for p, r in zip(model.parameters(), raw):
        p.grad.copy_(r)
    free.step(optimizer)
    unclipped = [p.grad.clone() for p in model.parameters()]
    vg = sum((u * r).sum() for u, r in zip(unclipped, raw)).item() * 0.25
    free.remove_hooks()
    kl = vg / 100.0  # forces nu = 0.1
    clipped_kfac = KFACPreconditioner(model, KFACOptions(kl_clip=kl, damping=0.01))
    model(x).pow(2).mean().backward()
    for p, r in zip(model.parameters(), raw):
        p.grad.copy_(r)
    clipped_kfac.step(optimizer)
    for p, u in zip(model.parameters(), unclipped):
        torch.testing.assert_close(p.grad, 0.1 * u, rtol=1e-4, atol=1e-7)
