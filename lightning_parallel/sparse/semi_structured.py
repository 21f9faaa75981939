"""Semi-structured 2:4 sparsity (two nonzeros in every group of four along the input dimension), CUDA only.

``two_four_mask`` is plain torch and runs anywhere. ``export_semi_structured`` hands the pruned weights to
``torch.sparse.to_sparse_semi_structured`` (prototype in torch 2.13: CUDA tensors, 2-D, contiguous, compute
capability >= 8.0, minimum shapes per backend, e.g. fp16/bf16 32x64 with CUTLASS), for inference: that torch
API gives the sparse forward, training kernels live in torchao's ``SemiSparseLinear``. On a machine without a
suitable GPU it raises a clear error instead of falling back. Not run in this project's CI (no GPU there).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the two largest-magnitude entries of every group of four consecutive inputs (ties by position).

    Args:
        weight: ``(out, in)`` with ``in`` divisible by 4.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"2:4 sparsity needs a 2-D weight whose input size is a multiple of 4; got {tuple(weight.shape)}.")
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    top = torch.topk(groups, 2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(weight.shape)


def check_semi_structured_device(device: torch.device) -> None:
    """Raise ``RuntimeError`` unless ``device`` is a CUDA GPU of compute capability >= 8.0."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"Semi-structured 2:4 sparsity runs on CUDA GPUs only (got device {device}); on CPU use "
            "SparseTraining(execution='sparse') or 'masked'."
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise RuntimeError(f"Semi-structured 2:4 sparsity needs compute capability >= 8.0; this GPU has {major}.{minor}.")


@torch.no_grad()
def export_semi_structured(model: nn.Module) -> nn.Module:
    """A copy whose ``nn.Linear`` weights are pruned to 2:4 and stored semi-structured (inference).

    Raises:
        RuntimeError: when the model is not on a CUDA GPU of compute capability >= 8.0.
    """
    first = next(model.parameters())
    check_semi_structured_device(first.device)
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model)
    for module in out.modules():
        if type(module) is nn.Linear and module.in_features % 4 == 0:
            pruned = (module.weight * two_four_mask(module.weight)).contiguous()
            module.weight = nn.Parameter(to_sparse_semi_structured(pruned), requires_grad=False)
    return out
