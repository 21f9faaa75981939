"""Error-bounded codec: |x_hat - x| <= eb for every element, whatever the input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_parallel.compression import ErrorBoundedCodec
from lightning_parallel.compression.lossless import zstd_available

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _check_bound(x: torch.Tensor, y: torch.Tensor, eb: float) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype
    xd, yd = x.double(), y.double()
    finite = torch.isfinite(xd)
    # NaN and +-inf pass through exactly
    assert torch.equal(torch.isnan(yd), torch.isnan(xd))
    assert torch.equal(yd[torch.isinf(xd)], xd[torch.isinf(xd)])
    err = (yd[finite] - xd[finite]).abs()
    assert err.numel() == 0 or float(err.max()) <= eb, float(err.max())
    # exact zeros stay exact zeros
    assert bool((yd[xd == 0] == 0).all())


@st.composite
def tensors(draw: st.DrawFn) -> tuple[torch.Tensor, float]:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    numel = math.prod(shape)
    kind = draw(st.sampled_from(["normal", "relu", "constant", "denormal", "huge", "nonfinite"]))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen, dtype=torch.float64) * scale
    if kind == "relu":
        x = x.clamp(min=0)
    elif kind == "constant":
        x = torch.full((numel,), draw(st.sampled_from([0.0, -2.5, 3e4])), dtype=torch.float64)
    elif kind == "denormal":
        x = x * torch.finfo(dtype).tiny
    elif kind == "huge":
        x = x * torch.finfo(dtype).max / 8 / max(scale, 1.0)
    elif kind == "nonfinite" and numel:
        special = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
        idx = torch.randint(0, numel, (max(1, numel // 3),), generator=gen)
        x[idx] = special[torch.randint(0, 3, idx.shape, generator=gen)]
    eb = draw(st.sampled_from([1e-6, 1e-3, 0.05, 0.5, 10.0]))
    return x.to(dtype).view(shape), eb


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors(), st.booleans())
def test_absolute_bound_holds_for_any_input(case: tuple[torch.Tensor, float], zero_mask: bool) -> None:
    x, eb = case
    codec = ErrorBoundedCodec(eb, mode="absolute", zero_mask=zero_mask)
    enc = codec.encode(x)
    _check_bound(x, codec.decode(enc), eb)
    # unpack may run several times: decoding again gives the same tensor
    assert torch.equal(codec.decode(enc), codec.decode(enc)) or bool(torch.isnan(x).any())


@settings(max_examples=60, deadline=None)
@given(tensors())
def test_relative_bound_holds_for_any_input(case: tuple[torch.Tensor, float]) -> None:
    x, _ = case
    codec = ErrorBoundedCodec(1e-2, mode="relative")
    eb = codec.absolute_bound(x)
    _check_bound(x, codec.roundtrip(x), eb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compresses_relu_activations(dtype: torch.dtype) -> None:
    x = torch.randn(64, 64, 16, generator=torch.Generator().manual_seed(0)).clamp(min=0).to(dtype)
    codec = ErrorBoundedCodec(1e-2)
    enc = codec.encode(x)
    assert enc.raw is None and enc.exc_index is None
    # 1e-2 of the range: 51 bins -> 6 bits, half the elements zero -> 1 + 6/2 bits per element;
    # bf16 keeps half an ulp (0.4% of max|x|) of margin for the final rounding: one more bit
    bits = 7 if dtype == torch.bfloat16 else 6
    assert enc.bits == bits and enc.nonzero is not None
    raw_bits = torch.finfo(dtype).bits
    assert x.numel() * x.element_size() / enc.nbytes == pytest.approx(raw_bits / (1 + bits / 2), rel=0.05)
    _check_bound(x, codec.decode(enc), codec.absolute_bound(x))


def test_denormal_and_tiny_bounds_fall_back_to_exact() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 1e3
    codec = ErrorBoundedCodec(1e-9, mode="absolute")  # below float32 resolution at 1e3
    enc = codec.encode(x)
    assert enc.raw is not None
    assert torch.equal(codec.decode(enc), x)


@pytest.mark.skipif(not zstd_available(), reason="zstandard (the `zstd` extra) is not installed")
def test_zstd_stage_is_lossless_and_smaller() -> None:
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2)).clamp(min=0)
    x[:128] = 0  # long runs, as in dead channels
    plain, zstd = ErrorBoundedCodec(1e-2), ErrorBoundedCodec(1e-2, lossless="zstd")
    ep, ez = plain.encode(x), zstd.encode(x)
    assert torch.equal(plain.decode(ep), zstd.decode(ez))
    assert ez.nbytes < ep.nbytes


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"`error_bound` must be a finite number > 0, got error_bound=0"):
        ErrorBoundedCodec(0)
    with pytest.raises(ValueError, match=r"`error_bound` must be a finite number > 0, got error_bound=-1"):
        ErrorBoundedCodec(-1.0)
    with pytest.raises(ValueError, match=r"`mode` must be 'absolute' or 'relative', got mode='rel'"):
        ErrorBoundedCodec(1e-2, mode="rel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`lossless` must be 'none' or 'zstd', got lossless='lz4'"):
        ErrorBoundedCodec(1e-2, lossless="lz4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`error_bound` must be >= 0, got error_bound=-0.1"):
        ErrorBoundedCodec(1e-2).encode(torch.ones(3), error_bound=-0.1)
