"""``nn.Linear`` with fake-quantized weights and inputs for quantization-aware training."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.activation_quantizer import ActivationFakeQuantizer
from lightning_parallel.quantization.weight_quantizer import WeightFakeQuantizer


class QATLinear(nn.Linear):
    """A Linear layer that trains a float weight but computes with its fake-quantized version.

    The ``weight`` and ``bias`` parameters are the original layer's own objects, so the module's
    ``state_dict`` keeps the float model's keys.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias.
    """

    weight_quantizer: WeightFakeQuantizer
    input_quantizer: ActivationFakeQuantizer | None

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
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        layer.weight_quantizer = WeightFakeQuantizer(linear.weight, weight_bits, group_size)
        layer.input_quantizer = ActivationFakeQuantizer(act_bits) if act_bits is not None else None
        return layer.to(linear.weight.device)

    @override
    def forward(self, input: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            input = self.input_quantizer(input)
        return F.linear(input, self.weight_quantizer(self.weight), self.bias)
