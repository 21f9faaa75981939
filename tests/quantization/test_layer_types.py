"""QAT of Hugging Face Conv1D and nn.MultiheadAttention against plain-Linear references; export of both."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_parallel.quantization import (
    QATConv1D,
    QATLinear,
    QATMultiheadAttention,
    QuantizedLinear,
    QuantizedMultiheadAttention,
    convert_to_qat,
    export_quantized,
)
from tests.helpers.attention import ExplicitAttention


def _train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_qat_conv1d_equals_qat_linear_with_the_transposed_weight() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 16)  # weight (16, 12)
    nn.init.normal_(conv.weight, std=0.2)
    linear = nn.Linear(16, 12)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    keys = set(nn.Sequential(conv).state_dict())
    mine = convert_to_qat(nn.Sequential(conv), weight_bits=4, group_size=8)
    ref = convert_to_qat(nn.Sequential(linear), weight_bits=4, group_size=8)
    assert isinstance(mine[0], QATConv1D) and isinstance(ref[0], QATLinear)
    assert set(mine.state_dict()) == keys and mine[0].weight is conv.weight
    x = torch.randn(4, 3, 16)
    _train_steps(mine, x)
    _train_steps(ref, x)
    torch.testing.assert_close(mine[0].weight.t(), ref[0].weight)
    torch.testing.assert_close(mine(x), ref(x))
    exported = export_quantized(mine)
    assert isinstance(exported[0], QuantizedLinear)
    torch.testing.assert_close(exported(x), export_quantized(ref)(x))


class _SelfAttention(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_qat_attention_equals_qat_of_explicit_projections(weight_bits: int) -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    ref = convert_to_qat(ExplicitAttention(attn), weight_bits=weight_bits, group_size=8)
    keys = set(_SelfAttention(attn).state_dict())
    mine = convert_to_qat(_SelfAttention(attn), weight_bits=weight_bits, group_size=8)
    assert isinstance(mine.attn, QATMultiheadAttention) and set(mine.state_dict()) == keys
    x = torch.randn(3, 5, 16)
    _train_steps(mine, x)
    _train_steps(ref, x)
    torch.testing.assert_close(mine.attn.out_proj.weight, ref.o.weight)
    torch.testing.assert_close(mine(x), ref(x))
    plain = _SelfAttention(copy.deepcopy(attn))  # the float model differs: the quantizers act
    assert not torch.allclose(plain(x), mine(x))
    exported = export_quantized(mine, scale_dtype=torch.float32)  # float32 steps: the same grid
    assert isinstance(exported.attn, QuantizedMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), mine(x))
