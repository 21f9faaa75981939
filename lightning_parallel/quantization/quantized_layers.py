"""Inference layers with real low-bit weights, exported from the QAT layers of :mod:`.qat_layers`.

Each stores int8 / packed int4 weight codes with float16 step sizes (:class:`QuantizedWeight`). The forward
quantizes the input with the learned activation step size (as in training) and uses the dequantized weight,
so its outputs match the fake-quantized training model up to the float16 rounding of the step sizes. What
the layer types share (storage, input path) lives once in :class:`_QuantizedLayer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.fake_quantize import quantize
from lightning_parallel.quantization.qat_layers import QATConv2d, QATLinear
from lightning_parallel.quantization.quantized_weight import QuantizedWeight, export_parts


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
        if self.input_scale is None:
            return input
        scale = self.input_scale.to(input.dtype)
        return quantize(input, scale, *self.input_range) * scale


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
    def from_qat(cls, layer: QATLinear, *, scale_dtype: torch.dtype = torch.float16) -> QuantizedLinear:
        """Export a trained :class:`QATLinear`.

        Args:
            layer: the QAT layer.
            scale_dtype: storage dtype of the weight step sizes.
        """
        return cls(*export_parts(layer, scale_dtype))

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
