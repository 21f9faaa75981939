"""K-FAC preconditioning in pure torch (no Lightning): factors, decompositions, DP-KFAC assignment.

``lightning_parallel.callbacks.DPKFAC`` is the Lightning adapter over :class:`KFACPreconditioner`.
"""

from lightning_parallel.kfac.assignment import assign_owners, layer_cost, placement_costs, round_robin_owners
from lightning_parallel.kfac.hyperparams import Hyperparameter, resolve
from lightning_parallel.kfac.layer import KFACLayer
from lightning_parallel.kfac.options import KFACOptions
from lightning_parallel.kfac.pipeline import PipelineKFACPreconditioner
from lightning_parallel.kfac.preconditioner import KFACPreconditioner

__all__ = [
    "Hyperparameter",
    "KFACLayer",
    "KFACOptions",
    "KFACPreconditioner",
    "PipelineKFACPreconditioner",
    "assign_owners",
    "layer_cost",
    "placement_costs",
    "resolve",
    "round_robin_owners",
]
