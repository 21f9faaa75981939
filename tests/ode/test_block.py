"""ODEBlock: the discrete adjoint equals backprop through the same steps (every method, fixed and adaptive
steps, one checkpoint and many), accuracy of the integrators, checkpoint memory, argument validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_parallel.ode import ODEBlock


class Field(nn.Module):
    """dy/dt = W2 tanh(W1 y + t u) - 0.5 y, float64."""

    def __init__(self, d: int = 3, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(d, hidden).double()
        self.l2 = nn.Linear(hidden, d).double()
        self.u = nn.Parameter(torch.randn(hidden, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y) + t * self.u)) - 0.5 * y


def _grads(block: ODEBlock, x: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    y = block(x)
    params = list(block.func.parameters())
    grads = torch.autograd.grad((y * c).sum() + y.pow(2).sum(), [x, *params])
    return [y.detach(), *grads]


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(
        4, 3, generator=g, dtype=torch.float64
    )


def _assert_relative(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).norm() / b.norm().clamp_min(1e-300))
        assert err <= tol, (i, err)


STEPPED = [
    ("euler", "direct"),
    ("rk4", "direct"),
    ("dopri5", "direct"),
    ("implicit_euler", "direct"),
    ("implicit_euler", "gmres"),
    ("crank_nicolson", "direct"),
    ("crank_nicolson", "gmres"),
]


@pytest.mark.parametrize(("method", "solver"), STEPPED)
@pytest.mark.parametrize("checkpoints", [1, 3, 8])
def test_discrete_adjoint_equals_backprop_fixed_steps(method: str, solver: str, checkpoints: int) -> None:
    func, (x, c) = Field(), _case()
    kwargs = {"method": method, "steps": 8, "linear_solver": solver, "newton_tol": 1e-13}
    discrete = _grads(ODEBlock(func, (0.0, 1.5), adjoint="discrete", checkpoints=checkpoints, **kwargs), x, c)  # type: ignore[arg-type]
    backprop = _grads(ODEBlock(func, (0.0, 1.5), adjoint="backprop", **kwargs), x, c)  # type: ignore[arg-type]
    _assert_relative(discrete, backprop, 1e-6)


@pytest.mark.parametrize("checkpoints", [1, 4, 1000])
def test_discrete_adjoint_equals_backprop_adaptive_steps(checkpoints: int) -> None:
    func, (x, c) = Field(), _case()
    x = 3 * x
    disc = ODEBlock(func, (0.0, 2.0), method="dopri5", rtol=1e-7, atol=1e-9, checkpoints=checkpoints)
    back = ODEBlock(func, (0.0, 2.0), method="dopri5", rtol=1e-7, atol=1e-9, adjoint="backprop")
    got, want = _grads(disc, x, c), _grads(back, x, c)
    assert disc.last is not None and back.last is not None
    assert disc.last.steps == back.last.steps and len(disc.last.steps) > 8  # the same accepted sequence
    assert disc.last.rejected == back.last.rejected
    _assert_relative(got, want, 1e-10)


def test_adaptive_steps_reject_and_reach_the_tolerance() -> None:
    """y' = -50 (y - cos t): a fast transient; the controller takes small steps first and rejects some."""

    class Relax(nn.Module):
        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -50.0 * (y - torch.cos(t))

    y0 = torch.tensor([[2.0]], dtype=torch.float64)
    block = ODEBlock(Relax(), (0.0, 1.0), method="dopri5", rtol=1e-8, atol=1e-10)
    y1 = block(y0)
    lam = 50.0
    exact = lam * (lam * math.cos(1) + math.sin(1)) / (lam**2 + 1) + (2.0 - lam**2 / (lam**2 + 1)) * math.exp(
        -lam
    )
    assert abs(float(y1) - exact) < 1e-6
    assert block.last is not None
    hs = [h for _, h in block.last.steps]
    assert hs[0] < hs[-1] / 2 and sum(hs) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("method", "order"),
    [("euler", 1), ("rk4", 4), ("dopri5", 5), ("implicit_euler", 1), ("crank_nicolson", 2)],
)
def test_convergence_order_on_linear_decay(method: str, order: int) -> None:
    class Decay(nn.Module):
        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -y

    y0 = torch.ones(1, 1, dtype=torch.float64)
    errors = [
        abs(float(ODEBlock(Decay(), (0.0, 1.0), method=method, steps=n)(y0)) - math.exp(-1)) for n in (8, 16)
    ]  # type: ignore[arg-type]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.3)


def test_saves_only_the_checkpoints() -> None:
    func, (x, _) = Field(), _case()
    x = x.requires_grad_()

    def saved_numel(block: ODEBlock) -> int:
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            block(x)
        return sum(total) - sum(p.numel() for p in func.parameters())

    assert saved_numel(ODEBlock(func, method="rk4", steps=16, checkpoints=4)) == 4 * x.numel()
    assert saved_numel(ODEBlock(func, method="rk4", steps=16, checkpoints=1)) == x.numel()
    assert saved_numel(ODEBlock(func, method="rk4", steps=16, adjoint="backprop")) > 16 * 4 * x.numel()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "rk45"}, r"method='rk45' is not one of"),
        ({"adjoint": "continuous"}, r"adjoint='continuous' is not one of"),
        ({"linear_solver": "lu"}, r"linear_solver='lu' is not one of"),
        ({"steps": 10, "rtol": 1e-5}, r"steps=10 with rtol=1e-05/atol=None: give steps"),
        ({"method": "rk4", "rtol": 1e-5}, r"method='rk4' has no error estimate"),
        ({"steps": 0}, r"steps=0 must be a positive integer"),
        ({"checkpoints": 0}, r"checkpoints=0 must be a positive integer"),
        ({"newton_max_iter": 0}, r"newton_max_iter=0 must be a positive integer"),
        ({"method": "dopri5", "atol": -1.0}, r"atol=-1.0 must be > 0"),
        ({"t_span": (1.0, 1.0)}, r"t_span=\[1.0, 1.0\] must be two different finite times"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ODEBlock(Field(), **kwargs)  # type: ignore[arg-type]


def test_func_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"func=function must be an nn.Module"):
        ODEBlock(lambda t, y: y)  # type: ignore[arg-type]


def test_max_steps_is_enforced() -> None:
    block = ODEBlock(Field(), method="dopri5", rtol=1e-12, atol=1e-14, max_steps=3)
    with pytest.raises(RuntimeError, match=r"more than max_steps=3"):
        block(torch.randn(2, 3, dtype=torch.float64))
