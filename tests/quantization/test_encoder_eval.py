"""Converted nn.TransformerEncoder layers in eval(): the fused fast path must not bypass (or crash on) them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_parallel.quantization import convert_to_bnb, convert_to_qat, export_quantized


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def _slow_path(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module-by-module forward (torch takes it whenever gradients are on)."""
    with torch.enable_grad():
        return model(x).detach()


def test_qat_encoder_in_eval_goes_through_the_quantizers() -> None:
    x = torch.randn(3, 5, 16)
    model = convert_to_qat(_encoder(), weight_bits=4, group_size=8)
    model(x)  # a training-mode call starts the activation step sizes
    model.eval()
    with torch.no_grad():
        fast = model(x)
    torch.testing.assert_close(fast, _slow_path(model, x))
    with torch.no_grad():
        float_model = _encoder().eval()(x)
    assert not torch.allclose(fast, float_model, atol=1e-3)  # the quantizers do act


def test_exported_encoder_runs_in_eval_and_matches_the_qat_model() -> None:
    x = torch.randn(3, 5, 16)
    model = convert_to_qat(_encoder(), weight_bits=4, group_size=8)
    model(x)
    model.eval()
    exported = export_quantized(model, scale_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))


def test_bnb_int8_encoder_validates() -> None:
    pytest.importorskip("bitsandbytes")
    x = torch.randn(3, 5, 16)
    model = convert_to_bnb(_encoder(), quant_type="int8").eval()
    with torch.no_grad():
        out = model(x)  # was: "self and mat2 must have the same dtype" from the fused kernel
    torch.testing.assert_close(out, _slow_path(model, x))


def test_bnb_nf4_in_eval_falls_back_to_the_dequantized_weight_with_a_warning() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_parallel.quantization import bnb_layers

    torch.manual_seed(0)
    model = convert_to_bnb(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), quant_type="nf4")
    x = torch.randn(3, 16)
    train_out = model(x).detach()  # bitsandbytes' training path: dequantized weight times the input
    model.eval()
    bnb_layers._WARNED_NF4 = False
    with pytest.warns(UserWarning, match="NF4 CPU kernel failed"), torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, train_out)
