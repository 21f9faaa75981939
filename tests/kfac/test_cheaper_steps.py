"""Cheaper K-FAC steps against their formulas: truncated eigenbases (``factor_rank``), position
subsampling (``position_subsample``) and staggered decompositions (``stagger_decompositions``)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_parallel.kfac import KFACLayer, KFACOptions, KFACPreconditioner
from lightning_parallel.kfac.layer import top_eigenpairs
from tests.helpers.distributed import run_distributed


def _truncated_dense(a: torch.Tensor, g: torch.Tensor, mat: torch.Tensor, damping: float, k: int) -> torch.Tensor:
    """``(G_k + r/pi I)^-1 mat (A_k + pi r I)^-1`` with ``X_k`` the best rank-``k`` part of ``X`` (its
    top eigenpairs, the rest of the spectrum set to 0), by dense solves; ``pi`` from the full traces."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    root = math.sqrt(damping)

    def part(x: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(x)
        if x.shape[0] > k:
            values, vectors = values[-k:], vectors[:, -k:]
        return (vectors * values.clamp_min(0)) @ vectors.t()

    a_k = part(a) + pi * root * torch.eye(a.shape[0], dtype=a.dtype)
    g_k = part(g) + root / pi * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g_k, torch.linalg.solve(a_k, mat.t()).t())


def _matrix(layer: nn.Linear) -> torch.Tensor:
    assert layer.weight.grad is not None and layer.bias.grad is not None
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)


def test_factor_rank_matches_the_truncated_dense_formula() -> None:
    """A 30-input layer at ``factor_rank=6`` (batch of 64, so A has full rank): its preconditioned
    gradient is the dense formula on the rank-6 parts of A and G; the 4-input layer keeps all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(64, 30, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    kfac = KFACPreconditioner(model, KFACOptions(damping=0.01, kl_clip=None, factor_rank=6))
    F.mse_loss(model(x), y).backward()
    grads = [_matrix(model[0]).clone(), _matrix(model[2]).clone()]
    kfac.step()
    for layer, grad, module in zip(kfac.layers, grads, (model[0], model[2])):
        assert layer.a_factor is not None and layer.g_factor is not None
        expected = _truncated_dense(layer.a_factor, layer.g_factor, grad, 0.01, 6)
        torch.testing.assert_close(_matrix(module), expected, rtol=1e-8, atol=1e-10)
    assert kfac.layers[0].decomposition["qa"].shape == (31, 6)  # truncated
    assert kfac.layers[1].decomposition["qg"].shape == (4, 4)  # kept whole


def test_factor_rank_is_exact_kfac_when_the_factors_have_lower_rank() -> None:
    """Batches of 5 examples and no running average: A (41 x 41) has rank <= 5, so keeping 8
    eigenpairs loses nothing. Over 4 steps with a decomposition every step (the later ones by
    subspace iteration from the previous basis) the weights equal full K-FAC's."""
    weights = []
    for rank in (None, 8):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(40, 12), nn.Tanh(), nn.Linear(12, 3)).double()
        options = KFACOptions(damping=0.01, kl_clip=None, inv_update_steps=1, factor_decay=0.0, factor_rank=rank)
        kfac = KFACPreconditioner(model, options)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(2)
        for _ in range(4):
            x = torch.randn(5, 40, generator=gen, dtype=torch.float64)
            optimizer.zero_grad()
            F.mse_loss(model(x), torch.randn(5, 3, generator=gen, dtype=torch.float64)).backward()
            kfac.step(optimizer)
            optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_subspace_iteration_converges_to_the_top_eigenpairs() -> None:
    torch.manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    spectrum = torch.cat([torch.linspace(10, 5, 6), torch.linspace(1, 0.01, 44)]).double()
    mat = (basis * spectrum) @ basis.t()
    start = torch.linalg.qr(torch.randn(50, 6, dtype=torch.float64))[0]
    values, vectors = top_eigenpairs(mat, 6, start, iterations=40)
    exact_values, exact_vectors = torch.linalg.eigh(mat)
    torch.testing.assert_close(values, exact_values[-6:], rtol=1e-10, atol=1e-10)
    # the same subspace: the projectors agree
    torch.testing.assert_close(vectors @ vectors.t(), exact_vectors[:, -6:] @ exact_vectors[:, -6:].t())
    full_values, _ = top_eigenpairs(mat, None)
    torch.testing.assert_close(full_values, exact_values)


