"""Inference Linear layer with real low-bit weights, exported from :class:`QATLinear`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.fake_quantize import quantize
from lightning_parallel.quantization.qat_linear import QATLinear
from lightning_parallel.quantization.quantized_weight import QuantizedWeight, export_parts


class QuantizedLinear(nn.Module):
    """A Linear layer storing int8 / packed int4 weight codes with float16 step sizes.

    The forward quantizes the input with the learned activation step size (as in training) and uses the
    dequantized weight, so its outputs match the fake-quantized training model up to the float16 rounding
    of the step sizes.

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
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.qweight = weight
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer(
            "input_scale", None if input_scale is None else input_scale.detach().float().clone()
        )
        self.input_range = input_range

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
        if self.input_scale is not None:
            scale = self.input_scale.to(input.dtype)
            input = quantize(input, scale, *self.input_range) * scale
        return F.linear(input, self.qweight.dequantize(input.dtype), self.bias)

    @override
    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )
