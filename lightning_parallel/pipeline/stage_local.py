"""Stage-local weights: materialise only the blocks a rank holds, free the others, find tied parameters.

A pipeline rank trains a few stages; the rest of the model need not exist there. Two ways in:

- **built on the meta device** (``configure_model()`` under the strategy's ``tensor_init_context``): the
  module's parameters and buffers have shapes but no storage. :func:`materialize_blocks` gives the held
  blocks storage on the rank's device and initialises them with the module's optional
  ``pipeline_init_weights(index, block)`` hook, which must draw block ``index``'s values from a stream that
  depends on the index alone (as :class:`~lightning_parallel.models.PipelineClassifier` does), so that the
  weights do not depend on the layout. Without the hook, every submodule's ``reset_parameters()`` is called
  from the rank's own random stream, with a warning: the initial weights then depend on the layout.
- **built eagerly**, the way most modules are written: :func:`free_blocks` replaces the tensors of the
  blocks a rank does not hold by meta tensors right after partitioning. The whole model still exists once
  per rank until then: the peak is the whole model, then the held blocks.

Tied parameters (one ``nn.Parameter`` used by several blocks, e.g. a token embedding shared with the
output head) are found by identity (:func:`tied_parameters`). Every stage that uses one keeps its own copy;
their gradients are summed before the optimizer step (:func:`sum_tied_gradients`). The copies start equal
because :func:`materialize_blocks` also runs, on a temporary materialisation, the initialisation of every
block that writes a tied parameter the rank holds, in block order, exactly as on one device.

This module imports no Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_parallel.pipeline.partition import stage_slices

InitFn = Callable[[int, nn.Module], None]


@dataclass(frozen=True)
class TiedParameter:
    """One parameter used by more than one block.

    Attributes:
        name: its state-dict name at its first use (e.g. ``"blocks.0.token.weight"``).
        aliases: every name it goes by, the first one included.
        blocks: the blocks that use it, ascending.
        stages: the stages that use it under the given partition, ascending (empty without one).
    """

    name: str
    aliases: tuple[str, ...]
    blocks: tuple[int, ...]
    stages: tuple[int, ...]


def _direct_tensors(module: nn.Module) -> Iterable[tuple[dict[str, Any], str, Tensor]]:
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for key, tensor in table.items():
                if tensor is not None:
                    yield table, key, tensor


def _block_of_tensors(blocks: Sequence[nn.Module]) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    for index, block in enumerate(blocks):
        for _, _, tensor in _direct_tensors(block):
            owners = users.setdefault(id(tensor), [])
            if index not in owners:
                owners.append(index)
    return users


def tied_parameters(
    module: nn.Module, blocks: Sequence[nn.Module], sizes: Sequence[int] | None = None
) -> list[TiedParameter]:
    """The parameters that several blocks use, with their names in ``module.state_dict()``.

    Args:
        module: the root module (names are taken from its ``named_parameters``).
        blocks: its ordered pipeline blocks.
        sizes: blocks per stage; when given, each entry lists the stages that use the parameter.
    """
    names: dict[int, list[str]] = {}
    for name, named in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(named), []).append(name)
    users = _block_of_tensors(blocks)
    stage_of: dict[int, int] = {}
    if sizes is not None:
        for stage, block_slice in enumerate(stage_slices(sizes)):
            for index in range(block_slice.start, block_slice.stop):
                stage_of[index] = stage
    out: list[TiedParameter] = []
    seen: set[int] = set()
    for block in blocks:
        for _, _, param in _direct_tensors(block):
            if not isinstance(param, nn.Parameter) or id(param) in seen or len(users.get(id(param), [])) < 2:
                continue
            seen.add(id(param))
            aliases = tuple(names.get(id(param), ["?"]))
            used_by = tuple(sorted(users[id(param)]))
            stages = tuple(sorted({stage_of[b] for b in used_by})) if sizes is not None else ()
            out.append(TiedParameter(aliases[0], aliases, used_by, stages))
    return out


def _swap_to(tensor: Tensor, device: torch.device | str) -> int:
    """Move ``tensor``'s storage to ``device`` in place (the Python object stays, so ties, optimizers and
    modules that refer to it keep working); values are not copied. Returns the bytes of the new storage."""
    empty = torch.empty_like(tensor, device=device)
    replacement: Tensor = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    torch.utils.swap_tensors(tensor, replacement)
    return tensor.numel() * tensor.element_size()


def _materialize(module: nn.Module, device: torch.device, done: set[int]) -> int:
    """Give every meta parameter/buffer of ``module`` (uninitialised) storage on ``device``; the bytes."""
    total = 0
    for _, _, tensor in list(_direct_tensors(module)):
        if id(tensor) not in done and tensor.device.type == "meta":
            done.add(id(tensor))
            total += _swap_to(tensor, device)
    return total


def _to_meta(module: nn.Module, keep: set[int]) -> int:
    """Move ``module``'s materialised tensors not in ``keep`` to the meta device; the bytes released."""
    released = 0
    for _, _, tensor in list(_direct_tensors(module)):
        if id(tensor) not in keep and tensor.device.type != "meta":
            keep_size = tensor.numel() * tensor.element_size()
            _swap_to(tensor, "meta")
            released += keep_size
    return released


