"""Neural-ODE blocks (plain torch, no Lightning): :class:`ODEBlock` and its reverse-accurate discrete adjoint."""

from lightning_parallel.ode.block import ODEBlock
from lightning_parallel.ode.integrate import Problem, Trajectory, integrate
from lightning_parallel.ode.linear import gmres
from lightning_parallel.ode.steps import NewtonOptions

__all__ = ["NewtonOptions", "ODEBlock", "Problem", "Trajectory", "gmres", "integrate"]
