"""Which rank owns which layer under DP-KFAC (pure functions).

Each layer is owned by one rank, which builds and decomposes its factors and preconditions its
gradient. Owners are chosen by longest-processing-time-first greedy scheduling over the layers'
costs: the most expensive remaining layer goes to the least loaded rank (ties broken by the lower
layer index and then the lower rank, so every rank computes the same assignment). LPT is within
4/3 of the optimal makespan and beats round-robin when layer sizes differ.
"""

from __future__ import annotations

from collections.abc import Sequence


def layer_cost(
    in_dim: int,
    out_dim: int,
    rows: int,
    *,
    factor_update_steps: int = 1,
    inv_update_steps: int = 1,
) -> float:
    """Estimated work per optimizer step of one layer's K-FAC (multiply-adds).

    Args:
        in_dim: Size of the layer's ``A`` factor (bias column included).
        out_dim: Size of the layer's ``G`` factor.
        rows: Rows of hook data per step (examples times output positions).
        factor_update_steps: Steps between factor updates.
        inv_update_steps: Steps between decompositions.

    Returns:
        ``rows (in^2 + out^2) / factor_update_steps + (in^3 + out^3) / inv_update_steps
        + out in (in + out)``: factor building, decomposition and preconditioning.
    """
    factors = rows * (in_dim**2 + out_dim**2) / factor_update_steps
    decomposition = (in_dim**3 + out_dim**3) / inv_update_steps
    precondition = out_dim * in_dim * (in_dim + out_dim)
    return float(factors + decomposition + precondition)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment of layers to ranks.

    Args:
        costs: One non-negative cost per layer.
        world_size: Number of ranks (at least 1).

    Returns:
        The owner rank of each layer, in the order of ``costs``.

    Raises:
        ValueError: If ``world_size < 1`` or a cost is negative.
    """
    if world_size < 1:
        raise ValueError(f"`world_size={world_size}` must be at least 1.")
    if any(c < 0 for c in costs):
        raise ValueError(f"`costs={list(costs)}` has a negative cost; layer costs must be >= 0.")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def round_robin_owners(num_layers: int, world_size: int) -> list[int]:
    """Round-robin assignment (layer ``i`` to rank ``i % world_size``), the simple alternative.

    Args:
        num_layers: Number of layers.
        world_size: Number of ranks (at least 1).

    Returns:
        The owner rank of each layer.
    """
    if world_size < 1:
        raise ValueError(f"`world_size={world_size}` must be at least 1.")
    return [i % world_size for i in range(num_layers)]
