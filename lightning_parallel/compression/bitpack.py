"""Vectorised bit packing of non-negative integer codes.

Design: codes are packed in *planes*. ``n`` codes (padded to a multiple of 8) of width 1, 2 or
4 bits fill ``8 / width`` rows of a ``(8 / width, n * width / 8)`` view; byte ``j`` holds code
``j`` of every row (row ``i`` at bit ``i * width``), so packing is ``8 / width - 1`` shift-or
operations on contiguous ``uint8`` rows and unpacking a single broadcast shift-and. Other widths
up to 8 are split into planes of 4, 2 and 1 bits (width 6 = a 4-bit plane of the low bits and
a 2-bit plane of the next ones), 8-bit codes are stored as bytes, and wider codes store their
low byte as a plane and pack the remaining high bits the same way. Every step is a tensor op
over all codes at once, in ``uint8`` wherever possible: no Python loop runs over elements, and
packing costs a few passes over the data on CPU and CUDA alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]

_MAX_BITS = 32


def _check_bits(bits: int) -> None:
    if not 0 <= bits <= _MAX_BITS:
        raise ValueError(f"`bits` must be an integer in [0, {_MAX_BITS}], got bits={bits!r}.")


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes :func:`pack_bits` produces for ``numel`` codes of width ``bits``.

    Args:
        numel: number of codes.
        bits: code width in bits, 0 to 32.
    """
    _check_bits(bits)
    return ((numel + 7) // 8) * bits


def _planes(bits: int) -> list[tuple[int, int]]:
    """(low bit, width) of the 4/2/1-bit planes of a code of ``bits <= 8`` bits, lowest first."""
    planes, low = [], 0
    for width in (4, 2, 1):
        if bits & width:
            planes.append((low, width))
            low += width
    return planes


def _pack_plane(codes: Tensor, width: int) -> Tensor:
    """Packs ``uint8`` codes below ``2**width`` (length a multiple of 8), ``width`` in {1, 2, 4}."""
    rows = codes.view(8 // width, -1)
    out = rows[0].clone()
    for i in range(1, 8 // width):
        out |= rows[i] << (i * width)
    return out


def _unpack_plane(packed: Tensor, width: int) -> Tensor:
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device).view(-1, 1)
    return ((packed.unsqueeze(0) >> shifts) & ((1 << width) - 1)).view(-1)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Packs integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor.

    Args:
        codes: integer tensor of any shape; flattened. Values must lie in ``[0, 2**bits)``;
            higher bits are dropped.
        bits: code width in bits, 0 to 32. Width 0 stores nothing (all codes are 0).

    Returns:
        A 1-D ``uint8`` tensor of :func:`packed_nbytes` bytes on the device of ``codes``.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 0 or n == 0:
        return torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=codes.device)
    pad = (-n) % 8
    if bits > 8:
        wide = flat.to(torch.int64 if bits > 31 else torch.int32)
        low = (wide & 0xFF).to(torch.uint8)
        low = torch.cat([low, low.new_zeros(pad)]) if pad else low
        return torch.cat([low, pack_bits(wide >> 8, bits - 8)])
    small = flat.to(torch.uint8)
    if pad:
        small = torch.cat([small, small.new_zeros(pad)])
    if bits == 8:
        return small
    planes = _planes(bits)
    if len(planes) == 1:
        return _pack_plane(small & ((1 << bits) - 1), bits)
    return torch.cat([_pack_plane((small >> low) & ((1 << width) - 1), width) for low, width in planes])


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: the ``uint8`` tensor returned by :func:`pack_bits`.
        bits: the code width used to pack, 0 to 32.
        numel: the number of codes that were packed.

    Returns:
        A 1-D tensor of ``numel`` codes: ``uint8`` for widths up to 8, ``int32`` up to 31, else ``int64``.
    """
    _check_bits(bits)
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"`packed` holds {packed.numel()} bytes but {numel} codes of {bits} bits need {expected}."
        )
    if bits == 0 or numel == 0:
        dtype = torch.uint8 if bits <= 8 else torch.int32 if bits <= 31 else torch.int64
        return torch.zeros(numel, dtype=dtype, device=packed.device)
    n8 = (numel + 7) // 8 * 8
    if bits > 8:
        wide = torch.int64 if bits > 31 else torch.int32
        low_byte = packed[:n8].to(wide)
        high = unpack_bits(packed[n8:], bits - 8, n8).to(wide)
        return ((high << 8) | low_byte)[:numel]
    if bits == 8:
        return packed[:numel]
    out: Tensor | None = None
    offset = 0
    for low, width in _planes(bits):
        size = n8 * width // 8
        plane = _unpack_plane(packed[offset : offset + size], width)
        offset += size
        out = plane if out is None else out | (plane << low)
    assert out is not None
    return out[:numel]
