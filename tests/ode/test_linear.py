"""GMRES against a dense solve, with restarts and from a zero right-hand side."""

from __future__ import annotations

import torch

from lightning_parallel.ode import gmres


def test_gmres_matches_dense_solve_with_restarts() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64) / 6 + torch.eye(30, dtype=torch.float64)
    b = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x, applications = gmres(lambda v: (a @ v.reshape(-1)).view(5, 6), b, tol=1e-12, max_iter=300, restart=7)
    torch.testing.assert_close(x.reshape(-1), torch.linalg.solve(a, b.reshape(-1)), rtol=1e-9, atol=1e-10)
    assert applications > 7  # it had to restart
    zero, none = gmres(lambda v: v, torch.zeros(3, dtype=torch.float64), tol=1e-12, max_iter=10)
    assert none == 0 and not zero.any()
