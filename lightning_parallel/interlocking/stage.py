"""One stage of interlocking backprop: its forward, its own loss and the gradients it passes on.

A stage keeps, per micro-batch, its detached input, its output's autograd graph and the gradients of the
output it has received, until its weight gradient is applied. Work per micro-batch, in the order the runtime
calls it (input gradients before weight gradients, so that messages leave as early as possible):

- :meth:`InterlockingStage.forward`: run the blocks;
- :meth:`InterlockingStage.own_input`: the stage's own loss (its head's, or the true loss on the last stage),
  which trains the head, and the loss's input gradient if it goes on (the *early* message);
- :meth:`InterlockingStage.own_weight`: the own loss's weight gradient, if it updates this stage (k = 1,
  and the last stage);
- :meth:`InterlockingStage.backward_input`: the gradients received from the next stage (targets further
  ahead, ascending); their input gradients that go on (the *late* message, stacked);
- :meth:`InterlockingStage.backward_weight`: the weight gradient of the received target that updates this
  stage.

Every gradient is scaled by the micro-batch's share of the batch, so that the accumulated ``.grad`` is the
gradient of the batch-mean loss. The loss of the model (``pipeline_loss``) must have no parameters of its own.
This module imports no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_parallel.interlocking.plan import InterlockingPlan

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
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # target -> gradient of ``out``


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
    def forward(self, micro_batch_index: int, x: torch.Tensor) -> torch.Tensor:
        """Run the stage's blocks on ``x`` (keeping the graph); return the output, detached."""
        x_in = x.detach().requires_grad_(self._needs_input) if x.is_floating_point() else x
        out = self.blocks(x_in)
        self._sleep(self.cost.forward if self.cost else 0.0)
        self._saved[micro_batch_index] = _Saved(x_in, out)
        return out.detach()

    def own_input(self, micro_batch_index: int, micro_batch: Any, weight: float) -> torch.Tensor | None:
        """Compute this stage's own loss, train its head, and return the early message (or ``None``).

        Args:
            micro_batch_index: the micro-batch's index in the step.
            micro_batch: the micro-batch (for the loss).
            weight: the micro-batch's share of the batch (scales every gradient).

        Returns:
            The input gradient of this stage's own loss, if it goes on to the previous stage.
        """
        saved = self._saved[micro_batch_index]
        own = self.index in self.plan.passes(self.index)
        if not self.is_last and self.head is None:
            return None
        out_d = saved.out.detach().requires_grad_(own)
        prediction = out_d if self.is_last else self.head(out_d)  # type: ignore[misc]
        loss = self.loss_fn(prediction, micro_batch)
        self.loss_sum = self.loss_sum + weight * loss.detach().float()
        inputs = [*self.head_params, out_d] if own else list(self.head_params)
        if not inputs:
            return None
        grads = torch.autograd.grad(loss * weight, inputs, allow_unused=True)
        _accumulate(self.head_params, grads[: len(self.head_params)])
        if not own:
            return None
        saved.grads[self.index] = grads[-1]
        return self._input_grad(self.index, grads[-1], saved)

    def own_weight(self, micro_batch_index: int) -> None:
        """Accumulate the weight gradient of this stage's own loss, if that loss updates this stage (k = 1)."""
        saved = self._saved[micro_batch_index]
        grad = saved.grads.get(self.index)
        if grad is not None:
            self._weight_grad(self.index, grad, saved)
        if not self.plan.has_backward(self.index):
            del self._saved[micro_batch_index]

    def backward_input(self, micro_batch_index: int, received: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Take the gradients of :meth:`InterlockingPlan.received` targets (ascending); return the late message.

        Args:
            micro_batch_index: the micro-batch's index in the step.
            received: one gradient (of this stage's output) per received target.

        Returns:
            The input gradients of :meth:`InterlockingPlan.sent_late` targets, stacked, or ``None``.
        """
        saved = self._saved[micro_batch_index]
        targets = self.plan.received(self.index)
        if len(received) != len(targets):
            raise RuntimeError(
                f"Stage {self.index} expected {len(targets)} gradients (targets {targets}), got {len(received)}."
            )
        late = []
        for target, grad in zip(targets, received):
            saved.grads[target] = grad
            input_grad = self._input_grad(target, grad, saved)
            if input_grad is not None:
                late.append(input_grad)
        return torch.stack(late) if late else None

    def backward_weight(self, micro_batch_index: int) -> None:
        """Accumulate the weight gradient of the received target that updates this stage; free the graph."""
        saved = self._saved.pop(micro_batch_index)
        for target in self.plan.received(self.index):
            self._weight_grad(target, saved.grads[target], saved)

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
    def _input_grad(self, target: int, grad: torch.Tensor, saved: _Saved) -> torch.Tensor | None:
        """``target``'s gradient of the stage input (``I``), if it goes on to the previous stage."""
        if not self.plan.needs_input(self.index, target):
            return None
        (input_grad,) = torch.autograd.grad(saved.out, [saved.x_in], grad_outputs=grad, retain_graph=True)
        self._sleep(self.cost.backward_input if self.cost else 0.0)
        return input_grad

    def _weight_grad(self, target: int, grad: torch.Tensor, saved: _Saved) -> None:
        """Accumulate ``target``'s gradient of the stage's parameters (``W``), if it updates this stage."""
        if not self.plan.needs_weight(self.index, target) or not self.params:
            return
        grads = torch.autograd.grad(
            saved.out, self.params, grad_outputs=grad, retain_graph=True, allow_unused=True
        )
        _accumulate(self.params, grads)
        self._sleep(self.cost.backward_weight if self.cost else 0.0)

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
