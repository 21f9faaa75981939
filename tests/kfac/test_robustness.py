"""In-place activations, silent hooks, non-finite factors, failing decompositions, bad arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner, assign_owners, layer_cost, resolve


def test_inplace_activation_gives_the_same_factors() -> None:
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    g_factors = []
    for inplace in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 2))
        kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None))
        model(x).pow(2).mean().backward()
        kfac.step()
        g_factors.append(kfac.layers[0].g_factor)
    torch.testing.assert_close(g_factors[0], g_factors[1])
    assert g_factors[0].abs().sum() > 0


class _FunctionalUseModel(nn.Module):
    """Applies ``proj``'s weight through ``F.linear``, so the hooks of ``proj`` never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.proj.weight, self.proj.bias).mean(1))


def test_layer_whose_hooks_never_fire_is_left_alone() -> None:
    torch.manual_seed(0)
    model = _FunctionalUseModel()
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None))
    assert [layer.name for layer in kfac.layers] == ["proj", "head"]
    model(torch.randn(4, 5, 8)).pow(2).mean().backward()
    raw = model.proj.weight.grad.clone()
    raw_head = model.head.weight.grad.clone()
    with pytest.warns(UserWarning, match="proj.*did not fire"):
        kfac.step()
    torch.testing.assert_close(model.proj.weight.grad, raw)
    assert not torch.allclose(model.head.weight.grad, raw_head)


def test_skip_layers_regex() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(1, 1, 1), nn.Linear(3, 2))
    kfac = KFACPreconditioner(model, KFACOptions(skip_layers=[r"^0$", "Conv2d"]))
    assert [layer.name for layer in kfac.layers] == ["2"]


def _train(model: nn.Module, kfac: KFACPreconditioner, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        torch.manual_seed(step)
        optimizer.zero_grad()
        F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 2)).backward()
        kfac.step(optimizer)
        optimizer.step()


