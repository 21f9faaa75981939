"""One stage of interlocking backprop: its forward, its own loss and the gradients it passes on.

A stage keeps, per micro-batch, its detached input and its output's autograd graph until every gradient that
passes through it has been applied. Work per micro-batch:

- :meth:`InterlockingStage.forward`: run the blocks, the head (or the true loss on the last stage), train the
  head on its own loss, and apply the stage's own loss gradient (``W`` if it updates this stage, ``I`` if it
  goes on to the previous stage: the *early* message);
- :meth:`InterlockingStage.backward`: apply the gradients received from the next stage (targets further
  ahead), in ascending target order, accumulating the weight gradient of the one target that updates this
  stage and returning the input gradients that go on (the *late* message, stacked).

Every gradient is scaled by the micro-batch's share of the batch, so that the accumulated ``.grad`` is the
gradient of the batch-mean loss. The loss of the model (``pipeline_loss``) must have no parameters of its own.
This module imports no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_parallel.pipeline.interlocking import InterlockingPlan

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class SimulatedCost:
    """Seconds slept per unit of work, on top of the real computation (for schedule benchmarks).

    Args:
        forward: per stage forward of one micro-batch.
        backward_input: per input-gradient computation (one target, one micro-batch).
        backward_weight: per weight-gradient computation (one target, one micro-batch).
    """

    forward: float = 0.0
    backward_input: float = 0.0
    backward_weight: float = 0.0


@dataclass
class _Saved:
    x_in: torch.Tensor
    out: torch.Tensor


class InterlockingStage:
    """The work of one stage of interlocking backprop on the micro-batches of a step.

    Args:
        index: the stage's index ``j`` (0-based).
        plan: which loss updates which stage.
        blocks: the stage's blocks (one module).
        head: the stage's auxiliary head, or ``None`` on the last stage (and on stages whose loss is unused).
        loss_fn: ``(prediction, micro_batch) -> mean loss`` (the model's ``pipeline_loss``).
        cost: optional simulated compute, slept per unit of work.
    """

    def __init__(
        self,
        index: int,
        plan: InterlockingPlan,
        blocks: nn.Module,
        head: nn.Module | None,
        loss_fn: LossFn,
        *,
        cost: SimulatedCost | None = None,
    ) -> None:
        self.index = index
        self.plan = plan
        self.blocks = blocks
        self.head = head
        self.loss_fn = loss_fn
        self.cost = cost
        self.is_last = index == plan.stages - 1
        if not self.is_last and head is None and index in plan.passes(index):
            raise ValueError(
                f"Stage {index} has no auxiliary head but its loss updates stage {plan.reach(index)} "
                f"(k={plan.k}, stages={plan.stages}); give it a head."
            )
        self.params = [p for p in blocks.parameters() if p.requires_grad]
        self.head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        self._needs_input = any(plan.needs_input(index, t) for t in plan.passes(index))
        self._saved: dict[int, _Saved] = {}
        self.loss_sum = torch.zeros(())

    # ----------------------------------------------------------------------------------- work
    def forward(
        self, micro_batch_index: int, x: torch.Tensor, micro_batch: Any, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the stage on ``x``, train its head, apply its own loss gradient.

        Args:
            micro_batch_index: the micro-batch's index in the step.
            x: the stage's input (the previous stage's output, or the first block's input).
            micro_batch: the micro-batch (for the loss).
            weight: the micro-batch's share of the batch (scales every gradient).

        Returns:
            The stage's output (detached) and the early message (own loss's input gradient) or ``None``.
        """
        x_in = x.detach().requires_grad_(self._needs_input) if x.is_floating_point() else x
        out = self.blocks(x_in)
        self._sleep(self.cost.forward if self.cost else 0.0)
        own = self.index in self.plan.passes(self.index)
        early: torch.Tensor | None = None
        if self.is_last or self.head is not None:
            out_d = out.detach().requires_grad_(own)
            prediction = out_d if self.is_last else self.head(out_d)  # type: ignore[misc]
            loss = self.loss_fn(prediction, micro_batch)
            self.loss_sum = self.loss_sum + weight * loss.detach().float()
            inputs = [*self.head_params, out_d] if own else list(self.head_params)
            if inputs:
                grads = torch.autograd.grad(loss * weight, inputs, allow_unused=True)
                _accumulate(self.head_params, grads[: len(self.head_params)])
                if own:
                    early = self._apply(self.index, grads[-1], out, x_in)
        if self.plan.has_backward(self.index):
            self._saved[micro_batch_index] = _Saved(x_in, out)
        return out.detach(), early

    def backward(self, micro_batch_index: int, received: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Apply the gradients of :meth:`InterlockingPlan.received` targets (ascending) to this stage.

        Args:
            micro_batch_index: the micro-batch's index in the step.
            received: one gradient (of this stage's output) per received target.

        Returns:
            The late message: the input gradients of :meth:`InterlockingPlan.sent_late` targets, stacked, or
            ``None`` if there are none.
        """
        saved = self._saved.pop(micro_batch_index)
        targets = self.plan.received(self.index)
        if len(received) != len(targets):
            raise RuntimeError(
                f"Stage {self.index} expected {len(targets)} gradients (targets {targets}), got {len(received)}."
            )
        late = []
        for target, grad in zip(targets, received):
            input_grad = self._apply(target, grad, saved.out, saved.x_in)
            if input_grad is not None:
                late.append(input_grad)
        return torch.stack(late) if late else None

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward without autograd: the stage's output and its prediction (head output, or the output)."""
        with torch.no_grad():
            out = self.blocks(x)
            prediction = out if self.head is None else self.head(out)
        return out, prediction

    def take_loss(self) -> torch.Tensor:
        """The batch-mean loss of this stage's head accumulated since the last call, and reset it."""
        loss, self.loss_sum = self.loss_sum, torch.zeros(())
        return loss

    # ----------------------------------------------------------------------------------- helpers
    def _apply(
        self, target: int, grad: torch.Tensor, out: torch.Tensor, x_in: torch.Tensor
    ) -> torch.Tensor | None:
        """Back-propagate ``target``'s gradient of the output through the stage (weights and/or input)."""
        weight = self.plan.needs_weight(self.index, target)
        to_input = self.plan.needs_input(self.index, target)
        inputs = [*(self.params if weight else []), *([x_in] if to_input else [])]
        if not inputs:
            return None
        grads = torch.autograd.grad(out, inputs, grad_outputs=grad, retain_graph=True, allow_unused=True)
        if weight:
            _accumulate(self.params, grads[: len(self.params)])
        if self.cost is not None:
            self._sleep(
                (self.cost.backward_weight if weight else 0.0)
                + (self.cost.backward_input if to_input else 0.0)
            )
        return grads[-1] if to_input else None

    @staticmethod
    def _sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.add_(grad)
