"""CompressedActivationPrecision: options validated once where they are consumed; a no-op run says so."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_parallel.plugins import CompressedActivationPrecision


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lossless": "gzip"}, ValueError, r"`lossless` must be 'none' or 'zstd', got lossless='gzip'"),
        ({"codec": "error_bounded", "lossless": "gzip"}, ValueError, r"got lossless='gzip'"),
        ({"lossless": "zstd"}, ValueError, r"`lossless='zstd'` applies to codec='error_bounded' only, got codec='kbit'"),
        ({"codec": "error_bounded", "error_bound": float("inf")}, ValueError, r"finite number > 0, got error_bound=inf"),
        ({"codec": "error_bounded", "error_bound": "x"}, TypeError, r"`error_bound` must be a number.*error_bound='x'"),
        ({"bits": 3}, ValueError, r"`bits` must be one of \(1, 2, 4, 8\), got bits=3"),
        ({"codec": "gzip"}, ValueError, r"`codec` must be one of .*got codec='gzip'"),
        ({"min_numel": "big"}, TypeError, r"`min_numel` must be an integer number of elements, got min_numel='big'"),
        ({"codec": "error_bounded", "adaptive": True, "target_error": "x"}, TypeError, r"target_error='x'"),
    ],
)
def test_bad_option_is_refused_naming_it(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CompressedActivationPrecision(**kwargs)


def _train_step(plugin: CompressedActivationPrecision, model: nn.Module, x: torch.Tensor) -> None:
    with plugin.train_step_context():
        loss = model(x).pow(2).sum()
    loss.backward()


def test_nothing_compressed_warns_once_with_counts() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # every activation < 1024 elements
    plugin = CompressedActivationPrecision(log_stats=False)
    model = plugin.convert_module(model)
    with pytest.warns(UserWarning, match=r"compressed none of the \d+ tensors .* \d+ have fewer than min_numel=1024"):
        _train_step(plugin, model, torch.randn(8, 8))
    assert plugin.last_stats.compressed_tensors == 0 and plugin.last_stats.small_tensors > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(plugin, model, torch.randn(8, 8))  # once only


def test_compressing_run_does_not_warn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    plugin = CompressedActivationPrecision(log_stats=False)
    model = plugin.convert_module(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(plugin, model, torch.randn(64, 64))
    assert plugin.last_stats.compressed_tensors > 0


def test_adaptive_plugin_trains_through_an_empty_saved_tensor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    plugin = CompressedActivationPrecision(codec="error_bounded", adaptive=True, adapt_interval=1, min_numel=0, log_stats=False)
    model = plugin.convert_module(model)
    for _ in range(2):
        with plugin.train_step_context():
            out = model(torch.randn(16, 64))
            loss = out.pow(2).sum() + (out[:, :0] * out[:, :0]).sum()
        loss.backward()
        assert plugin.controller is not None
        plugin.controller.end_step()  # what post_backward does after the inner precision's
    assert plugin.controller.step == 2
