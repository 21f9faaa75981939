"""Vectorised bit packing of non-negative integer codes.

Design: codes of width ``bits`` (0 to 32) are packed little-endian, eight codes at a time into
``bits`` bytes. For widths up to 8 the eight codes of a group are combined into one int64 word
(``8 * bits <= 64``) and the word is split into bytes; wider codes are split into a low byte
plane, stored as is, and the remaining high bits, packed recursively. Every step is a tensor op
over all groups at once: the only Python loops run over the 8 codes of a group and the bytes of
a word, never over elements, so packing costs a few passes over the data on CPU and CUDA alike.
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
    if bits > 8:
        low = (flat & 0xFF).to(torch.uint8)
        pad = (-n) % 8
        if pad:
            low = torch.cat([low, low.new_zeros(pad)])
        high = pack_bits(flat.to(torch.int64) >> 8, bits - 8)
        return torch.cat([low, high])
    if bits == 8:
        out = flat.to(torch.uint8)
        pad = (-n) % 8
        return torch.cat([out, out.new_zeros(pad)]) if pad else out
    groups = (n + 7) // 8
    wide = flat.to(torch.int64)
    pad = groups * 8 - n
    if pad:
        wide = torch.cat([wide, wide.new_zeros(pad)])
    wide = wide.view(groups, 8) & ((1 << bits) - 1)
    word = wide[:, 0].clone()
    for i in range(1, 8):  # combine the 8 codes of every group: (groups,) int64
        word |= wide[:, i] << (i * bits)
    out = torch.empty(groups, bits, dtype=torch.uint8, device=codes.device)
    for j in range(bits):  # split each word into `bits` bytes
        out[:, j] = (word >> (8 * j)) & 0xFF
    return out.view(-1)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: the ``uint8`` tensor returned by :func:`pack_bits`.
        bits: the code width used to pack, 0 to 32.
        numel: the number of codes that were packed.

    Returns:
        A 1-D ``int64`` tensor of ``numel`` codes.
    """
    _check_bits(bits)
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"`packed` holds {packed.numel()} bytes but {numel} codes of {bits} bits need {expected}."
        )
    if bits == 0 or numel == 0:
        return torch.zeros(numel, dtype=torch.int64, device=packed.device)
    groups = (numel + 7) // 8
    if bits > 8:
        low = packed[: groups * 8].to(torch.int64)
        high = unpack_bits(packed[groups * 8 :], bits - 8, groups * 8)
        return ((high << 8) | low)[:numel]
    if bits == 8:
        return packed[:numel].to(torch.int64)
    by = packed.view(groups, bits).to(torch.int64)
    word = by[:, 0].clone()
    for j in range(1, bits):
        word |= by[:, j] << (8 * j)
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.int64, device=packed.device)
    for i in range(8):
        out[:, i] = (word >> (i * bits)) & mask
    return out.view(-1)[:numel]
