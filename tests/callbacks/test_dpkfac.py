"""DPKFAC under the Trainer: same as the pure preconditioner, exact resume, 16-mixed, logging, errors."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.callbacks import DPKFAC
from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from tests.helpers.trainers import quiet_trainer


class TinyNet(pl.LightningModule):
    def __init__(self, lr: float = 0.05, inplace: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 8),
            nn.Tanh(),
            nn.Linear(8, 3),
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _data(n: int = 16, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


OPTIONS = {"damping": 0.01, "kl_clip": 0.01, "inv_update_steps": 3, "factor_decay": 0.9}


@pytest.mark.parametrize("fisher", ["empirical", "categorical"])
def test_trainer_matches_a_manual_loop_with_the_preconditioner(tmp_path: Path, fisher: str) -> None:
    model = TinyNet()
    quiet_trainer(tmp_path, [DPKFAC(**OPTIONS, fisher=fisher)], max_epochs=2).fit(model, _data())

    reference = TinyNet()
    optimizer = reference.configure_optimizers()
    kfac = KFACPreconditioner(reference, KFACOptions(**OPTIONS, fisher=fisher))
    for _ in range(2):
        for x, y in _data():
            optimizer.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            kfac.step(optimizer)
            optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    plain = TinyNet()
    quiet_trainer(tmp_path, [], max_epochs=2).fit(plain, _data())
    assert not torch.allclose(plain.net[0].weight, model.net[0].weight)


def test_resume_is_exact(tmp_path: Path) -> None:
    continuous = TinyNet()
    quiet_trainer(tmp_path, [DPKFAC(**OPTIONS)], max_epochs=3).fit(continuous, _data())

    first = TinyNet()
    trainer = quiet_trainer(tmp_path, [DPKFAC(**OPTIONS)], max_epochs=1)
    trainer.fit(first, _data())
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if "DPKFAC" in k)
    assert state["steps"] == 2 and set(state["layers"]) == {"net.0", "net.3", "net.5"}
    assert "qa" in state["layers"]["net.0"]["decomposition"]

    resumed = TinyNet()
    quiet_trainer(tmp_path, [DPKFAC(**OPTIONS)], max_epochs=3).fit(resumed, _data(), ckpt_path=path)
    for p, q in zip(continuous.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_loss_scale_does_not_leak_into_g_under_16_mixed(tmp_path: Path) -> None:
    factors = {}
    for name, plugins in (
        ("32", []),
        ("16", [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))]),
    ):
        callback = DPKFAC(**OPTIONS)
        model = TinyNet()
        trainer = quiet_trainer(tmp_path, [callback], max_steps=1, plugins=plugins)
        trainer.fit(model, _data())
        factors[name] = callback.state_dict()["layers"]["net.5"]["g_factor"]
    ratio = (factors["16"].norm() / factors["32"].norm()).item()
    assert 0.98 < ratio < 1.02, ratio  # a leaked scale would give 2^24
    torch.testing.assert_close(factors["16"], factors["32"], rtol=0.05, atol=1e-4)


def test_per_rank_counters_reach_the_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    callback = DPKFAC(**OPTIONS, log_every_n_steps=1)
    trainer = quiet_trainer(tmp_path, [callback], max_steps=2, logger=CSVLogger(tmp_path, name="kfac"))
    trainer.fit(TinyNet(), _data())
    assert callback.logged["kfac/curvature_bytes/rank0"] > 0
    assert callback.logged["kfac/factor_seconds/rank0"] > 0
    assert callback.logged["kfac/bytes_communicated/rank0"] == 0  # one process: nothing to send
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("kfac/decomposition_seconds/rank0") for row in rows)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": 0.0}, r"`damping=0.0` must be > 0"),
        ({"factor_update_steps": 0}, r"`factor_update_steps=0.0` must be an integer >= 1"),
        ({"inv_update_steps": -3}, r"`inv_update_steps=-3.0` must be an integer >= 1"),
        ({"assignment": "sharded"}, r"`assignment='sharded'` is unknown; use 'dp'"),
        ({"log_every_n_steps": -1}, r"`log_every_n_steps=-1` must be >= 0"),
        ({"fisher": "true"}, r"`fisher='true'` is unknown; use 'empirical'"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DPKFAC(**kwargs)


def test_every_option_is_an_argument_documented_once_in_kfac_options() -> None:
    """DPKFAC's signature repeats KFACOptions' fields (LightningCLI reads it) with the same defaults;
    its docstring embeds KFACOptions' entries, so each option has one text."""
    import dataclasses
    import inspect

    from lightning_parallel.kfac import KFACOptions

    parameters = inspect.signature(DPKFAC).parameters
    for f in dataclasses.fields(KFACOptions):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert parameters[f.name].default == default or tuple(parameters[f.name].default) == default
        assert f"\n        {f.name}: " in (DPKFAC.__doc__ or "")
    assert "{kfac_options}" not in (DPKFAC.__doc__ or "")


class NoLayers(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16), nn.Flatten(0))
        self.scale = nn.Parameter(torch.ones(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self(batch[0]) * self.scale).pow(2).mean()


def test_model_without_supported_layers_fails_at_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`model` \(NoLayers\) has no nn.Linear or nn.Conv2d layer"):
        quiet_trainer(tmp_path, [DPKFAC()], max_steps=1).fit(NoLayers(), _data())


def test_local_loss_pipeline_and_sharded_strategies_are_refused() -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_parallel.callbacks.dpkfac import check_strategy
    from lightning_parallel.strategies.chimera import ChimeraStrategy
    from lightning_parallel.strategies.interlocking import InterlockingBackpropStrategy

    with pytest.raises(ValueError, match=r"`strategy=InterlockingBackpropStrategy` is not supported by DPKFAC"):
        check_strategy(InterlockingBackpropStrategy.__new__(InterlockingBackpropStrategy), 4)
    check_strategy(ChimeraStrategy.__new__(ChimeraStrategy), 4)  # see test_dpkfac_chimera.py
    with pytest.raises(
        ValueError, match=r"`strategy=SingleDeviceStrategy` with 2 processes is not supported"
    ):
        check_strategy(SingleDeviceStrategy.__new__(SingleDeviceStrategy), 2)
    check_strategy(SingleDeviceStrategy.__new__(SingleDeviceStrategy), 1)


def test_fisher_output_under_chimera_is_refused_at_setup() -> None:
    from types import SimpleNamespace

    from lightning_parallel.strategies.chimera import ChimeraStrategy

    trainer = SimpleNamespace(strategy=ChimeraStrategy.__new__(ChimeraStrategy), world_size=2)
    with pytest.raises(ValueError, match=r"`fisher_output='head'` is not supported under ChimeraStrategy"):
        DPKFAC(fisher="gaussian", fisher_output="head").setup(trainer, TinyNet(), "fit")  # type: ignore[arg-type]
