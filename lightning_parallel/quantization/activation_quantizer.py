"""Fake quantizer for activations: one learned LSQ step size per tensor.

Design decisions:

- Data-dependent start: on the first call the quantizer looks at its input. If it is non-negative (a ReLU
  output) the grid is unsigned ``[0, 2^b - 1]``, otherwise signed; the step size starts at the finer of LSQ's
  ``2 mean|x| / sqrt(qmax)`` and the first batch's range ``max|x| / qmax``. LSQ's rule targets 2-4 bits; at
  8 bits it would clip only beyond 22 times the mean and leave a grid ten times coarser than needed (a few
  percent of noise per layer before any training). Negative values that appear later under an unsigned grid
  are clipped to 0.
- The start is taken from the first *training-mode* batch. Before it, an evaluation-mode call (Lightning's
  sanity check runs validation before the first training step) passes its input through unquantized:
  activations seen in evaluation mode can be far from the training ones (BatchNorm with its initial
  running statistics scales them differently), and a step size started from them clipped a whole layer's
  training input to one value, so that the model could not learn at all.
- The gradient scale uses the features of one example (``x.numel() / x.shape[0]``) as LSQ does, so it does
  not change with the batch size.
- The learned step size is ``init_scale * factor`` for the same reason as for weights
  (see :mod:`~lightning_parallel.quantization.weight_quantizer`).
- Under DDP the quantizer's buffers are broadcast from rank 0 before every forward (DDP's default
  ``broadcast_buffers=True``), so every rank uses rank 0's starting step size from the second step on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.quantization.fake_quantize import fake_quantize, lsq_grad_scale, quant_range
from lightning_parallel.quantization.quantizer_base import QuantizerBase

_MIN_FACTOR = 1e-3


class ActivationFakeQuantizer(QuantizerBase):
    """Per-tensor LSQ fake quantizer for activations (inputs of Linear/Conv2d layers).

    Args:
        bits: bit width, 2 to 8.
    """

    init_scale: Tensor
    initialized: Tensor
    signed: Tensor

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        quant_range(bits)  # validates bits
        self.bits = bits
        self.register_buffer("init_scale", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.ones((), dtype=torch.bool))
        self.factor = nn.Parameter(torch.ones(()))
        # (initialized, signed) mirrored on the host so that forward does not synchronise with the device.
        self._host_flags: tuple[bool, bool] | None = None

    def qrange(self) -> tuple[int, int]:
        """The integer grid in use (signed or unsigned, decided on the first call)."""
        if self._host_flags is None:
            self._host_flags = (bool(self.initialized), bool(self.signed))
        return quant_range(self.bits, signed=self._host_flags[1])

    def scale(self) -> Tensor:
        """The current step size (a scalar tensor)."""
        return self.init_scale * self.factor.clamp_min(_MIN_FACTOR)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        signed = bool((x.min() < 0).item())
        _, qmax = quant_range(self.bits, signed=signed)
        self.signed.fill_(signed)
        magnitude = x.detach().abs().float()
        lsq_start = 2.0 * magnitude.mean().item() / math.sqrt(qmax)
        range_start = magnitude.max().item() / qmax
        self.init_scale.fill_(max(min(lsq_start, range_start), 1e-8))
        self.initialized.fill_(True)
        self._host_flags = (True, signed)

    @override
    def load_quantizer_state(self, state: dict[str, Tensor]) -> None:
        super().load_quantizer_state(state)
        self._host_flags = None

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self._host_flags is None:
            self._host_flags = (bool(self.initialized), bool(self.signed))
        if not self._host_flags[0]:
            if not self.training:
                return x  # no grid before the first training batch sets it
            self._initialize(x)
        qmin, qmax = self.qrange()
        numel = x.numel() // max(x.shape[0], 1) if x.dim() > 1 else x.numel()
        return fake_quantize(x, self.scale().to(x.dtype), qmin, qmax, lsq_grad_scale(numel, qmax))

    @override
    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-tensor"
