"""Fake quantizer for weights: per-output-channel or group-wise symmetric LSQ.

Design decisions:

- Step sizes start at ``max|w| / qmax`` per channel (or per group), so nothing is clipped at the start of
  training, which matters most for the 8-bit case where LSQ's ``2 mean|w| / sqrt(qmax)`` is coarser.
- The learned step size is stored as ``init_scale * factor`` with ``factor`` the trained parameter
  (starting at 1). The quantizer's forward uses :func:`fake_quantize`, so ``d loss / d scale`` is LSQ's
  estimator with its gradient scale, and ``d loss / d factor = init_scale * d loss / d scale``. With
  Adam-type optimizers (which normalise gradient magnitudes) this makes the learning rate act on the
  *relative* step size; a raw step size of ``1e-4`` trained with ``lr=1e-3`` would otherwise jump by
  10x in one step.
- Group-wise quantization groups along the flattened input dimension (``in_features`` for Linear,
  ``in_channels * kh * kw`` for Conv2d), zero-padded to a multiple of ``group_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.fake_quantize import (
    fake_quantize,
    from_groups,
    lsq_grad_scale,
    quant_range,
    quantize,
    to_groups,
)
from lightning_parallel.quantization.quantizer_base import QuantizerBase

_MIN_FACTOR = 1e-3


class WeightFakeQuantizer(QuantizerBase):
    """Symmetric signed LSQ fake quantizer for a weight tensor of shape ``(C_out, ...)``.

    Args:
        weight: the weight to be quantized; its shape fixes the step-size shape and its values the initial
            step sizes.
        bits: bit width, 2 to 8.
        group_size: elements per group along the flattened input dimension, or ``None`` for one step size
            per output channel.
    """

    init_scale: Tensor

    def __init__(self, weight: Tensor, bits: int, group_size: int | None = None) -> None:
        super().__init__()
        self.qmin, self.qmax = quant_range(bits, signed=True)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(
                f"group_size={group_size!r} must be a positive integer (for example 64) or None."
            )
        self.bits = bits
        self.group_size = group_size
        self.weight_shape = weight.shape
        w = weight.detach().float()
        if group_size is None:
            absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
            init = absmax.reshape((-1,) + (1,) * (w.dim() - 1))  # (C, 1, ...)
            numel = w[0].numel()
        else:
            init = to_groups(w, group_size).abs().amax(dim=2, keepdim=True)  # (C, G, 1)
            numel = group_size
        self.grad_scale = lsq_grad_scale(numel, self.qmax)
        init = (init / self.qmax).clamp_min(1e-8)
        self.register_buffer("init_scale", init.to(weight.dtype))
        self.factor = nn.Parameter(torch.ones_like(self.init_scale))

    def scale(self) -> Tensor:
        """The current step sizes (per channel ``(C, 1, ...)`` or per group ``(C, G, 1)``)."""
        return self.init_scale * self.factor.clamp_min(_MIN_FACTOR)

    @override
    def forward(self, weight: Tensor) -> Tensor:
        scale = self.scale()
        if self.group_size is None:
            return fake_quantize(weight, scale, self.qmin, self.qmax, self.grad_scale)
        grouped = fake_quantize(
            to_groups(weight, self.group_size), scale, self.qmin, self.qmax, self.grad_scale
        )
        return from_groups(grouped, weight.shape)

    @torch.no_grad()
    def integer_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The integer codes and step sizes that :meth:`forward` dequantizes.

        Args:
            weight: the latent float weight.

        Returns:
            ``(codes, scale)``: int8 codes of shape ``(C, K)`` (``K`` the flattened input dimension) and
            step sizes of shape ``(C, G)`` where ``G`` is 1 per channel or the number of groups.
        """
        scale = self.scale()
        c = weight.shape[0]
        if self.group_size is None:
            codes = quantize(weight, scale, self.qmin, self.qmax).reshape(c, -1)
            return codes.to(torch.int8), scale.reshape(c, 1)
        grouped = quantize(to_groups(weight, self.group_size), scale, self.qmin, self.qmax)
        codes = grouped.reshape(c, -1)[:, : weight[0].numel()]
        return codes.to(torch.int8), scale.reshape(c, -1)

    @override
    def extra_repr(self) -> str:
        granularity = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"bits={self.bits}, {granularity}"
