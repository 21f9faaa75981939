"""SparseTraining under Lightning's DDP on 2 gloo processes: both ranks take the same mask decisions, and the run
equals single-process training on the global batch (masks exactly, weights up to all-reduce rounding)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_parallel.callbacks import SparseTraining
from lightning_parallel.sparse import SparseEngine
from tests.callbacks.test_sparse_training import SparseNet, _loader, _trainer
from tests.helpers.distributed import run_distributed

CASES = [("rigl", "masked"), ("rigl", "sparse"), ("set", "sparse")]
OPTIONS: dict[str, Any] = dict(sparsity=0.8, distribution="uniform", update_interval=2, stop_at=7, drop_fraction=0.5)


def _split(rank: int, world_size: int) -> DataLoader:
    dataset = _loader().dataset
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=16 // world_size, sampler=sampler)


def _patterns(callback: SparseTraining) -> dict[str, torch.Tensor]:
    assert callback.engine is not None
    state = callback.engine.state_dict()
    out = {name: mask.flatten().nonzero().squeeze(1) for name, mask in state["masks"].items()}
    out.update({name: pattern["indices"] for name, pattern in state["patterns"].items()})
    return out


def _run(root: Path, method: str, execution: str, **kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    model = SparseNet(conv=False)
    callback = SparseTraining(method, execution=execution, **OPTIONS)
    loader = kwargs.pop("loader")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(root, [callback], max_steps=-1, max_epochs=2, **kwargs).fit(model, loader)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return _patterns(callback), weights


def _worker(rank: int, world_size: int, root: str) -> list[Any]:
    ddp = {"devices": world_size, "strategy": "ddp", "use_distributed_sampler": False}
    return [_run(Path(root), m, e, loader=_split(rank, world_size), **ddp) for m, e in CASES]


@pytest.mark.slow  # about 90 s on 2 loaded cores
def test_ranks_agree_and_match_single_process(tmp_path: Path) -> None:
    results = run_distributed(_worker, 2, str(tmp_path), timeout=300.0)
    for case, (m, e) in enumerate(CASES):
        (masks0, weights0), (masks1, weights1) = results[0][case], results[1][case]
        masks_ref, weights_ref = _run(tmp_path, m, e, loader=_loader())
        initial = SparseEngine(SparseNet(conv=False), method=m, sparsity=0.8, distribution="uniform").masks
        assert any(not torch.equal(v.flatten().nonzero().squeeze(1), masks0[n]) for n, v in initial.items()), (m, e)
        for name, indices in masks_ref.items():
            assert torch.equal(masks0[name], masks1[name]), (m, e, name)
            assert torch.equal(masks0[name], indices), (m, e, name)
        for name, value in weights_ref.items():
            torch.testing.assert_close(weights0[name], weights1[name], rtol=0, atol=0, msg=f"{m} {e} {name}")
            if value.is_floating_point():
                torch.testing.assert_close(weights0[name], value, rtol=1e-4, atol=1e-5, msg=f"{m} {e} {name}")
