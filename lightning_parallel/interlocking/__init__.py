"""The interlocking-backprop engine (Gomez et al. 2022): plan, auxiliary heads, stages, runtime. Imports no Lightning.

- :class:`InterlockingPlan`: which loss updates which stage for ``S`` stages and width ``k``.
- :func:`split_trunk`: cut a pipeline-protocol module into stages (blocks per stage from
  :mod:`lightning_parallel.pipeline.partition`) and build the auxiliary heads.
- :class:`InterlockingRuntime`: run every stage's forwards and interlocking backwards, in one process or over
  a process group.

:class:`~lightning_parallel.strategies.InterlockingBackpropStrategy` is the Lightning adapter.
"""

from lightning_parallel.interlocking.heads import build_aux_heads, default_aux_head, split_trunk
from lightning_parallel.interlocking.plan import InterlockingPlan, check_width, stages_of_rank
from lightning_parallel.interlocking.runtime import InterlockingRuntime

__all__ = [
    "InterlockingPlan",
    "InterlockingRuntime",
    "build_aux_heads",
    "check_width",
    "default_aux_head",
    "split_trunk",
    "stages_of_rank",
]
