"""Deep-equilibrium layers (plain torch, no Lightning): :class:`DEQ` and its fixed-point solvers."""

from lightning_parallel.implicit.deq import DEQ
from lightning_parallel.implicit.solvers import SolverStats, anderson, broyden, fixed_point

__all__ = ["DEQ", "SolverStats", "anderson", "broyden", "fixed_point"]
