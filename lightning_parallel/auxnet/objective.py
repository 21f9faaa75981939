"""The penalty and augmented-Lagrangian (AL) objectives of AuxNet training, written once.

Notation (one batch of ``B`` examples, ``S`` stages ``f_0 .. f_{S-1}`` with parameters ``theta_s``):

- ``x = pipeline_input(batch)``; the *auxiliary variable* of stage ``s >= 1`` is its input
  ``z_s = a_s(x; phi_s)``, the output of a small auxiliary network ``a_s``; ``z_0 = x``;
- ``u_s = f_s(z_s; theta_s)`` is stage ``s``'s output on its auxiliary input;
- the *residual* of boundary ``b`` (``1 <= b <= S - 1``, between stages ``b - 1`` and ``b``) is
  ``r_b = z_b - u_{b-1}``, of shape ``(B, *F_b)``; ``n_b = prod(F_b)`` elements per example.

End-to-end training is ``min L(f_{S-1}(...f_0(x)), y)``, i.e. ``min L(u_{S-1}, y)`` subject to ``r_b = 0``
for every boundary. The relaxations (``mean`` is over the ``B * n_b`` elements, so ``rho`` does not depend
on the feature size)::

    penalty:  J(theta, phi) = L(u_{S-1}, y) + sum_b (rho / 2) mean(r_b ** 2)
    AL:       J(theta, phi) = L(u_{S-1}, y) + sum_b [ mean(lambda_b * r_b) + (rho / 2) mean(r_b ** 2) ]

``lambda_b`` is one multiplier per element of a stage input (shape ``F_b``), shared by all examples: the
multiplier of the batch-mean constraint ``mean_over_examples(r_b) = 0``. Per-example multipliers would have to
be stored for every training example, which is what the auxiliary networks avoid (and they would not survive
data augmentation). After each step's gradients the multipliers take one ascent step of the method of
multipliers, ``lambda_b <- lambda_b + rho * mean_over_examples(r_b)``, with the residuals of that step (before
the optimizer moves ``theta`` and ``phi``); the penalty objective is the AL one with ``lambda = 0`` frozen.

*Local losses.* The objective splits into one loss per stage, each computable from that stage's own
auxiliary input without waiting for the stages before it::

    loss_s = C_s(z_s, sg[u_{s-1}])                      (s >= 1: the constraint at the stage's input)
           + C_{s+1}(sg[z_{s+1}], u_s)   for s < S - 1  (the constraint at its output)
           + L(u_{S-1}, y)               for s = S - 1

where ``C_b`` is boundary ``b``'s term of ``J`` and ``sg`` stops the gradient (the value is received from the
neighbouring stage). Every constraint term appears twice, once on each side, and each side differentiates only
its own variable, so ``d loss_s / d theta_s = dJ / d theta_s`` and ``d loss_s / d phi_s = dJ / d phi_s``: the
sum of the local gradients is the gradient of ``J``. The auxiliary variable ``z_s`` is pulled towards the
predecessor's output (``C_s``) and towards an input that lowers stage ``s``'s own loss (through ``f_s``); the
step on ``phi_s`` is how the auxiliary network "reproduces the updated auxiliary variable".

``rho`` may grow over optimizer steps (:class:`RhoSchedule`): ``rho_t = min(rho * growth ** t, maximum)``,
tightening the constraints as training proceeds, the usual continuation of penalty methods.

This module imports no Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LossName = Literal["penalty", "augmented_lagrangian"]
LOSSES: tuple[str, ...] = ("penalty", "augmented_lagrangian")


def check_loss(loss: str) -> None:
    """Raise a ``ValueError`` unless ``loss`` names one of :data:`LOSSES`."""
    if loss not in LOSSES:
        raise ValueError(
            f"loss={loss!r} is not one of {LOSSES}: 'penalty' adds (rho / 2) * mean(residual ** 2) per stage "
            "boundary, 'augmented_lagrangian' adds a multiplier term as well."
        )


@dataclass(frozen=True)
class RhoSchedule:
    """The penalty weight over optimizer steps: ``min(rho * growth ** step, maximum)``.

    Args:
        rho: the weight at step 0 (> 0).
        growth: factor per optimizer step (>= 1; 1 keeps ``rho`` constant).
        maximum: upper bound of the weight (``None``: no bound).
    """

    rho: float = 1.0
    growth: float = 1.0
    maximum: float | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.rho, bool)
            or not isinstance(self.rho, (int, float))
            or not 0 < self.rho < math.inf
        ):
            raise ValueError(f"rho={self.rho!r} must be a positive finite penalty weight, e.g. 1.0.")
        if (
            isinstance(self.growth, bool)
            or not isinstance(self.growth, (int, float))
            or not 1 <= self.growth < math.inf
        ):
            raise ValueError(
                f"rho_growth={self.growth!r} must be a finite factor >= 1 per optimizer step (1 keeps rho "
                "constant, e.g. 1.001 doubles it in about 700 steps)."
            )
        if self.maximum is not None and not self.maximum >= self.rho:
            raise ValueError(f"rho_max={self.maximum!r} must be >= rho={self.rho} (or None for no bound).")

    def value(self, step: int) -> float:
        """The penalty weight at optimizer step ``step`` (counted from 0)."""
        if self.growth == 1.0:
            return float(self.rho)
        # log form: growth ** step overflows for long runs before the bound applies
        log_value = math.log(self.rho) + step * math.log(self.growth)
        bound = math.inf if self.maximum is None else self.maximum
        return float(min(math.exp(min(log_value, 700.0)), bound))


def constraint_term(
    z: torch.Tensor, u: torch.Tensor, rho: float, multiplier: torch.Tensor | None = None
) -> torch.Tensor:
    """One boundary's term of the objective: ``mean(lambda * r + (rho / 2) * r ** 2)`` with ``r = z - u``.

    Args:
        z: the auxiliary variable (the next stage's input), ``(B, *F)``.
        u: the previous stage's output, same shape.
        rho: the penalty weight.
        multiplier: ``lambda`` of shape ``F`` (broadcast over the batch), or ``None`` for the penalty objective.
    """
    residual = z - u
    term = 0.5 * rho * residual.square().mean()
    if multiplier is not None:
        term = term + (multiplier * residual).mean()
    return term


def residual_mean(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The residual ``z - u`` averaged over the examples (shape ``F``), detached: what a multiplier step needs."""
    return (z.detach() - u.detach()).mean(dim=0)
