"""K-FAC preconditioning in pure torch (no Lightning): factors, decompositions, DP-KFAC assignment.

``lightning_parallel.callbacks.DPKFAC`` is the Lightning adapter over :class:`KFACPreconditioner`.
"""

from lightning_parallel.kfac.assignment import assign_owners, layer_cost, round_robin_owners
from lightning_parallel.kfac.layer import KFACLayer
from lightning_parallel.kfac.options import KFACOptions
from lightning_parallel.kfac.pipeline import PipelineKFACPreconditioner
from lightning_parallel.kfac.preconditioner import KFACPreconditioner
from lightning_parallel.kfac.schedule import Schedule, resolve

__all__ = [
    "KFACLayer",
    "KFACOptions",
    "KFACPreconditioner",
    "PipelineKFACPreconditioner",
    "Schedule",
    "assign_owners",
    "layer_cost",
    "resolve",
    "round_robin_owners",
]
