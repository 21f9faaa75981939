"""StageLocalState: what a pipeline rank keeps when it holds only its own stages' weights.

Used by :class:`~lightning_parallel.strategies.ChimeraStrategy` with ``stage_local=True``:

- before the stages are built, the blocks of every stage the rank trains are materialised on its device
  (a module built on the meta device in ``configure_model``) with the module's layout-independent
  ``pipeline_init_weights``; a module built eagerly is left as it is;
- right after the stages are built, every block whose values live elsewhere is freed (replaced by meta
  tensors): the blocks of stages the rank does not train, and the module's originals of the stages it
  trains as Chimera's second-pipeline copy (the copy is what it trains). A rank then holds its stages'
  parameter bytes, the ideal;
- checkpoints are sharded directories (:mod:`lightning_parallel.pipeline.stage_checkpoint`): each rank
  writes its tensors under the module's own state-dict names (the copies under their originals' names)
  and its optimizer state by parameter name; loading asks each rank's names back, whatever the layout
  that wrote them (another stage count, schedule or world size);
- a parameter tied across stages (a token embedding shared with the output head) has a copy on every rank
  whose stages use it; after each step's schedule the copies' gradients are summed
  (:meth:`StageLocalState.tied_reduction`: one copy per stage, the first pipeline's, summed over the ranks
  that hold any copy), so every copy takes the same step as the one parameter on one device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_parallel.pipeline.stage_checkpoint import (
    MODEL_PREFIX,
    load_optimizer_state_by_name,
    load_sharded,
    optimizer_keys,
    optimizer_layout,
    optimizer_state_by_name,
    parameter_names,
    save_sharded,
)
from lightning_parallel.pipeline.stage_local import TiedParameter, free_blocks, materialize_blocks

_SKIPPED = ("state_dict", "optimizer_states")


class StageLocalState:
    """The names and tensors of this rank's stages, their freeing and their sharded checkpoints.

    Args:
        module: the LightningModule (its state-dict names are the checkpoint's keys).
        blocks: its ordered pipeline blocks.
    """

    def __init__(self, module: nn.Module, blocks: Sequence[nn.Module]) -> None:
        self.module = module
        self.blocks = list(blocks)
        self.meta_built = any(t.device.type == "meta" for b in self.blocks for t in [*b.parameters(), *b.buffers()])
        self.layouts: list[list[dict[str, Any]]] = []
        self.tensor_names: list[tuple[str, Tensor]] = []
        self.param_names: dict[int, str] = {}
        self.aliases: dict[str, list[str]] = {}
        self.tied: list[tuple[list[Tensor], list[Tensor], Any]] = []  # (owner copies, all copies, group)

    def materialize(self, held_blocks: Sequence[int], device: torch.device) -> None:
        """Give the blocks this rank trains storage and initial values (meta-built modules only)."""
        if self.meta_built:
            materialize_blocks(self.module, self.blocks, held_blocks, device=device)

    def record_layouts(self, optimizers: Sequence[Optimizer]) -> None:
        """Remember each optimizer's param groups by name (before they are cut down to the held stages)."""
        names = parameter_names(self.module)
        self.layouts = [optimizer_layout(opt, names) for opt in optimizers]

    def after_build(
        self, stage_modules: Mapping[tuple[int, int], nn.Module], copies: Sequence[tuple[nn.Module, nn.Module]],
        owned_blocks: Sequence[int],
    ) -> int:
        """Name the held tensors (copies under their originals' names), then free every other block.

        Args:
            stage_modules: (replica, stage) -> the module this rank trains.
            copies: (the module's original stage, this rank's copy of it) for Chimera's second pipeline.
            owned_blocks: indices of the blocks trained in place (replica 0's stages).

        Returns:
            The bytes freed.
        """
        state_names = _first_names(self.module)
        names_of_copy: dict[int, str] = {}
        for original, duplicate in copies:
            originals = [*original.parameters(), *original.buffers()]
            duplicates = [*duplicate.parameters(), *duplicate.buffers()]
            for source, target in zip(originals, duplicates):
                names_of_copy[id(target)] = state_names[id(source)]
        self.tensor_names = []
        self.param_names = {}
        for (replica, _), stage_module in sorted(stage_modules.items()):
            lookup = state_names if replica == 0 else names_of_copy
            for tensor in [*stage_module.parameters(), *stage_module.buffers()]:
                name = lookup[id(tensor)]
                self.tensor_names.append((name, tensor))
                if isinstance(tensor, nn.Parameter):
                    self.param_names[id(tensor)] = name
        return free_blocks(self.blocks, owned_blocks)

    def prepare_tied(
        self, tied: Sequence[TiedParameter], stage_modules: Mapping[tuple[int, int], nn.Module],
        copies: Sequence[tuple[nn.Module, nn.Module]], holders: Sequence[Sequence[list[int]]], my_pipeline: int,
    ) -> None:
        """Find this rank's copies of every tied parameter and make one process group per pipeline and
        tied parameter (collective: every rank calls this with the same ``tied`` and ``holders``).

        Args:
            tied: the tied parameters (found before the stages were built).
            stage_modules: (replica, stage) -> the module this rank trains.
            copies: (original stage, this rank's copy) pairs of Chimera's second pipeline.
            holders: for each pipeline, for each tied parameter, the global ranks that hold a copy.
            my_pipeline: this rank's pipeline index.
        """
        for item in tied:
            self.aliases[item.name] = list(item.aliases)
        copy_of = {id(a): b for original, duplicate in copies
                   for a, b in zip(original.parameters(), duplicate.parameters())}
        self.tied = []
        for index, item in enumerate(tied):
            groups = [dist.new_group(ranks[index]) for ranks in holders]  # every rank creates every group
            param = _first(self.module, item.name)
            owners: list[Tensor] = []
            everyone: list[Tensor] = []
            for (replica, stage), stage_module in stage_modules.items():
                if stage not in item.stages:
                    continue
                local = param if replica == 0 else copy_of.get(id(param))
                if local is None or not any(p is local for p in stage_module.parameters()):
                    continue
                everyone.append(local)
                if replica == 0 and not any(o is local for o in owners):
                    owners.append(local)
            unique: list[Tensor] = []
            for t in everyone:
                if not any(u is t for u in unique):
                    unique.append(t)
            self.tied.append((owners, unique, groups[my_pipeline]))

    def tied_reduction(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Set-aside gradients with every tied copy's gradient replaced by the sum over the stages that use
        it (collective over each tied parameter's holders). One copy per stage counts: Chimera's second
        pipeline has already added its gradient into the first's by then."""
        out = list(grads)
        position = {id(p): i for i, p in enumerate(params)}
        for owners, everyone, group in self.tied:
            if not everyone:
                continue
            total = torch.zeros_like(everyone[0])
            for owner in owners:
                grad = out[position[id(owner)]]
                if grad is not None:
                    total += grad
            dist.all_reduce(total, group=group)
            for copy in everyone:
                out[position[id(copy)]] = total.clone()
        return out

    # ------------------------------------------------------------------ sharded checkpoints
    def save(self, path: str | Path, checkpoint: Mapping[str, Any], optimizers: Sequence[Optimizer], meta: dict[str, Any]) -> None:
        """Write this rank's shard of ``checkpoint`` (collective); the non-tensor part goes to the meta file."""
        entries: dict[str, Tensor] = {MODEL_PREFIX + name: t.detach() for name, t in self.tensor_names}
        for index, optimizer in enumerate(optimizers):
            entries.update(optimizer_state_by_name(optimizer, self.param_names, index))
        rest = {k: v for k, v in checkpoint.items() if k not in _SKIPPED}
        save_sharded(path, entries, {"checkpoint": rest, "optimizers": self.layouts, "aliases": self.aliases, **meta})

    def load_model(self, path: str | Path, device: torch.device) -> None:
        """Copy this rank's tensors from the sharded checkpoint at ``path`` (collective)."""
        values = load_sharded(path, [MODEL_PREFIX + name for name, _ in self.tensor_names], device=device)
        with torch.no_grad():
            for name, tensor in self.tensor_names:
                tensor.copy_(values[MODEL_PREFIX + name])

    def load_optimizers(self, path: str | Path, optimizers: Sequence[Optimizer]) -> None:
        """Load each optimizer's state of this rank's parameters from ``path`` (collective)."""
        for index, optimizer in enumerate(optimizers):
            names = [self.param_names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            entries = load_sharded(path, optimizer_keys(path, index, names))
            load_optimizer_state_by_name(optimizer, self.param_names, entries, index)


def _first(module: nn.Module, name: str) -> Tensor:
    return module.get_parameter(name)


def _first_names(module: nn.Module) -> dict[int, str]:
    """id(tensor) -> its first state-dict name (a tied parameter's first alias, as ``parameter_names``)."""
    names: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    return names


__all__ = ["StageLocalState"]
