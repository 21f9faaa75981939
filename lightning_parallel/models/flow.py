"""A continuous normalising flow (FFJORD-style, exact trace) on 2-D points, trained by maximum likelihood.

The state is ``[z, l]`` (``(B, 3)``): ``dz/dt = f(t, z)``, ``dl/dt = tr(df/dz)``, from ``z(0) = x``,
``l(0) = 0``; then ``log p(x) = log N(z(1); 0, I) + l(1)``. The field is one hidden tanh layer, whose
Jacobian trace is written out (``sum_h (1 - a_h^2) sum_i W2[i, h] W1[h, i]``), so it needs no
autograd inside the field and the discrete adjoint sees plain tensor code.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_parallel.ode import ODEBlock
from lightning_parallel.ode.block import MethodName


class CNFField(nn.Module):
    """``f(t, z) = W2 tanh(W1 [z, t] + b1) + b2`` and its exact divergence, on the state ``[z, l]``.

    Args:
        hidden: hidden width. Default 64.
    """

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, hidden)
        self.l2 = nn.Linear(hidden, 2)

    @override
    def forward(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        z = state[:, :2]
        a = torch.tanh(self.l1(torch.cat([z, t.expand(z.shape[0], 1)], dim=1)))  # (B, H)
        dz = self.l2(a)
        coupling = (self.l1.weight[:, :2] * self.l2.weight.t()).sum(dim=1)  # (H,): sum_i W1[h, i] W2[i, h]
        trace = (1.0 - a * a) @ coupling  # (B,)
        return torch.cat([dz, trace[:, None]], dim=1)


class _Augment(nn.Module):
    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)


class CNFDensityModel(pl.LightningModule):
    """Blocks: ``[x, 0]``, ``ODEBlock(CNFField)``; loss: the negative log-likelihood per point (nats).

    Args:
        hidden: hidden width of the field. Default 64.
        method: the integrator. Default ``"rk4"``.
        steps: fixed steps. Default 8.
        adjoint: ``"discrete"`` or ``"backprop"``.
        checkpoints: checkpoints of the discrete adjoint (``None``: ``ceil(sqrt(steps))``).
        lr: Adam learning rate. Default 3e-3.
    """

    def __init__(
        self,
        hidden: int = 64,
        *,
        method: MethodName = "rk4",
        steps: int = 8,
        adjoint: Literal["discrete", "backprop"] = "discrete",
        checkpoints: int | None = None,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden={hidden} must be positive, e.g. 64.")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive, e.g. 3e-3.")
        self.save_hyperparameters()
        self.lr = lr
        block = ODEBlock(
            CNFField(hidden), (0.0, 1.0), method=method, steps=steps, adjoint=adjoint, checkpoints=checkpoints
        )
        self.blocks = nn.Sequential(_Augment(), block)

    # ----------------------------------------------------------------- pipeline protocol
    def pipeline_blocks(self) -> nn.Sequential:
        """The ordered blocks."""
        return self.blocks

    def pipeline_input(self, batch: Any) -> torch.Tensor:
        """The points ``(B, 2)``."""
        return batch[0]

    def pipeline_loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Mean negative log-likelihood of the points."""
        z, trace = output[:, :2], output[:, 2]
        log_base = -0.5 * z.pow(2).sum(dim=1) - math.log(2 * math.pi)
        return -(log_base + trace).mean()

    def pipeline_metrics(self, output: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        """The loss (negative log-likelihood)."""
        return {"loss": self.pipeline_loss(output, batch)}

    # ----------------------------------------------------------------- Lightning hooks
    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per point."""
        out = self(x)
        return -0.5 * out[:, :2].pow(2).sum(dim=1) - math.log(2 * math.pi) + out[:, 2]

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.pipeline_loss(self(self.pipeline_input(batch)), batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.pipeline_loss(self(self.pipeline_input(batch)), batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
