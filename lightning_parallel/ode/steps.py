"""One step of each integrator, and the exact adjoint (VJP) of that step.

Design decisions:

- Explicit Runge-Kutta steps are plain tensor code; their adjoint is autograd through one
  recomputed step from a detached start (every stage evaluated once with its true cotangent).
- The implicit methods are theta-methods, ``y1 = y0 + h ((1 - theta) f(t0, y0) + theta f(t1, y1))``
  (``implicit_euler``: theta 1, ``crank_nicolson``: theta 1/2). The stage equation is solved by
  Newton; each Newton system ``(I - h theta J) d = r`` by a dense solve (``direct``: the Jacobian of
  the whole state from batched JVPs) or by GMRES on JVPs (``gmres``). The adjoint of the step is the
  implicit function theorem: ``mu = (I - h theta J1)^-T lambda``, then
  ``lambda0 = mu + h (1 - theta) J0^T mu`` and ``dtheta += h theta df1/dtheta^T mu + h (1 - theta) df0/dtheta^T mu``;
  the transposed system is solved the same two ways, with VJPs.
- ``backprop`` through an implicit step runs Newton to convergence without a graph and then one
  Newton step with it from the detached solution: at a converged point that step's derivative is
  exactly the implicit-function-theorem derivative, computed by autograd through a dense linear
  solve (whatever ``linear_solver`` says: the baseline is meant for small states).
- The Jacobian products of the solves are not recorded by K-FAC (``recording.not_recorded``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn

from lightning_parallel.kfac import recording
from lightning_parallel.ode.linear import gmres
from lightning_parallel.ode.tableaux import Tableau

Func = Callable[[Tensor, Tensor], Tensor]
THETA = {"implicit_euler": 1.0, "crank_nicolson": 0.5}


@dataclass(frozen=True)
class NewtonOptions:
    """How the implicit methods solve their stage equations.

    Attributes:
        linear_solver: ``"direct"`` (dense Jacobian of the state) or ``"gmres"`` (matrix-free).
        tol: Newton stops when ``||d|| <= tol * (1 + ||y||)``.
        max_iter: most Newton iterations per step.
        krylov_tol: relative residual of each GMRES solve.
        krylov_max_iter: most operator applications per GMRES solve.
    """

    linear_solver: str = "direct"
    tol: float = 1e-10
    max_iter: int = 20
    krylov_tol: float = 1e-12
    krylov_max_iter: int = 200


def at(t: float, like: Tensor) -> Tensor:
    """The time ``t`` as a 0-d tensor of ``like``'s dtype and device (what ``func(t, y)`` receives)."""
    return torch.tensor(t, dtype=like.dtype, device=like.device)