def test_position_subsample_linear_formula() -> None:
    """``(n, T, in)`` inputs at ``position_subsample=3``: A is the mean over positions 0, 3, 6 of every
    example (bias entry included), G ``n * (T / T_used)`` times the sum over those positions."""
    torch.manual_seed(4)
    layer = nn.Linear(5, 4)
    kfac = KFACLayer("lin", layer, position_subsample=3)
    x, g = torch.randn(6, 8, 5), torch.randn(6, 8, 4)
    kfac.accumulate_input(x)
    kfac.accumulate_grad(g)
    factors = kfac.batch_factors()
    assert factors is not None
    rows = torch.cat([x[:, [0, 3, 6]].reshape(-1, 5), torch.ones(18, 1)], dim=1)
    used = g[:, [0, 3, 6]].reshape(-1, 4)
    torch.testing.assert_close(factors[0], rows.t() @ rows / 18)
    torch.testing.assert_close(factors[1], 6 * (8 / 3) * used.t() @ used)


def test_position_subsample_conv_formula() -> None:
    """A Conv2d at ``position_subsample=2``: the patches (``F.unfold``) and output gradients of output
    rows 0, 2, 4 only; G rescaled by ``OH / OH_used = 5 / 3``."""
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    kfac = KFACLayer("conv", conv, position_subsample=2)
    x = torch.randn(4, 2, 9, 9)
    g = torch.randn(4, 3, 5, 5)  # output 5 x 5
    kfac.accumulate_input(x)
    kfac.accumulate_grad(g)
    factors = kfac.batch_factors()
    assert factors is not None
    patches = F.unfold(x, 3, padding=1, stride=2).view(4, 18, 5, 5)[:, :, ::2]  # (n, C k k, 3, OW)
    rows = patches.permute(0, 2, 3, 1).reshape(-1, 18)
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
    grads = g[:, :, ::2].permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(factors[0], rows.t() @ rows / rows.shape[0])
    torch.testing.assert_close(factors[1], 4 * (5 / 3) * grads.t() @ grads)


def _decomposition_steps(options: KFACOptions, steps: int) -> tuple[list[set[int]], KFACPreconditioner]:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 2))
    kfac = KFACPreconditioner(model, options)
    seen: list[set[int]] = [set() for _ in kfac.layers]
    for step in range(steps):
        model.zero_grad()
        F.mse_loss(model(torch.randn(16, 20)), torch.randn(16, 2)).backward()
        before = [id(layer.decomposition) for layer in kfac.layers]
        kfac.step()
        for i, layer in enumerate(kfac.layers):
            if id(layer.decomposition) != before[i]:
                seen[i].add(step)
    return seen, kfac


def test_stagger_spreads_the_decompositions_over_the_interval() -> None:
    """Interval 4, three layers: each decomposes at step 0 and then once per interval, at its own
    step (the costliest layer first, at step 0 of the interval), never two on one step after step 0."""
    seen, kfac = _decomposition_steps(KFACOptions(kl_clip=None, inv_update_steps=4, stagger_decompositions=True), 12)
    slots = kfac._stagger_slots(4)
    assert slots == [0, 1, 2]  # costs 21^3 + 10^3 > 11^3 + 6^3 > 7^3 + 2^3
    for layer_steps, slot in zip(seen, slots):
        assert layer_steps == {0} | {s for s in range(1, 12) if s % 4 == slot}
    plain, _ = _decomposition_steps(KFACOptions(kl_clip=None, inv_update_steps=4), 12)
    assert plain == [{0, 4, 8}] * 3


