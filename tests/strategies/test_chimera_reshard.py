"""Trainer-level resharding of sharded ChimeraStrategy checkpoints.

A stage-local run saves a sharded checkpoint at an epoch boundary (so that resuming replays exactly the
batches the uninterrupted run sees next) and resumes under another number of stages, another schedule or
another data-parallel layout. Reference: the single-device run of the same GPT, seed and batches.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import GPTLanguageModel
from lightning_parallel.pipeline.consolidate import consolidated_checkpoint
from lightning_parallel.strategies.chimera import ChimeraStrategy
from tests.helpers.callbacks import LossRecorder
from tests.helpers.distributed import run_distributed

GPT = {"vocab_size": 16, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, "init_seed": 5, "lr": 1e-2}
BATCH, EPOCH, EPOCHS = 8, 2, 2  # 2 batches per epoch, 4 steps; the checkpoint is written after epoch 1


def _fit(strategy: Any, devices: int, *, epochs: int = EPOCHS, ckpt_path: str | None = None,
         save: str | None = None) -> tuple[GPTLanguageModel, list[float]]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (BATCH * EPOCH, 8), generator=g)
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[recorder],
    )
    module = GPTLanguageModel(**GPT, build_in_configure_model=devices > 1)
    trainer.fit(module, DataLoader(TensorDataset(idx, idx.roll(-1, dims=1)), batch_size=BATCH), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return module, recorder.losses


def _held(strategy: ChimeraStrategy, module: GPTLanguageModel) -> dict[str, torch.Tensor]:
    """This rank's trained tensors (replica 0's stages) by state-dict name."""
    names = {id(t): n for n, t in module.state_dict(keep_vars=True).items()}
    return {
        names[id(t)]: t.detach().clone()
        for (replica, _), stage_module in strategy.held_stage_modules.items()
        if replica == 0
        for t in stage_module.parameters()
    }


def _save_then_resume(tmp: str, saver: ChimeraStrategy, resumers: dict[str, Any], devices: int) -> dict[str, Any]:
    """Save after one epoch with ``saver``; resume the second epoch with each of ``resumers``."""
    path = os.path.join(tmp, "epoch1.ckpt")
    module, first = _fit(saver, devices, epochs=1, save=path)
    out: dict[str, Any] = {"path": path, "first": first, "saved": _held(saver, module)}
    for name, make in resumers.items():
        strategy = make()
        module, losses = _fit(strategy, devices, ckpt_path=path)
        out[name] = {"losses": losses, "tensors": _held(strategy, module), "stage_local": strategy.stage_local}
    return out


def _world2(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # The GPT is built in configure_model: stage_local=None (the default) makes it stage-local.
    return _save_then_resume(tmp, ChimeraStrategy(2), {
        "1f1b-D2": lambda: ChimeraStrategy(2, schedule="1f1b"),
        "1f1b-D1x2": lambda: ChimeraStrategy(1, schedule="1f1b"),  # one stage, 2 replicas
    }, world_size)


def _world4(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    return _save_then_resume(tmp, ChimeraStrategy(4, stage_local=True), {
        "chimera-D2x2": lambda: ChimeraStrategy(2, stage_local=True),  # 2 stages, 2 replicas
        "1f1b-D4": lambda: ChimeraStrategy(4, schedule="1f1b", stage_local=True),
    }, world_size)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], list[float], dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    one_epoch, _ = _fit("auto", 1, epochs=1)
    model, losses = _fit("auto", 1)
    return model.state_dict(), losses, one_epoch.state_dict()


def _close(actual: list[float], expected: list[float], tol: float = 1e-5) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected):
        assert abs(a - e) <= tol * max(1.0, abs(e)), (actual, expected)


def _check(ranks: list[dict[str, Any]], reference: Any, names: list[str]) -> None:
    final, losses, one_epoch = reference
    for rank_out in ranks:
        _close(rank_out["first"], losses[:EPOCH])
        for name in names:
            # Resuming continues the uninterrupted trajectory: the second epoch's losses and the final weights.
            _close(rank_out[name]["losses"], losses[EPOCH:])
            assert rank_out[name]["stage_local"] is True
            for key, value in rank_out[name]["tensors"].items():
                torch.testing.assert_close(value, final[key], rtol=1e-4, atol=1e-4, msg=key)
    # The consolidated checkpoint is exactly what the ranks held when they saved, and the one-device weights.
    checkpoint = consolidated_checkpoint(ranks[0]["path"])
    held = {key: value for rank_out in ranks for key, value in rank_out["saved"].items()}
    assert set(held) <= set(checkpoint["state_dict"])
    for key, value in held.items():
        torch.testing.assert_close(checkpoint["state_dict"][key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(checkpoint["state_dict"], one_epoch, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_reshards_to_another_schedule_and_stage_count(tmp_path: Any, reference: Any) -> None:
    ranks = run_distributed(_world2, 2, str(tmp_path), timeout=600.0)
    _check(ranks, reference, ["1f1b-D2", "1f1b-D1x2"])


@pytest.mark.slow
def test_four_stage_chimera_checkpoint_resumes_with_two_stages_and_with_1f1b(tmp_path: Any, reference: Any) -> None:
    ranks = run_distributed(_world4, 4, str(tmp_path), timeout=900.0)
    _check(ranks, reference, ["chimera-D2x2", "1f1b-D4"])


def _world_scheduled(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """A cosine learning-rate schedule across a sharded resume: the saved ``lr`` must come back."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import ModelCheckpoint

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (BATCH * EPOCH, 8), generator=g)
    data = DataLoader(TensorDataset(idx, idx.roll(-1, dims=1)), batch_size=BATCH)
    out: dict[str, Any] = {}
    for run in ("uninterrupted", "resumed"):
        recorder = LossRecorder()
        callbacks: list[Any] = [recorder]
        if run == "uninterrupted":
            callbacks.append(ModelCheckpoint(dirpath=os.path.join(tmp, "ckpts"), save_top_k=-1, every_n_epochs=1))
        trainer = pl.Trainer(
            accelerator="cpu", devices=world_size, strategy=ChimeraStrategy(2, schedule="1f1b"), max_epochs=EPOCHS,
            logger=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
            callbacks=callbacks, enable_checkpointing=run == "uninterrupted",
        )
        module = GPTLanguageModel(**GPT, scheduler="cosine", build_in_configure_model=True)
        ckpt = os.path.join(tmp, "ckpts", f"epoch=0-step={EPOCH}.ckpt") if run == "resumed" else None
        trainer.fit(module, data, ckpt_path=ckpt)
        assert trainer.strategy.stage_local is True  # type: ignore[attr-defined]
        out[run] = {"losses": recorder.losses, "lr": [group["lr"] for group in trainer.optimizers[0].param_groups]}
    return out


def test_sharded_resume_restores_the_learning_rate_schedule(tmp_path: Any) -> None:
    # Fails when the param groups' settings are not restored: the chainable cosine restarts from the initial lr.
    for rank_out in run_distributed(_world_scheduled, 2, str(tmp_path), timeout=600.0):
        _close(rank_out["resumed"]["losses"], rank_out["uninterrupted"]["losses"][EPOCH:], tol=1e-6)
        assert rank_out["resumed"]["lr"] == pytest.approx(rank_out["uninterrupted"]["lr"], rel=1e-9)
