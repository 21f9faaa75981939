"""Dynamic sparse training in pure torch (no Lightning): densities, masks, SET/RigL rules, sparse layers.

``lightning_parallel.callbacks.SparseTraining`` is the Lightning adapter over :class:`SparseEngine`.
"""

from lightning_parallel.sparse.densities import erk_densities, uniform_densities
from lightning_parallel.sparse.engine import SparseEngine, covered_layers
from lightning_parallel.sparse.sparse_linear import SparseLinear
from lightning_parallel.sparse.updates import drop_fraction_at, random_mask, rigl_update, set_update

__all__ = [
    "SparseEngine",
    "SparseLinear",
    "covered_layers",
    "drop_fraction_at",
    "erk_densities",
    "random_mask",
    "rigl_update",
    "set_update",
    "uniform_densities",
]
