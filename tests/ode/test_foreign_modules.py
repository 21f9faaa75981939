"""DEQ and ODEBlock around a module this project did not write: torch's nn.TransformerEncoderLayer."""

from __future__ import annotations

import torch
from torch import nn

from lightning_parallel.implicit import DEQ
from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from lightning_parallel.ode import ODEBlock


def _encoder() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return layer.double()


class EncoderField(nn.Module):
    """dy/dt = encoder(y) - y (a contraction-ish field over a (B, T, C) sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _encoder()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.encoder(y) - y


class EncoderCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _encoder()

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.encoder(z + x)


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_ode_block_discrete_equals_backprop_on_a_transformer_layer() -> None:
    field, x = EncoderField(), _x()
    grads = []
    for adjoint in ("discrete", "backprop"):
        block = ODEBlock(field, method="rk4", steps=6, adjoint=adjoint, checkpoints=2)  # type: ignore[arg-type]
        y = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(block(y).pow(2).sum(), [y, *field.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_deq_implicit_matches_long_phantom_on_a_transformer_layer() -> None:
    cell, x = EncoderCell(), _x()
    implicit = DEQ(
        cell, max_iter=100, tol=1e-12, backward="implicit", backward_max_iter=100, backward_tol=1e-12
    )
    phantom = DEQ(cell, max_iter=100, tol=1e-12, backward="phantom", phantom_steps=60, damping=1.0)
    g_imp = torch.autograd.grad(implicit(x).sum(), list(cell.parameters()))
    g_ph = torch.autograd.grad(phantom(x).sum(), list(cell.parameters()))
    for a, b in zip(g_imp, g_ph):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert implicit.forward_stats is not None and implicit.forward_stats.converged


def test_kfac_records_the_transformer_layers_inside_an_ode_block() -> None:
    field, x = EncoderField(), _x()
    block = ODEBlock(field, method="euler", steps=3, checkpoints=1)
    pre = KFACPreconditioner(block, KFACOptions(kl_clip=None))
    block(x.clone().requires_grad_()).pow(2).sum().backward()
    pre.step()
    recorded = {layer.name: layer.a_factor is not None for layer in pre.layers}
    assert recorded["func.encoder.linear1"] and recorded["func.encoder.linear2"], recorded
    linear1 = next(layer for layer in pre.layers if layer.name == "func.encoder.linear1")
    assert linear1.rows_per_step == 3 * 2 * 5  # 3 steps x (B=2, T=5) rows
