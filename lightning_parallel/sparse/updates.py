"""Mask initialisation and the SET / RigL drop-and-grow rules, as pure functions on tensors.

A mask is a ``bool`` tensor of the weight's shape; ``True`` marks an active (trainable, stored) weight. Every
rule keeps the number of active weights of a layer constant: it drops ``k`` and grows ``k``.

Decisions taken here (and why):

- RigL (Evci et al. 2020; google-research/rigl): drop the ``k = round(fraction * active)`` active weights of
  smallest magnitude, grow the ``k`` positions of largest dense-gradient magnitude among all positions not
  kept, so a weight dropped in this update may be grown again at once (as in the reference code), in which
  case it keeps its value. Newly active weights start at zero (``grow_init='zeros'``).
- SET (Mocanu et al. 2018; the reference ``set_mlp_sequential.py``): drop the fraction ``zeta`` of the
  positive weights and ``zeta`` of the negative weights closest to zero (zero-valued active weights count as
  positive), then grow as many at uniformly random positions not kept.
- Ties are broken by ``torch.topk`` on the same inputs, so equal inputs give equal masks on every rank.
"""

from __future__ import annotations

import math

import torch


def random_mask(shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """A mask with exactly ``max(1, round(density * numel))`` active positions chosen uniformly at random.

    Args:
        shape: the weight's shape.
        density: fraction of positions kept, in (0, 1].
        generator: the CPU random generator the positions are drawn from.
    """
    numel = math.prod(shape)
    count = min(numel, max(1, round(density * numel)))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:count]] = True
    return mask.view(shape)


def drop_fraction_at(step: int, *, initial: float, stop_at: int, decay: str = "cosine") -> float:
    """The fraction of active weights dropped at optimizer step ``step``; 0 from ``stop_at`` on.

    Args:
        step: optimizer steps taken so far.
        initial: the fraction at step 0 (RigL's ``alpha``, SET's ``zeta``).
        stop_at: the step from which masks stop changing (RigL's ``T_end``).
        decay: ``"cosine"``: ``initial / 2 * (1 + cos(pi * step / stop_at))``; ``"constant"``: ``initial``.
    """
    if step >= stop_at:
        return 0.0
    if decay == "constant":
        return initial
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / stop_at))


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A flat mask of the ``count`` largest entries of the flat ``scores``."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        chosen[torch.topk(scores, count, sorted=False).indices] = True
    return chosen


def _grow(kept: torch.Tensor, grow_scores: torch.Tensor, count: int) -> torch.Tensor:
    scores = grow_scores.masked_fill(kept, -math.inf)
    return kept | _top(scores, count)


def rigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """RigL: drop the smallest-magnitude active weights, grow where the dense gradient is largest.

    Args:
        weight: the layer's weight (inactive entries are ignored).
        mask: its current mask.
        grad: the dense gradient of the loss with respect to the full weight.
        fraction: share of the active weights replaced, in [0, 1].

    Returns:
        The new mask, with as many active positions as ``mask``.
    """
    flat_mask = mask.flatten()
    active = int(flat_mask.sum())
    count = round(fraction * active)
    keep_scores = weight.detach().abs().flatten().float().masked_fill(~flat_mask, -math.inf)
    kept = _top(keep_scores, active - count)
    return _grow(kept, grad.detach().abs().flatten().float(), count).view_as(mask)


def set_update(
    weight: torch.Tensor, mask: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """SET: drop ``fraction`` of the positive and of the negative active weights nearest zero, regrow at random.

    Args:
        weight: the layer's weight.
        mask: its current mask.
        fraction: SET's ``zeta``, in [0, 1].
        generator: CPU random generator of the regrown positions.

    Returns:
        The new mask, with as many active positions as ``mask``.
    """
    flat_mask = mask.flatten()
    w = weight.detach().flatten().float()
    positive = flat_mask & (w >= 0)
    negative = flat_mask & (w < 0)
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    drop_pos, drop_neg = round(fraction * n_pos), round(fraction * n_neg)
    kept = _top(w.masked_fill(~positive, -math.inf), n_pos - drop_pos)
    kept |= _top((-w).masked_fill(~negative, -math.inf), n_neg - drop_neg)
    random_scores = torch.rand(w.numel(), generator=generator).to(w.device)
    return _grow(kept, random_scores, drop_pos + drop_neg).view_as(mask)
