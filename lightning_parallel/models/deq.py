"""A deep-equilibrium classifier: a linear stem, one DEQ layer (a weight-tied tanh cell), a linear head."""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from lightning_parallel.implicit import DEQ
from lightning_parallel.implicit.deq import BackwardName
from lightning_parallel.implicit.solvers import SolverName
from lightning_parallel.models.base import OptimizerName, PipelineClassifier, SchedulerName


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)``, with ``W`` started at spectral norm ``contraction`` (< 1: a contraction).

    Args:
        width: size of ``z`` and ``x``.
        contraction: the starting spectral norm of ``W``. Default 0.5.
    """

    def __init__(self, width: int, contraction: float = 0.5) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        with torch.no_grad():
            self.lin.weight.mul_(contraction / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    @override
    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


class DEQClassifier(PipelineClassifier):
    """Blocks: ``Flatten + Linear(in_features, width)``, ``DEQ(TanhCell)``, ``Linear(width, num_classes)``.

    Args:
        in_features: size of a flattened input (64 for 8x8 digits).
        width: size of the equilibrium state. Default 64.
        num_classes: number of classes. Default 10.
        solver: ``"anderson"``, ``"broyden"`` or ``"fixed_point"``.
        max_iter: most forward solver iterations. Default 30.
        tol: forward solver tolerance (relative residual). Default 1e-4.
        backward: ``"phantom"``, ``"implicit"`` or ``"unrolled"``.
        phantom_steps: steps of the phantom gradient. Default 5.
        damping: damping of the phantom steps. Default 0.5.
        backward_max_iter: most adjoint-solve iterations (implicit backward). Default 30.
        backward_tol: adjoint-solve tolerance. Default 1e-6.
        lr: learning rate. Default 3e-3.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        weight_decay: optimizer weight decay. Default 0.
        momentum: SGD momentum. Default 0.9.
        scheduler: ``"none"`` or ``"cosine"``.
    """

    def __init__(
        self,
        in_features: int = 64,
        width: int = 64,
        num_classes: int = 10,
        *,
        solver: SolverName = "anderson",
        max_iter: int = 30,
        tol: float = 1e-4,
        backward: BackwardName = "phantom",
        phantom_steps: int = 5,
        damping: float = 0.5,
        backward_max_iter: int = 30,
        backward_tol: float = 1e-6,
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
        deq = DEQ(
            TanhCell(width),
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            backward=backward,
            phantom_steps=phantom_steps,
            damping=damping,
            backward_max_iter=backward_max_iter,
            backward_tol=backward_tol,
        )
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Flatten(), nn.Linear(in_features, width)), deq, nn.Linear(width, num_classes)
        )
