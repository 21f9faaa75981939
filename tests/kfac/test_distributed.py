"""DP-KFAC against replicated K-FAC and single-process K-FAC, over 2 and 4 gloo processes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from tests.helpers.distributed import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        nn.Tanh(),
        nn.Linear(12, 3),
    )


def _batch(step: int, part: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch of 8 examples, or its ``part``-th of ``parts`` slices."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    size = 8 // parts
    return x[part * size : (part + 1) * size], y[part * size : (part + 1) * size]


def _train(
    model: nn.Module,
    kfac: KFACPreconditioner,
    optimizer: torch.optim.Optimizer,
    steps: range,
    rank: int,
    parts: int,
    world_size: int,
) -> None:
    for step in steps:
        x, y = _batch(step, rank if parts > 1 else 0, parts)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if world_size > 1:  # what DDP does: average the gradients
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
        kfac.step(optimizer)
        optimizer.step()


def _options(assignment: str, placement: str = "auto", method: str = "eigen") -> KFACOptions:
    return KFACOptions(
        assignment=assignment,  # type: ignore[arg-type]
        placement=placement,  # type: ignore[arg-type]
        method=method,  # type: ignore[arg-type]
        damping=0.01,
        kl_clip=0.01,
        inv_update_steps=2,
    )


# (assignment, placement, method) of every run; the key of the default runs is the assignment alone
RUNS = {
    "dp": ("dp", "auto", "eigen"),
    "replicated": ("replicated", "auto", "eigen"),
    "dp_owner": ("dp", "owner", "eigen"),
    "dp_all": ("dp", "all", "eigen"),
    "dp_all_inverse": ("dp", "all", "inverse"),
}


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _worker(rank: int, world_size: int, same_data_runs: tuple[bool, ...]) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {same: _runs(rank, world_size, same) for same in same_data_runs}
    if world_size == 2:
        out["sampled"] = _sampled_run(rank, world_size)
    return out


def _runs(rank: int, world_size: int, same_data: bool) -> dict[str, Any]:
    parts = 1 if same_data else world_size
    out: dict[str, Any] = {}
    for key, (assignment, placement, method) in RUNS.items():
        model = _model()
        kfac = KFACPreconditioner(model, _options(assignment, placement, method))
        _train(model, kfac, _sgd(model), range(3), rank, parts, world_size)
        out[key] = [p.detach().numpy().copy() for p in model.parameters()]  # no shared storage
        out[key + "_metrics"] = kfac.metrics()
        out[key + "_owners"] = kfac.owners
        out[key + "_placement"] = kfac.placement
        out[key + "_costs"] = kfac.costs_by_placement
    if world_size == 2:
        # exact resume under dp: state gathered from both owners, reloaded into a fresh preconditioner
        for placement in ("owner", "all"):
            model = _model()
            kfac = KFACPreconditioner(model, _options("dp", placement))
            optimizer = _sgd(model)
            _train(model, kfac, optimizer, range(2), rank, parts, world_size)
            state = kfac.state_dict()
            assert set(state["layers"]) == {layer.name for layer in kfac.layers}
            kfac.remove_hooks()
            resumed = KFACPreconditioner(model, _options("dp", placement))
            resumed.load_state_dict(state)
            _train(model, resumed, optimizer, range(2, 3), rank, parts, world_size)
            out["resumed_" + placement] = [p.detach().numpy().copy() for p in model.parameters()]
    return out


def _single_process(method: str = "eigen") -> list[torch.Tensor]:
    """Single-process K-FAC on the global batch."""
    model = _model()
    kfac = KFACPreconditioner(model, _options("dp", method=method))
    _train(model, kfac, _sgd(model), range(3), 0, 1, 1)
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[Any], b: list[Any]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), rtol=1e-5, atol=1e-6)


def test_two_processes_against_replicated_and_single_process() -> None:
    """Same data on both ranks: dp == replicated == single process. Split data: replicated == single
    process on the global batch (dp builds each layer's factors from its owner's half instead).
    A sampled Fisher under torch's DDP wrapper: see ``_check_sampled_fisher_under_ddp``."""
    results = run_distributed(_worker, 2, (True, False), timeout=120.0)
    _check_sampled_fisher_under_ddp([res["sampled"] for res in results])
    reference = _single_process()
    for res in results:
        same = res[True]
        _check_placements(same, reference, _single_process("inverse"))
        for placement in ("owner", "all"):
            _assert_same(same["resumed_" + placement], same["dp"])
            # split data: the placement changes where the update is computed, not the update
            _assert_same(res[False]["dp_" + placement], res[False]["dp"])
            _assert_same(res[False]["resumed_" + placement], res[False]["dp"])
        _assert_same(res[False]["replicated"], reference)
        dp, rep = same["dp_metrics"], same["replicated_metrics"]
        assert dp["bytes_communicated"] < rep["bytes_communicated"]
        assert dp["curvature_bytes"] < rep["curvature_bytes"]
    _assert_same(results[0][False]["dp"], results[1][False]["dp"])
    owners = results[0][True]["dp_owners"]
    assert owners == results[1][True]["dp_owners"] and set(owners) == {0, 1}


