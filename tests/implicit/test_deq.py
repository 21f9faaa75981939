"""DEQ: the implicit backward against the analytic gradient through (I - W)^-1 on a linear f, phantom's
convergence to it, unrolled against a hand-written unrolled loop, the solvers, and argument validation."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_parallel.implicit import DEQ, anderson, broyden, fixed_point


class LinearMap(nn.Module):
    """f(z, x) = z W^T + x U^T + b with ||W||_2 = 0.6 (a contraction)."""

    def __init__(self, d: int = 6, n: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.w = nn.Parameter(0.6 * w / torch.linalg.matrix_norm(w, ord=2))
        self.u = nn.Parameter(torch.randn(d, n, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.w.t() + x @ self.u.t() + self.b


class TanhMap(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(d, d).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


def _inputs(n: int = 4, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, n, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(batch, 6, generator=g, dtype=torch.float64)
    return x, c


def _analytic(f: LinearMap, x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    """z* = (I - W)^-1 (U x + b) per row, loss sum(c * z*): u = c (I - W)^-1, dW = u^T z*, dU = u^T x, ..."""
    eye = torch.eye(6, dtype=torch.float64)
    w, u_mat, b = f.w.detach(), f.u.detach(), f.b.detach()
    z_star = torch.linalg.solve(eye - w, (x.detach() @ u_mat.t() + b).t()).t()
    u = torch.linalg.solve((eye - w).t(), c.t()).t()
    return {"x": u @ u_mat, "w": u.t() @ z_star, "u": u.t() @ x.detach(), "b": u.sum(0), "z": z_star}


def _grads(deq: DEQ, x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().requires_grad_()
    z = deq(x, torch.zeros(x.shape[0], 6, dtype=torch.float64))
    deq.f.zero_grad()
    (z * c).sum().backward()
    f = deq.f
    return {"x": x.grad, "w": f.w.grad, "u": f.u.grad, "b": f.b.grad, "z": z.detach()}


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_implicit_backward_equals_analytic_gradient(solver: str) -> None:
    f = LinearMap()
    x, c = _inputs()
    deq = DEQ(
        f,
        solver=solver,
        max_iter=200,
        tol=1e-13,
        backward="implicit",
        backward_max_iter=200,
        backward_tol=1e-13,
    )
    got, want = _grads(deq, x, c), _analytic(f, x, c)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-8, msg=key)
    assert deq.forward_stats is not None and deq.forward_stats.converged
    assert deq.backward_stats is not None and deq.backward_stats.converged
    if solver != "fixed_point":  # the accelerated solvers need fewer evaluations than plain iteration
        plain = DEQ(f, solver="fixed_point", max_iter=200, tol=1e-13)
        plain(x.detach(), torch.zeros(3, 6, dtype=torch.float64))
        assert (
            plain.forward_stats is not None and deq.forward_stats.iterations < plain.forward_stats.iterations
        )


def test_phantom_converges_to_implicit_gradient() -> None:
    f = LinearMap()
    x, c = _inputs()
    want = _analytic(f, x, c)
    errors = []
    for steps in (1, 5, 20, 80):
        deq = DEQ(
            f,
            solver="anderson",
            max_iter=200,
            tol=1e-13,
            backward="phantom",
            phantom_steps=steps,
            damping=1.0,
        )
        got = _grads(deq, x, c)
        errors.append(float((got["w"] - want["w"]).norm() / want["w"].norm()))
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-6, errors
    assert errors[0] > 1e-2, errors  # one step is a truncation, far from exact


def test_phantom_damped_steps_are_the_written_formula() -> None:
    f = TanhMap()
    x = torch.randn(3, 6, dtype=torch.float64)
    deq = DEQ(f, max_iter=100, tol=1e-12, backward="phantom", phantom_steps=3, damping=0.7)
    out = deq(x)
    with torch.no_grad():
        z_star = DEQ(f, max_iter=100, tol=1e-12)(x)
    z = z_star
    for _ in range(3):
        z = 0.7 * f(z, x) + 0.3 * z
    torch.testing.assert_close(out, z)
    (g_out,) = torch.autograd.grad(out.sum(), f.lin.weight)
    (g_ref,) = torch.autograd.grad(z.sum(), f.lin.weight)
    torch.testing.assert_close(g_out, g_ref)


def test_unrolled_equals_autograd_through_a_written_loop() -> None:
    f = TanhMap()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    deq = DEQ(f, solver="fixed_point", max_iter=7, tol=0.0, backward="unrolled")
    out = deq(x)
    got = torch.autograd.grad(out.pow(2).sum(), (x, f.lin.weight))
    z = torch.zeros_like(x)
    for _ in range(7):
        z = f(z, x)
    want = torch.autograd.grad(z.pow(2).sum(), (x, f.lin.weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert deq.forward_stats is not None and deq.forward_stats.iterations == 7


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_unrolled_accelerated_solver_matches_finite_differences(solver: str) -> None:
    f = TanhMap()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    deq = DEQ(f, solver=solver, max_iter=6, tol=0.0, backward="unrolled")
    assert torch.autograd.gradcheck(lambda inp: deq(inp), (x,))


def test_no_graph_in_forward_solve_and_eval() -> None:
    f = TanhMap()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        out = DEQ(f, backward="implicit")(x)
    assert not out.requires_grad
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        DEQ(f, max_iter=50, tol=1e-10, backward="phantom", phantom_steps=2)(x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        DEQ(f, max_iter=50, tol=1e-10, backward="unrolled")(x)
    phantom = sum(s for s in saved if s > 0)
    unrolled = -sum(s for s in saved if s < 0)
    assert phantom < unrolled / 3  # two steps' graph, not the solver's iterations


@pytest.mark.parametrize("solve", [anderson, broyden, fixed_point])
def test_solvers_find_the_fixed_point_of_a_contraction(solve: object) -> None:
    a = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    z, stats = solve(lambda z: z @ a.t() + b, torch.zeros(4, 2, dtype=torch.float64), max_iter=100, tol=1e-12)  # type: ignore[operator]
    exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - a, b)
    torch.testing.assert_close(z, exact.expand(4, 2))
    assert stats.converged and stats.residual <= 1e-12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "newton"}, r"solver='newton' is not one of"),
        ({"backward": "exact"}, r"backward='exact' is not one of"),
        ({"max_iter": 0}, r"max_iter=0 must be a positive integer"),
        ({"phantom_steps": 0}, r"phantom_steps=0 must be a positive integer"),
        ({"backward_max_iter": 2.5}, r"backward_max_iter=2.5 must be a positive integer"),
        ({"tol": -1.0}, r"tol=-1.0 must be >= 0"),
        ({"backward_tol": float("nan")}, r"backward_tol=nan must be >= 0"),
        ({"damping": 0.0}, r"damping=0.0 must be in \(0, 1\]"),
        ({"damping": 1.5}, r"damping=1.5 must be in \(0, 1\]"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DEQ(TanhMap(), **kwargs)  # type: ignore[arg-type]


def test_f_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"f=function must be an nn.Module"):
        DEQ(lambda z, x: z)  # type: ignore[arg-type]
