"""Export of a QAT-trained model to real low-bit weights, and weight-size accounting."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_parallel.quantization.convert import replace_layers
from lightning_parallel.quantization.qat_layers import QATConv1D, QATConv2d, QATLinear, QATMultiheadAttention
from lightning_parallel.quantization.quantized_layers import (
    QuantizedConv2d,
    QuantizedLinear,
    QuantizedMultiheadAttention,
)
from lightning_parallel.quantization.quantized_weight import QuantizedWeight


def export_quantized(
    module: nn.Module, *, inplace: bool = False, scale_dtype: torch.dtype = torch.float16
) -> nn.Module:
    """Replace every QAT layer by an inference layer holding integer weight codes and step sizes.

    8-bit weights are stored as int8, 2-4-bit weights packed two per byte; step sizes as ``scale_dtype``.
    The exported layers keep quantizing their inputs with the learned activation step sizes, so their
    outputs match the fake-quantized model's up to the rounding of the step sizes to ``scale_dtype``.

    Args:
        module: a model converted by :func:`~lightning_parallel.quantization.convert_to_qat` and trained.
        inplace: modify ``module`` itself instead of a deep copy.
        scale_dtype: storage dtype of the weight step sizes (``torch.float16`` or ``torch.float32``).

    Returns:
        The exported model.
    """
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scale_dtype={scale_dtype} is not supported; use torch.float16 or torch.float32.")
    qat = (QATLinear, QATConv2d, QATConv1D, QATMultiheadAttention)
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, qat)]
    if not layers:
        raise ValueError(
            f"module {type(module).__name__} has no QAT layer to export; convert it with convert_to_qat "
            "(or train it with QuantizationPrecision in a qat mode) first."
        )
    target = module if inplace else copy.deepcopy(module)
    new: dict[str, nn.Module] = {}
    for name, _ in layers:
        layer = target.get_submodule(name) if name else target
        if isinstance(layer, QATConv2d):
            new[name] = QuantizedConv2d.from_qat(layer, scale_dtype=scale_dtype)
        elif isinstance(layer, QATMultiheadAttention):
            new[name] = QuantizedMultiheadAttention.from_qat(layer, scale_dtype=scale_dtype)
        elif isinstance(layer, (QATLinear, QATConv1D)):
            new[name] = QuantizedLinear.from_qat(layer, scale_dtype=scale_dtype)
    return replace_layers(target, new)


def weight_bytes(module: nn.Module) -> tuple[int, int]:
    """Bytes of the quantized layers' weights: ``(stored, float32)``.

    ``stored`` counts the codes and step sizes of every exported layer; ``float32`` the bytes the same weights
    take in float32. Biases, ignored layers and other parameters (embeddings, norms) are not counted.

    Args:
        module: an exported model.
    """
    stored = full = 0
    for sub in module.modules():
        if isinstance(sub, QuantizedWeight):
            stored += sub.nbytes()
            full += 4 * int(torch.Size(sub.shape).numel())
    return stored, full
