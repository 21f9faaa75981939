"""Bit packing: exact round trips for every width, sizes, and bad input."""

from __future__ import annotations

import pytest
import torch

from lightning_parallel.compression.bitpack import pack_bits, packed_nbytes, unpack_bits
from lightning_parallel.compression.masks import is_binary, pack_mask, unpack_mask


def test_round_trip_every_width() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in range(33):
        for numel in (0, 1, 7, 8, 9, 1001):
            codes = torch.randint(0, 2**bits, (numel,), generator=gen)
            packed = pack_bits(codes, bits)
            assert packed.dtype == torch.uint8
            assert packed.numel() == packed_nbytes(numel, bits) == ((numel + 7) // 8) * bits
            assert torch.equal(unpack_bits(packed, bits, numel).long(), codes), (bits, numel)


def test_extreme_codes_and_layout() -> None:
    codes = torch.tensor([0, 3, 1, 2, 3, 3, 0, 1])
    packed = pack_bits(codes, 2)
    # planar: 8 codes -> 4 rows of 2; byte j holds code j of row i at bits 2i..2i+1
    rows = codes.view(4, 2)
    assert packed.tolist() == [sum(int(rows[i, j]) << (2 * i) for i in range(4)) for j in range(2)]
    top = torch.full((9,), 2**32 - 1, dtype=torch.int64)
    assert torch.equal(unpack_bits(pack_bits(top, 32), 32, 9), top)
    assert unpack_bits(pack_bits(codes, 2), 2, 8).dtype == torch.uint8


def test_bad_bits_and_sizes() -> None:
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[0, 32\], got bits=33"):
        pack_bits(torch.zeros(3, dtype=torch.long), 33)
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[0, 32\], got bits=-1"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), -1, 3)
    with pytest.raises(ValueError, match="`packed` holds 3 bytes but 9 codes of 2 bits need 4"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 9)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_masks_take_one_bit(dtype: torch.dtype) -> None:
    x = (torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5).to(dtype)
    assert is_binary(x)
    packed = pack_mask(x)
    assert packed.nbytes == (x.numel() + 7) // 8
    out = unpack_mask(packed)
    assert out.dtype == dtype and out.shape == x.shape and torch.equal(out, x)
    assert not is_binary(torch.tensor([0, 1, 2]))
