"""CompressedActivationPrecision under a pipeline strategy: each stage compresses its own activations."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import MLPClassifier
from lightning_parallel.plugins import CompressedActivationPrecision
from lightning_parallel.strategies import ChimeraStrategy
from tests.helpers.callbacks import LossRecorder
from tests.helpers.distributed import run_distributed


def _fit(plugin: CompressedActivationPrecision | None) -> list[float]:
    torch.manual_seed(0)
    model = MLPClassifier(16, (64, 64, 64), 4, optimizer="sgd", lr=0.1)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(4 * 32, 16, generator=gen), torch.randint(0, 4, (4 * 32,), generator=gen)
    )
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ChimeraStrategy(2, 2),
        max_steps=4,
        callbacks=[recorder],
        plugins=[plugin] if plugin is not None else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=32))
    return recorder.losses


def _world(rank: int, world_size: int) -> dict[str, Any]:
    plain = _fit(None)
    passthrough = CompressedActivationPrecision(codec="none", min_numel=1)
    exact = _fit(passthrough)
    kbit = CompressedActivationPrecision(codec="kbit", bits=8, min_numel=64)
    lossy = _fit(kbit)
    return {
        "plain": plain,
        "exact": exact,
        "lossy": lossy,
        "tensors": passthrough.last_stats.tensors,
        "ratio": kbit.last_stats.compression_ratio,
    }


def test_each_pipeline_stage_compresses_its_activations() -> None:
    results = run_distributed(_world, 2, timeout=300.0)
    for res in results:
        assert res["exact"] == res["plain"]  # passthrough: bitwise-identical training
        assert res["tensors"] > 0  # the hooks ran on every stage
        assert res["ratio"] > 2.5
        assert max(abs(a - b) for a, b in zip(res["lossy"], res["plain"])) < 0.02
