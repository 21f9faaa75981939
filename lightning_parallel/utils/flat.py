"""Pack tensors into one flat buffer for a single collective, and unpack the result.

Every distributed part of the package (pipeline gradient and weight exchanges, K-FAC's factor and
update exchanges, checkpoint gathering) sends many small tensors; one collective over one flat buffer
costs one latency instead of one per tensor. The tensors handed to one buffer must share a dtype and a
device (``torch.cat`` refuses others).

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One 1-D buffer holding ``tensors`` one after another (a copy, detached from autograd)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped like ``like``, in order (the inverse of :func:`flatten`)."""
    out: list[Tensor] = []
    offset = 0
    for tensor in like:
        out.append(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    return out


def flat_collective(tensors: Sequence[Tensor], collective: Callable[[Tensor], Any]) -> list[Tensor]:
    """Run ``collective`` (e.g. ``lambda flat: dist.all_reduce(flat, group=g)``) on one flat buffer.

    Args:
        tensors: tensors of one dtype and device; left unchanged.
        collective: a blocking in-place collective over the buffer.

    Returns:
        The buffer after the collective, as views shaped like ``tensors``.
    """
    flat = flatten(tensors)
    collective(flat)
    return unflatten(flat, tensors)


__all__ = ["flat_collective", "flatten", "unflatten"]