def _stagger_worker(rank: int, world_size: int) -> dict[str, Any]:
    from tests.kfac.test_distributed import _model, _train

    out = {}
    for placement in ("owner", "all"):
        model = _model()
        options = KFACOptions(
            placement=placement,  # type: ignore[arg-type]
            damping=0.01,
            kl_clip=0.01,
            inv_update_steps=3,
            stagger_decompositions=True,
        )
        kfac = KFACPreconditioner(model, options)
        _train(model, kfac, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), range(5), rank, 1, world_size)
        out[placement] = [p.detach().numpy().copy() for p in model.parameters()]
        out[placement + "_owners"] = kfac.owners
    # truncated eigenbases under "all": the owners broadcast (in, k) bases, at the cost model's bytes
    model = _model()
    kfac = KFACPreconditioner(model, _rank_options("all"))
    _train(model, kfac, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), range(5), rank, 1, world_size)
    out["rank"] = [p.detach().numpy().copy() for p in model.parameters()]
    out["rank_bytes"] = kfac.metrics()["bytes_communicated"]
    out["rank_model_bytes"] = kfac.costs_by_placement["all"]["bytes_per_step"]
    assert dist.is_initialized()
    return out


def _rank_options(placement: str) -> KFACOptions:
    return KFACOptions(placement=placement, damping=0.01, kl_clip=0.01, inv_update_steps=3, factor_rank=3)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_stagger_under_dp_matches_single_process(world_size: int) -> None:
    """2 and 4 processes, the same data on all: staggered decompositions (under ``all`` only the due
    layers' decompositions travel, from their owners) give single-process staggered K-FAC's
    weights, within 1e-6."""
    from tests.kfac.test_distributed import _model, _train

    results = run_distributed(_stagger_worker, world_size, timeout=300.0)
    model = _model()
    options = KFACOptions(damping=0.01, kl_clip=0.01, inv_update_steps=3, stagger_decompositions=True)
    kfac = KFACPreconditioner(model, options)
    _train(model, kfac, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), range(5), 0, 1, 1)
    reference = [p.detach() for p in model.parameters()]
    model = _model()
    kfac = KFACPreconditioner(model, _rank_options("auto"))
    _train(model, kfac, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), range(5), 0, 1, 1)
    rank_reference = [p.detach() for p in model.parameters()]
    for res in results:
        for got, want in zip(res["rank"], rank_reference):
            torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-5, atol=1e-6)
        # the owner assignment (one float64 per layer), then decompositions at steps 0 and 3
        assert res["rank_bytes"] == 8 * 4 + res["rank_model_bytes"] * 3 * 2
        assert set(res["all_owners"]) == set(range(world_size))
        for placement in ("owner", "all"):
            for got, want in zip(res[placement], reference):
                torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor_rank": 0}, r"`factor_rank=0` must be >= 1 \(eigenpairs kept"),
        ({"factor_rank": 2.5}, r"`factor_rank=2.5` must be an integer >= 1"),
        ({"position_subsample": 0}, r"`position_subsample=0` must be >= 1"),
        ({"factor_rank": 8, "method": "inverse"}, r"`factor_rank=8` with `method='inverse'`"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        KFACOptions(**kwargs)


def test_position_subsample_warns_once_with_counts_of_layers_without_positions() -> None:
    """A sequence model whose head sees pooled (2-D) features: the head has no positions to thin."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).mean(dim=1))

    model = Pooled()
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None, position_subsample=2))
    with pytest.warns(UserWarning, match=r"position_subsample=2 thins 1 of the 2 layers .* the other 1 \(\['head'\]"):
        F.mse_loss(model(torch.randn(3, 5, 4)), torch.randn(3, 2)).backward()
        kfac.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.zero_grad()
        F.mse_loss(model(torch.randn(3, 5, 4)), torch.randn(3, 2)).backward()
        kfac.step()
