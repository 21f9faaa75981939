"""Adaptive error control: the analytic weight-gradient error and the controller built on it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_parallel.compression import (
    AdaptiveErrorController,
    ErrorBoundedCodec,
    SavedTensorCompressor,
    layer_error_bound,
)


def _weight_grad(
    lin: nn.Linear, x: torch.Tensor, delta: torch.Tensor, compressor: SavedTensorCompressor | None
) -> torch.Tensor:
    lin.zero_grad()
    if compressor is None:
        out = lin(x)
    else:
        with compressor:
            out = lin(x)
    out.backward(delta)
    assert lin.weight.grad is not None
    return lin.weight.grad.clone()


@pytest.mark.parametrize("eb", [1e-3, 3e-2])
def test_linear_weight_gradient_error_matches_analytic_estimate(eb: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n, fan_in, fan_out = 512, 96, 48
    lin = nn.Linear(fan_in, fan_out)
    x = torch.randn(n, fan_in, generator=gen, requires_grad=True)
    delta = torch.randn(n, fan_out, generator=gen)
    exact = _weight_grad(lin, x, delta, None)
    compressor = SavedTensorCompressor(ErrorBoundedCodec(eb, mode="absolute", zero_mask=False), min_numel=1)
    compressor.exclude(lin)
    err = (_weight_grad(lin, x, delta, compressor) - exact).norm()
    # errors uniform in (-eb, eb): ||dW_err||_F ~ eb / sqrt(3) * sqrt(fan_in) * ||delta||_F
    estimate = eb / math.sqrt(3) * math.sqrt(fan_in) * delta.norm()
    assert 0.85 < float(err / estimate) < 1.1


def test_layer_error_bound_formula() -> None:
    assert layer_error_bound(0.1, 2.0, 4.0, 12) == pytest.approx(0.1 * 2.0 / (2.0 * 4.0))
    assert layer_error_bound(0.1, 2.0, 0.0, 12) == math.inf


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    compressor: SavedTensorCompressor | None,
    controller: AdaptiveErrorController | None,
) -> list[torch.Tensor]:
    model.zero_grad()
    if controller is not None:
        controller.begin_step()
    if compressor is None:
        loss = nn.functional.cross_entropy(model(x), y)
    else:
        with compressor:
            loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if controller is not None:
        controller.end_step()
    return [m.weight.grad.clone() for m in model if isinstance(m, nn.Linear)]  # type: ignore[union-attr]


@pytest.mark.parametrize("target", [0.02, 0.1])
def test_controller_reaches_target_weight_gradient_error(target: float) -> None:
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 64, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    controller = AdaptiveErrorController(target_error=target, adapt_interval=2, max_relative_bound=1.0)
    controller.attach(model)
    compressor = SavedTensorCompressor(ErrorBoundedCodec(1e-4), min_numel=1, policy=controller)
    compressor.exclude(model)
    _step(model, x, y, compressor, controller)  # calibration step
    assert controller.step == 1 and set(controller.layer_bounds) == {"0", "2", "4"}
    # the inputs of the three Linear layers (the loss's log-softmax output is kept exact)
    assert len(controller.bounds) == 3
    exact = _step(model, x, y, None, None)
    got = _step(model, x, y, compressor, controller)
    # the first layer's input is the data (errors hit it directly); deeper ones also see the
    # errors of the layers above through backward, and exact zeros make the estimate an upper bound
    for g, e in zip(got, exact):
        rel = float((g - e).norm() / e.norm())
        assert 0.2 * target < rel < 1.6 * target, (rel, target)


def test_controller_state_round_trip_and_bad_arguments() -> None:
    controller = AdaptiveErrorController()
    controller.step, controller.bounds, controller.layer_bounds = 7, {0: 0.5, 3: 0.25}, {"fc": 0.5}
    other = AdaptiveErrorController()
    other.load_state_dict(controller.state_dict())
    assert other.state_dict() == {"step": 7, "bounds": {0: 0.5, 3: 0.25}, "layer_bounds": {"fc": 0.5}}
    with pytest.raises(ValueError, match="`target_error` must be > 0, got target_error=0"):
        AdaptiveErrorController(target_error=0)
    with pytest.raises(ValueError, match="`adapt_interval` must be an integer >= 1, got adapt_interval=0"):
        AdaptiveErrorController(adapt_interval=0)
    with pytest.raises(ValueError, match="`max_relative_bound` must be > 0, got max_relative_bound=-1"):
        AdaptiveErrorController(max_relative_bound=-1)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(4, 64, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, T, 16)
        # the attention lays its output out as (batch, T, heads, 16): `proj` reads the very storage it saved
        return self.proj(y.transpose(1, 2).reshape(4, 64, 32))


def test_tensors_attention_saves_keep_the_codec_bound() -> None:
    model = _Attention()
    x = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(2))
    controller = AdaptiveErrorController(target_error=0.3, adapt_interval=1)
    controller.attach(model)
    compressor = SavedTensorCompressor(ErrorBoundedCodec(1e-2), min_numel=1, policy=controller)
    compressor.exclude(model)
    controller.begin_step()
    with controller.forward_context(), compressor:
        out = model(x)
    out.square().mean().backward()
    controller.end_step()
    assert set(controller.layer_bounds) == {"qkv", "proj"}
    # slot 0 is the data read by `qkv`: bounded by the formula. The attention output, read by `proj` too,
    # and the query, key and value keep the codec's own bound (no entry).
    assert set(controller.bounds) == {0}, controller.bounds
    assert controller.bound(1, torch.ones(3)) is None
    # without the watch (not a calibration step, or a controller that never saw attention) `proj`'s formula
    # would bound the attention output as well
    controller.begin_step()
    with compressor:
        out = model(x)
    out.square().mean().backward()
    controller.end_step()
    assert set(controller.bounds) == {0, 4}, controller.bounds
