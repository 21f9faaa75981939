"""A neural-ODE classifier: a linear stem, one ODE block (a time-dependent tanh MLP field), a linear head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from typing_extensions import override

from lightning_parallel.models.base import OptimizerName, PipelineClassifier, SchedulerName
from lightning_parallel.ode import ODEBlock
from lightning_parallel.ode.block import MethodName


class MLPField(nn.Module):
    """``dy/dt = W2 tanh(W1 y + t u + b1) + b2``.

    Args:
        width: size of the state.
        hidden: hidden width. Default ``2 * width``.
    """

    def __init__(self, width: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = 2 * width if hidden is None else hidden
        self.l1 = nn.Linear(width, hidden)
        self.l2 = nn.Linear(hidden, width)
        self.time = nn.Parameter(torch.zeros(hidden))

    @override
    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y) + t * self.time))


class ODEClassifier(PipelineClassifier):
    """Blocks: ``Flatten + Linear(in_features, width) + tanh``, ``ODEBlock(MLPField)``, ``Linear(width, num_classes)``.

    Args:
        in_features: size of a flattened input (64 for 8x8 digits).
        width: size of the ODE state. Default 32.
        num_classes: number of classes. Default 10.
        t1: end of the span ``[0, t1]``. Default 1.0.
        method: the integrator (``"euler"``, ``"rk4"``, ``"dopri5"``, ``"implicit_euler"``, ``"crank_nicolson"``).
        steps: fixed steps (``None`` with ``rtol``/``atol``: adaptive ``dopri5``). Default 8.
        rtol: adaptive relative tolerance. Default ``None``.
        atol: adaptive absolute tolerance. Default ``None``.
        adjoint: ``"discrete"`` or ``"backprop"``.
        checkpoints: checkpoints of the discrete adjoint (``None``: ``ceil(sqrt(steps))``).
        linear_solver: ``"direct"`` or ``"gmres"`` (implicit methods). Default ``"gmres"``.
        lr: learning rate. Default 3e-3.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        weight_decay: optimizer weight decay. Default 0.
        momentum: SGD momentum. Default 0.9.
        scheduler: ``"none"`` or ``"cosine"``.
    """

    def __init__(
        self,
        in_features: int = 64,
        width: int = 32,
        num_classes: int = 10,
        *,
        t1: float = 1.0,
        method: MethodName = "rk4",
        steps: int | None = 8,
        rtol: float | None = None,
        atol: float | None = None,
        adjoint: Literal["discrete", "backprop"] = "discrete",
        checkpoints: int | None = None,
        linear_solver: Literal["direct", "gmres"] = "gmres",
        lr: float = 3e-3,
        optimizer: OptimizerName = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            momentum=momentum,
            scheduler=scheduler,
        )
        if in_features < 1 or width < 1:
            raise ValueError(
                f"in_features={in_features} and width={width} must be positive (64 for 8x8 digits)."
            )
        self.save_hyperparameters()
        if rtol is not None or atol is not None:
            steps = None
        block = ODEBlock(
            MLPField(width),
            (0.0, t1),
            method=method,
            steps=steps,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            checkpoints=checkpoints,
            linear_solver=linear_solver,
        )
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.Tanh()),
            block,
            nn.Linear(width, num_classes),
        )
