"""The collectives K-FAC uses, with a per-rank count of the bytes they carry.

``bytes_communicated`` counts the payload of each collective this rank takes part in (the bytes
of the flat buffer handed to ``all_reduce`` or ``broadcast``), the same measure for both
assignments. Tensors are packed into one flat buffer per collective so that a step costs one
all-reduce (``replicated``) or one broadcast per owner rank (``dp``). With one process, or
without an initialised process group, every call is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_parallel.kfac.layer import KFACLayer
from lightning_parallel.utils.flat import flat_collective


class Communicator:
    """Packs tensors into flat buffers and runs collectives over a process group.

    Args:
        group: The process group; ``None`` for the default group.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.bytes_communicated = 0

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Sums tensors over the ranks with one all-reduce of a packed buffer.

        Args:
            tensors: Tensors of one dtype and device.

        Returns:
            The summed tensors, shaped like the inputs.
        """
        if self.world_size == 1 or not tensors:
            return list(tensors)
        self.bytes_communicated += sum(t.numel() for t in tensors) * tensors[0].element_size()
        return flat_collective(tensors, lambda flat: dist.all_reduce(flat, group=self.group))

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> list[torch.Tensor]:
        """Broadcasts tensors from ``src`` with one broadcast of a packed buffer.

        Args:
            tensors: The tensors; their values matter on ``src`` only, their shapes everywhere.
            src: The sending rank within the group.

        Returns:
            ``src``'s tensors, shaped like the inputs.
        """
        if self.world_size == 1 or not tensors:
            return list(tensors)
        self.bytes_communicated += sum(t.numel() for t in tensors) * tensors[0].element_size()
        global_src = src if self.group is None else dist.get_global_rank(self.group, src)
        return flat_collective(tensors, lambda flat: dist.broadcast(flat, src=global_src, group=self.group))


def or_zeros(update: torch.Tensor | None, layer: KFACLayer) -> torch.Tensor:
    """``update``, or a zero matrix of the layer's gradient shape and dtype to fill a broadcast."""
    if update is not None:
        return update
    return torch.zeros(layer.out_dim, layer.in_dim, dtype=layer.weight.dtype, device=layer.weight.device)


def from_triu(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric ``(dim, dim)`` matrix whose upper triangle (row-major) is ``packed``."""
    i, j = torch.triu_indices(dim, dim, device=packed.device)
    mat = torch.zeros(dim, dim, dtype=packed.dtype, device=packed.device)
    mat[i, j] = packed
    return mat + mat.triu(1).t()
