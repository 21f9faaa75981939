"""Matrix-free GMRES for the implicit integrators.

The operator is a function on tensors shaped like the state, so the same code serves the Newton
systems ``(I - h theta J) d = r`` (with JVPs) and their adjoints ``(I - h theta J)^T mu = lambda``
(with VJPs). It is written out of place so that autograd could go through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gmres(
    op: Callable[[Tensor], Tensor], rhs: Tensor, *, tol: float, max_iter: int, restart: int = 40
) -> tuple[Tensor, int]:
    """Restarted GMRES for ``op(x) = rhs`` from ``x = 0``.

    Args:
        op: the linear operator.
        rhs: the right-hand side.
        tol: relative residual ``||rhs - op(x)|| / ||rhs||`` to reach.
        max_iter: most operator applications.
        restart: Krylov dimension before a restart. Default 40.

    Returns:
        The solution estimate and the number of operator applications.
    """
    x = torch.zeros_like(rhs)
    norm_b = float(rhs.norm())
    if norm_b == 0.0:
        return x, 0
    applications = 0
    r = rhs
    while applications < max_iter:
        beta = r.norm()
        if float(beta) <= tol * norm_b:
            break
        basis = [r / beta]
        m = min(restart, max_iter - applications)
        columns: list[Tensor] = []  # Hessenberg columns, out of place so that autograd can go through
        y = beta.new_zeros(1)
        for k in range(m):
            w = op(basis[k])
            applications += 1
            coeffs = []
            for v in basis:  # modified Gram-Schmidt
                coeff = (w * v).sum()
                w = w - coeff * v
                coeffs.append(coeff)
            coeffs.append(w.norm())
            columns.append(torch.stack(coeffs))
            hess = torch.stack([torch.cat([c, c.new_zeros(k + 2 - c.numel())]) for c in columns], dim=1)
            e1 = torch.cat([beta.reshape(1), beta.new_zeros(k + 1)])
            y = torch.linalg.lstsq(hess, e1[:, None]).solution[:, 0]
            residual = float((hess @ y - e1).norm())
            if residual <= tol * norm_b or float(coeffs[-1]) <= 1e-300:
                break
            basis.append(w / coeffs[-1])
        x = x + sum(y[i] * basis[i] for i in range(y.numel()))
        r = rhs - op(x)
        applications += 1
    return x, applications
