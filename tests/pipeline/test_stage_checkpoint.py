"""Sharded stage checkpoints (DCP): resharding across layouts, consolidation, interrupted saves refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import GPTLanguageModel
from lightning_parallel.pipeline.consolidate import consolidate_command, consolidated_checkpoint
from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.pipeline.stage_checkpoint import (
    DCP_METADATA,
    META_FILE,
    MODEL_PREFIX,
    check_complete,
    load_optimizer_state_by_name,
    load_sharded,
    optimizer_keys,
    optimizer_layout,
    optimizer_state_by_name,
    parameter_names,
    save_sharded,
)
from lightning_parallel.pipeline.stage_local import materialize_blocks
from tests.helpers.distributed import run_distributed

GPT = {"vocab_size": 16, "block_size": 8, "n_layer": 4, "n_head": 2, "n_embd": 8, "init_seed": 3}


def _trained(tmp_path: Path, tie: bool) -> tuple[GPTLanguageModel, pl.Trainer]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (16, 8), generator=g)
    model = GPTLanguageModel(**GPT, tie_weights=tie)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(idx, idx.roll(-1, 1)), batch_size=4))
    return model, trainer


def _meta_of(trainer: pl.Trainer, model: nn.Module) -> dict[str, Any]:
    full = trainer._checkpoint_connector.dump_checkpoint()
    rest = {k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}
    return {"checkpoint": rest, "optimizers": [optimizer_layout(trainer.optimizers[0], parameter_names(model))]}


def _held_entries(model: GPTLanguageModel, optimizer: torch.optim.Optimizer, held: range) -> dict[str, torch.Tensor]:
    """This "rank"'s entries: the state of its blocks under the module's names."""
    blocks = list(model.pipeline_blocks())
    mine = {id(t) for i in held for t in [*blocks[i].parameters(), *blocks[i].buffers()]}
    entries = {
        MODEL_PREFIX + name: t.detach() for name, t in model.state_dict(keep_vars=True).items() if id(t) in mine
    }
    return entries | optimizer_state_by_name(optimizer, parameter_names(model))


def _stage_optimizer(model: GPTLanguageModel, held: range) -> torch.optim.Optimizer:
    blocks = list(model.pipeline_blocks())
    params = {id(p): p for i in held for p in blocks[i].parameters()}
    return torch.optim.AdamW(list(params.values()), lr=3e-3)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_consolidating_one_process_shards_gives_the_lightning_checkpoint(tmp_path: Path, tie: bool) -> None:
    model, trainer = _trained(tmp_path, tie)
    optimizer = trainer.optimizers[0]
    directory = tmp_path / "sharded"
    save_sharded(directory, _held_entries(model, optimizer, range(6)), _meta_of(trainer, model))
    check_complete(directory)
    reference = trainer._checkpoint_connector.dump_checkpoint()
    consolidated = consolidated_checkpoint(directory)
    torch.testing.assert_close(consolidated["state_dict"], reference["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(consolidated["optimizer_states"], reference["optimizer_states"], rtol=0, atol=0)
    assert consolidated["global_step"] == reference["global_step"] == 3
    out = tmp_path / "one.ckpt"
    assert consolidate_command([str(directory), str(out)]) == 0
    loaded = GPTLanguageModel.load_from_checkpoint(out)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert (loaded.blocks[-1][1].weight is loaded.blocks[0].token.weight) == tie


def _save_stage(rank: int, world_size: int, directory: str, state: dict[str, Any], sizes: list[int]) -> None:
    held = range(stage_slices(sizes)[rank].start, stage_slices(sizes)[rank].stop)
    with torch.device("meta"):
        model = GPTLanguageModel(**GPT, tie_weights=True)
    materialize_blocks(model, list(model.pipeline_blocks()), held)
    names = parameter_names(model)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.device.type != "meta":
                tensor.copy_(state["model"][name])
    optimizer = _stage_optimizer(model, held)
    entries = {k: v for k, v in state["optimizer"].items() if k.split("/")[2] in {names[id(p)] for p in optimizer.param_groups[0]["params"]}}
    load_optimizer_state_by_name(optimizer, names, entries)
    save_sharded(directory, _held_entries(model, optimizer, held), state["meta"])


def _load_stage(rank: int, world_size: int, directory: str, sizes: list[int]) -> dict[str, Any]:
    held = range(stage_slices(sizes)[rank].start, stage_slices(sizes)[rank].stop)
    with torch.device("meta"):
        model = GPTLanguageModel(**GPT, tie_weights=True)
    materialize_blocks(model, list(model.pipeline_blocks()), held)
    names = parameter_names(model)
    mine = [name for name, t in model.state_dict(keep_vars=True).items() if t.device.type != "meta"]
    values = load_sharded(directory, [MODEL_PREFIX + name for name in mine])
    optimizer = _stage_optimizer(model, held)
    held_names = [names[id(p)] for p in optimizer.param_groups[0]["params"]]
    load_optimizer_state_by_name(optimizer, names, load_sharded(directory, optimizer_keys(directory, 0, held_names)))
    return {"model": {k[len(MODEL_PREFIX) :]: v for k, v in values.items()},
            "optimizer": optimizer_state_by_name(optimizer, names)}


def test_shards_written_by_two_ranks_load_into_three_ranks_and_one(tmp_path: Path) -> None:
    model, trainer = _trained(tmp_path, tie=True)
    optimizer = trainer.optimizers[0]
    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "optimizer": optimizer_state_by_name(optimizer, parameter_names(model)),
             "meta": _meta_of(trainer, model)}
    directory = str(tmp_path / "two")
    run_distributed(_save_stage, 2, directory, state, [3, 3], timeout=120)
    for part in run_distributed(_load_stage, 3, directory, [1, 3, 2], timeout=120):
        for name, value in part["model"].items():
            torch.testing.assert_close(value, state["model"][name], rtol=0, atol=0)
        for key, value in part["optimizer"].items():
            torch.testing.assert_close(value, state["optimizer"][key], rtol=0, atol=0)
    reference = trainer._checkpoint_connector.dump_checkpoint()
    consolidated = consolidated_checkpoint(directory)
    torch.testing.assert_close(consolidated["state_dict"], reference["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(consolidated["optimizer_states"], reference["optimizer_states"], rtol=0, atol=0)


@pytest.mark.parametrize("missing", [META_FILE, DCP_METADATA])
def test_a_half_written_checkpoint_is_refused(tmp_path: Path, missing: str, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "partial"
    save_sharded(directory, {MODEL_PREFIX + "w": torch.ones(2)}, {"checkpoint": {}, "optimizers": []})
    (directory / missing).unlink()
    with pytest.raises(ValueError, match=f"not a complete sharded checkpoint: {missing} missing"):
        check_complete(directory)
    with pytest.raises(ValueError, match="not a complete sharded checkpoint"):
        load_sharded(directory, [MODEL_PREFIX + "w"])
    assert consolidate_command([str(directory), str(tmp_path / "out.ckpt")]) == 2
    assert "not a complete sharded checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_unknown_keys_and_missing_directories_are_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ok"
    save_sharded(directory, {MODEL_PREFIX + "w": torch.ones(2)}, {"checkpoint": {}, "optimizers": []})
    with pytest.raises(ValueError, match="holds no model/v"):
        load_sharded(directory, [MODEL_PREFIX + "v"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_complete(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not part of the module"):
        optimizer_state_by_name(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0), {})


def test_the_cli_runs_consolidate(tmp_path: Path) -> None:
    from lightning_parallel.cli import main

    directory = tmp_path / "partial"
    save_sharded(directory, {MODEL_PREFIX + "w": torch.ones(2)}, {"checkpoint": {}, "optimizers": []})
    (directory / META_FILE).unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["consolidate", str(directory), str(tmp_path / "out.ckpt")])
    assert exit_info.value.code == 2
