"""1-bit storage of boolean masks (ReLU zero masks, dropout masks, 0/1 integer tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_parallel.compression.bitpack import pack_bits, unpack_bits

__all__ = ["PackedMask", "is_binary", "pack_mask", "unpack_mask"]


@dataclass(frozen=True)
class PackedMask:
    """A tensor of 0/1 values stored as one bit per element.

    Args:
        bits: the packed bits (``uint8``).
        shape: the original shape.
        dtype: the original dtype (``bool`` or an integer/float type holding only 0 and 1).
    """

    bits: Tensor
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed bits."""
        return self.bits.numel()


def is_binary(x: Tensor) -> bool:
    """Whether every element of ``x`` is 0 or 1 (always true for ``bool``)."""
    if x.dtype == torch.bool:
        return True
    return bool(((x == 0) | (x == 1)).all())


def pack_mask(x: Tensor) -> PackedMask:
    """Stores a 0/1 tensor in one bit per element.

    Args:
        x: a ``bool`` tensor, or any tensor whose elements are all 0 or 1.
    """
    return PackedMask(pack_bits(x.reshape(-1).to(torch.uint8), 1), x.shape, x.dtype)


def unpack_mask(packed: PackedMask) -> Tensor:
    """Restores the tensor stored by :func:`pack_mask` (same shape and dtype)."""
    numel = 1
    for s in packed.shape:
        numel *= s
    flat = unpack_bits(packed.bits, 1, numel)
    return flat.to(packed.dtype).view(packed.shape)


def restore_dense(
    vals: Tensor,
    nonzero: PackedMask | None,
    exc_index: Tensor | None,
    exc_value: Tensor | None,
    shape: torch.Size,
) -> Tensor:
    """The decoded tensor of ``shape``: ``vals`` scattered back into the non-zero positions (when the codec
    kept a zero mask) and the values stored exactly (``exc_index`` / ``exc_value``) written over them."""
    if nonzero is not None:
        keep = unpack_mask(nonzero)
        out = torch.zeros(keep.shape, dtype=vals.dtype, device=vals.device)
        out.masked_scatter_(keep, vals)
    else:
        out = vals
    if exc_index is not None and exc_value is not None:
        out[exc_index.long()] = exc_value
    return out.view(shape)
