"""DP-KFAC against replicated K-FAC and single-process K-FAC, over 2 and 4 gloo processes."""

from __future__ import annotations

from typing import Any

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


def _options(assignment: str) -> KFACOptions:
    return KFACOptions(assignment=assignment, damping=0.01, kl_clip=0.01, inv_update_steps=2)  # type: ignore[arg-type]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _worker(rank: int, world_size: int, same_data_runs: tuple[bool, ...]) -> dict[bool, dict[str, Any]]:
    return {same: _runs(rank, world_size, same) for same in same_data_runs}


def _runs(rank: int, world_size: int, same_data: bool) -> dict[str, Any]:
    parts = 1 if same_data else world_size
    out: dict[str, Any] = {}
    for assignment in ("dp", "replicated"):
        model = _model()
        kfac = KFACPreconditioner(model, _options(assignment))
        _train(model, kfac, _sgd(model), range(3), rank, parts, world_size)
        out[assignment] = [p.detach().numpy().copy() for p in model.parameters()]  # no shared storage
        out[assignment + "_metrics"] = kfac.metrics()
        out[assignment + "_owners"] = kfac.owners
    if world_size == 2:
        # exact resume under dp: state gathered from both owners, reloaded into a fresh preconditioner
        model = _model()
        kfac = KFACPreconditioner(model, _options("dp"))
        optimizer = _sgd(model)
        _train(model, kfac, optimizer, range(2), rank, parts, world_size)
        state = kfac.state_dict()
        assert set(state["layers"]) == {layer.name for layer in kfac.layers}
        kfac.remove_hooks()
        resumed = KFACPreconditioner(model, _options("dp"))
        resumed.load_state_dict(state)
        _train(model, resumed, optimizer, range(2, 3), rank, parts, world_size)
        out["resumed"] = [p.detach().numpy().copy() for p in model.parameters()]
    return out


def _single_process() -> list[torch.Tensor]:
    """Single-process K-FAC on the global batch."""
    model = _model()
    kfac = KFACPreconditioner(model, _options("dp"))
    _train(model, kfac, _sgd(model), range(3), 0, 1, 1)
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[Any], b: list[Any]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), rtol=1e-5, atol=1e-6)


def test_two_processes_against_replicated_and_single_process() -> None:
    """Same data on both ranks: dp == replicated == single process. Split data: replicated == single
    process on the global batch (dp builds each layer's factors from its owner's half instead)."""
    results = run_distributed(_worker, 2, (True, False), timeout=120.0)
    reference = _single_process()
    for res in results:
        same = res[True]
        _assert_same(same["dp"], same["replicated"])
        _assert_same(same["dp"], reference)
        _assert_same(same["resumed"], same["dp"])
        _assert_same(res[False]["replicated"], reference)
        _assert_same(res[False]["resumed"], res[False]["dp"])
        dp, rep = same["dp_metrics"], same["replicated_metrics"]
        assert dp["bytes_communicated"] < rep["bytes_communicated"]
        assert dp["curvature_bytes"] < rep["curvature_bytes"]
    _assert_same(results[0][False]["dp"], results[1][False]["dp"])
    owners = results[0][True]["dp_owners"]
    assert owners == results[1][True]["dp_owners"] and set(owners) == {0, 1}


def test_four_processes_dp_equals_replicated() -> None:
    results = run_distributed(_worker, 4, (True,), timeout=120.0)
    reference = _single_process()
    for res in results:
        _assert_same(res[True]["dp"], res[True]["replicated"])
        _assert_same(res[True]["dp"], reference)
    assert len(set(results[0][True]["dp_owners"])) == 4
