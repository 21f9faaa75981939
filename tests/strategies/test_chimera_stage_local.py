"""ChimeraStrategy(stage_local=True): each rank holds only its stages; sharded checkpoints reshard on resume.

Two gloo processes, D = 2. References are single-device runs of the same GPT, seed and batches.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import GPTLanguageModel
from lightning_parallel.pipeline.consolidate import consolidated_checkpoint
from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.pipeline.stage_local import materialized_bytes
from lightning_parallel.strategies.chimera import ChimeraStrategy
from tests.helpers.callbacks import LossRecorder
from tests.helpers.checkpoints import resume_half_written
from tests.helpers.distributed import run_distributed

GPT = {"vocab_size": 16, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, "init_seed": 5, "lr": 1e-2}
BATCH, STEPS = 8, 4


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (BATCH * STEPS, 8), generator=g)
    return TensorDataset(idx, idx.roll(-1, dims=1))


def _fit(strategy: Any, devices: int, *, steps: int = STEPS, ckpt_path: str | None = None,
         callbacks: list[Any] | None = None, **model: Any) -> tuple[GPTLanguageModel, list[float]]:
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[recorder, *(callbacks or [])],
    )
    module = GPTLanguageModel(**{**GPT, **model})
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH), ckpt_path=ckpt_path)
    return module, recorder.losses


def _held(strategy: ChimeraStrategy, module: GPTLanguageModel) -> dict[str, Any]:
    tensors = {}
    names = {id(t): n for n, t in module.state_dict(keep_vars=True).items()}
    for (replica, _stage), stage_module in strategy.held_stage_modules.items():
        if replica == 0:
            for t in stage_module.parameters():
                tensors[names[id(t)]] = t.detach().clone()
    modules = [module, *strategy.held_stage_modules.values()]
    return {"tensors": tensors, "bytes": materialized_bytes(modules), "stages": sorted(strategy.held_stage_modules),
            "sizes": strategy.partition_sizes}


def _world(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    for name, schedule, build in [("chimera-meta", "chimera", True), ("1f1b-meta", "1f1b", True),
                                  ("1f1b-eager", "1f1b", False)]:
        strategy = ChimeraStrategy(2, 2, schedule=schedule, stage_local=True)
        module, losses = _fit(strategy, 2, build_in_configure_model=build)
        out[name] = {"losses": losses, **_held(strategy, module)}
    for name, schedule in [("recompute-1f1b", "1f1b"), ("recompute-zb", "chimera-zb")]:
        strategy = ChimeraStrategy(2, 2, schedule=schedule, stage_local=True, recompute=True)
        module, losses = _fit(strategy, 2, build_in_configure_model=True)
        out[name] = {"losses": losses, **_held(strategy, module)}
    for name, schedule, build in [("tied-1f1b", "1f1b", True), ("tied-chimera", "chimera", True),
                                  ("tied-eager", "chimera", False)]:
        strategy = ChimeraStrategy(2, 2, schedule=schedule, stage_local=True)
        module, losses = _fit(strategy, 2, build_in_configure_model=build, tie_weights=True)
        out[name] = {"losses": losses, **_held(strategy, module)}
    strategy = ChimeraStrategy(2, 2, schedule="1f1b", stage_local=True, partition="flops")
    module, losses = _fit(strategy, 2, build_in_configure_model=True)
    out["flops"] = {"losses": losses, **_held(strategy, module)}
    # Sharded checkpoint after 2 steps of Chimera; resume under 1F1B for the remaining steps.
    save = ModelCheckpoint(dirpath=tmp, save_last=True, save_top_k=0)
    _fit(ChimeraStrategy(2, 2, stage_local=True), 2, steps=2, callbacks=[save], build_in_configure_model=True)
    path = os.path.join(tmp, "last.ckpt")
    out["path"] = path
    _, out["resumed"] = _fit(ChimeraStrategy(2, 2, schedule="1f1b", stage_local=True), 2, ckpt_path=path,
                             build_in_configure_model=True)
    out["broken"] = resume_half_written(
        rank, path, lambda broken: _fit(ChimeraStrategy(2, 2, stage_local=True), 2, ckpt_path=broken, build_in_configure_model=True)
    )
    return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_world, 2, str(tmp_path_factory.mktemp("stage_local")), timeout=600.0)


@pytest.fixture(scope="module")
def reference() -> tuple[GPTLanguageModel, list[float]]:
    return _fit("auto", 1)


@pytest.fixture(scope="module")
def tied_reference() -> tuple[GPTLanguageModel, list[float]]:
    return _fit("auto", 1, tie_weights=True)


@pytest.mark.parametrize("name", ["tied-1f1b", "tied-chimera", "tied-eager"])
def test_tied_weights_train_as_on_one_device(distributed: list[dict[str, Any]], tied_reference: Any, name: str) -> None:
    model, losses = tied_reference
    state = model.state_dict()
    for rank_out in distributed:
        run = rank_out[name]
        _close(run["losses"], losses)
        for key, value in run["tensors"].items():
            torch.testing.assert_close(value, state[key], rtol=1e-4, atol=1e-4)
    # The embedding's rank and the head's rank each hold a copy of the tied weight, and they agree bit for bit.
    copies = [out[name]["tensors"]["blocks.3.1.weight"] for out in distributed if "blocks.3.1.weight" in out[name]["tensors"]]
    assert len(copies) == 2
    torch.testing.assert_close(copies[0], copies[1], rtol=0, atol=0)


def _close(actual: list[float], expected: list[float], tol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert abs(a - e) <= tol * max(1.0, abs(e)), (actual, expected)


@pytest.mark.parametrize("name", ["chimera-meta", "1f1b-meta", "1f1b-eager", "flops", "recompute-1f1b", "recompute-zb"])
def test_stage_local_training_equals_one_device(distributed: list[dict[str, Any]], reference: Any, name: str) -> None:
    model, losses = reference
    state = model.state_dict()
    for rank_out in distributed:
        run = rank_out[name]
        _close(run["losses"], losses)
        # Adam divides by sqrt(v): float rounding of tiny gradients moves a weight by up to ~1e-5 here, against
        # up to 4e-2 of training movement (lr 1e-2, 4 steps).
        for key, value in run["tensors"].items():
            torch.testing.assert_close(value, state[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["chimera-meta", "1f1b-meta", "1f1b-eager", "flops"])
def test_a_rank_materialises_only_its_stages(distributed: list[dict[str, Any]], reference: Any, name: str) -> None:
    model, _ = reference
    blocks = list(model.pipeline_blocks())
    for rank, rank_out in enumerate(distributed):
        run = rank_out[name]
        slices = stage_slices(run["sizes"])
        held_blocks = [b for _, stage in run["stages"] for b in blocks[slices[stage]]]
        expected = sum(t.numel() * t.element_size() for b in held_blocks for t in [*b.parameters(), *b.buffers()])
        assert run["bytes"] == expected, (rank, run["stages"])
        if len(run["stages"]) == 1:  # Chimera at D=2 holds both stages, i.e. the whole model, by design
            assert run["bytes"] < sum(p.numel() * p.element_size() for p in model.parameters())


def test_sharded_checkpoint_resumes_under_another_schedule(distributed: list[dict[str, Any]], tmp_path: Path) -> None:
    # The reference resumes on one device from the consolidated checkpoint (optimizer state included).
    assert Path(distributed[0]["path"]).is_dir()
    out = tmp_path / "one.ckpt"
    torch.save(consolidated_checkpoint(distributed[0]["path"]), out)
    _, losses = _fit("auto", 1, ckpt_path=str(out))
    assert len(losses) == 2
    for rank_out in distributed:
        _close(rank_out["resumed"], losses)


def test_consolidated_checkpoint_loads_into_the_plain_module(distributed: list[dict[str, Any]], tmp_path: Path) -> None:
    checkpoint = consolidated_checkpoint(distributed[0]["path"])
    assert checkpoint["global_step"] == 2
    reference, _ = _fit("auto", 1, steps=2)
    torch.testing.assert_close(checkpoint["state_dict"], reference.state_dict(), rtol=1e-4, atol=1e-4)
    out = tmp_path / "one.ckpt"
    torch.save(checkpoint, out)
    loaded = GPTLanguageModel.load_from_checkpoint(out)
    torch.testing.assert_close(loaded.state_dict(), checkpoint["state_dict"], rtol=0, atol=0)


def test_a_half_written_checkpoint_is_refused(distributed: list[dict[str, Any]]) -> None:
    for rank_out in distributed:
        assert "not a complete sharded checkpoint: pipeline_meta.pt missing" in rank_out["broken"]


def test_stage_local_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False cannot write"):
        ChimeraStrategy(2, stage_local=True, save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=True needs stage_local=True"):
        ChimeraStrategy(2, stage_local=False, save_distributed_checkpoint=True)
    with pytest.raises(ValueError, match=r"recompute=\[2\] names stages \[2\] that do not exist"):
        ChimeraStrategy(2, recompute=[2])