def materialize_blocks(
    module: nn.Module,
    blocks: Sequence[nn.Module],
    held: Iterable[int],
    *,
    device: torch.device | str = "cpu",
    init: InitFn | None = None,
) -> int:
    """Materialise and initialise the held blocks of a meta-built module; the others stay on meta.

    Tensors keep their identity (their storage is swapped in place), so tied parameters stay tied and an
    optimizer built over the meta module steps the materialised tensors. For every tied parameter a held block uses, the blocks that
    use it but are not held are materialised for a moment, so that the initialisations run in block order
    as on one device, and freed again.

    Args:
        module: the root module; its ``pipeline_init_weights(index, block)`` is the default ``init``.
        blocks: its ordered pipeline blocks.
        held: indices of the blocks this rank holds.
        device: where the held blocks live.
        init: ``init(index, block)`` sets block ``index``'s initial values in place. Default: the module's
            ``pipeline_init_weights``, or ``reset_parameters()`` of each submodule (with a warning).

    Returns:
        The bytes of the tensors materialised for the held blocks.
    """
    device = torch.device(device)
    held_set = set(held)
    users = _block_of_tensors(blocks)
    # Blocks not held that share a tensor with a held block: their initialisation may write it.
    helpers = {
        other
        for index in held_set
        for _, _, tensor in _direct_tensors(blocks[index])
        for other in users[id(tensor)]
        if other not in held_set
    }
    done: set[int] = set()
    materialized = sum(_materialize(blocks[index], device, done) for index in sorted(held_set))
    kept = {id(t) for index in held_set for _, _, t in _direct_tensors(blocks[index])}
    for index in sorted(helpers):
        _materialize(blocks[index], device, done)
    init_fn = init if init is not None else getattr(module, "pipeline_init_weights", None)
    if not callable(init_fn):
        init_fn = _ResetInit(type(module).__name__)
    for index in sorted(held_set | helpers):
        init_fn(index, blocks[index])
    for index in sorted(helpers):
        _to_meta(blocks[index], kept)
    return materialized


class _ResetInit:
    """Fallback initialisation: every submodule's ``reset_parameters()``; warns once, with counts."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.warned = False

    def __call__(self, index: int, block: nn.Module) -> None:
        uncovered = 0
        for sub in block.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
            elif any(t is not None for t in [*sub._parameters.values(), *sub._buffers.values()]):
                uncovered += 1
                with torch.no_grad():
                    for t in [*sub._parameters.values(), *sub._buffers.values()]:
                        if t is not None:
                            t.zero_()
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.owner} has no pipeline_init_weights(index, block): held blocks are initialised with "
                "reset_parameters() from this rank's random stream, so the initial weights depend on the layout "
                f"(block {index}: {uncovered} submodule(s) without reset_parameters() were zero-filled). Add "
                "the hook to start from the same weights as on one device.",
                stacklevel=3,
            )


def free_blocks(blocks: Sequence[nn.Module], held: Iterable[int]) -> int:
    """Replace the tensors of the blocks not in ``held`` by meta tensors (shared ones with a held block stay).

    The memory returns to the allocator once nothing else refers to the old tensors (build the optimizer
    afterwards, or cut it down to the held parameters).

    Returns:
        The bytes released.
    """
    held_set = set(held)
    keep = {id(t) for index in held_set for _, _, t in _direct_tensors(blocks[index])}
    return sum(_to_meta(block, keep) for index, block in enumerate(blocks) if index not in held_set)


def materialized_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the non-meta parameters and buffers of ``modules``, each storage once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def has_meta_tensors(modules: Iterable[nn.Module]) -> bool:
    """Whether any parameter or buffer of ``modules`` is on the meta device (built there, or freed)."""
    return any(t.device.type == "meta" for m in modules for t in [*m.parameters(), *m.buffers()])


def meta_outputs(modules: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """Each module's output when ``x`` goes through ``modules`` in turn, on the meta device (shapes and
    dtypes only: nothing is computed or allocated, whether the modules' tensors are materialised or not).

    Run in eval mode without autograd by the caller when it matters (dropout, batch statistics).
    """
    outputs = []
    x = x.to("meta")
    for module in modules:
        state = {
            name: torch.empty_like(tensor, device="meta")
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        }
        x = torch.func.functional_call(module, state, (x,))
        outputs.append(x)
    return outputs


def sum_tied_gradients(copies: Sequence[Tensor], group: Any = None) -> None:
    """Sum the gradients of one tied parameter over its copies on this rank and on the ranks of ``group``;
    every copy's ``.grad`` becomes the total (collective over ``group``; ``None`` and no process group:
    this rank only).

    Each copy's gradient must be its own uses' contribution only (before any other reduction), so that
    the total equals the one-device gradient of the shared parameter.
    """
    if not copies:
        raise ValueError("copies is empty; pass this rank's copies of the tied parameter.")
    total = torch.zeros_like(copies[0])
    for copy in copies:
        if copy.grad is not None:
            total += copy.grad
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    for copy in copies:
        copy.grad = total.clone() if len(copies) > 1 else total


__all__ = [
    "TiedParameter",
    "free_blocks",
    "has_meta_tensors",
    "materialize_blocks",
    "materialized_bytes",
    "meta_outputs",
    "sum_tied_gradients",
    "tied_parameters",
]
