"""Quantized training in pure PyTorch (no Lightning): fake quantizers, QAT layers, export, bitsandbytes helpers.

- :func:`fake_quantize` and friends: LSQ fake quantization with a straight-through estimator.
- :class:`WeightFakeQuantizer` (per-channel or group-wise) and :class:`ActivationFakeQuantizer` (per-tensor).
- :func:`convert_to_qat`: swap the layers the layer registry knows (``nn.Linear``, ``nn.Conv2d``, Hugging Face
  ``Conv1D``, ``nn.MultiheadAttention``, user-registered types) for their QAT versions.
- :func:`export_quantized`: turn a trained QAT model into int8 / packed int4 weights plus step sizes.
- :mod:`~lightning_parallel.quantization.bnb`: bitsandbytes layers and 8-bit optimizers, imported lazily.
"""

from lightning_parallel.quantization.activation_quantizer import ActivationFakeQuantizer
from lightning_parallel.quantization.bnb import convert_to_bnb, require_bitsandbytes, to_8bit_optimizer
from lightning_parallel.quantization.convert import convert_to_qat
from lightning_parallel.quantization.export import export_quantized, weight_bytes
from lightning_parallel.quantization.fake_quantize import (
    dequantize,
    fake_quantize,
    lsq_grad_scale,
    quant_range,
    quantize,
)
from lightning_parallel.quantization.qat_layers import QATConv1D, QATConv2d, QATLinear, QATMultiheadAttention
from lightning_parallel.quantization.quantized_layers import (
    QuantizedConv2d,
    QuantizedLinear,
    QuantizedMultiheadAttention,
)
from lightning_parallel.quantization.state import load_quantizer_state_dict, quantizer_state_dict
from lightning_parallel.quantization.weight_quantizer import WeightFakeQuantizer

__all__ = [
    "ActivationFakeQuantizer",
    "QATConv1D",
    "QATConv2d",
    "QATLinear",
    "QATMultiheadAttention",
    "QuantizedConv2d",
    "QuantizedLinear",
    "QuantizedMultiheadAttention",
    "WeightFakeQuantizer",
    "convert_to_bnb",
    "convert_to_qat",
    "dequantize",
    "export_quantized",
    "fake_quantize",
    "load_quantizer_state_dict",
    "lsq_grad_scale",
    "quant_range",
    "quantize",
    "quantizer_state_dict",
    "require_bitsandbytes",
    "to_8bit_optimizer",
    "weight_bytes",
]
