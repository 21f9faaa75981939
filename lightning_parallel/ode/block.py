"""A neural-ODE block: ``y(t1)`` of ``dy/dt = func(t, y)``, ``y(t0) = x``, by a chosen integrator.

Design decisions:

- ``adjoint="discrete"`` differentiates the integrator's own steps (reverse-accurate, as PNODE):
  the gradient is that of the computed ``y(t1)``, equal to backprop through the same steps up to
  rounding, while only ``checkpoints`` states are saved (:mod:`lightning_parallel.ode.adjoint`).
  ``adjoint="backprop"`` keeps the whole graph of the steps (the memory baseline).
- Gradients flow to the initial state and to ``func``'s parameters (as ``torchdiffeq``'s
  ``adjoint_params``); tensors captured by ``func`` from outside get none under ``discrete``.
- ``steps`` gives fixed steps (every method); ``rtol``/``atol`` without ``steps`` adaptive steps
  (``dopri5`` only, the method with an embedded error estimate).
- ``checkpoints=None`` keeps ``ceil(sqrt(steps))`` states (for adaptive steps: ``16``).
- Under K-FAC the layers of ``func`` are shared weights over stages and steps
  (``lightning_parallel.kfac.recording``); the implicit methods' Jacobian products are not recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.kfac import recording
from lightning_parallel.ode.adjoint import DiscreteAdjoint
from lightning_parallel.ode.integrate import Problem, Trajectory, integrate
from lightning_parallel.ode.steps import NewtonOptions

MethodName = Literal["euler", "rk4", "dopri5", "implicit_euler", "crank_nicolson"]
METHODS = ("euler", "rk4", "dopri5", "implicit_euler", "crank_nicolson")
ADJOINTS = ("discrete", "backprop")
LINEAR_SOLVERS = ("direct", "gmres")
ADAPTIVE_CHECKPOINTS = 16


class ODEBlock(nn.Module):
    """Integrates ``dy/dt = func(t, y)`` over ``t_span`` from the block's input.

    Args:
        func: an ``nn.Module`` called as ``func(t, y)`` (``t`` a 0-d tensor), returning a tensor shaped like ``y``.
        t_span: ``(t0, t1)``. Default ``(0.0, 1.0)``.
        method: ``"euler"``, ``"rk4"`` (default), ``"dopri5"``, ``"implicit_euler"`` or ``"crank_nicolson"``.
        steps: number of fixed steps. Default 10 when neither ``rtol`` nor ``atol`` is given.
        rtol: relative tolerance of adaptive steps (``dopri5``, without ``steps``). Default 1e-6 when adaptive.
        atol: absolute tolerance of adaptive steps. Default 1e-8 when adaptive.
        adjoint: ``"discrete"`` (default) or ``"backprop"``.
        checkpoints: states kept for the discrete adjoint's backward (K >= 1); ``None``: ``ceil(sqrt(steps))``.
        linear_solver: Newton's linear solve in the implicit methods, ``"direct"`` (default) or ``"gmres"``.
        newton_tol: Newton stops at ``||d|| <= newton_tol (1 + ||y||)``. Default 1e-10.
        newton_max_iter: most Newton iterations per step. Default 20.
        max_steps: most adaptive steps (accepted plus rejected). Default 10000.
    """

    def __init__(
        self,
        func: nn.Module,
        t_span: Sequence[float] = (0.0, 1.0),
        *,
        method: MethodName = "rk4",
        steps: int | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        adjoint: Literal["discrete", "backprop"] = "discrete",
        checkpoints: int | None = None,
        linear_solver: Literal["direct", "gmres"] = "direct",
        newton_tol: float = 1e-10,
        newton_max_iter: int = 20,
        max_steps: int = 10_000,
    ) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(f"func={type(func).__name__} must be an nn.Module called as func(t, y).")
        if len(t_span) != 2 or not all(math.isfinite(float(t)) for t in t_span) or t_span[0] == t_span[1]:
            raise ValueError(
                f"t_span={list(t_span)} must be two different finite times [t0, t1], e.g. [0.0, 1.0]."
            )
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}.")
        if adjoint not in ADJOINTS:
            raise ValueError(f"adjoint={adjoint!r} is not one of {ADJOINTS}.")
        if linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"linear_solver={linear_solver!r} is not one of {LINEAR_SOLVERS}.")
        adaptive = steps is None and (rtol is not None or atol is not None)
        if steps is not None and (rtol is not None or atol is not None):
            raise ValueError(
                f"steps={steps} with rtol={rtol}/atol={atol}: give steps (fixed steps) or rtol/atol (adaptive), not both."
            )
        if adaptive and method != "dopri5":
            raise ValueError(
                f"method={method!r} has no error estimate for adaptive steps: use method='dopri5' or give steps."
            )
        for name, value in (("steps", steps), ("checkpoints", checkpoints)):
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name}={value} must be a positive integer (or None), e.g. 10.")
        for name, value in (("newton_max_iter", newton_max_iter), ("max_steps", max_steps)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}={value} must be a positive integer, e.g. 20.")
        for name, tol in (("rtol", rtol), ("atol", atol), ("newton_tol", newton_tol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"{name}={tol} must be > 0, e.g. 1e-6.")
        self.func = func
        self.t_span = (float(t_span[0]), float(t_span[1]))
        self.method: str = method
        self.steps = None if adaptive else int(steps if steps is not None else 10)
        self.rtol = 1e-6 if rtol is None else float(rtol)
        self.atol = 1e-8 if atol is None else float(atol)
        self.adjoint: str = adjoint
        if checkpoints is None:
            checkpoints = ADAPTIVE_CHECKPOINTS if self.steps is None else math.ceil(math.sqrt(self.steps))
        self.checkpoints = int(checkpoints)
        self.newton = NewtonOptions(
            linear_solver=linear_solver, tol=float(newton_tol), max_iter=int(newton_max_iter)
        )
        self.max_steps = int(max_steps)
        self.last: Trajectory | None = None  # the last forward's steps (no states)

    def problem(self) -> Problem:
        """The integration problem this block solves."""
        return Problem(
            func=self.func,
            method=self.method,
            t0=self.t_span[0],
            t1=self.t_span[1],
            steps=self.steps,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            newton=self.newton,
        )

    @override
    def forward(self, x: Tensor) -> Tensor:
        """``y(t1)`` from ``y(t0) = x``."""
        problem = self.problem()
        params = [p for p in self.func.parameters() if p.requires_grad]
        if self.adjoint == "discrete" and torch.is_grad_enabled() and (x.requires_grad or params):
            out: list[Trajectory] = []
            y = DiscreteAdjoint.apply(problem, self.checkpoints, out, x, *params)
            self.last = out[0]
            return y  # type: ignore[no-any-return]
        with recording.shared_weights():
            traj = integrate(problem, x)
        self.last = Trajectory(final=traj.final, steps=traj.steps, rejected=traj.rejected)
        return traj.final

    @override
    def extra_repr(self) -> str:
        stepping = f"steps={self.steps}" if self.steps is not None else f"rtol={self.rtol}, atol={self.atol}"
        return f"t_span={self.t_span}, method={self.method!r}, {stepping}, adjoint={self.adjoint!r}, checkpoints={self.checkpoints}"
