"""StageLocalState: what a pipeline rank keeps when it holds only its own stages' weights.

Used by the pipeline strategies (:class:`~lightning_parallel.strategies.ChimeraStrategy`,
:class:`~lightning_parallel.strategies.InterlockingBackpropStrategy`) with ``stage_local=True``:

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
  whose stages use it; the strategy sums the copies' gradients
  (:class:`~lightning_parallel.strategies.tied_gradients.TiedGradients`); the checkpoint stores it once,
  under its first name, and records its other names (:meth:`StageLocalState.record_aliases`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
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
    read_meta,
    save_sharded,
)
from lightning_parallel.pipeline.stage_local import (
    TiedParameter,
    free_blocks,
    has_meta_tensors,
    materialize_blocks,
)

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

    def materialize(self, held_blocks: Sequence[int], device: torch.device) -> None:
        """Give the blocks this rank trains storage and initial values (meta-built modules only; a block that
        already has its values, e.g. trained by an earlier ``fit`` of the same layout, keeps them)."""
        pending = [i for i in held_blocks if has_meta_tensors([self.blocks[i]])]
        if self.meta_built and pending:
            materialize_blocks(self.module, self.blocks, pending, device=device)

    def record_layouts(self, optimizers: Sequence[Optimizer]) -> None:
        """Remember each optimizer's param groups by name (before they are cut down to the held stages)."""
        names = parameter_names(self.module)
        self.layouts = [optimizer_layout(opt, names) for opt in optimizers]

    def after_build(
        self, stage_modules: Mapping[tuple[int, int], nn.Module], copies: Sequence[tuple[nn.Module, nn.Module]],
        owned_blocks: Sequence[int], companions: Sequence[nn.Module] = (),
    ) -> int:
        """Name the held tensors (copies under their originals' names), then free every other block.

        Args:
            stage_modules: (replica, stage) -> the module this rank trains.
            copies: (the module's original stage, this rank's copy of it) for Chimera's second pipeline.
            owned_blocks: indices of the blocks trained in place (replica 0's stages).
            companions: other modules of the LightningModule this rank trains (interlocking's auxiliary heads of
                its stages), named and checkpointed like the stages; the strategy frees the others itself.

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
        held = [(replica == 0, m) for (replica, _), m in sorted(stage_modules.items())]
        for in_place, stage_module in held + [(True, m) for m in companions]:
            lookup = state_names if in_place else names_of_copy
            for tensor in [*stage_module.parameters(), *stage_module.buffers()]:
                name = lookup[id(tensor)]
                self.tensor_names.append((name, tensor))
                if isinstance(tensor, nn.Parameter):
                    self.param_names[id(tensor)] = name
        return free_blocks(self.blocks, owned_blocks)

    def record_aliases(self, tied: Sequence[TiedParameter]) -> None:
        """Remember every name of each tied parameter (stored once; consolidation writes every alias)."""
        for item in tied:
            self.aliases[item.name] = list(item.aliases)

    # ------------------------------------------------------------------ sharded checkpoints
    def save(self, path: str | Path, checkpoint: Mapping[str, Any], optimizers: Sequence[Optimizer], meta: dict[str, Any]) -> None:
        """Write this rank's shard of ``checkpoint`` (collective); the non-tensor part goes to the meta file."""
        entries: dict[str, Tensor] = {MODEL_PREFIX + name: t.detach() for name, t in self.tensor_names}
        for index, optimizer in enumerate(optimizers):
            entries.update(optimizer_state_by_name(optimizer, self.param_names, index))
        rest = {k: v for k, v in checkpoint.items() if k not in _SKIPPED}
        save_sharded(path, entries, {"checkpoint": rest, "optimizers": self.current_layouts(optimizers), "aliases": self.aliases, **meta})

    def current_layouts(self, optimizers: Sequence[Optimizer]) -> list[list[dict[str, Any]]]:
        """The recorded layouts with each param group's settings as they are now (a scheduler's ``lr``, ...).

        The optimizers keep their param groups when they are cut down to the held stages, so group ``i`` of
        the layout is group ``i`` of the optimizer on every rank.
        """
        return [
            [
                {**layout, **{k: v for k, v in group.items() if k != "params"}}
                for layout, group in zip(optimizer_layouts, optimizer.param_groups)
            ]
            for optimizer_layouts, optimizer in zip(self.layouts, optimizers)
        ]

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
        # The param groups' settings as saved (a scheduler may have changed ``lr``); every rank has them all.
        layouts = read_meta(path).get("optimizers", [])
        for optimizer, layout in zip(optimizers, layouts):
            for group, saved in zip(optimizer.param_groups, layout):
                group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})


def _first_names(module: nn.Module) -> dict[int, str]:
    """id(tensor) -> its first state-dict name (a tied parameter's first alias, as ``parameter_names``)."""
    names: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    return names


__all__ = ["StageLocalState"]
