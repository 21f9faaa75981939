"""Mid-epoch resume: the package's DataModules, the k-bit codec's and DPKFAC's generators are in the checkpoint.

Each Trainer test runs 30 steps once, writing a checkpoint every 10 steps (16 batches per epoch, so step 10 is
in the middle of the first epoch and the run crosses an epoch boundary after it), then resumes from the step-10
checkpoint in a fresh Trainer and model and compares the 20 losses after it with the uninterrupted run's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from lightning_parallel.callbacks import DPKFAC
from lightning_parallel.compression import KBitCodec
from lightning_parallel.data import DigitsDataModule, SyntheticDataModule, TextDataModule
from lightning_parallel.data.resumable import EpochRandomSampler, ResumableDataLoader
from lightning_parallel.models import MLPClassifier
from lightning_parallel.plugins import CompressedActivationPrecision
from tests.helpers.callbacks import LossRecorder

TOLERANCE = 1e-6


def _batches(loader: Any) -> list[torch.Tensor]:
    return [batch[0].clone() for batch in loader]


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    data = TensorDataset(torch.arange(50))
    a, b = EpochRandomSampler(data, seed=3), EpochRandomSampler(data, seed=3)
    b.set_epoch(1)
    first, second = list(a), list(b)
    assert sorted(first) == list(range(50)) and first != second
    a.set_epoch(1)
    assert list(a) == second
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(4)).tolist()
    assert second == expected


def test_loader_resumes_after_the_served_batches() -> None:
    data = TensorDataset(torch.arange(50))
    loader = ResumableDataLoader(data, batch_size=8, sampler=EpochRandomSampler(data, seed=0))
    loader.sampler.set_epoch(2)  # type: ignore[attr-defined]
    whole = _batches(loader)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    assert state["served"] == 3

    fresh = ResumableDataLoader(data, batch_size=8, sampler=EpochRandomSampler(data, seed=99))
    fresh.load_state_dict(state)  # the seed and epoch come from the state
    rest = _batches(fresh)
    assert len(rest) == len(whole) - 3
    for got, want in zip(rest, whole[3:]):
        assert torch.equal(got, want)
    # only the first iteration after loading skips; the next one is a whole epoch again
    assert len(_batches(fresh)) == len(whole)


def test_state_after_the_last_batch_starts_the_next_epoch_whole() -> None:
    data = TensorDataset(torch.arange(16))
    loader = ResumableDataLoader(data, batch_size=4, sampler=EpochRandomSampler(data, seed=0))
    _batches(loader)
    fresh = ResumableDataLoader(data, batch_size=4, sampler=EpochRandomSampler(data, seed=0))
    fresh.load_state_dict(loader.state_dict())
    assert len(_batches(fresh)) == 4


@pytest.mark.parametrize(
    "datamodule",
    [
        lambda: SyntheticDataModule(num_samples=64, batch_size=8),
        lambda: DigitsDataModule(batch_size=64),
        lambda: TextDataModule(block_size=16, batch_size=8, max_chars=4000),
    ],
    ids=["synthetic", "digits", "text"],
)
def test_package_datamodules_give_resumable_training_loaders(datamodule: Any) -> None:
    dm = datamodule()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochRandomSampler)


# ---- through the Trainer ---------------------------------------------------------------------------------


class DropoutMLP(MLPClassifier):
    """An MLP with dropout after every hidden block and Gaussian input noise drawn in ``training_step``: both
    draw from the global generators (torch, and NumPy for the noise scale)."""

    def build_blocks(self) -> nn.Sequential:
        blocks = super().build_blocks()
        for block in list(blocks)[:-1]:
            block.append(nn.Dropout(0.3))
        return blocks

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        scale = float(np.random.uniform(0.05, 0.15)) + random.uniform(0.0, 0.01)
        return super().training_step((x + scale * torch.randn_like(x), y), batch_idx)


def _run(
    tmp_path: Path,
    *,
    resume: Path | None = None,
    plugins: Any = None,
    callbacks: tuple[Any, ...] = (),
    model_class: type[MLPClassifier] = MLPClassifier,
    strategy: Any = "auto",
    devices: int = 1,
    hidden: tuple[int, ...] = (32, 32),
) -> tuple[list[float], Path]:
    pl.seed_everything(0)
    model = model_class(in_features=16, hidden=hidden, num_classes=4, lr=1e-2, optimizer="adam")
    data = SyntheticDataModule(shape=(16,), num_classes=4, num_samples=512, batch_size=32)  # 16 batches
    recorder = LossRecorder()
    ckpt_dir = tmp_path / ("resumed" if resume else "whole")
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=10, save_top_k=-1, save_last=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=30,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[recorder, checkpoints, *callbacks],
        plugins=plugins,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data, ckpt_path=resume)
    return recorder.losses, ckpt_dir / "epoch=0-step=10.ckpt"


def _assert_resume_exact(
    tmp_path: Path, make_plugins: Any = lambda: None, make_callbacks: Any = tuple, **kwargs: Any
) -> None:
    whole, ckpt = _run(tmp_path, plugins=make_plugins(), callbacks=make_callbacks(), **kwargs)
    assert len(whole) == 30 and ckpt.is_file()
    resumed, _ = _run(tmp_path, resume=ckpt, plugins=make_plugins(), callbacks=make_callbacks(), **kwargs)
    assert len(resumed) == 20
    worst = max(abs(a - b) for a, b in zip(resumed, whole[10:]))
    assert worst <= TOLERANCE, f"largest loss difference after resume {worst:.3g}"


def test_plain_training_resumes_exactly_mid_epoch(tmp_path: Path) -> None:
    _assert_resume_exact(tmp_path)


def test_dropout_and_draws_in_training_step_resume_exactly_mid_epoch(tmp_path: Path) -> None:
    # torch's, NumPy's and Python's global generators are in the checkpoint (Lightning saves none of them)
    _assert_resume_exact(tmp_path, model_class=DropoutMLP)


def test_generators_of_another_world_size_are_not_restored_with_a_warning() -> None:
    data = TensorDataset(torch.arange(16))
    loader = ResumableDataLoader(data, batch_size=4, sampler=EpochRandomSampler(data, seed=0))
    state = loader.state_dict()
    assert len(state["rng"]) == 1
    with pytest.warns(UserWarning, match=r"random generators of 2 ranks and this run has 1; they are not restored"):
        loader.load_state_dict({**state, "rng": state["rng"] * 2})


def test_kbit_compression_resumes_exactly_mid_epoch(tmp_path: Path) -> None:
    _assert_resume_exact(
        tmp_path, lambda: CompressedActivationPrecision(codec="kbit", bits=2, min_numel=64, log_stats=False)
    )


def test_dpkfac_categorical_fisher_resumes_exactly_mid_epoch(tmp_path: Path) -> None:
    _assert_resume_exact(
        tmp_path,
        make_callbacks=lambda: (DPKFAC(fisher="categorical", factor_update_steps=1, inv_update_steps=5),),
    )


def test_kbit_codec_state_continues_the_noise() -> None:
    x = torch.randn(4096)
    codec = KBitCodec(2, seed=5)
    codec.encode(x)
    state = codec.state_dict()
    want = codec.decode(codec.encode(x))
    other = KBitCodec(2, seed=5)
    other.load_state_dict(state)
    assert torch.equal(other.decode(other.encode(x)), want)
    assert not torch.equal(KBitCodec(2, seed=5).roundtrip(x), want)  # a fresh generator draws other noise


@pytest.mark.parametrize("epoch", [0, 3])
def test_sampler_order_is_that_of_one_replica_distributed_sampler(epoch: int) -> None:
    # a pipeline with one replica gets Lightning's DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED): with
    # the package's DataModules it reads the batches single-device training reads, without
    # use_distributed_sampler=False
    from torch.utils.data.distributed import DistributedSampler

    data = TensorDataset(torch.arange(37))
    ours = EpochRandomSampler(data, seed=7)
    theirs = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
    ours.set_epoch(epoch)
    theirs.set_epoch(epoch)
    assert list(ours) == list(theirs)
