"""k-bit codec: per-group error, unbiased stochastic rounding, exact zeros, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_parallel.compression import KBitCodec, PassthroughCodec, make_codec


def _group_ranges(x: torch.Tensor, group: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % group
    flat = torch.cat([flat, flat[-1:].expand(pad)]) if pad else flat
    v = flat.view(-1, group)
    return (v.amax(1) - v.amin(1)).repeat_interleave(group)[: x.numel()]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_error_within_one_bin(bits: int, stochastic: bool) -> None:
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(bits))
    codec = KBitCodec(bits, group_size=128, stochastic=stochastic, zero_mask=False)
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert y.shape == x.shape and y.dtype == x.dtype
    step = _group_ranges(x, 128) / (2**bits - 1)
    bound = step if stochastic else step / 2
    assert bool(((y - x).abs().reshape(-1) <= bound * (1 + 1e-5) + 1e-6).all())
    # codes + a float32 minimum and scale per group
    groups = math.ceil(x.numel() / 128)
    assert enc.nbytes == math.ceil(x.numel() / 8) * bits + 8 * groups


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.rand(256, generator=torch.Generator().manual_seed(0))
    codec = KBitCodec(1, group_size=256, zero_mask=False, seed=3)
    mean = torch.stack([codec.roundtrip(x) for _ in range(2000)]).mean(0)
    # 1-bit: each draw is min or max; std of the mean <= range / (2 sqrt(2000)) ~ 0.011
    assert float((mean - x).abs().max()) < 0.06
    assert abs(float((mean - x).mean())) < 0.005


def test_codec_rng_leaves_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    KBitCodec(2).roundtrip(torch.randn(1000, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.rand(4), expected)


def test_zero_mask_keeps_relu_zeros_exact() -> None:
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)).clamp(min=0)
    x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    codec = KBitCodec(2)
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert enc.nonzero is not None
    assert torch.equal(y == 0, x == 0)
    assert torch.equal(y[0, :3].isnan(), x[0, :3].isnan()) and torch.equal(y[0, 1:3], x[0, 1:3])
    # about half zeros: 1 mask bit + half of (2 bits + 64 bits per 256 values)
    ratio = x.numel() * 4 / enc.nbytes
    assert 14.0 < ratio < 16.5
    # a tensor without zeros is not worth a mask
    assert codec.encode(torch.randn(4096) + 10).nonzero is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    x = torch.randn(2048, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = KBitCodec(8, zero_mask=False).roundtrip(x)
    assert y.dtype == dtype
    assert float((y.double() - x.double()).abs().max()) < 0.05


def test_empty_and_tiny_inputs() -> None:
    codec = KBitCodec(4)
    for x in (torch.empty(0, 3), torch.tensor([2.5]), torch.zeros(7)):
        y = codec.roundtrip(x)
        assert y.shape == x.shape
        assert torch.allclose(y, x)


def test_passthrough_is_the_same_storage() -> None:
    x = torch.randn(10)
    y = PassthroughCodec().roundtrip(x)
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, x)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"`bits` must be one of \(1, 2, 4, 8\), got bits=3"):
        KBitCodec(3)
    with pytest.raises(ValueError, match="`group_size` must be a positive integer, got group_size=0"):
        KBitCodec(2, group_size=0)
    with pytest.raises(
        ValueError, match=r"`codec` must be one of \('error_bounded', 'kbit', 'none'\), got codec='jpeg'"
    ):
        make_codec("jpeg")
    with pytest.raises(
        ValueError, match="`error_bound_mode` must be 'absolute' or 'relative', got error_bound_mode='x'"
    ):
        make_codec("error_bounded", error_bound_mode="x")
    with pytest.raises(ValueError, match="`lossless` must be 'none' or 'zstd', got lossless='x'"):
        make_codec("error_bounded", lossless="x")