def test_non_finite_factors_are_skipped_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    kfac = KFACPreconditioner(model, KFACOptions(inv_update_steps=1))
    _train(model, kfac, 2)
    good = kfac.layers[0].a_factor.clone()
    original = kfac.layers[0].accumulate_input

    def poisoned(x: torch.Tensor) -> None:
        original(x)
        kfac.layers[0].a_sum[0, 0] = float("nan")

    kfac.layers[0].accumulate_input = poisoned  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="factors of layer '0' are not finite"):
        _train(model, kfac, 2)
    torch.testing.assert_close(kfac.layers[0].a_factor, good)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failing_eigendecomposition_is_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    kfac = KFACPreconditioner(model, KFACOptions(inv_update_steps=1))

    def broken(a: torch.Tensor) -> None:
        raise torch.linalg.LinAlgError("the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="decomposing layer '0' failed.*not preconditioned"):
        kfac.step(torch.optim.SGD(model.parameters(), lr=0.1))
    for p, r in zip(model.parameters(), raw):
        torch.testing.assert_close(p.grad, r)


def test_nan_decomposition_keeps_the_previous_one(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    kfac = KFACPreconditioner(model, KFACOptions(inv_update_steps=1))
    _train(model, kfac, 2)
    before = {k: v.clone() for k, v in kfac.layers[0].decomposition.items()}
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: tuple(t * float("nan") for t in real(a)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, kfac, 1)
    assert any("keeps its previous decomposition" in str(w.message) for w in caught)
    for k, v in before.items():
        torch.testing.assert_close(kfac.layers[0].decomposition[k], v)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": 0.0}, r"`damping=0.0` must be > 0"),
        ({"damping": -1}, r"`damping=-1.0` must be > 0"),
        ({"damping": [[0, 0.1], [10, -0.1]]}, r"`damping=-0.1` must be > 0"),
        ({"kl_clip": 0}, r"`kl_clip=0.0` must be > 0"),
        ({"factor_decay": 1.0}, r"`factor_decay=1.0` must be in \[0, 1\)"),
        ({"factor_update_steps": 0}, r"`factor_update_steps=0.0` must be an integer >= 1"),
        ({"inv_update_steps": 0.5}, r"`inv_update_steps=0.5` must be an integer >= 1"),
        ({"assignment": "zero"}, r"`assignment='zero'` is unknown; use 'dp'"),
        ({"method": "cholesky"}, r"`method='cholesky'` is unknown"),
        ({"skip_layers": ["("]}, r"`skip_layers` has the pattern '\('"),
        ({"damping": [[5, 0.1]]}, r"`damping` starts at step 5"),
        ({"damping": [[0, 0.1], [0, 0.2]]}, r"must strictly increase"),
        ({"damping": []}, r"`damping=\[\]` is empty"),
        ({"damping": [[0, 1, 2]]}, r"each entry must be a \[first_step, value\] pair"),
        ({"damping": "high"}, r"`damping='high'` is not a schedule"),
        ({"damping": True}, r"`damping=True` is a bool"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        KFACOptions(**kwargs)


def test_callable_schedule_is_checked_per_step() -> None:
    options = KFACOptions(damping=lambda step: 0.1 if step < 2 else 0.0)
    assert options.at("damping", 1) == 0.1
    with pytest.raises(ValueError, match=r"`damping=0.0` must be > 0"):
        options.at("damping", 2)


def test_model_without_supported_layers() -> None:
    with pytest.raises(ValueError, match=r"`model` \(Sequential\) has no nn.Linear or nn.Conv2d layer"):
        KFACPreconditioner(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"loosen `skip_layers`"):
        KFACPreconditioner(nn.Sequential(nn.Linear(2, 2)), KFACOptions(skip_layers=["Linear"]))


def test_kl_clip_needs_the_optimizer() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    kfac = KFACPreconditioner(model)
    model(torch.randn(3, 2)).sum().backward()
    with pytest.raises(ValueError, match=r"`optimizer=None` but `kl_clip` is set"):
        kfac.step()


def test_piecewise_schedule() -> None:
    schedule = [[0, 1.0], [10, 0.5], [20, 0.1]]
    assert [resolve(schedule, s) for s in (0, 9, 10, 19, 20, 100)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
    assert resolve(0.3, 5) == 0.3
    assert resolve(lambda s: s * 2.0, 3) == 6.0


def test_lpt_assignment_balances_and_is_optimal_on_a_known_case() -> None:
    # LPT on {7,6,5,4,3,2,1}... : loads {7+2+1? ...}; optimum makespan for 2 ranks is ceil(28/2)=14
    costs = [7, 6, 5, 4, 3, 2, 1]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [14, 14]
    # one huge layer: it sits alone on a rank, the rest share the others
    owners = assign_owners([100, 1, 1, 1, 1], 3)
    assert owners.count(owners[0]) == 1
    assert assign_owners([1.0, 1.0], 1) == [0, 0]
    with pytest.raises(ValueError, match=r"`world_size=0` must be at least 1"):
        assign_owners([1.0], 0)
    with pytest.raises(ValueError, match=r"negative cost"):
        assign_owners([-1.0], 2)


def test_layer_cost_formula() -> None:
    assert layer_cost(3, 2, 10) == 10 * (9 + 4) + (27 + 8) + 2 * 3 * 5
    assert layer_cost(3, 2, 10, factor_update_steps=10, inv_update_steps=5) == 13 + 35 / 5 + 30


def test_non_finite_gradient_is_left_alone_and_does_not_spread() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    kfac = KFACPreconditioner(model, KFACOptions(inv_update_steps=1))
    _train(model, kfac, 1)
    model.zero_grad()
    F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 2)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="gradient of layer '0' is not finite"):
        kfac.step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert model[0].weight.grad[0, 0] == float("inf")
    assert torch.isfinite(model[2].weight.grad).all()
