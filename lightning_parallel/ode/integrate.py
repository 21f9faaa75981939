"""The time loop: fixed or adaptive steps, the accepted step sequence, and sparse checkpoints.

Design decisions:

- A trajectory is the list of accepted steps ``(t, h)`` plus the state at a few step indices
  (checkpoints). Replaying the accepted steps from a checkpoint reproduces the forward states
  bit for bit (same operations on the same inputs), which is what makes the discrete adjoint
  exact for adaptive steps too: rejected trial steps and the controller are not replayed.
- Fixed steps keep the states at every ``ceil(steps / K)``-th step. Adaptive steps do not know
  their count in advance: the stride starts at 1 and doubles (dropping every other checkpoint)
  whenever more than ``K`` would be held, so at most ``K`` are held and segments are at most
  about ``2 steps / K`` long.
- The adaptive controller (``dopri5``) is the usual one: the error is the RMS of the embedded
  estimate over ``atol + rtol * max(|y0|, |y1|)``, the step is accepted when it is <= 1, and the
  next step is ``h * clamp(0.9 err^(-1/5), 0.2, 10)``; the first from Hairer's
  ``0.01 ||y0|| / ||f(t0, y0)||``. Step sizes never depend on the graph (they are floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_parallel.ode.steps import THETA, Func, NewtonOptions, at, rk_step, theta_step
from lightning_parallel.ode.tableaux import TABLEAUX


@dataclass
class Trajectory:
    """What a forward integration leaves for the backward.

    Attributes:
        final: the state at the end of the span.
        steps: the accepted steps, ``(t, h)`` each.
        checkpoints: step index -> the state before that step (index 0 is the initial state).
        rejected: trial steps the adaptive controller rejected.
    """

    final: Tensor
    steps: list[tuple[float, float]] = field(default_factory=list)
    checkpoints: dict[int, Tensor] = field(default_factory=dict)
    rejected: int = 0


@dataclass(frozen=True)
class Problem:
    """Everything the integrator needs besides the state.

    Attributes:
        func: the right-hand side ``f(t, y)``.
        method: the integrator.
        t0: start of the span.
        t1: end of the span.
        steps: the number of fixed steps, or ``None`` for adaptive steps.
        rtol: relative tolerance of adaptive steps.
        atol: absolute tolerance of adaptive steps.
        max_steps: most accepted plus rejected adaptive steps.
        newton: the implicit methods' solver options.
    """

    func: Func
    method: str
    t0: float
    t1: float
    steps: int | None
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 10_000
    newton: NewtonOptions = field(default_factory=NewtonOptions)

    def step(self, t: float, h: float, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """One step of the method from ``(t, y)``: the new state and the local error estimate (if any)."""
        if self.method in THETA:
            return theta_step(self.func, THETA[self.method], t, h, y, self.newton), None
        return rk_step(self.func, TABLEAUX[self.method], t, h, y)


def _rms(x: Tensor) -> float:
    return float(x.detach().pow(2).mean().sqrt())


def integrate(problem: Problem, y0: Tensor, *, checkpoints: int = 0) -> Trajectory:
    """Integrates from ``t0`` to ``t1`` (with the graph when grad is enabled).

    Args:
        problem: the problem.
        y0: the initial state.
        checkpoints: most states to keep (0 keeps none).

    Returns:
        The trajectory.

    Raises:
        RuntimeError: If adaptive stepping needs more than ``max_steps`` steps.
    """
    traj = Trajectory(final=y0)
    stride = 1 if problem.steps is None else max(1, math.ceil(problem.steps / max(checkpoints, 1)))

    def keep(index: int, y: Tensor) -> None:
        nonlocal stride
        if checkpoints <= 0 or index % stride:
            return
        traj.checkpoints[index] = y.detach()
        if len(traj.checkpoints) > checkpoints:  # adaptive only: thin to every other checkpoint
            stride *= 2
            traj.checkpoints = {i: s for i, s in traj.checkpoints.items() if i % stride == 0}

    y = y0
    if problem.steps is not None:
        h = (problem.t1 - problem.t0) / problem.steps
        for n in range(problem.steps):
            keep(n, y)
            t = problem.t0 + n * h
            y, _ = problem.step(t, h, y)
            traj.steps.append((t, h))
        traj.final = y
        return traj
    t, span = problem.t0, problem.t1 - problem.t0
    with torch.no_grad():
        scale = problem.atol + problem.rtol * y0.abs()
        d0, d1 = _rms(y0 / scale), _rms(problem.func(at(t, y0), y0) / scale)
    h = min(abs(span), 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6) * math.copysign(1.0, span)
    while (problem.t1 - t) * math.copysign(1.0, span) > 1e-12 * abs(span):
        if len(traj.steps) + traj.rejected >= problem.max_steps:
            raise RuntimeError(
                f"dopri5 needed more than max_steps={problem.max_steps} steps at t={t:.6g}; raise max_steps, "
                f"loosen rtol={problem.rtol}/atol={problem.atol}, or use fixed steps."
            )
        if (t + h - problem.t1) * math.copysign(1.0, span) > 0:
            h = problem.t1 - t  # land on t1 exactly
        y_new, error = problem.step(t, h, y)
        assert error is not None  # adaptive steps are validated to dopri5, which has an embedded pair
        tolerance = problem.atol + problem.rtol * torch.maximum(y.detach().abs(), y_new.detach().abs())
        ratio = _rms(error / tolerance)
        if ratio <= 1.0:
            keep(len(traj.steps), y)
            traj.steps.append((t, h))
            t, y = t + h, y_new
        else:
            traj.rejected += 1
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.2, 0.9 * ratio ** (-1.0 / 5.0)))
        h *= factor
    traj.final = y
    return traj


def replay(problem: Problem, y: Tensor, steps: list[tuple[float, float]]) -> list[Tensor]:
    """The states along ``steps`` from ``y`` (no graph): ``[y, y after step 1, ...]``."""
    states = [y]
    with torch.no_grad():
        for t, h in steps:
            y, _ = problem.step(t, h, y)
            states.append(y)
    return states
