"""The sampled Fisher's backward through a pipeline schedule (pure torch, no Lightning).

On one device the sampled (true) Fisher runs, on factor-update steps, a second backward from the
prediction with the gradient of the negative log-likelihood at targets sampled from the model, and
records ``G`` from it only (:class:`~lightning_parallel.kfac.KFACPreconditioner`). Under a pipeline
the prediction lives on the last stage, so :class:`SampledFisherPass` rides the schedule's own
backward: the runtime (:class:`~lightning_parallel.pipeline.runtime.PipelineRuntime`'s
``side_backward``) calls it at every backward action, just before the real backward frees the
graph, and sends the sampled input gradient to the previous stage after the real one.

Design decisions:

- The prediction is the last stage's output (what ``pipeline_loss`` receives); ``fisher_output``
  is refused under a pipeline.
- The same samples as one device: the random numbers for the whole batch are drawn in one call
  (:func:`~lightning_parallel.kfac.fisher.sample_noise`, shape ``(batch,) + output.shape[1:]``)
  by every rank that holds a last stage, from generators seeded alike, and micro-batch ``m`` takes
  its rows ``[offset_m, offset_m + size_m)``, so the draw does not depend on the micro-batches nor
  on which rank runs which of them.
- Each stage's pass is ``torch.autograd.grad`` of the stage output with respect to its input and
  parameters (``retain_graph=True``): the layers' output-gradient hooks record ``G`` (the
  preconditioner's ``sampling`` flag is set), the real ``.grad`` is not touched, and the real
  backward that follows records nothing more (one ``G`` contribution per forward call).
- Only factor-update steps run it (the same predicate on every rank, so all ranks agree on the
  extra messages); other steps cost nothing.
- A callable ``fisher`` is called on each micro-batch's prediction; its loss must be a sum over
  the examples (its own random draws follow the micro-batches, so they match one device only if it
  draws per example).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_parallel.kfac.fisher import output_grad_from_noise, sample_noise
from lightning_parallel.pipeline.micro_batches import batch_size


class SampledFisherPass:
    """The ``side_backward`` of a pipeline runtime that records the sampled Fisher's ``G``.

    Args:
        preconditioner: The K-FAC preconditioner of this rank's stage copies (its hooks record, its
            generator draws, its options say which steps update the factors).
    """

    def __init__(self, preconditioner: Any) -> None:
        self.preconditioner = preconditioner
        self._offsets: list[int] = []
        self._total = 0
        self._noise: Tensor | None = None
        self._predictions: dict[tuple[int, int], Tensor] = {}

    def begin(self, micro_batches: Sequence[Any]) -> bool:
        """Whether this step runs the pass (a factor-update step); resets the step's draw.

        Args:
            micro_batches: The step's micro-batches, in order.

        Returns:
            ``True`` on factor-update steps.
        """
        pre = self.preconditioner
        active = bool(pre._hooks_enabled) and pre.options.is_update_step("factor_update_steps", pre.steps)
        self._noise, self._predictions = None, {}
        if active:
            sizes = [batch_size(mb) for mb in micro_batches]
            self._offsets = [sum(sizes[:m]) for m in range(len(sizes))]
            self._total = sum(sizes)
        return active

    def last_forward(self, replica: int, micro_batch: int, output: Tensor) -> None:
        """Keeps a last-stage output (the prediction) for its backward.

        Args:
            replica: The pipeline replica.
            micro_batch: The micro-batch index.
            output: The last stage's output.
        """
        self._predictions[(replica, micro_batch)] = output

    def backward(
        self,
        module: nn.Module,
        replica: int,
        stage: int,
        micro_batch: int,
        x: Tensor,
        out: Tensor | None,
        grad: Tensor | None,
    ) -> Tensor | None:
        """The sampled backward of one stage and micro-batch; records ``G``.

        Args:
            module: The stage's module.
            replica: The pipeline replica.
            stage: The stage.
            micro_batch: The micro-batch index.
            x: The stage's input.
            out: The stage's output (``None`` at the last stage: the kept prediction is used).
            grad: The sampled gradient of ``out`` from the next stage (``None`` at the last stage).

        Returns:
            The sampled gradient of ``x`` (``None`` when ``x`` needs none).
        """
        pre = self.preconditioner
        start = pre.clock()
        if out is None or grad is None:
            out = self._predictions.pop((replica, micro_batch))
            if not out.requires_grad:
                return None
            root, grad = self._sampled_root(out, micro_batch)
        else:
            root = out
        if not root.requires_grad:
            return None
        wants_x = x.requires_grad
        inputs = ([x] if wants_x else []) + [p for p in module.parameters() if p.requires_grad]
        if not inputs:
            return None
        pre.sampling = True
        try:
            grads = torch.autograd.grad(root, inputs, grad_outputs=grad, retain_graph=True, allow_unused=True)
        finally:
            pre.sampling = False
        pre.counters["factor_seconds"] += pre.clock() - start
        return grads[0] if wants_x else None

    def _sampled_root(self, output: Tensor, micro_batch: int) -> tuple[Tensor, Tensor | None]:
        """``(tensor, gradient)`` to backpropagate from for the sampled loss of one micro-batch."""
        fisher = self.preconditioner.options.fisher
        if callable(fisher):
            return fisher(output), None
        if self._noise is None:  # the whole batch's numbers in one draw, as one device draws them
            shape = (self._total, *output.shape[1:])
            self._noise = sample_noise(shape, output, str(fisher), self.preconditioner._rng(output.device))
        offset = self._offsets[micro_batch]
        noise = self._noise[offset : offset + output.shape[0]]
        return output, output_grad_from_noise(output.detach(), str(fisher), noise)
