"""Uniform symmetric fake quantization with a learned step size (LSQ) and a straight-through estimator.

Pure functions over tensors; no module state. Conventions used across :mod:`lightning_parallel.quantization`:

- A ``b``-bit signed quantizer maps to the integer grid ``[-2^(b-1), 2^(b-1) - 1]``; an unsigned one (used
  for non-negative activations such as ReLU outputs) to ``[0, 2^b - 1]``. There is no zero point: the grid is
  symmetric around 0, so ``dequantize(quantize(x)) = s * clamp(round(x / s), qmin, qmax)``.
- ``scale`` (the step size ``s``) broadcasts against ``x``: a scalar for per-tensor, shape ``(C, 1, ...)``
  for per-output-channel, ``(C, G, 1)`` for group-wise on the grouped view of :func:`to_groups`.

LSQ (Esser et al., ICLR 2020). Forward: ``x_hat = s * clamp(round(x / s), qmin, qmax)``. Backward:

- ``d x_hat / d x = 1`` inside the clipping range, ``0`` outside (straight-through estimator for ``round``);
- ``d x_hat / d s = round(x / s) - x / s`` inside the range, ``qmin`` or ``qmax`` when clipped below/above,
  multiplied by the gradient scale ``g = 1 / sqrt(n * qmax)``, where ``n`` is the number of elements that
  share one step size (the whole tensor per-tensor, one output channel per-channel, one group group-wise;
  for activations, the features of one example). The per-element terms are summed over those elements.

The backward is written by hand (one ``autograd.Function``) rather than with the usual ``detach`` trick: it
saves ``x``, ``s`` and the output (which the next layer saves anyway), where the detach formulation keeps three
more full-size intermediates alive. PyTorch's fused ``fake_quantize_per_*_affine`` kernels were measured
slower than the four-op composite forward on the CPU, so they are not used.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def quant_range(bits: int, *, signed: bool = True) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)`` of a ``bits``-bit quantizer.

    Args:
        bits: bit width, 2 to 8.
        signed: ``True`` for ``[-2^(bits-1), 2^(bits-1) - 1]``, ``False`` for ``[0, 2^bits - 1]``.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not supported; use an integer from 2 to 8 (for example 8 or 4).")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(numel * qmax)``.

    Args:
        numel: number of elements sharing one step size (see the module docstring).
        qmax: the largest integer of the grid.
    """
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes ``clamp(round(x / scale), qmin, qmax)`` as a float tensor (exact small integers).

    The division is computed as ``x * (1 / scale)``, as PyTorch's fused fake-quantization kernels do, so the
    codes are exactly those :func:`fake_quantize` dequantizes.
    """
    return torch.clamp(torch.round(x * scale.reciprocal()), qmin, qmax)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Real values ``q * scale`` of integer codes."""
    return q.to(scale.dtype) * scale


class _LSQFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
        out = quantize(x, scale, qmin, qmax) * scale
        ctx.save_for_backward(x, scale, out)  # ``out`` is the next layer's saved input too: no extra memory
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = grad_outputs
        x, scale, out = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        v = x * scale.reciprocal()
        inside = v == v.clamp(qmin, qmax)  # qmin <= x / s <= qmax, with one comparison
        grad_x = torch.where(inside, grad, grad.new_zeros(())) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # s * (round(v) - v) inside, s * qmin or s * qmax when clipped; divided by s below.
            residual = torch.where(inside, out - x, out)
            if scale.numel() == 1:
                total = torch.dot(grad.reshape(-1), residual.reshape(-1)).reshape(scale.shape)
            else:
                total = _sum_to_shape(grad * residual, scale.shape)
            grad_s = total * scale.reciprocal() * ctx.grad_scale
        return grad_x, grad_s, None, None, None


def _sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dimensions along which a tensor of ``shape`` was broadcast."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t.reshape(shape)


def fake_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_scale: float = 1.0) -> Tensor:
    """LSQ fake quantization ``scale * clamp(round(x / scale), qmin, qmax)`` with LSQ/STE gradients.

    Args:
        x: the tensor to quantize.
        scale: positive step size(s), broadcastable to ``x``.
        qmin: smallest integer of the grid.
        qmax: largest integer of the grid.
        grad_scale: factor on the step-size gradient, usually :func:`lsq_grad_scale`.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        # Half-precision inputs (autocast): x / s would carry only 8-11 significant bits, as coarse as the grid
        # itself, so the rounding residuals and the step-size gradient are computed in float32.
        wide: Tensor = _LSQFakeQuantize.apply(x.float(), scale.float(), qmin, qmax, grad_scale)
        return wide.to(x.dtype)
    out: Tensor = _LSQFakeQuantize.apply(x, scale, qmin, qmax, grad_scale)
    return out


def to_groups(w: Tensor, group_size: int) -> Tensor:
    """View a weight ``(C, ...)`` as ``(C, G, group_size)`` groups along its flattened input dimension.

    The flattened input dimension ``K`` is zero-padded up to a multiple of ``group_size``; zeros quantize to 0
    exactly and :func:`from_groups` drops them again.

    Args:
        w: a weight whose first dimension is the output channel.
        group_size: elements per group.
    """
    flat = w.reshape(w.shape[0], -1)
    pad = (-flat.shape[1]) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(w.shape[0], -1, group_size)


def from_groups(grouped: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_groups`: drop the padding and restore ``shape``."""
    k = math.prod(shape[1:])
    return grouped.reshape(grouped.shape[0], -1)[:, :k].reshape(shape)
