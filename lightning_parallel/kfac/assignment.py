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


def placement_costs(
    dims: Sequence[tuple[int, int]],
    owners: Sequence[int],
    *,
    method: str,
    factor_update_steps: int,
    inv_update_steps: int,
    element_size: int = 4,
    factor_rank: int | None = None,
) -> dict[str, dict[str, float]]:
    """Bytes communicated per step and curvature bytes held, per worker, of each placement.

    The byte counts are the payloads of the collectives a worker takes part in, as
    ``Communicator.bytes_communicated`` counts them (small metadata entries included):

    - ``"owner"`` (``dp``): one broadcast per owner rank of its layers' preconditioned gradients,
      ``out * in + 2`` entries per layer, every step.
    - ``"all"`` (``dp``): one broadcast per owner rank of its layers' decompositions every
      ``inv_update_steps`` (eigen ``in^2 + in + out^2 + out``; inverse the two upper triangles),
      plus two entries per layer (set, ``pi``).
    - ``"replicated"``: one all-reduce of the batch factors' upper triangles every
      ``factor_update_steps``, plus one entry per layer.

    Memory: ``"owner"`` the worker's own layers' factors and decompositions (the largest worker);
    ``"all"`` its own factors plus every layer's decomposition; ``"replicated"`` everything. The eigen
    method also caches the damped inverses once a decomposition is reused.

    Args:
        dims: ``(in_dim, out_dim)`` of every layer.
        owners: The owner rank of every layer.
        method: ``"eigen"`` or ``"inverse"``.
        factor_update_steps: Steps between factor updates.
        inv_update_steps: Steps between decompositions.
        element_size: Bytes per entry (4 for float32).
        factor_rank: Eigenpairs kept per factor (eigen method; ``None``: all). A truncated factor
            sends and holds ``dim * k + k`` entries and caches no inverse.

    Returns:
        ``{placement: {"bytes_per_step": ..., "curvature_bytes": ...}}`` for ``"owner"``, ``"all"``
        and ``"replicated"``.
    """

    def triu(n: int) -> int:
        return n * (n + 1) // 2

    def kept(n: int) -> int:
        return n if factor_rank is None else min(n, factor_rank)

    factors = [i * i + o * o for i, o in dims]
    if method == "eigen":
        decomposition = [i * kept(i) + kept(i) + o * kept(o) + kept(o) for i, o in dims]
        # plus the cached damped inverses (of the sides that keep every eigenpair)
        held = [
            d + (i * i if kept(i) == i else 0) + (o * o if kept(o) == o else 0)
            for d, (i, o) in zip(decomposition, dims)
        ]
    else:
        decomposition = [triu(i) + triu(o) for i, o in dims]
        held = [i * i + o * o for i, o in dims]
    workers = max(owners, default=0) + 1
    own = [sum(f + h for f, h, r in zip(factors, held, owners) if r == w) for w in range(workers)]
    own_factors = [sum(f for f, r in zip(factors, owners) if r == w) for w in range(workers)]
    size = float(element_size)
    return {
        "owner": {
            "bytes_per_step": size * sum(o * i + 2 for i, o in dims),
            "curvature_bytes": size * max(own, default=0),
        },
        "all": {
            "bytes_per_step": size * sum(d + 2 for d in decomposition) / inv_update_steps,
            "curvature_bytes": size * (max(own_factors, default=0) + sum(held)),
        },
        "replicated": {
            "bytes_per_step": size * sum(triu(i) + triu(o) + 1 for i, o in dims) / factor_update_steps,
            "curvature_bytes": size * sum(f + h for f, h in zip(factors, held)),
        },
    }
