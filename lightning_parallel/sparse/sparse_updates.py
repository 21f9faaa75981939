"""SET / RigL drop-and-grow on a :class:`SparseLinear` pattern, without any dense ``out x in`` tensor.

The same rules as :mod:`lightning_parallel.sparse.updates` (which work on dense masks), on index sets:

- the kept entries are chosen from ``values`` exactly as the dense rules choose them from the weight;
- RigL grows at the largest ``|dy^T x|`` (the dense gradient) outside the kept set, found block of rows by
  block of rows so at most ``block_entries`` dense gradient entries exist at once; each block is passed through
  ``reduce`` (an all-reduce mean under data parallelism) before it is ranked, so every replica ranks the same
  numbers;
- SET grows at uniformly random positions outside the kept set (rejection sampling with the given generator);
- an entry kept or grown back at its old position keeps its value and its optimizer state; a new one starts
  at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_parallel.sparse.sparse_linear import SparseLinear

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    return torch.topk(scores, count, sorted=False).indices


def kept_entries(values: torch.Tensor, fraction: float, method: str) -> torch.Tensor:
    """Positions in ``values`` that survive the drop (RigL: largest ``|w|``; SET: largest per sign)."""
    v = values.detach().float()
    if method == "rigl":
        return _top_positions(v.abs(), v.numel() - round(fraction * v.numel()))
    positive = v >= 0
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    keep_pos = _top_positions(v.masked_fill(~positive, -math.inf), n_pos - round(fraction * n_pos))
    keep_neg = _top_positions((-v).masked_fill(positive, -math.inf), n_neg - round(fraction * n_neg))
    return torch.cat([keep_pos, keep_neg])


def dense_grad_top(
    layer: SparseLinear, exclude: torch.Tensor, count: int, *, reduce: Reduce | None = None,
    block_entries: int = 1 << 24,
) -> torch.Tensor:
    """Flat positions of the ``count`` largest ``|dy^T x|`` entries not in ``exclude`` (sorted flat indices).

    Needs the ``(x, dy)`` recorded by the layer's last backward (``layer.record = True``).
    """
    if layer.recorded is None:
        raise RuntimeError("RigL's growth needs the dense gradient: set `layer.record = True` before backward.")
    x, grad_out = layer.recorded
    n_in = layer.in_features
    rows_per_block = max(1, block_entries // n_in)
    best_scores = torch.empty(0, device=x.device)
    best_positions = torch.empty(0, dtype=torch.int64, device=x.device)
    for start in range(0, layer.out_features, rows_per_block):
        stop = min(layer.out_features, start + rows_per_block)
        block = grad_out[:, start:stop].t() @ x  # (rows, in): this block of the dense weight gradient
        if reduce is not None:
            block = reduce(block)
        scores = block.abs().flatten().float()
        lo, hi = start * n_in, stop * n_in
        inside = exclude[(exclude >= lo) & (exclude < hi)] - lo
        scores[inside] = -math.inf
        top = _top_positions(scores, min(count, scores.numel()))
        best_scores = torch.cat([best_scores, scores[top]])
        best_positions = torch.cat([best_positions, top + lo])
        if best_scores.numel() > count:
            keep = _top_positions(best_scores, count)
            best_scores, best_positions = best_scores[keep], best_positions[keep]
    return best_positions


def random_positions(
    numel: int, exclude: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` distinct uniformly random flat positions in ``[0, numel)`` outside ``exclude``."""
    taken = torch.sort(exclude.cpu()).values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < count:
        draw = torch.randint(0, numel, (2 * (count - chosen.numel()) + 16,), generator=generator)
        draw = torch.unique(draw)  # sorted; uniform over distinct positions
        draw = draw[torch.randperm(draw.numel(), generator=generator)]
        fresh = draw[~torch.isin(draw, taken) & ~torch.isin(draw, chosen)]
        chosen = torch.cat([chosen, fresh[: count - chosen.numel()]])
    return chosen.to(exclude.device)


def regrow(
    layer: SparseLinear, kept: torch.Tensor, grown: torch.Tensor, states: list[torch.Tensor]
) -> None:
    """Give ``layer`` the pattern ``kept`` entries + ``grown`` flat positions; carry values and ``states``.

    Entries whose position was in the old pattern keep their value and per-entry state (each tensor in
    ``states`` is ``(nnz,)`` and is rewritten in place); the others start at zero.
    """
    old = layer.indices
    new = torch.sort(torch.cat([old[kept], grown])).values
    where = torch.searchsorted(old, new).clamp(max=old.numel() - 1)
    present = old[where] == new
    for state in [layer.values.data, *states]:
        carried = torch.where(present, state[where], torch.zeros((), dtype=state.dtype, device=state.device))
        state.copy_(carried)
    layer.indices = new
    layer._build_structure()
