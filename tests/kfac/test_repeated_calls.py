"""K-FAC over the layers inside DEQ and ODEBlock: the factors of a layer called once per stage, step or
solver iteration are those of shared weights (rows of every call, the batch's examples counted once),
checked against factors built by hand from the inputs and output gradients of an autograd reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_parallel.implicit import DEQ
from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from lightning_parallel.ode import ODEBlock

B = 5


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(3, 6).double()
        self.l2 = nn.Linear(6, 3).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y))) * 0.5


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(3, 6).double()
        self.l2 = nn.Linear(6, 3).double()

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.l2(torch.tanh(self.l1(z))) + x


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(
        B, 3, generator=g, dtype=torch.float64
    )


class Recorder:
    """Inputs and output gradients of every call of the given Linear layers (the hand-made reference)."""

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.grads: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if output.requires_grad:
                self.inputs[name].append(inputs[0].detach())
                output.register_hook(lambda g: self.grads[name].append(g.detach()))

        return hook

    def factors(self, name: str, examples: int = B) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat(self.inputs[name])
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        g = torch.cat(self.grads[name])
        return a.t() @ a / a.shape[0], examples * (g.t() @ g)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _kfac_factors(model: nn.Module, run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    pre = KFACPreconditioner(model, KFACOptions(kl_clip=None))
    run()
    pre.step()
    out = {}
    for layer in pre.layers:
        assert layer.a_factor is not None and layer.g_factor is not None
        out[layer.name] = (layer.a_factor, layer.g_factor)
    pre.remove_hooks()
    return out


def _euler_reference(func: Field, x: torch.Tensor, c: torch.Tensor, steps: int) -> Recorder:
    rec = Recorder({"l1": func.l1, "l2": func.l2})
    y, h = x, 1.0 / steps
    for n in range(steps):
        y = y + h * func(torch.tensor(n * h, dtype=torch.float64), y)
    (y * c).sum().backward()
    rec.remove()
    return rec


def _implicit_euler_reference(func: Field, x: torch.Tensor, c: torch.Tensor, steps: int) -> Recorder:
    """Each step's recorded call is f(t1, y1) with the cotangent h mu, mu = (I - h J1)^-T lambda (dense)."""
    h, ys = 1.0 / steps, [x]
    t = [torch.tensor((n + 1) * h, dtype=torch.float64) for n in range(steps)]
    eye = torch.eye(x.numel(), dtype=torch.float64)

    def jac(n: int, y: torch.Tensor) -> torch.Tensor:
        return torch.autograd.functional.jacobian(
            lambda v: func(t[n], v.view_as(y)).reshape(-1), y.reshape(-1)
        )

    for n in range(steps):
        y = ys[-1]
        for _ in range(30):  # Newton on y - h f(t1, y) - y_n = 0
            residual = (y - h * func(t[n], y) - ys[-1]).detach()
            y = y - torch.linalg.solve(eye - h * jac(n, y), residual.reshape(-1)).view_as(y)
        ys.append(y.detach())
    lam, mus = c, []
    for n in reversed(range(steps)):
        lam = torch.linalg.solve((eye - h * jac(n, ys[n + 1])).t(), lam.reshape(-1)).view_as(lam)
        mus.append((n, lam))
    rec = Recorder({"l1": func.l1, "l2": func.l2})
    for n, mu in mus:
        func(t[n], ys[n + 1]).backward(h * mu)
    rec.remove()
    return rec


@pytest.mark.parametrize(
    ("adjoint", "checkpoints", "method"),
    [
        ("discrete", 1, "euler"),
        ("discrete", 3, "euler"),
        ("backprop", 1, "euler"),
        ("discrete", 2, "implicit_euler"),
    ],
)
def test_ode_block_factors_are_shared_weight_factors(adjoint: str, checkpoints: int, method: str) -> None:
    x, c = _data()
    func = Field()
    if method == "euler":
        rec = _euler_reference(func, x, c, steps=6)
    else:
        rec = _implicit_euler_reference(func, x, c, steps=6)
    func.zero_grad()
    block = ODEBlock(func, method=method, steps=6, adjoint=adjoint, checkpoints=checkpoints, newton_tol=1e-13)  # type: ignore[arg-type]
    got = _kfac_factors(block, lambda: (block(x) * c).sum().backward())
    assert set(got) == {"func.l1", "func.l2"}
    for name in ("l1", "l2"):
        a_ref, g_ref = rec.factors(name)
        torch.testing.assert_close(got[f"func.{name}"][0], a_ref, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(got[f"func.{name}"][1], g_ref, rtol=1e-6, atol=1e-12)


def test_without_a_scope_every_call_counts_its_examples() -> None:
    """The hooks as they were: six Euler steps outside a scope make G six times the shared-weights G."""
    x, c = _data()
    func = Field()
    rec = _euler_reference(func, x, c, steps=6)
    got = _kfac_factors(func, lambda: _euler_reference(func, x, c, steps=6))
    _, g_ref = rec.factors("l1")
    torch.testing.assert_close(got["l1"][1], 6 * g_ref)


def test_deq_phantom_factors_are_shared_weight_factors() -> None:
    x, c = _data()
    cell = Cell()
    deq = DEQ(cell, max_iter=100, tol=1e-12, backward="phantom", phantom_steps=4, damping=0.8)
    with torch.no_grad():
        z_star = DEQ(cell, max_iter=100, tol=1e-12)(x)
    rec = Recorder({"l1": cell.l1, "l2": cell.l2})
    z = z_star
    for _ in range(4):
        z = 0.8 * cell(z, x) + 0.2 * z
    (z * c).sum().backward()
    rec.remove()
    got = _kfac_factors(deq, lambda: (deq(x) * c).sum().backward())
    for name in ("l1", "l2"):
        a_ref, g_ref = rec.factors(name)
        torch.testing.assert_close(got[f"f.{name}"][0], a_ref)
        torch.testing.assert_close(got[f"f.{name}"][1], g_ref)


def test_deq_implicit_factors_use_the_adjoint_not_the_solver_products() -> None:
    """One recorded call (f at z*) whose output gradient is u = (I - J^T)^-1 g, J from a dense Jacobian."""
    x, c = _data()
    cell = Cell()
    with torch.no_grad():
        z_star = DEQ(cell, max_iter=200, tol=1e-13)(x)
    jac = torch.autograd.functional.jacobian(lambda z: cell(z.view_as(x), x).reshape(-1), z_star.reshape(-1))
    u = torch.linalg.solve(torch.eye(jac.shape[0], dtype=torch.float64) - jac.t(), c.reshape(-1)).view_as(c)
    rec = Recorder({"l1": cell.l1, "l2": cell.l2})
    cell(z_star, x).backward(u)
    rec.remove()
    deq = DEQ(cell, max_iter=200, tol=1e-13, backward="implicit", backward_tol=1e-13, backward_max_iter=200)
    got = _kfac_factors(deq, lambda: (deq(x) * c).sum().backward())
    for name in ("l1", "l2"):
        a_ref, g_ref = rec.factors(name)
        torch.testing.assert_close(got[f"f.{name}"][0], a_ref)
        torch.testing.assert_close(got[f"f.{name}"][1], g_ref, rtol=1e-6, atol=1e-12)
