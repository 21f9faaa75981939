"""A deep-equilibrium layer: ``z* = f(z*, x)`` found by a solver, differentiated three ways.

Design decisions:

- The forward solve runs under ``torch.no_grad()``: no graph of the solver iterations is kept
  (except with ``backward="unrolled"``, which is that graph).
- ``backward="implicit"`` (implicit function theorem): the output is ``f(z*, x)`` with ``z*``
  detached, and a hook on it replaces the incoming gradient ``g`` by the solution ``u`` of the
  adjoint system ``u = g + J^T u`` (``J = df/dz`` at ``z*``), solved by the same solver with VJPs
  of a separate graph of ``f(z*, x)``. The gradient of the parameters and of ``x`` is then
  ``(df/d(theta, x))^T (I - J^T)^-1 g``.
- ``backward="phantom"`` (Geng et al., 2021, unrolling form): from ``z*`` (detached),
  ``phantom_steps`` damped steps ``z <- damping * f(z, x) + (1 - damping) * z`` are taken with
  the graph; the output is the last one. Memory and backward cost grow with the steps, not with
  the solver's iterations. With damping 1 the gradient is the Neumann series of ``(I - J^T)^-1``
  truncated after ``phantom_steps`` terms.
- ``backward="unrolled"``: the solver itself runs with the graph and autograd differentiates its
  iterations (the baseline that memory grows with).
- Every solve's statistics are kept (:attr:`DEQ.forward_stats`, :attr:`DEQ.backward_stats`) for
  :class:`~lightning_parallel.callbacks.DEQStatistics` to log.
- K-FAC (``DPKFAC``): the calls of ``f``'s layers that carry the gradient (the output evaluation or
  the phantom/unrolled steps) are recorded as shared weights (examples counted once); the adjoint
  solve's own evaluations are not recorded (``lightning_parallel.kfac.recording``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.implicit.solvers import SOLVERS, SolverName, SolverStats, solve
from lightning_parallel.kfac import recording

BackwardName = Literal["phantom", "implicit", "unrolled"]
BACKWARDS = ("phantom", "implicit", "unrolled")


class DEQ(nn.Module):
    """Wraps ``f(z, x)`` into a layer returning its fixed point ``z* = f(z*, x)``.

    Args:
        f: an ``nn.Module`` called as ``f(z, x)``, returning a tensor shaped like ``z``.
        solver: ``"anderson"`` (default), ``"broyden"`` or ``"fixed_point"``.
        max_iter: most evaluations of ``f`` in the forward solve. Default 30.
        tol: relative residual ``||f(z) - z|| / ||f(z)||`` at which the forward solve stops. Default 1e-4.
        backward: ``"phantom"`` (default), ``"implicit"`` or ``"unrolled"`` (see the module docstring).
        phantom_steps: damped steps of the phantom gradient, ``k >= 1``. Default 5.
        damping: the phantom steps' damping ``lambda`` in ``(0, 1]``. Default 0.5.
        backward_max_iter: most iterations of the implicit backward's adjoint solve. Default 50.
        backward_tol: relative residual at which the adjoint solve stops. Default 1e-6.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: SolverName = "anderson",
        max_iter: int = 30,
        tol: float = 1e-4,
        backward: BackwardName = "phantom",
        phantom_steps: int = 5,
        damping: float = 0.5,
        backward_max_iter: int = 50,
        backward_tol: float = 1e-6,
    ) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"f={type(f).__name__} must be an nn.Module called as f(z, x).")
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is not one of {SOLVERS}.")
        if backward not in BACKWARDS:
            raise ValueError(f"backward={backward!r} is not one of {BACKWARDS}.")
        for name, value in (
            ("max_iter", max_iter),
            ("phantom_steps", phantom_steps),
            ("backward_max_iter", backward_max_iter),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}={value} must be a positive integer, e.g. 10.")
        for name, tolerance in (("tol", tol), ("backward_tol", backward_tol)):
            if not tolerance >= 0:
                raise ValueError(f"{name}={tolerance} must be >= 0 (0 runs every iteration), e.g. 1e-4.")
        if not 0 < damping <= 1:
            raise ValueError(f"damping={damping} must be in (0, 1], e.g. 0.5 (1 is undamped).")
        self.f = f
        self.solver: str = solver
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.backward: str = backward
        self.phantom_steps = int(phantom_steps)
        self.damping = float(damping)
        self.backward_max_iter = int(backward_max_iter)
        self.backward_tol = float(backward_tol)
        self.forward_stats: SolverStats | None = None
        self.backward_stats: SolverStats | None = None

    @override
    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """Solves for the fixed point.

        Args:
            x: the input injected at every iteration.
            z0: the starting point; zeros shaped like ``x`` when omitted.

        Returns:
            The fixed point (``f(z*, x)`` with the implicit backward, the last phantom step with
            the phantom backward, the solver's last iterate when unrolled or without a graph).
        """
        start = torch.zeros_like(x) if z0 is None else z0
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad or start.requires_grad or any(p.requires_grad for p in self.f.parameters())
        )
        with recording.shared_weights():
            if needs_graph and self.backward == "unrolled":
                z, self.forward_stats = self._solve(x, start)
                return z
            with torch.no_grad():
                z_star, self.forward_stats = self._solve(x, start)
            if not needs_graph:
                return z_star
            if self.backward == "phantom":
                return self._phantom(z_star, x)
            return self._implicit(z_star, x)

    def _solve(self, x: Tensor, z0: Tensor) -> tuple[Tensor, SolverStats]:
        return solve(self.solver, lambda z: self.f(z, x), z0, max_iter=self.max_iter, tol=self.tol)

    def _phantom(self, z_star: Tensor, x: Tensor) -> Tensor:
        z = z_star
        for _ in range(self.phantom_steps):
            fz = self.f(z, x)
            z = fz if self.damping == 1.0 else self.damping * fz + (1.0 - self.damping) * z
        return z

    def _implicit(self, z_star: Tensor, x: Tensor) -> Tensor:
        out = self.f(z_star, x)  # the graph the gradient leaves through
        with torch.enable_grad(), recording.not_recorded():
            z_leaf = z_star.detach().requires_grad_()
            f_leaf = self.f(z_leaf, x.detach())  # J^T products for the adjoint solve

        def adjoint(grad: Tensor) -> Tensor:
            def step(u: Tensor) -> Tensor:
                (jtu,) = torch.autograd.grad(f_leaf, z_leaf, u, retain_graph=True)
                return grad + jtu

            with torch.enable_grad():
                u, self.backward_stats = solve(
                    self.solver, step, grad, max_iter=self.backward_max_iter, tol=self.backward_tol
                )
            return u.detach()

        if out.requires_grad:
            out.register_hook(adjoint)
        return out

    @override
    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, max_iter={self.max_iter}, tol={self.tol}, backward={self.backward!r}, "
            f"phantom_steps={self.phantom_steps}, damping={self.damping}"
        )
