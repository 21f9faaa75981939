"""Fixed-point solvers for ``z = g(z)`` over a batch: plain iteration, Anderson acceleration, Broyden.

Design decisions:

- Every solver works on the batch flattened to ``(B, d)`` and mixes each example's own history only
  (Anderson's least-squares weights and Broyden's inverse-Jacobian estimate are per example), so an
  example's iterates do not depend on the rest of its batch; the stopping test is on the whole batch.
- The residual is relative, ``||g(z) - z|| / (||g(z)|| + 1e-12)`` over the batch, reported for the
  iterate that is returned. ``tol=0`` runs exactly ``max_iter`` evaluations of ``g``.
- The solvers use out-of-place tensor operations only, so that the ``unrolled`` backward of
  :class:`~lightning_parallel.implicit.DEQ` can differentiate through them as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SolverName = Literal["anderson", "broyden", "fixed_point"]
SOLVERS: tuple[str, ...] = ("anderson", "broyden", "fixed_point")


@dataclass
class SolverStats:
    """What one solve did.

    Attributes:
        iterations: evaluations of the map ``g``.
        residual: relative residual ``||g(z) - z|| / ||g(z)||`` of the returned iterate.
        converged: whether ``residual <= tol``.
    """

    iterations: int
    residual: float
    converged: bool


def _relative(gz: Tensor, z: Tensor) -> float:
    gz, z = gz.detach(), z.detach()
    return float((gz - z).norm() / (gz.norm() + 1e-12))


def fixed_point(
    g: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float
) -> tuple[Tensor, SolverStats]:
    """Plain iteration ``z <- g(z)``.

    Args:
        g: the map, on tensors shaped like ``z0``.
        z0: the starting point.
        max_iter: most evaluations of ``g``.
        tol: relative residual at which to stop.

    Returns:
        The last iterate ``g(z)`` and the solve's statistics.
    """
    z = z0
    residual = float("inf")
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        gz = g(z)
        residual = _relative(gz, z)
        z = gz
        if residual <= tol:
            break
    return z, SolverStats(iterations, residual, residual <= tol)


def anderson(
    g: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    memory: int = 5,
    regularisation: float = 1e-8,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II, no relaxation) with a per-example history of ``memory`` iterates.

    Args:
        g: the map, on tensors shaped like ``z0``.
        z0: the starting point.
        max_iter: most evaluations of ``g``.
        tol: relative residual at which to stop.
        memory: iterates kept in each example's least-squares mixing. Default 5.
        regularisation: Tikhonov term on the normal equations, relative to their trace. Default 1e-8.

    Returns:
        The last evaluated ``g(z)`` and the solve's statistics.
    """
    shape, batch = z0.shape, z0.shape[0]
    xs: list[Tensor] = []  # iterates, each (B, d)
    gs: list[Tensor] = []  # g at the iterates
    z = z0.reshape(batch, -1)
    residual, iterations = float("inf"), 0
    for iterations in range(1, max_iter + 1):
        gz = g(z.reshape(shape)).reshape(batch, -1)
        residual = _relative(gz, z)
        xs, gs = [*xs[-(memory - 1) :], z], [*gs[-(memory - 1) :], gz]
        if residual <= tol or iterations == max_iter:
            z = gz
            break
        if len(xs) == 1:
            z = gz
            continue
        f = torch.stack([b - a for a, b in zip(xs, gs)], dim=1)  # (B, m, d) residuals
        gram = f @ f.transpose(1, 2)  # (B, m, m)
        m = gram.shape[-1]
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
        # minimise ||sum_i alpha_i f_i|| subject to sum_i alpha_i = 1: alpha = H^-1 1 / (1^T H^-1 1)
        ones = torch.ones(batch, m, 1, dtype=gram.dtype, device=gram.device)
        w = torch.linalg.solve(gram + regularisation * scale * eye, ones)
        alpha = w / w.sum(dim=1, keepdim=True)  # (B, m, 1)
        z = (alpha.transpose(1, 2) @ torch.stack(gs, dim=1)).squeeze(1)
    return z.reshape(shape), SolverStats(iterations, residual, residual <= tol)


def broyden(
    g: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float
) -> tuple[Tensor, SolverStats]:
    """Broyden's ("good") method on ``r(z) = g(z) - z`` with a per-example low-rank inverse Jacobian.

    The inverse Jacobian estimate starts at ``-I`` (so the first step is a plain iteration) and gains
    one rank-one term per step: ``H = -I + U V^T``.

    Args:
        g: the map, on tensors shaped like ``z0``.
        z0: the starting point.
        max_iter: most evaluations of ``g``.
        tol: relative residual at which to stop.

    Returns:
        The iterate with the smallest residual met and the solve's statistics.
    """
    shape, batch = z0.shape, z0.shape[0]
    z = z0.reshape(batch, -1)
    us: list[Tensor] = []  # (B, d) each
    vs: list[Tensor] = []

    def h_times(x: Tensor) -> Tensor:  # H x, x (B, d)
        out = -x
        for u, v in zip(us, vs):
            out = out + u * (v * x).sum(-1, keepdim=True)
        return out

    def times_h(x: Tensor) -> Tensor:  # x^T H
        out = -x
        for u, v in zip(us, vs):
            out = out + v * (x * u).sum(-1, keepdim=True)
        return out

    gz = g(z.reshape(shape)).reshape(batch, -1)
    r = gz - z
    best, best_residual = gz, _relative(gz, z)
    iterations = 1
    while best_residual > tol and iterations < max_iter:
        dz = -h_times(r)
        z_new = z + dz
        gz = g(z_new.reshape(shape)).reshape(batch, -1)
        iterations += 1
        r_new = gz - z_new
        residual = _relative(gz, z_new)
        if residual < best_residual:
            best, best_residual = gz, residual
        dr = r_new - r
        vt = times_h(dz)  # dz^T H
        denom = (vt * dr).sum(-1, keepdim=True)
        denom = torch.where(denom.abs() < 1e-30, torch.full_like(denom, 1e-30), denom)
        us.append((dz - h_times(dr)) / denom)
        vs.append(vt)
        z, r = z_new, r_new
    return best.reshape(shape), SolverStats(iterations, best_residual, best_residual <= tol)


def solve(
    name: str, g: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float
) -> tuple[Tensor, SolverStats]:
    """Runs the named solver (``"anderson"``, ``"broyden"`` or ``"fixed_point"``).

    Args:
        name: the solver.
        g: the map.
        z0: the starting point.
        max_iter: most evaluations of ``g``.
        tol: relative residual at which to stop.

    Returns:
        The solution estimate and the statistics.
    """
    if name == "anderson":
        return anderson(g, z0, max_iter=max_iter, tol=tol)
    if name == "broyden":
        return broyden(g, z0, max_iter=max_iter, tol=tol)
    return fixed_point(g, z0, max_iter=max_iter, tol=tol)
