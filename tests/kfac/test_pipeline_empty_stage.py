"""A pipeline rank whose stage holds no preconditioned layer takes part in K-FAC's collectives.

Two gloo processes: rank 0 holds stage 0 (an ``nn.Linear``), rank 1 stage 1 (a ``Tanh``, nothing to
precondition). With KL-clip on, every step all-reduces the clip sum over the pipeline and the
checkpoint gathers over it, so a rank that refused to build (or skipped a collective) would make
rank 0 wait. Rank 0's update must equal single-process K-FAC on the whole two-stage model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner, PipelineKFACPreconditioner
from tests.helpers.distributed import run_distributed

OPTIONS: dict[str, Any] = {"damping": 0.01, "kl_clip": 1e-4, "inv_update_steps": 1}


def _stages() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Tanh())


def _batch(step: int) -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(step))


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    first, second = _stages()
    held = {(0, rank): first if rank == 0 else second}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kfac = PipelineKFACPreconditioner(held, KFACOptions(**OPTIONS), pipeline_group=dist.group.WORLD)
    params = list(held[(0, rank)].parameters()) or [nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        if rank == 0:  # the pipeline's backward, by hand: stage 1's loss gradient arrives at stage 0
            out = first(_batch(step))
            grad = torch.empty_like(out)
            dist.recv(grad, src=1)
            out.backward(grad)
        else:
            received = torch.empty(8, 3)
            dist.recv(received, src=0)
            received.requires_grad_(True)
            second(received).pow(2).mean().backward()
            dist.send(received.grad, dst=0)  # type: ignore[arg-type]
        kfac.step(optimizer)
        optimizer.step()
        if rank == 0 and step < 2:  # the next step's activation (gloo's send waits for its receive)
            with torch.no_grad():  # not a training forward: K-FAC's hooks must not record it
                dist.send(first(_batch(step + 1)), dst=1)
    state = kfac.state_dict()  # a collective over the pipeline
    return {
        "weights": [p.detach().clone() for p in first.parameters()] if rank == 0 else None,
        "warnings": [str(w.message) for w in caught],
        "layers": sorted(state["layers"]),
    }


def _run(rank: int, world_size: int) -> dict[str, Any]:
    if rank == 0:
        with torch.no_grad():
            dist.send(_stages()[0](_batch(0)), dst=1)
    return _worker(rank, world_size)


def _single_process() -> list[torch.Tensor]:
    first, second = _stages()
    model = nn.Sequential(first, second)
    kfac = KFACPreconditioner(model, KFACOptions(**OPTIONS))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        kfac.step(optimizer)
        optimizer.step()
    return [p.detach().clone() for p in first.parameters()]


def test_rank_without_preconditioned_layers_neither_fails_nor_hangs() -> None:
    results = run_distributed(_run, 2, timeout=150.0)
    for got, expected in zip(results[0]["weights"], _single_process()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert any("have no nn.Linear or nn.Conv2d layer" in w for w in results[1]["warnings"])
    assert not results[0]["warnings"]
    assert results[0]["layers"] == results[1]["layers"] == ["replica0.stage0.0"]
