"""Activation recomputation per stage: a stage's forward runs again in backward instead of storing its
activations (``torch.utils.checkpoint``, non-reentrant; the random state is replayed, so dropout masks and
results are the same as without it).

Under 1F1B the first stage stores D micro-batches' activations and the last one one; recomputing the stages
that store the most saves the most memory for the forward time they cost (Merak's stage-aware
recomputation). :func:`recompute_stages` picks those from the schedule itself.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lightning_parallel.pipeline.schedule import Schedule
from lightning_parallel.pipeline.simulate import peak_activations


class RecomputedStage(nn.Module):
    """Run ``inner`` so that its activations are recomputed in backward (while gradients are recorded).

    Args:
        inner: the stage module; its parameters stay its own (this wrapper adds none).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @override
    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.inner(x)  # type: ignore[no-any-return]
        return checkpoint(self.inner, x, use_reentrant=False)  # type: ignore[no-any-return]


def recompute_stages(schedule: Schedule, choice: bool | Sequence[int]) -> set[int]:
    """The stages to recompute: ``True`` picks every stage held by a rank whose schedule stores the most
    micro-batches' activations at once; ``False`` none; a list names them.

    Raises:
        ValueError: if a listed stage does not exist.
    """
    if choice is False:
        return set()
    d = schedule.stages
    if choice is True:
        peaks = [peak_activations(order) for order in schedule.actions]
        top = max(peaks)
        return {stage for rank, peak in enumerate(peaks) if peak == top for _, stage in schedule.stages_of(rank)}
    stages = {int(s) for s in choice}
    bad = sorted(s for s in stages if not 0 <= s < d)
    if bad:
        raise ValueError(f"recompute={list(choice)} names stages {bad}; stages are 0..{d - 1}.")
    return stages


__all__ = ["RecomputedStage", "recompute_stages"]
