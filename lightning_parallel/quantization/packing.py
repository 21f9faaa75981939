"""Storage of integer weight codes: int8 as is, 2 to 4 bits two to a byte.

A code ``q`` of at most 4 bits is stored as its 4-bit two's complement nibble; element ``2j`` of a row goes to
the low nibble of byte ``j``, element ``2j + 1`` to the high nibble (a row of odd length is padded by one).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack signed integer codes ``(C, K)`` for storage.

    Args:
        codes: int8 codes within the ``bits``-bit signed range.
        bits: bit width of the codes; 2 to 4 packs two per byte (``uint8`` of shape ``(C, ceil(K/2))``),
            5 to 8 keeps ``int8`` ``(C, K)``.
    """
    if bits > 4:
        return codes.to(torch.int8).contiguous()
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of shape ``(C, k)``.

    Args:
        packed: the stored tensor.
        bits: bit width used by :func:`pack_codes`.
        k: number of codes per row before packing.
    """
    if bits > 4:
        return packed
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    nibbles = torch.stack((low, high), dim=2).reshape(packed.shape[0], -1)[:, :k]
    return (nibbles ^ 8) - 8  # sign-extend the 4-bit two's complement
