"""The zero-mask helpers against boolean indexing, the dense reference."""

from __future__ import annotations

import pytest
import torch

from lightning_parallel.compression.masks import compact, pack_mask, restore_dense, unpack_mask


def _mask(n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(n, generator=g) > 0.5
    if kind == "sparse":
        return torch.rand(n, generator=g) > 0.97
    return torch.full((n,), kind == "all", dtype=torch.bool)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 1000, 4099])
@pytest.mark.parametrize("kind", ["random", "sparse", "all", "none"])
def test_compact_equals_boolean_indexing(n: int, kind: str) -> None:
    keep = _mask(n, kind, n)
    flat = torch.randn(n, generator=torch.Generator().manual_seed(1))
    got = compact(flat, keep, int(keep.sum()))
    assert torch.equal(got, flat[keep])


@pytest.mark.parametrize("n", [0, 1, 13, 1000, 4099])
@pytest.mark.parametrize("kind", ["random", "sparse", "all", "none"])
def test_restore_dense_scatters_values_back(n: int, kind: str) -> None:
    keep = _mask(n, kind, n + 5)
    flat = torch.randn(n, generator=torch.Generator().manual_seed(2)).masked_fill(~keep, 0.0)
    shape = torch.Size([n]) if n % 2 else torch.Size([1, n])
    out = restore_dense(flat[keep], pack_mask(keep.view(shape)), None, None, shape)
    assert out.shape == shape and torch.equal(out.reshape(-1), flat)
    if n:
        # values stored exactly are written over the scattered ones
        index = torch.tensor([0, n - 1], dtype=torch.int32)
        value = torch.tensor([42.0, -7.0])
        out = restore_dense(flat[keep], pack_mask(keep.view(shape)), index, value, shape)
        expected = flat.clone()
        expected[index.long()] = value
        assert torch.equal(out.reshape(-1), expected)


def test_pack_mask_round_trips_bool_and_integer_masks() -> None:
    keep = _mask(1001, "random", 3).view(7, 143)
    for mask in (keep, keep.to(torch.int64), keep.to(torch.float16)):
        back = unpack_mask(pack_mask(mask))
        assert back.dtype == mask.dtype and torch.equal(back, mask)
