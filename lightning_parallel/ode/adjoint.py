"""The discrete adjoint: an autograd function whose backward is the exact adjoint of the forward steps.

The forward integrates without a graph and saves only the checkpoints (``ctx.save_for_backward``, so
saved-tensor hooks such as the activation compressor see them). The backward walks the segments
between checkpoints from the last to the first:

- explicit methods recompute the segment's accepted steps from its checkpoint with the graph and
  differentiate them in one pass (:func:`segment_vjp`): one extra forward in all, and a transient
  peak of one segment's graph (``steps / K`` steps);
- implicit methods replay the segment without a graph (their Newton solutions are the states) and
  run each step's implicit-function-theorem adjoint (:func:`~lightning_parallel.ode.steps.step_vjp`)
  from the segment's end back to its start: a transient peak of one segment's states and one
  step's graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_parallel.kfac import recording
from lightning_parallel.ode.integrate import Problem, Trajectory, integrate, replay
from lightning_parallel.ode.steps import step_vjp
from lightning_parallel.ode.tableaux import TABLEAUX


def segment_vjp(
    problem: Problem, start: Tensor, steps: list[tuple[float, float]], lam: Tensor, params: list[Tensor]
) -> tuple[Tensor, list[Tensor | None]]:
    """The adjoint of a run of explicit steps: autograd through their recomputation from ``start``."""
    with torch.enable_grad():
        y0 = start.detach().requires_grad_()
        y = y0
        for t, h in steps:
            y, _ = problem.step(t, h, y)
        grads = torch.autograd.grad(y, (y0, *params), lam, allow_unused=True)
    lam0 = grads[0] if grads[0] is not None else torch.zeros_like(lam)
    return lam0, list(grads[1:])


def _accumulate(totals: list[Tensor | None], where: list[int], grads: list[Tensor | None]) -> None:
    for i, g in zip(where, grads):
        if g is not None:
            totals[i] = g if totals[i] is None else totals[i] + g  # type: ignore[operator]


class DiscreteAdjoint(torch.autograd.Function):
    """``y(t1) = DiscreteAdjoint.apply(problem, checkpoints, out, y0, *params)``; ``out`` (a list) receives the
    forward trajectory (without its checkpoints) for statistics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, problem: Problem, checkpoints: int, out: list[Trajectory], y0: Tensor, *params: Tensor
    ) -> Tensor:
        traj = integrate(problem, y0.detach(), checkpoints=checkpoints)
        indices = sorted(traj.checkpoints)
        ctx.problem, ctx.steps, ctx.indices, ctx.n_params = problem, traj.steps, indices, len(params)
        ctx.save_for_backward(*(traj.checkpoints[i] for i in indices), *params)
        out.append(Trajectory(final=traj.final, steps=traj.steps, rejected=traj.rejected))
        return traj.final

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        problem: Problem = ctx.problem
        saved = ctx.saved_tensors
        n_ckpt = len(ctx.indices)
        states, params = saved[:n_ckpt], saved[n_ckpt:]
        needed = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        where = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        totals: list[Tensor | None] = [None] * len(params)
        tableau = TABLEAUX.get(problem.method)
        bounds = [*ctx.indices, len(ctx.steps)]
        lam = grad
        with recording.shared_weights():
            for seg in reversed(range(n_ckpt)):
                steps = ctx.steps[bounds[seg] : bounds[seg + 1]]
                if tableau is not None:  # explicit: one recomputation of the segment with its graph
                    lam, grads = segment_vjp(problem, states[seg], steps, lam, needed)
                    _accumulate(totals, where, grads)
                    continue
                # implicit: the Newton solutions (the states), then each step's IFT adjoint
                ys = replay(problem, states[seg], steps)
                for n in reversed(range(len(steps))):
                    t, h = steps[n]
                    lam, grads = step_vjp(
                        problem.func,
                        problem.method,
                        None,
                        t,
                        h,
                        ys[n],
                        ys[n + 1],
                        lam,
                        needed,
                        problem.newton,
                    )
                    _accumulate(totals, where, grads)
                ys.clear()
        return (None, None, None, lam, *totals)
