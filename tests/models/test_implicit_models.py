"""The DEQ, ODE and CNF example models under a Trainer: they learn, resume exactly (with DPKFAC), DDP on
2 gloo processes equals single-process training on the global batch, and activation compression shrinks
what their blocks save."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_parallel.callbacks import DPKFAC, DEQStatistics
from lightning_parallel.data import DigitsDataModule, Toy2DDataModule
from lightning_parallel.models import CNFDensityModel, DEQClassifier, ODEClassifier
from lightning_parallel.plugins import CompressedActivationPrecision
from tests.helpers.distributed import run_distributed
from tests.helpers.trainers import quiet_trainer

KFAC = {"damping": 0.01, "kl_clip": 0.01, "inv_update_steps": 2}


def _data(n: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=batch_size,
    )


def _models() -> dict[str, pl.LightningModule]:
    torch.manual_seed(0)
    deq = DEQClassifier(width=16, max_iter=8, tol=0.0, lr=0.01)  # tol 0: the same iterations on any split
    torch.manual_seed(0)
    ode = ODEClassifier(width=8, steps=4, checkpoints=2, lr=0.05, optimizer="sgd")
    return {"deq": deq, "ode": ode}


def _params(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


@pytest.mark.slow  # two epochs of digits per model: about 50-100 s on 2 loaded cores
@pytest.mark.parametrize("name", ["deq", "ode"])
def test_classifiers_learn_digits(tmp_path: Path, name: str) -> None:
    pl.seed_everything(0)
    model = DEQClassifier(lr=3e-3) if name == "deq" else ODEClassifier(lr=3e-3, steps=4)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=4)
    trainer.fit(model, DigitsDataModule(batch_size=64, image_size=8))
    assert float(trainer.callback_metrics["val_acc"]) > 0.8


def test_flow_learns_moons(tmp_path: Path) -> None:
    pl.seed_everything(0)
    flow = CNFDensityModel(hidden=32)
    data = Toy2DDataModule(num_samples=1024, batch_size=128)
    before = -float(flow.log_density(next(iter(data.val_dataloader()))[0]).mean())
    quiet_trainer(tmp_path, max_epochs=3).fit(flow, data)
    after = -float(flow.log_density(next(iter(data.val_dataloader()))[0]).mean())
    assert after < before - 0.3, (before, after)


def test_flow_density_integrates_to_one() -> None:
    """The CNF's log p is a density: its integral over a fine grid is 1 (change of variables is right)."""
    torch.manual_seed(0)
    flow = CNFDensityModel(hidden=16, steps=16)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(3.0)  # far from the identity map
        axis = torch.linspace(-6, 6, 121)
        grid = torch.cartesian_prod(axis, axis)
        mass = flow.log_density(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(float(mass) - 1.0) < 0.02


@pytest.mark.parametrize("name", ["deq", "ode"])
def test_resume_is_exact_with_dpkfac(tmp_path: Path, name: str) -> None:
    full = _models()[name]
    quiet_trainer(tmp_path, [DPKFAC(**KFAC)], max_epochs=3).fit(full, _data())
    first = _models()[name]
    trainer = quiet_trainer(tmp_path, [DPKFAC(**KFAC)], max_epochs=1)
    trainer.fit(first, _data())
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    resumed = _models()[name]
    quiet_trainer(tmp_path, [DPKFAC(**KFAC)], max_epochs=3).fit(resumed, _data(), ckpt_path=path)
    for got, want in zip(_params(resumed), _params(full)):
        np.testing.assert_array_equal(got, want)


def _ddp_worker(rank: int, world_size: int, root: str) -> dict[str, list[np.ndarray]]:
    dataset = _data().dataset
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    out = {}
    for name, model in _models().items():
        loader = DataLoader(dataset, batch_size=8 // world_size, sampler=sampler)
        quiet_trainer(
            Path(root), max_epochs=2, devices=world_size, strategy="ddp", use_distributed_sampler=False
        ).fit(model, loader)
        out[name] = _params(model)
    return out


@pytest.mark.slow  # about 70 s on 2 loaded cores
def test_ddp_equals_single_process(tmp_path: Path) -> None:
    results = run_distributed(_ddp_worker, 2, str(tmp_path), timeout=300.0)
    for name, model in _models().items():
        quiet_trainer(tmp_path, max_epochs=2).fit(model, _data())
        for res in results:
            for got, want in zip(res[name], _params(model)):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["deq", "ode"])
def test_compressed_activations_shrink_what_the_blocks_save(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = DEQClassifier(width=64) if name == "deq" else ODEClassifier(width=64, steps=8, checkpoints=8)
    plugin = CompressedActivationPrecision(codec="kbit", bits=4, min_numel=256)
    callbacks = [DEQStatistics()] if name == "deq" else []
    trainer = quiet_trainer(tmp_path, callbacks, max_steps=3, plugins=[plugin])
    trainer.fit(model, DataLoader(_data(n=96, batch_size=32).dataset, batch_size=32))
    stats = plugin.last_stats
    assert stats.compressed_tensors > 0
    assert stats.packed_bytes < 0.5 * stats.raw_bytes, (stats.packed_bytes, stats.raw_bytes)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
