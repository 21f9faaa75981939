"""Full, unsharded model and optimizer states for the pipeline strategies.

A pipeline rank holds only its stages, and under Chimera a second copy of another stage. Checkpoints stay
in the single-device format regardless:

- the model state is the LightningModule's own ``state_dict()``, made complete on every rank by
  broadcasting each stage's tensors from the rank that owns the stage's first-pipeline copy
  (:func:`sync_stages`);
- the optimizer state is numbered like the optimizer ``configure_optimizers`` built over the whole module
  (its parameters counted in order over its param groups). Each rank contributes the entries of the
  parameters it owns (:func:`full_optimizer_state`); on load each rank picks the entries of every parameter
  it holds, copies included (:func:`local_optimizer_state`).

So a pipeline checkpoint loads into a plain module with ``load_from_checkpoint``, and a single-device
checkpoint resumes under a pipeline strategy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_parallel.utils.flat import flat_collective


@dataclass(frozen=True)
class HeldParameter:
    """A parameter in this rank's optimizer.

    Attributes:
        param: the tensor the optimizer steps.
        full_index: its index in the optimizer state numbering of the whole module.
        owner: True for the first-pipeline copy (the one saved); False for Chimera's second copy.
    """

    param: torch.Tensor
    full_index: int
    owner: bool


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int, group: Any = None) -> None:
    """Broadcast ``tensors`` in place from global rank ``src``, one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for dtype in sorted(by_dtype, key=str):
        group_tensors = by_dtype[dtype]
        received = flat_collective(group_tensors, lambda flat: dist.broadcast(flat, src=src, group=group))
        with torch.no_grad():
            for tensor, value in zip(group_tensors, received):
                tensor.copy_(value)


def module_tensors(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Parameters and buffers of ``modules`` in a fixed order, each tensor once."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                out.append(tensor)
    return out


def sync_stages(stage_blocks: Sequence[Sequence[nn.Module]], owners: Sequence[int], group: Any) -> None:
    """Make every rank's copy of every stage equal to the owner's.

    Args:
        stage_blocks: the blocks of each stage (the module's own blocks, present on every rank).
        owners: global rank that owns each stage's current values.
        group: the pipeline's process group (every member calls this).
    """
    for blocks, owner in zip(stage_blocks, owners):
        tensors = module_tensors(blocks)
        if tensors:
            broadcast_tensors(tensors, src=owner, group=group)


def _local_numbering(optimizer: Optimizer) -> dict[int, int]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): index for index, p in enumerate(params)}


def full_optimizer_state(
    optimizer: Optimizer, held: Sequence[HeldParameter], full_groups: Sequence[Sequence[int]], group: Any
) -> dict[str, Any]:
    """The optimizer state of the whole module, the same on every rank of the pipeline (collective).

    Args:
        optimizer: this rank's optimizer (over its held parameters).
        held: the parameters in ``optimizer`` with their index in the whole-module numbering.
        full_groups: for each param group, the whole-module indices of its parameters.
        group: the pipeline's process group.
    """
    local = optimizer.state_dict()
    numbering = _local_numbering(optimizer)
    mine = {
        item.full_index: _to_cpu(local["state"][numbering[id(item.param)]])
        for item in held
        if item.owner and numbering[id(item.param)] in local["state"]
    }
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    state: dict[int, Any] = {}
    for part in gathered:
        state.update(part)
    param_groups = [
        {**{k: v for k, v in local_group.items() if k != "params"}, "params": list(indices)}
        for local_group, indices in zip(local["param_groups"], full_groups)
    ]
    return {"state": dict(sorted(state.items())), "param_groups": param_groups}


def local_optimizer_state(
    full_state: dict[str, Any], optimizer: Optimizer, held: Sequence[HeldParameter]
) -> dict[str, Any]:
    """This rank's optimizer state dict cut from a whole-module one (every held copy gets its own tensors).

    Raises:
        ValueError: if the checkpoint has a different number of param groups than ``optimizer``.
    """
    if len(full_state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"The checkpoint's optimizer has {len(full_state['param_groups'])} param groups but "
            f"configure_optimizers built {len(optimizer.param_groups)}; resume with the same "
            "configure_optimizers."
        )
    numbering = _local_numbering(optimizer)
    full_index = {id(item.param): item.full_index for item in held}
    state: dict[int, Any] = {}
    for param_id, local_index in numbering.items():
        entry = full_state["state"].get(full_index[param_id])
        if entry is not None:
            state[local_index] = copy.deepcopy(entry)
    param_groups = []
    for full_group, local_group in zip(full_state["param_groups"], optimizer.param_groups):
        params = [numbering[id(p)] for p in local_group["params"]]
        param_groups.append({**{k: v for k, v in full_group.items() if k != "params"}, "params": params})
    return {"state": state, "param_groups": param_groups}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
