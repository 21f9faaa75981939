"""Inference Conv2d layer with real low-bit weights, exported from :class:`QATConv2d`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.fake_quantize import quantize
from lightning_parallel.quantization.qat_conv2d import QATConv2d
from lightning_parallel.quantization.quantized_weight import QuantizedWeight, export_parts


class QuantizedConv2d(nn.Module):
    """A Conv2d layer storing int8 / packed int4 weight codes with float16 step sizes.

    Args:
        weight: the quantized weight.
        bias: the float bias, or ``None``.
        input_scale: the activation step size, or ``None`` when inputs stay in float.
        input_range: the activation integer grid ``(qmin, qmax)``.
        conv: the source layer, for its stride, padding, dilation, groups and padding mode.
    """

    bias: Tensor | None
    input_scale: Tensor | None

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: Tensor | None,
        input_scale: Tensor | None,
        input_range: tuple[int, int],
        conv: nn.Conv2d,
    ) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={conv.padding_mode!r} is not supported by QuantizedConv2d; use 'zeros' or "
                "list the layer in ignore_modules."
            )
        self.qweight = weight
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer(
            "input_scale", None if input_scale is None else input_scale.detach().float().clone()
        )
        self.input_range = input_range
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
        if self.input_scale is not None:
            scale = self.input_scale.to(input.dtype)
            input = quantize(input, scale, *self.input_range) * scale
        weight = self.qweight.dequantize(input.dtype)
        return F.conv2d(input, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)  # type: ignore[arg-type]