def rk_step(func: Func, tableau: Tableau, t: float, h: float, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """One explicit Runge-Kutta step.

    Returns:
        ``y(t + h)`` and the embedded local error estimate (``None`` without an embedded pair).
    """
    ks: list[Tensor] = []
    for row, c in zip(tableau.a, tableau.c):
        stage = y
        for a, k in zip(row, ks):
            if a:
                stage = stage + (h * a) * k
        ks.append(func(at(t + c * h, y), stage))
    y_new = y
    for b, k in zip(tableau.b, ks):
        if b:
            y_new = y_new + (h * b) * k
    error = None
    if tableau.b_error:
        error = torch.zeros_like(y)
        for e, k in zip(tableau.b_error, ks):
            if e:
                error = error + (h * e) * k
    return y_new, error


def _jacobian(func: Func, t1: Tensor, z: Tensor) -> Tensor:
    """The dense ``(n, n)`` Jacobian ``df/dy`` at ``(t1, z)`` of the whole state, row by row from VJPs
    of one graph (``torch.func`` transforms measured ~10x slower on the small states a dense solve is for)."""
    with torch.enable_grad(), recording.not_recorded():
        leaf = z.detach().requires_grad_()
        out = func(t1, leaf)
        eye = torch.eye(out.numel(), dtype=z.dtype, device=z.device)
        rows = [
            _grad(out, leaf, eye[i].view_as(out), retain_graph=i + 1 < out.numel()).reshape(-1)
            for i in range(out.numel())
        ]
    return torch.stack(rows).detach()


def _grad(out: Tensor, leaf: Tensor, cotangent: Tensor, retain_graph: bool) -> Tensor:
    if not out.requires_grad:  # f does not depend on y
        return torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(out, leaf, cotangent, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


def _newton_matrix(func: Func, t1: Tensor, z: Tensor, h_theta: float) -> Tensor:
    """``I - h theta J`` at ``(t1, z)`` as a dense matrix."""
    jac = _jacobian(func, t1, z)
    return torch.eye(jac.shape[0], dtype=jac.dtype, device=jac.device) - h_theta * jac


def _jvp_operator(func: Func, t1: Tensor, z: Tensor, h_theta: float) -> Callable[[Tensor], Tensor]:
    """``v -> (I - h theta J) v`` by forward-mode AD (no graph)."""
    point = z.detach()

    def op(v: Tensor) -> Tensor:
        with fwad.dual_level():
            out = func(t1, fwad.make_dual(point, v))
            tangent = fwad.unpack_dual(out).tangent
        return v if tangent is None else v - h_theta * tangent

    return op


def _newton_solve(
    func: Func, t1: Tensor, z: Tensor, h_theta: float, rhs: Tensor, options: NewtonOptions
) -> Tensor:
    """``(I - h theta J)^-1 rhs`` (no graph)."""
    if options.linear_solver == "gmres":
        return gmres(
            _jvp_operator(func, t1, z, h_theta), rhs, tol=options.krylov_tol, max_iter=options.krylov_max_iter
        )[0]
    matrix = _newton_matrix(func, t1, z, h_theta)
    return torch.linalg.solve(matrix, rhs.reshape(-1)).view_as(rhs)


def adjoint_solve(
    func: Func, t1: Tensor, z: Tensor, h_theta: float, lam: Tensor, options: NewtonOptions
) -> Tensor:
    """``mu = (I - h theta J)^-T lam`` with ``J = df/dy`` at ``(t1, z)`` (no graph)."""
    if options.linear_solver == "direct":  # the same matrix as the forward Newton system, transposed
        matrix = _newton_matrix(func, t1, z, h_theta)
        return torch.linalg.solve(matrix.t(), lam.reshape(-1)).view_as(lam)
    with torch.enable_grad(), recording.not_recorded():
        leaf = z.detach().requires_grad_()
        out = func(t1, leaf)

        def op(v: Tensor) -> Tensor:
            return v - h_theta * _grad(out, leaf, v, retain_graph=True)

        mu, _ = gmres(op, lam.detach(), tol=options.krylov_tol, max_iter=options.krylov_max_iter)
    return mu.detach()


def theta_step(func: Func, theta: float, t: float, h: float, y: Tensor, options: NewtonOptions) -> Tensor:
    """One implicit theta-method step (see the module docstring); differentiable when grad is enabled."""
    t0, t1 = at(t, y), at(t + h, y)
    h_theta = h * theta
    explicit = y if theta == 1.0 else y + (h * (1.0 - theta)) * func(t0, y)  # carries the graph if any
    with torch.no_grad(), recording.not_recorded():
        e = explicit.detach()
        z = e.clone()
        for _ in range(options.max_iter):
            residual = z - h_theta * func(t1, z) - e
            d = _newton_solve(func, t1, z, h_theta, residual, options)
            z = z - d
            if float(d.norm()) <= options.tol * (1.0 + float(z.norm())):
                break
        else:
            warnings.warn(
                f"Newton did not converge in {options.max_iter} iterations at t={t:.6g} (h={h:.3g}); "
                "raise newton_max_iter or take smaller steps.",
                stacklevel=3,
            )
    if not torch.is_grad_enabled() or not (explicit.requires_grad or _has_grad_params(func)):
        return z
    # one differentiable Newton step from the converged point: its derivative is the IFT derivative,
    # taken by autograd through a dense solve (GMRES cannot carry the derivative of a zero residual)
    residual = z - h_theta * func(t1, z) - explicit
    matrix = _newton_matrix(func, t1, z, h_theta)
    return z - torch.linalg.solve(matrix, residual.reshape(-1)).view_as(z)


def _has_grad_params(func: Func) -> bool:
    return isinstance(func, nn.Module) and any(p.requires_grad for p in func.parameters())


def step_vjp(
    func: Func,
    method: str,
    tableau: Tableau | None,
    t: float,
    h: float,
    y0: Tensor,
    y1: Tensor,
    lam: Tensor,
    params: Sequence[Tensor],
    options: NewtonOptions,
) -> tuple[Tensor, list[Tensor | None]]:
    """The adjoint of one step: ``(dL/dy0, dL/dparams)`` given ``lam = dL/dy1``.

    Args:
        func: the right-hand side ``f(t, y)``.
        method: the integrator's name.
        tableau: its tableau (explicit methods).
        t: the step's start time.
        h: the step size.
        y0: the state at ``t`` (no graph).
        y1: the state at ``t + h`` (implicit methods; ignored by explicit ones).
        lam: the gradient of the loss with respect to ``y1``.
        params: the tensors to differentiate (``func``'s parameters).
        options: the implicit methods' solver options.

    Returns:
        The gradient with respect to ``y0`` and one entry per parameter (``None`` where unused).
    """
    with torch.enable_grad():
        if tableau is not None:
            start = y0.detach().requires_grad_()
            y_new, _ = rk_step(func, tableau, t, h, start)
            grads = torch.autograd.grad(y_new, (start, *params), lam, allow_unused=True)
            lam0 = grads[0] if grads[0] is not None else torch.zeros_like(lam)
            return lam0, list(grads[1:])
        theta = THETA[method]
        t0, t1 = at(t, y0), at(t + h, y0)
        mu = adjoint_solve(func, t1, y1, h * theta, lam, options)
        param_grads: list[Tensor | None] = [None] * len(params)
        if params:
            f1 = func(t1, y1.detach())
            param_grads = list(torch.autograd.grad(f1, params, (h * theta) * mu, allow_unused=True))
        if theta == 1.0:
            return mu, param_grads
        start = y0.detach().requires_grad_()
        f0 = func(t0, start)
        grads = torch.autograd.grad(f0, (start, *params), (h * (1.0 - theta)) * mu, allow_unused=True)
        lam0 = mu if grads[0] is None else mu + grads[0]
        for i, g in enumerate(grads[1:]):
            if g is not None:
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g  # type: ignore[operator]
        return lam0, param_grads
