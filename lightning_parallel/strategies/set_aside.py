"""SetAsideGradients: the gradients a pipeline step computes in ``training_step``, kept until ``backward``.

A pipeline strategy runs its whole schedule (forwards and backwards) inside ``training_step``, but
Lightning zeroes the gradients between ``training_step`` and ``backward`` (or, when accumulating, keeps
the earlier ones). So the step's gradients are computed with ``.grad`` cleared, set aside, the previous
``.grad`` put back, and the set-aside ones added in ``backward`` (scaled for gradient accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import Tensor

T = TypeVar("T")
Reduction = Callable[[Sequence[Tensor], Sequence[Tensor | None]], list[Tensor | None]]


class SetAsideGradients:
    """Holds one step's gradients between ``training_step`` and ``backward``."""

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._grads: list[Tensor | None] | None = None

    def compute(self, params: Sequence[Tensor], step: Callable[[], T]) -> T:
        """Run ``step`` with the ``.grad`` of ``params`` cleared; set its gradients aside; restore ``.grad``.

        Args:
            params: every parameter ``step`` may give a gradient.
            step: runs the schedule's forwards and backwards.
        """
        params = list(params)
        previous = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            return step()
        finally:
            self._params, self._grads = params, [p.grad for p in params]
            for p, grad in zip(params, previous):
                p.grad = grad

    def reduce(self, reduction: Reduction) -> None:
        """Replace the set-aside gradients by ``reduction(params, grads)`` (e.g. an all-reduce over replicas)."""
        if self._grads is not None:
            self._grads = reduction(self._params, self._grads)

    def install(self, *, accumulate_grad_batches: int, divide_by: int = 1) -> None:
        """Add the set-aside gradients, times ``1 / (accumulate_grad_batches * divide_by)``, to ``.grad``.

        Args:
            accumulate_grad_batches: the Trainer's gradient accumulation.
            divide_by: a further divisor, e.g. the number of replicas whose gradients were summed.
        """
        grads, self._grads = self._grads, None
        if grads is None:
            return
        scale = 1.0 / max(1, int(accumulate_grad_batches))
        if divide_by != 1:
            scale /= divide_by
        for p, grad in zip(self._params, grads):
            if grad is None:
                continue
            grad = grad * scale if scale != 1.0 else grad
            p.grad = grad if p.grad is None else p.grad + grad
