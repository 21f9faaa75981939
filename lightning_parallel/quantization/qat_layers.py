"""Layers with fake-quantized weights and inputs for quantization-aware training.

Each QAT layer shares the ``weight`` and ``bias`` parameters of the float layer it replaces, so the model's
``state_dict`` keeps the float model's keys; what differs between the layer types is only how the weight is
applied, so the quantizers and the input path live once in :class:`_FakeQuantized`.
"""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.activation_quantizer import ActivationFakeQuantizer
from lightning_parallel.quantization.weight_quantizer import WeightFakeQuantizer


class _FakeQuantized(nn.Module):
    """The quantizers of a QAT layer: one for the ``(C_out, ...)`` weight, one (optional) for the input."""

    weight_quantizer: WeightFakeQuantizer
    input_quantizer: ActivationFakeQuantizer | None

    def _attach_quantizers(
        self,
        source: nn.Module,
        weight: Tensor,
        weight_bits: int,
        act_bits: int | None,
        group_size: int | None,
    ) -> None:
        """Share ``source``'s parameters and create the quantizers; ``weight`` is in ``(C_out, ...)`` layout."""
        for name in ("weight", "bias"):
            setattr(self, name, getattr(source, name))
        self.train(source.training)
        self.weight_quantizer = WeightFakeQuantizer(weight, weight_bits, group_size)
        self.input_quantizer = ActivationFakeQuantizer(act_bits) if act_bits is not None else None

    def _quantize_input(self, input: Tensor) -> Tensor:
        return input if self.input_quantizer is None else self.input_quantizer(input)


class QATLinear(nn.Linear, _FakeQuantized):
    """A Linear layer that trains a float weight but computes with its fake-quantized version.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias.
    """

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, weight_bits: int, act_bits: int | None, group_size: int | None
    ) -> QATLinear:
        """Wrap ``linear`` (sharing its parameters) with fake quantizers.

        Args:
            linear: the float layer.
            weight_bits: weight bit width, 2 to 8.
            act_bits: input bit width, 2 to 8, or ``None`` to leave inputs in float.
            group_size: group size for group-wise weights, or ``None`` for per-output-channel.
        """
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer._attach_quantizers(linear, linear.weight, weight_bits, act_bits, group_size)
        return layer.to(linear.weight.device)

    @override
    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.linear(
            self._quantize_input(input), self.weight_quantizer(self.weight), self.bias
        )


class QATConv2d(nn.Conv2d, _FakeQuantized):
    """A Conv2d layer that trains a float weight but computes with its fake-quantized version.

    Weights are quantized per output channel (or group-wise along ``in_channels * kh * kw``).
    """

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, *, weight_bits: int, act_bits: int | None, group_size: int | None
    ) -> QATConv2d:
        """Wrap ``conv`` (sharing its parameters) with fake quantizers.

        Args:
            conv: the float layer.
            weight_bits: weight bit width, 2 to 8.
            act_bits: input bit width, 2 to 8, or ``None`` to leave inputs in float.
            group_size: group size for group-wise weights, or ``None`` for per-output-channel.
        """
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        layer._attach_quantizers(conv, conv.weight, weight_bits, act_bits, group_size)
        return layer.to(conv.weight.device)

    @override
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self._quantize_input(input), self.weight_quantizer(self.weight), self.bias)
