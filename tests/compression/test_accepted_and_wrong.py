"""Inputs the codecs accepted and got wrong: k-bit groups wider than float32's range, empty saved tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_parallel.compression import (
    AdaptiveErrorController,
    ErrorBoundedCodec,
    KBitCodec,
    SavedTensorCompressor,
)


@pytest.mark.parametrize("bits", [1, 2, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_kbit_group_wider_than_float32_range_decodes_finite(bits: int, stochastic: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(4096, generator=gen) * 2 - 1) * 3.0e38  # finite float32 values spanning ~6e38
    x[0], x[1] = 3.3e38, -3.3e38
    codec = KBitCodec(bits, group_size=256, stochastic=stochastic, zero_mask=False)
    y = codec.roundtrip(x)
    assert torch.isfinite(y).all()
    # every decoded value lies within one bin of its input (bin = group range / (2^bits - 1))
    groups = x.view(-1, 256).double()
    width = ((groups.amax(1) - groups.amin(1)) / ((1 << bits) - 1)).repeat_interleave(256)
    assert bool(((y.double() - x.double()).abs() <= width * (1 + 1e-6)).all())


def test_kbit_ordinary_tensors_keep_float32_statistics() -> None:
    encoded = KBitCodec(2).encode(torch.randn(1024))
    assert encoded.minimum.dtype == torch.float32 and encoded.scale.dtype == torch.float32


def test_adaptive_controller_takes_an_empty_saved_tensor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    controller = AdaptiveErrorController(adapt_interval=1)
    controller.attach(model)
    compressor = SavedTensorCompressor(ErrorBoundedCodec(1e-2), min_numel=0, policy=controller)
    compressor.exclude(model)
    x = torch.randn(16, 8)
    for _ in range(2):  # a calibrating step, then one that applies the bounds
        controller.begin_step()
        with controller.forward_context(), compressor:
            out = model(x)
            empty = out[:, :0]
            loss = out.pow(2).sum() + (empty * empty).sum()  # mul saves the two empty tensors
        loss.backward()
        controller.end_step()
    assert controller.step == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"error_bound": "x"}, TypeError, r"`error_bound` must be a number, e\.g\. 1e-2, got error_bound='x'"),
        ({"error_bound": float("inf")}, ValueError, r"`error_bound` must be a finite number > 0, got error_bound=inf"),
    ],
)
def test_error_bounded_codec_names_a_bad_bound(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ErrorBoundedCodec(**kwargs)


def test_compressor_names_a_bad_min_numel() -> None:
    with pytest.raises(TypeError, match=r"`min_numel` must be an integer number of elements, got min_numel='1024'"):
        SavedTensorCompressor(KBitCodec(2), min_numel="1024")  # type: ignore[arg-type]


def test_adaptive_controller_names_a_bad_target() -> None:
    with pytest.raises(TypeError, match=r"`target_error` must be a number, got target_error='0.3'"):
        AdaptiveErrorController(target_error="0.3")  # type: ignore[arg-type]
