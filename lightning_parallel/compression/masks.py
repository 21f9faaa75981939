"""1-bit storage of boolean masks (ReLU zero masks, dropout masks, 0/1 integer tensors)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_parallel.compression.bitpack import pack_bits, unpack_bits

__all__ = ["PackedMask", "compact", "exact_values", "is_binary", "pack_mask", "restore_dense", "unpack_mask"]


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

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)


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
    flat = x.reshape(-1)
    # a bool tensor already holds one 0/1 byte per element: reinterpret it instead of copying
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)
    return PackedMask(pack_bits(flat, 1), x.shape, x.dtype)


def unpack_mask(packed: PackedMask) -> Tensor:
    """Restores the tensor stored by :func:`pack_mask` (same shape and dtype)."""
    flat = unpack_bits(packed.bits, 1, packed.numel)
    return flat.to(packed.dtype).view(packed.shape)


def _positions(keep: Tensor, count: int) -> Tensor:
    """For every element of the flat 0/1 tensor ``keep``: its rank among the kept elements, or ``count``
    (``int32`` below 2**31 elements, which ``index_select`` takes as is).

    A prefix sum and two element-wise ops: on CPU several times faster than the ``nonzero`` behind
    boolean indexing and ``masked_scatter_``, whose cost is one unpredictable branch per element.
    """
    dtype = torch.int32 if keep.numel() < 2**31 else torch.int64
    k = keep.to(dtype)
    rank = torch.cumsum(k, 0, dtype=dtype)
    # kept: rank - 1; dropped: count
    return rank.sub_(1 + count).mul_(k).add_(count)


def compact(flat: Tensor, keep: Tensor, count: int) -> Tensor:
    """``flat[keep]`` for a flat tensor and a flat bool mask with ``count`` true elements.

    Scatters every element to its rank among the kept ones; the dropped ones all go to one extra
    slot that is cut off.

    Args:
        flat: a 1-D tensor.
        keep: a 1-D ``bool`` tensor of the same length.
        count: the number of ``True`` elements of ``keep``.
    """
    out = flat.new_empty(count + 1)
    out.scatter_(0, _positions(keep, count).long(), flat)
    return out[:count]


def exact_values(flat: Tensor, where: Tensor) -> tuple[Tensor, Tensor]:
    """The flat indices (``int32`` below 2**31 elements) and the values of ``flat`` where ``where`` is true:
    what a lossy codec stores exactly beside its codes, and :func:`restore_dense` writes back.

    Args:
        flat: a 1-D tensor.
        where: a 1-D ``bool`` tensor of the same length.
    """
    index = where.nonzero().view(-1)
    value = flat[index]  # advanced indexing copies
    return (index.to(torch.int32) if flat.numel() < 2**31 else index), value


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
        keep = unpack_bits(nonzero.bits, 1, nonzero.numel)
        # gather from the values followed by one zero, which every dropped element reads
        padded = torch.cat([vals.reshape(-1), vals.new_zeros(1)])
        out = padded.index_select(0, _positions(keep, vals.numel()))
    else:
        out = vals
    if exc_index is not None and exc_value is not None:
        out[exc_index.long()] = exc_value
    return out.view(shape)
