"""``nn.Conv2d`` with fake-quantized weights and inputs for quantization-aware training."""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.activation_quantizer import ActivationFakeQuantizer
from lightning_parallel.quantization.weight_quantizer import WeightFakeQuantizer


class QATConv2d(nn.Conv2d):
    """A Conv2d layer that trains a float weight but computes with its fake-quantized version.

    Weights are quantized per output channel (or group-wise along ``in_channels * kh * kw``); the
    ``weight`` and ``bias`` parameters are the original layer's own objects.
    """

    weight_quantizer: WeightFakeQuantizer
    input_quantizer: ActivationFakeQuantizer | None

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
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer.train(conv.training)
        layer.weight_quantizer = WeightFakeQuantizer(conv.weight, weight_bits, group_size)
        layer.input_quantizer = ActivationFakeQuantizer(act_bits) if act_bits is not None else None
        return layer.to(conv.weight.device)

    @override
    def forward(self, input: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            input = self.input_quantizer(input)
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)
