"""Inference layers with real low-bit weights, exported from the QAT layers of :mod:`.qat_layers`.

Each stores int8 / packed int4 weight codes with float16 step sizes (:class:`QuantizedWeight`). The forward
quantizes the input with the learned activation step size (as in training) and uses the dequantized weight,
so its outputs match the fake-quantized training model up to the float16 rounding of the step sizes. What
the layer types share (storage, input path) lives once in :class:`_QuantizedLayer`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.layers.attention import attention_forward
from lightning_parallel.quantization.fake_quantize import quantize
from lightning_parallel.quantization.qat_layers import QATConv1D, QATConv2d, QATLinear, QATMultiheadAttention
from lightning_parallel.quantization.quantized_weight import (
    QuantizedWeight,
    export_parts,
    input_step,
    quantized_weight,
)


def _dequantize(weight: nn.Module, dtype: torch.dtype) -> Tensor:
    assert isinstance(weight, QuantizedWeight)
    return weight.dequantize(dtype)


def _quantize(input: Tensor, scale: Tensor | None, qrange: tuple[int, int]) -> Tensor:
    if scale is None:
        return input
    step = scale.to(input.dtype)
    return quantize(input, step, *qrange) * step


class _QuantizedLayer(nn.Module):
    """Weight codes, float bias and the input's step size and integer grid.

    Args:
        weight: the quantized weight.
        bias: the float bias, or ``None``.
        input_scale: the activation step size, or ``None`` when inputs stay in float.
        input_range: the activation integer grid ``(qmin, qmax)``.
    """

    bias: Tensor | None
    input_scale: Tensor | None
    converted = True

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: Tensor | None,
        input_scale: Tensor | None,
        input_range: tuple[int, int],
    ) -> None:
        super().__init__()
        self.qweight = weight
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer(
            "input_scale", None if input_scale is None else input_scale.detach().float().clone()
        )
        self.input_range = input_range

    def _quantize_input(self, input: Tensor) -> Tensor:
        return _quantize(input, self.input_scale, self.input_range)


class QuantizedLinear(_QuantizedLayer):
    """A Linear layer storing int8 / packed int4 weight codes with float16 step sizes.

    Args:
        weight: the quantized weight.
        bias: the float bias, or ``None``.
        input_scale: the activation step size, or ``None`` when inputs stay in float.
        input_range: the activation integer grid ``(qmin, qmax)``.
    """

    @property
    def in_features(self) -> int:
        """Input width."""
        return int(self.qweight.shape[1])

    @property
    def out_features(self) -> int:
        """Output width."""
        return int(self.qweight.shape[0])

    @classmethod
    def from_qat(
        cls, layer: QATLinear | QATConv1D, *, scale_dtype: torch.dtype = torch.float16
    ) -> QuantizedLinear:
        """Export a trained :class:`QATLinear` (or a :class:`QATConv1D`, whose weight it stores transposed).

        Args:
            layer: the QAT layer.
            scale_dtype: storage dtype of the weight step sizes.
        """
        weight: Any = layer.weight
        weight = weight.t() if isinstance(layer, QATConv1D) else None
        return cls(*export_parts(layer, scale_dtype, weight))

    @override
    def forward(self, input: Tensor) -> Tensor:
        input = self._quantize_input(input)
        return F.linear(input, self.qweight.dequantize(input.dtype), self.bias)

    @override
    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class QuantizedConv2d(_QuantizedLayer):
    """A Conv2d layer storing int8 / packed int4 weight codes with float16 step sizes.

    Args:
        weight: the quantized weight.
        bias: the float bias, or ``None``.
        input_scale: the activation step size, or ``None`` when inputs stay in float.
        input_range: the activation integer grid ``(qmin, qmax)``.
        conv: the source layer, for its stride, padding, dilation, groups and padding mode.
    """

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: Tensor | None,
        input_scale: Tensor | None,
        input_range: tuple[int, int],
        conv: nn.Conv2d,
    ) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={conv.padding_mode!r} is not supported by QuantizedConv2d; use 'zeros' or "
                "list the layer in ignore_modules."
            )
        super().__init__(weight, bias, input_scale, input_range)
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups

    @classmethod
    def from_qat(cls, layer: QATConv2d, *, scale_dtype: torch.dtype = torch.float16) -> QuantizedConv2d:
        """Export a trained :class:`QATConv2d`.

        Args:
            layer: the QAT layer.
            scale_dtype: storage dtype of the weight step sizes.
        """
        return cls(*export_parts(layer, scale_dtype), layer)

    @override
    def forward(self, input: Tensor) -> Tensor:
        input = self._quantize_input(input)
        weight = self.qweight.dequantize(input.dtype)
        return F.conv2d(input, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)  # type: ignore[arg-type]


class QuantizedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with int8 / packed int4 projection weights, exported from
    :class:`QATMultiheadAttention` (same forward, through
    :func:`~lightning_parallel.layers.attention.attention_forward`).

    Built by :meth:`from_qat`. It keeps the attributes ``nn.TransformerEncoderLayer`` reads
    (``batch_first``, ``num_heads``, ``in_proj_bias``, ``_qkv_same_embed_dim``).
    """

    converted = True
    in_proj: nn.ModuleList
    out_proj: QuantizedWeight
    input_scales: Tensor | None
    input_range: tuple[int, int]
    in_proj_bias: Tensor | None
    out_proj_bias: Tensor | None
    bias_k: Tensor | None
    bias_v: Tensor | None

    @classmethod
    def from_qat(
        cls, layer: QATMultiheadAttention, *, scale_dtype: torch.dtype = torch.float16
    ) -> QuantizedMultiheadAttention:
        """Export a trained :class:`QATMultiheadAttention`.

        Args:
            layer: the QAT attention.
            scale_dtype: storage dtype of the weight step sizes.
        """
        out = cls()
        for name in (
            "embed_dim",
            "num_heads",
            "batch_first",
            "dropout",
            "add_zero_attn",
            "_qkv_same_embed_dim",
        ):
            setattr(out, name, getattr(layer, name))
        raw = (
            [layer.in_proj_weight]
            if layer._qkv_same_embed_dim
            else [layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight]
        )
        out.in_proj = nn.ModuleList(
            quantized_weight(q, w, scale_dtype) for q, w in zip(layer.in_proj_quantizers, raw)
        )
        out.out_proj = quantized_weight(layer.out_proj_quantizer, layer.out_proj.weight, scale_dtype)
        for name, value in (
            ("in_proj_bias", layer.in_proj_bias),
            ("out_proj_bias", layer.out_proj.bias),
            ("bias_k", layer.bias_k),
            ("bias_v", layer.bias_v),
        ):
            out.register_buffer(name, None if value is None else value.detach().clone())
        steps = [input_step(q) for q in layer.input_quantizers] if layer.input_quantizers is not None else []
        out.register_buffer(
            "input_scales",
            torch.stack([s.float() for s, _ in steps if s is not None]) if steps else None,
        )
        out.input_range = steps[0][1] if steps else (0, 0)
        return out.train(layer.training)

    @override
    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (same arguments), with the dequantized weights."""
        dtype = (args[0] if args else kwargs["query"]).dtype
        if len(self.in_proj) == 1:
            w_q, w_k, w_v = _dequantize(self.in_proj[0], dtype).chunk(3)
        else:
            w_q, w_k, w_v = (_dequantize(w, dtype) for w in self.in_proj)
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        weights = (w_q, w_k, w_v, b_q, b_k, b_v, self.out_proj.dequantize(dtype), self.out_proj_bias)
        return attention_forward(self, *args, weights=weights, project=self._project, **kwargs)

    def _project(self, index: int, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        scale = None if self.input_scales is None else self.input_scales[index]
        return F.linear(_quantize(x, scale, self.input_range), weight, bias)
