"""Real low-bit weight storage shared by the exported layers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_parallel.quantization.packing import pack_codes, unpack_codes


class QuantizedWeight(nn.Module):
    """A weight held as integer codes plus step sizes, dequantized on use.

    Args:
        codes: int8 codes ``(C, K)``, ``K`` the flattened input dimension.
        scale: step sizes ``(C, G)``: ``G = 1`` per channel, otherwise one per group of ``group_size``.
        bits: bit width of the codes (2 to 4 are packed two per byte).
        shape: the float weight's shape.
        group_size: elements per group, or ``None`` for per channel.
        scale_dtype: storage dtype of the step sizes (float16 by default: 2 bytes per channel or group).
    """

    packed: Tensor
    scale: Tensor

    def __init__(
        self,
        codes: Tensor,
        scale: Tensor,
        *,
        bits: int,
        shape: torch.Size,
        group_size: int | None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.shape = tuple(shape)
        self.group_size = group_size
        self.register_buffer("packed", pack_codes(codes, bits))
        self.register_buffer("scale", scale.detach().to(scale_dtype).contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``codes * scale`` in its original shape."""
        k = math.prod(self.shape[1:])
        codes = unpack_codes(self.packed, self.bits, k).to(dtype)  # (C, K)
        scale = self.scale.to(dtype)
        if self.group_size is None:
            return (codes * scale).reshape(self.shape)
        pad = (-k) % self.group_size
        grouped = torch.nn.functional.pad(codes, (0, pad)).reshape(codes.shape[0], -1, self.group_size)
        return (grouped * scale.unsqueeze(2)).reshape(codes.shape[0], -1)[:, :k].reshape(self.shape)

    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus step sizes."""
        return (
            self.packed.numel() * self.packed.element_size() + self.scale.numel() * self.scale.element_size()
        )

    def extra_repr(self) -> str:
        granularity = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"bits={self.bits}, shape={self.shape}, {granularity}"


def quantized_weight(quantizer: Any, weight: Tensor, scale_dtype: torch.dtype) -> QuantizedWeight:
    """The integer weight a trained ``WeightFakeQuantizer`` makes of ``weight`` (``(C_out, ...)`` layout)."""
    codes, scale = quantizer.integer_weight(weight)
    return QuantizedWeight(
        codes,
        scale,
        bits=quantizer.bits,
        shape=weight.shape,
        group_size=quantizer.group_size,
        scale_dtype=scale_dtype,
    )


def input_step(quantizer: Any) -> tuple[Tensor | None, tuple[int, int]]:
    """The learned input step size and integer range of an ``ActivationFakeQuantizer`` (``None, (0, 0)``
    without one)."""
    if quantizer is None:
        return None, (0, 0)
    return quantizer.scale().detach(), quantizer.qrange()


def export_parts(
    layer: Any, scale_dtype: torch.dtype, weight: Tensor | None = None
) -> tuple[QuantizedWeight, Tensor | None, Tensor | None, tuple[int, int]]:
    """What an exported layer keeps of a trained QAT layer (``QATLinear``, ``QATConv2d``, ``QATConv1D``).

    Args:
        layer: the QAT layer.
        scale_dtype: storage dtype of the weight step sizes.
        weight: the weight in ``(C_out, ...)`` layout (default ``layer.weight``).

    Returns:
        The integer weight, the bias, the input step size (``None`` for weight-only QAT) and the input's
        integer range (``(0, 0)`` without input quantization).
    """
    weight = layer.weight if weight is None else weight
    return (
        quantized_weight(layer.weight_quantizer, weight, scale_dtype),
        layer.bias,
        *input_step(layer.input_quantizer),
    )
