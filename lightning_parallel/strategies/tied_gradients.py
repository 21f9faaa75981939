"""TiedGradients: sum the gradients of a parameter tied across stages over the ranks that use it.

A parameter tied across stages (a token embedding shared with the output head, as in GPT-2) is held by
every rank whose stages use it: the same ``nn.Parameter`` when the rank keeps the module's own blocks, or
a copy (Chimera's second pipeline). Each rank's schedule gives its copy the gradient of its own uses only;
on one device the one parameter gets the sum. :meth:`TiedGradients.reduction` makes every copy's
set-aside gradient that sum before the optimizer step (as DeepSpeed's ``TiedLayerSpec``), so every copy
takes the same step as the one parameter on one device. Used by every pipeline strategy (Chimera with
stage-local weights, interlocking backprop with or without them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_parallel.pipeline.stage_local import TiedParameter


class TiedGradients:
    """This rank's copies of every tied parameter and the process group of each parameter's holders."""

    def __init__(self) -> None:
        self.entries: list[tuple[list[Tensor], list[Tensor], Any]] = []  # (counted copies, all copies, group)

    def __len__(self) -> int:
        return len(self.entries)

    def prepare(
        self, module: nn.Module, tied: Sequence[TiedParameter], stage_modules: Mapping[tuple[int, int], nn.Module],
        copies: Sequence[tuple[nn.Module, nn.Module]], holders: Sequence[Sequence[list[int]]], my_pipeline: int,
    ) -> None:
        """Find this rank's copies of every tied parameter and make one process group per pipeline and
        tied parameter (collective: every rank calls this with the same ``tied`` and ``holders``).

        Args:
            module: the module whose parameters are tied (``TiedParameter.name`` is its name there).
            tied: the tied parameters that several ranks use.
            stage_modules: (replica, stage) -> the module this rank trains.
            copies: (original stage, this rank's copy) pairs of Chimera's second pipeline (empty otherwise).
            holders: for each pipeline, for each tied parameter, the global ranks that hold a copy.
            my_pipeline: this rank's pipeline index.
        """
        copy_of = {id(a): b for original, duplicate in copies
                   for a, b in zip(original.parameters(), duplicate.parameters())}
        self.entries = []
        for index, item in enumerate(tied):
            groups = [dist.new_group(ranks[index]) for ranks in holders]  # every rank creates every group
            param = module.get_parameter(item.name)
            counted: list[Tensor] = []
            everyone: list[Tensor] = []
            for (replica, stage), stage_module in stage_modules.items():
                if stage not in item.stages:
                    continue
                local = param if replica == 0 else copy_of.get(id(param))
                if local is None or not any(p is local for p in stage_module.parameters()):
                    continue
                if not any(e is local for e in everyone):
                    everyone.append(local)
                if replica == 0 and not any(c is local for c in counted):
                    counted.append(local)
            self.entries.append((counted, everyone, groups[my_pipeline]))

    def reduction(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Set-aside gradients with every tied copy's gradient replaced by the sum over the stages that use
        it (collective over each tied parameter's holders). One copy per stage counts: Chimera's second
        pipeline has already added its gradient into the first's by then."""
        out = list(grads)
        position = {id(p): i for i, p in enumerate(params)}
        for counted, everyone, group in self.entries:
            if not everyone:
                continue
            total = torch.zeros_like(everyone[0])
            for copy in counted:
                grad = out[position[id(copy)]]
                if grad is not None:
                    total += grad
            dist.all_reduce(total, group=group)
            for copy in everyone:
                out[position[id(copy)]] = total.clone()
        return out


__all__ = ["TiedGradients"]
