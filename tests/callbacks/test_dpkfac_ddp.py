"""DPKFAC under Lightning's DDP on 2 gloo processes: replicated equals single-process K-FAC on the
global batch, dp replicas agree, and a dp checkpoint written by rank 0 resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_parallel.callbacks import DPKFAC
from tests.callbacks.test_dpkfac import OPTIONS, TinyNet, _data
from tests.helpers.distributed import run_distributed
from tests.helpers.trainers import quiet_trainer


def _params(model: TinyNet) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def _split_data(rank: int, world_size: int) -> DataLoader:
    """Rank r gets examples r, r + 2, ... of every global batch of 8 (two per epoch)."""
    dataset = _data().dataset
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=8 // world_size, sampler=sampler)


def _worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    tmp = Path(root)
    ddp = {"devices": world_size, "strategy": "ddp", "use_distributed_sampler": False}
    out: dict[str, Any] = {}
    for assignment in ("replicated", "dp"):
        model = TinyNet()
        callback = DPKFAC(**OPTIONS, assignment=assignment)
        quiet_trainer(tmp, [callback], max_epochs=2, **ddp).fit(model, _split_data(rank, world_size))
        out[assignment] = _params(model)
        out[assignment + "_metrics"] = callback.preconditioner.metrics()  # type: ignore[union-attr]
    first = TinyNet()
    trainer = quiet_trainer(tmp, [DPKFAC(**OPTIONS)], max_epochs=1, **ddp)
    trainer.fit(first, _split_data(rank, world_size))
    path = tmp / "dp.ckpt"
    trainer.save_checkpoint(path)  # every rank takes part (the owners' states are gathered)
    trainer.strategy.barrier()
    saved = torch.load(path, weights_only=False)["callbacks"]
    out["saved_layers"] = sorted(next(v for k, v in saved.items() if "DPKFAC" in k)["layers"])
    resumed = TinyNet()
    quiet_trainer(tmp, [DPKFAC(**OPTIONS)], max_epochs=2, **ddp).fit(
        resumed, _split_data(rank, world_size), ckpt_path=path
    )
    out["resumed"] = _params(resumed)
    return out


def test_ddp_two_processes(tmp_path: Path) -> None:
    results = run_distributed(_worker, 2, str(tmp_path), timeout=180.0)
    reference = TinyNet()
    quiet_trainer(tmp_path, [DPKFAC(**OPTIONS)], max_epochs=2).fit(reference, _data(batch_size=8))
    for res in results:
        for got, want in zip(res["replicated"], reference.parameters()):
            torch.testing.assert_close(torch.as_tensor(got), want.detach(), rtol=1e-5, atol=1e-6)
        assert res["saved_layers"] == ["net.0", "net.3", "net.5"]
        for got, want in zip(res["resumed"], res["dp"]):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        assert res["dp_metrics"]["bytes_communicated"] < res["replicated_metrics"]["bytes_communicated"]
    for a, b in zip(results[0]["dp"], results[1]["dp"]):
        np.testing.assert_array_equal(a, b)
