"""One stage of AuxNet training: its auxiliary input, its forward and its local loss's gradients.

Work per micro-batch, in the order the runtime calls it:

- :meth:`AuxNetStage.begin`: the auxiliary input ``z_s = a_s(x)`` (stage 0: ``x`` itself), keeping the
  auxiliary network's graph; its detached value is the *target* the previous stage's output must match;
- :meth:`AuxNetStage.forward`: ``u_s = f_s(z_s)``, keeping the graph (with ``oracle``, ``z_s`` is the
  previous stage's true output instead, and the stage waits for it);
- :meth:`AuxNetStage.backward`: the local loss ``C_s(z_s, u_{s-1}) + C_{s+1}(z_{s+1}, u_s)`` (the last stage:
  ``C_s + L(u_s, y)``, see :mod:`lightning_parallel.auxnet.objective`) from the neighbours' detached values,
  and one backward into the stage's parameters and its auxiliary network's.

Every gradient is scaled by the micro-batch's share of the batch, so that the accumulated ``.grad`` is the
gradient of the batch objective. The loss of the model (``pipeline_loss``) must have no parameters of its own.
This module imports no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_parallel.auxnet.objective import constraint_term, residual_mean
from lightning_parallel.interlocking.stage import SimulatedCost

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class _Saved:
    z: (
        torch.Tensor | None
    )  # the stage's input (with the auxiliary network's graph); None until forward (oracle)
    u: torch.Tensor | None = None  # the stage's output, with its graph


class AuxNetStage:
    """The work of one stage on the micro-batches of a step.

    Args:
        index: the stage's index ``s`` (0-based).
        stages: the number of stages ``S``.
        blocks: the stage's blocks (one module).
        aux_net: the auxiliary network producing this stage's input (``None`` for stage 0).
        loss_fn: ``(prediction, micro_batch) -> mean loss`` (the model's ``pipeline_loss``; last stage only).
        oracle: take the previous stage's true output as input instead of the auxiliary network's (tests).
        cost: simulated compute of the stage, slept per unit of work.
        aux_cost: simulated compute of the auxiliary network (``forward`` and ``backward_weight`` are used).
        input_gradient: differentiate the local loss through the stage into its auxiliary input (the
            auxiliary network's share of the objective's gradient); ``False`` runs the stage on the auxiliary
            input as a constant (no input gradient), so the auxiliary network learns only from the constraint
            at the stage's input. Default True.
    """

    def __init__(
        self,
        index: int,
        stages: int,
        blocks: nn.Module,
        aux_net: nn.Module | None,
        loss_fn: LossFn,
        *,
        oracle: bool = False,
        cost: SimulatedCost | None = None,
        aux_cost: SimulatedCost | None = None,
        input_gradient: bool = True,
    ) -> None:
        if index > 0 and aux_net is None and not oracle:
            raise ValueError(
                f"Stage {index} needs an auxiliary network (only stage 0 reads the input itself)."
            )
        self.index = index
        self.is_first, self.is_last = index == 0, index == stages - 1
        self.blocks = blocks
        self.aux_net = None if index == 0 or oracle else aux_net
        self.loss_fn = loss_fn
        self.oracle = oracle
        self.input_gradient = input_gradient
        self.cost, self.aux_cost = cost, aux_cost
        self.params = [p for p in blocks.parameters() if p.requires_grad]
        self.aux_params = [p for p in self.aux_net.parameters() if p.requires_grad] if self.aux_net else []
        self._saved: dict[int, _Saved] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.residual_sums: dict[
            int, torch.Tensor
        ] = {}  # boundary -> sum over micro-batches of w * mean_b(r)

    # ----------------------------------------------------------------------------------- work
    def begin(self, micro_batch_index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Compute the auxiliary input from the trunk's input ``x``; return it detached (the target message).

        Returns ``None`` for stage 0 (whose input is ``x``) and with ``oracle`` (the input arrives later).
        """
        z: torch.Tensor | None
        if self.is_first:
            z = x.detach()
        elif self.aux_net is None:
            z = None
        else:
            z = self.aux_net(x)
            sleep(self.aux_cost.forward if self.aux_cost else 0.0)
        self._saved[micro_batch_index] = _Saved(z)
        return None if self.is_first or z is None else z.detach()

    def forward(self, micro_batch_index: int, true_input: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks on the auxiliary input (``oracle``: on ``true_input``); return the output, detached."""
        saved = self._saved[micro_batch_index]
        if saved.z is None:
            if true_input is None:
                raise RuntimeError(f"Stage {self.index} runs with oracle=True and needs its true input.")
            saved.z = true_input.detach()
        saved.u = self.blocks(saved.z if self.input_gradient else saved.z.detach())
        sleep(self.cost.forward if self.cost else 0.0)
        return saved.u.detach()

    def input_value(self, micro_batch_index: int) -> torch.Tensor:
        """This micro-batch's input ``z_s``, detached (what the previous stage's output is compared with)."""
        z = self._saved[micro_batch_index].z
        if z is None:
            raise RuntimeError(f"Stage {self.index} has no input for micro-batch {micro_batch_index} yet.")
        return z.detach()

    def output_value(self, micro_batch_index: int) -> torch.Tensor:
        """This micro-batch's output ``u_s``, detached."""
        u = self._saved[micro_batch_index].u
        if u is None:
            raise RuntimeError(f"Stage {self.index} has not run micro-batch {micro_batch_index} forward yet.")
        return u.detach()

    def backward(
        self,
        micro_batch_index: int,
        micro_batch: Any,
        weight: float,
        rho: float,
        *,
        previous_output: torch.Tensor | None,
        next_input: torch.Tensor | None,
        multipliers: dict[int, torch.Tensor],
    ) -> None:
        """Accumulate the local loss's gradients into the stage's and its auxiliary network's ``.grad``.

        Args:
            micro_batch_index: the micro-batch's index in the step.
            micro_batch: the micro-batch (for the last stage's loss).
            weight: the micro-batch's share of the batch (scales every gradient).
            rho: the penalty weight of this step.
            previous_output: ``u_{s-1}`` (stages ``s >= 1``).
            next_input: ``z_{s+1}`` (stages ``s < S - 1``).
            multipliers: boundary -> ``lambda`` (empty for the penalty objective).
        """
        saved = self._saved.pop(micro_batch_index)
        z, u = saved.z, saved.u
        if z is None or u is None:
            raise RuntimeError(
                f"Stage {self.index} runs backward before forward (micro-batch {micro_batch_index})."
            )
        total = u.new_zeros(())
        if not self.is_first:
            if previous_output is None:
                raise RuntimeError(f"Stage {self.index} needs the previous stage's output.")
            term = constraint_term(z, previous_output, rho, multipliers.get(self.index))
            total = total + term
            self._add("penalty", weight * term.detach())
            self._add("residual", weight * (z.detach() - previous_output).square().mean())
            self._add_residual(self.index, weight * residual_mean(z, previous_output))
        if self.is_last:
            loss = self.loss_fn(u, micro_batch)
            total = total + loss
            self._add("loss", weight * loss.detach())
        else:
            if next_input is None:
                raise RuntimeError(f"Stage {self.index} needs the next stage's input.")
            total = total + constraint_term(next_input, u, rho, multipliers.get(self.index + 1))
            self._add_residual(self.index + 1, weight * residual_mean(next_input, u))
        params = [*self.params, *self.aux_params]
        if params and total.requires_grad:
            (total * weight).backward(inputs=params)  # accumulates into .grad
        if self.cost:
            through_input = self.aux_params and self.input_gradient
            sleep(self.cost.backward_weight + (self.cost.backward_input if through_input else 0.0))
        if self.aux_cost and self.aux_params:
            sleep(self.aux_cost.backward_weight)

    def true_input_backward(self, h: torch.Tensor, micro_batch: Any, weight: float) -> None:
        """Last stage: accumulate the gradient of the task loss on the true input ``h`` (scaled by ``weight``)."""
        loss = self.loss_fn(self.blocks(h.detach()), micro_batch)
        sleep(self.cost.forward if self.cost else 0.0)
        if self.params:
            (loss * weight).backward(inputs=self.params)
        sleep(self.cost.backward_weight if self.cost else 0.0)
        self._add("true_input_loss", weight * loss.detach())

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's output on ``x`` without autograd (the end-to-end forward)."""
        with torch.no_grad():
            return self.blocks(x)

    def take_stats(self) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        """The step's batch-mean statistics and residual means per boundary since the last call; reset them."""
        stats, residuals = self.stats, self.residual_sums
        self.stats, self.residual_sums = {}, {}
        self._saved.clear()
        return stats, residuals

    # ----------------------------------------------------------------------------------- helpers
    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float().cpu()
        self.stats[name] = self.stats[name] + value if name in self.stats else value

    def _add_residual(self, boundary: int, value: torch.Tensor) -> None:
        sums = self.residual_sums
        sums[boundary] = sums[boundary] + value if boundary in sums else value


def sleep(seconds: float) -> None:
    """Sleep ``seconds`` of simulated compute (nothing for 0)."""
    if seconds > 0:
        time.sleep(seconds)