@pytest.mark.slow
def test_four_processes_dp_equals_replicated() -> None:
    results = run_distributed(_worker, 4, (True,), timeout=300.0)  # five runs on 4 processes: slow on a loaded machine
    reference = _single_process()
    for res in results:
        _check_placements(res[True], reference, _single_process("inverse"))
    assert len(set(results[0][True]["dp_owners"])) == 4


def _check_placements(runs: dict[str, Any], reference: list[Any], inverse_reference: list[Any]) -> None:
    """Every placement gives single-process K-FAC's update (the same data on every rank), and each
    rank's bytes are the cost model's: one owner assignment at step 0 (one float64 per layer), then
    3 steps of gradient broadcasts (``owner``) or 2 decomposition broadcasts (``all``, every 2 steps)."""
    for key in ("dp", "replicated", "dp_owner", "dp_all"):
        _assert_same(runs[key], reference)
    _assert_same(runs["dp_all_inverse"], inverse_reference)
    assert runs["dp_owner_placement"] == "owner" and runs["dp_all_placement"] == "all"
    assign = 4 * 8
    for key, placement, steps in (("dp_owner", "owner", 3), ("dp_all", "all", 4), ("dp_all_inverse", "all", 4)):
        costs = runs[key + "_costs"][placement]
        assert runs[key + "_metrics"]["bytes_communicated"] == assign + costs["bytes_per_step"] * steps
    # the auto placement is the cheaper of the two in the cost model
    costs = runs["dp_costs"]
    cheaper = min(("owner", "all"), key=lambda p: costs[p]["bytes_per_step"])
    assert runs["dp_placement"] == cheaper


def _sampled_run(rank: int, world_size: int) -> dict[str, Any]:
    """One step of DDP (torch's wrapper) with a sampled Fisher: the sampling backward runs inside
    DDP's forward and must neither disturb DDP's all-reduce nor the training gradient."""
    out: dict[str, Any] = {}
    for assignment in ("replicated", "dp"):
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        options = KFACOptions(assignment=assignment, fisher="categorical", kl_clip=None, inv_update_steps=1)  # type: ignore[arg-type]
        kfac = KFACPreconditioner(model, options)
        x, y = _batch(0, rank, world_size)
        F.cross_entropy(ddp(x), y).backward()
        out[assignment + "_grads"] = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        kfac.step()
        out[assignment + "_g"] = {
            layer.name: layer.g_factor for layer in kfac.layers if layer.g_factor is not None
        }
        out[assignment + "_update"] = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    return out


def _check_sampled_fisher_under_ddp(results: list[dict[str, Any]]) -> None:
    # the training gradient: the average of the ranks' batch-mean gradients, untouched by the sampling pass
    plain = _model()
    F.cross_entropy(plain(_batch(0, 0, 1)[0]), _batch(0, 0, 1)[1]).backward()
    # replicated G: the mean over ranks of each rank's own sampled G (generator seeded fisher_seed + rank)
    per_rank = []
    for rank in range(2):
        model = _model()
        kfac = KFACPreconditioner(model, KFACOptions(fisher="categorical", fisher_seed=rank, kl_clip=None))
        F.cross_entropy(model(_batch(0, rank, 2)[0]), _batch(0, rank, 2)[1]).backward()
        kfac.step()
        per_rank.append({layer.name: layer.g_factor for layer in kfac.layers})
    for res in results:
        for assignment in ("replicated", "dp"):
            for got, p in zip(res[assignment + "_grads"], plain.parameters()):
                torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
        for name, g in res["replicated_g"].items():
            torch.testing.assert_close(g, (per_rank[0][name] + per_rank[1][name]) / 2, rtol=1e-5, atol=1e-7)
    for assignment in ("replicated", "dp"):
        for a, b in zip(results[0][assignment + "_update"], results[1][assignment + "_update"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # dp: each owner builds its layers' G from its own half and its own samples
    for rank, res in enumerate(results):
        for name, g in res["dp_g"].items():
            torch.testing.assert_close(g, per_rank[rank][name], rtol=1e-5, atol=1e-7)
