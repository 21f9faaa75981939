"""Module swapping, export to real low-bit weights, and quantizer state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_parallel.quantization import (
    QATConv2d,
    QATLinear,
    QATMultiheadAttention,
    QuantizedConv2d,
    QuantizedLinear,
    convert_to_qat,
    export_quantized,
    load_quantizer_state_dict,
    quantizer_state_dict,
    weight_bytes,
)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(self.stem(x))))


def _train(model: nn.Module, steps: int = 6, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_convert_swaps_layers_and_keeps_state_dict_keys() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    keys = set(model.state_dict())
    weight = model.body[1].weight
    convert_to_qat(model, ignore_modules=["stem"], module_bits={"head.3": 4}, group_size=16)
    assert type(model.stem) is nn.Conv2d
    assert isinstance(model.body[1], QATConv2d) and model.body[1].weight is weight
    assert isinstance(model.head[1], QATLinear) and model.head[1].weight_quantizer.bits == 8
    assert model.head[1].weight_quantizer.group_size is None  # 8-bit layers stay per channel
    assert model.head[3].weight_quantizer.bits == 4 and model.head[3].weight_quantizer.group_size == 16
    assert set(model.state_dict()) == keys
    # step sizes are parameters the optimizer sees
    names = {n for n, _ in model.named_parameters()}
    assert "body.1.weight_quantizer.factor" in names and "head.1.input_quantizer.factor" in names


def test_qat_int8_output_close_to_float() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(8, 1, 8, 8)
    ref = model(x)
    qat = convert_to_qat(copy.deepcopy(model))
    out = qat(x)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, atol=0.02 * ref.abs().max().item(), rtol=0)


def test_convert_takes_multihead_attention_as_a_whole() -> None:
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    convert_to_qat(model)
    assert isinstance(model["attn"], QATMultiheadAttention)
    # out_proj is read by the attention (never called): it stays, its weight quantized by the attention
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model["fc"], QATLinear)


def test_convert_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"ignore_modules has pattern 'stme' that matches no module"):
        convert_to_qat(TinyNet(), ignore_modules=["stme"])
    with pytest.raises(ValueError, match=r"module_bits has pattern 'nope\.\*' that matches no module"):
        convert_to_qat(TinyNet(), module_bits={"nope.*": 4})
    with pytest.raises(ValueError, match=r"module_bits\['head'\]=12 is not supported"):
        convert_to_qat(TinyNet(), module_bits={"head": 12})
    with pytest.raises(ValueError, match=r"model Sequential has no .*Linear or Conv2d layer to quantize"):
        convert_to_qat(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(
        ValueError, match=r"has no .*Linear or Conv2d layer to quantize \(ignore_modules=\['\*'\]\)"
    ):
        convert_to_qat(TinyNet(), ignore_modules=["*"])
    with pytest.raises(ValueError, match=r"bits=3.5 is not supported"):
        convert_to_qat(TinyNet(), weight_bits=3.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"group_size=-1 must be a positive integer"):
        convert_to_qat(TinyNet(), group_size=-1)


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 16), (3, 8)])
def test_export_matches_qat_model(bits: int, group_size: int | None) -> None:
    torch.manual_seed(0)
    model = convert_to_qat(TinyNet(), weight_bits=bits, group_size=group_size, ignore_modules=["stem"])
    _train(model)  # move step sizes and weights away from their start
    model.eval()
    assert any(
        not torch.allclose(m.weight_quantizer.factor, torch.ones_like(m.weight_quantizer.factor))
        for m in model.modules()
        if isinstance(m, (QATLinear, QATConv2d))
    )
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        exported = export_quantized(model)
        out = exported(x)
    assert isinstance(exported.body[1], QuantizedConv2d) and isinstance(exported.head[1], QuantizedLinear)
    assert isinstance(model.body[1], QATConv2d), "export copies by default"
    # float16 step sizes: relative weight error <= 2^-11, which can move a downstream activation across a
    # rounding boundary (one activation step); with float32 step sizes the export is exact.
    torch.testing.assert_close(out, expected, atol=1e-2 * expected.abs().max().item(), rtol=0)
    with torch.no_grad():
        exact = export_quantized(model, scale_dtype=torch.float32)(x)
    torch.testing.assert_close(exact, expected, atol=1e-5, rtol=1e-5)
    packed = exported.body[1].qweight.packed
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)


def test_export_weight_sizes() -> None:
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(128, 384), nn.Linear(128, 512), nn.Linear(512, 128))
    stored8, full = weight_bytes(export_quantized(convert_to_qat(copy.deepcopy(layers))))
    assert full == 4 * (128 * 384 + 128 * 512 + 512 * 128)
    assert full / stored8 >= 3.9
    stored4, _ = weight_bytes(
        export_quantized(convert_to_qat(copy.deepcopy(layers), weight_bits=4, group_size=64))
    )
    assert full / stored4 >= 7.0


def test_export_errors() -> None:
    with pytest.raises(ValueError, match=r"module TinyNet has no QAT layer to export"):
        export_quantized(TinyNet())
    with pytest.raises(ValueError, match=r"scale_dtype=torch.int8 is not supported"):
        export_quantized(convert_to_qat(TinyNet()), scale_dtype=torch.int8)


def test_quantizer_state_round_trip() -> None:
    torch.manual_seed(0)
    model = convert_to_qat(TinyNet(), ignore_modules=["stem"])
    _train(model)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    expected = model(x)
    state = quantizer_state_dict(model)
    assert "body.1.weight_quantizer.factor" in state and "head.1.input_quantizer.init_scale" in state

    fresh = TinyNet()
    fresh.load_state_dict(model.state_dict())  # the float model takes the QAT model's state_dict as is
    convert_to_qat(fresh, ignore_modules=["stem"])
    load_quantizer_state_dict(fresh, state)
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected)

    other = convert_to_qat(TinyNet())  # stem quantized too: one quantizer pair more
    with pytest.raises(ValueError, match=r"quantizer state does not fit the model: missing \['stem"):
        load_quantizer_state_dict(other, state)
    int4 = convert_to_qat(TinyNet(), ignore_modules=["stem"], weight_bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"expects \(32, 1, 1, 1\)|has shape"):
        load_quantizer_state_dict(int4, state)
