"""InterlockingBackpropStrategy with tied weights and with stage-local weights (sharded checkpoints).

Two gloo processes, 4 stages (2 per rank), k = 2. The reference of a k = 2 run is the same strategy in
single-process mode: every stage in one process, so the tied embedding/head weight is one parameter whose
gradient is the sum of both stages' uses. A k = 4 run (end-to-end backprop) is also compared with plain
one-device training.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import GPTLanguageModel
from lightning_parallel.pipeline.consolidate import consolidated_checkpoint
from lightning_parallel.pipeline.stage_local import materialized_bytes
from lightning_parallel.strategies import InterlockingBackpropStrategy
from tests.helpers.checkpoints import resume_half_written
from tests.helpers.distributed import run_distributed

GPT = {"vocab_size": 16, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, "init_seed": 5, "lr": 1e-2}
BATCH, STEPS = 8, 4
EPOCH = 2  # batches per epoch: a checkpoint after step 2 sits at an epoch boundary, so resuming is exact
HEADS = "interlocking_heads."


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (BATCH * EPOCH, 8), generator=g)
    return TensorDataset(idx, idx.roll(-1, dims=1))


def _strategy(k: int = 2, **kwargs: Any) -> InterlockingBackpropStrategy:
    return InterlockingBackpropStrategy(k=k, stages=4, micro_batches=2, **kwargs)


def _fit(strategy: Any, devices: int, *, steps: int = STEPS, ckpt_path: str | None = None,
         save: str | None = None, **model: Any) -> GPTLanguageModel:
    """Train ``steps`` steps (whole epochs), then with ``save`` save a checkpoint there (exact to resume)."""
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=steps // EPOCH, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    torch.manual_seed(0)  # the auxiliary heads are drawn from torch's stream (rank 0's, broadcast)
    module = GPTLanguageModel(**{**GPT, **model})
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return module


def _materialised(module: GPTLanguageModel) -> dict[str, torch.Tensor]:
    """Every non-meta tensor of the module (heads included) by state-dict name."""
    return {
        name: t.detach().clone() for name, t in module.state_dict(keep_vars=True).items() if t.device.type != "meta"
    }


def _world(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    out["tied"] = _materialised(_fit(_strategy(), 2, tie_weights=True))
    out["tied-k4"] = _materialised(_fit(_strategy(4), 2, tie_weights=True))
    # local-tied: the default stage_local=None turns stage-local weights on for a module built in configure_model.
    for name, local, build, tie in [("local-meta", True, True, False), ("local-eager", True, False, False),
                                    ("local-tied", None, True, True)]:
        strategy = _strategy(stage_local=local)
        module = _fit(strategy, 2, build_in_configure_model=build, tie_weights=tie)
        out[name] = _materialised(module)
        out[name + "-bytes"] = materialized_bytes([module])
        out[name + "-resolved"] = strategy.stage_local
    # Sharded checkpoint after 2 steps (the default for this meta-built module); resume for the remaining 2.
    path = os.path.join(tmp, "last.ckpt")
    _fit(_strategy(), 2, steps=2, save=path, build_in_configure_model=True, tie_weights=True)
    out["path"] = path
    out["resumed"] = _materialised(_fit(_strategy(), 2, ckpt_path=path, build_in_configure_model=True, tie_weights=True))
    out["broken"] = resume_half_written(
        rank, path, lambda broken: _fit(_strategy(stage_local=True), 2, ckpt_path=broken, build_in_configure_model=True, tie_weights=True)
    )
    return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_world, 2, str(tmp_path_factory.mktemp("interlocking_local")), timeout=600.0)


def _one_process(k: int = 2, **model: Any) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return _materialised(_fit(_strategy(k), 1, **model))


# Adam divides by sqrt(v): float rounding of tiny gradients moves a weight by up to ~1e-5 here, against
# up to 7e-2 of difference when the tied copies step with their own stage's gradient only.
def _assert_subset_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-4) -> None:
    assert actual, "no tensors to compare"
    for key, value in actual.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=atol, msg=key)


def test_tied_weights_train_as_in_one_process(distributed: list[dict[str, Any]]) -> None:
    # Before the tied gradients were summed, each rank stepped its own copy: the embedding with the first
    # stage's gradient only, the head with the last stage's only (trained as if untied).
    reference = _one_process(tie_weights=True)
    for rank_out in distributed:
        _assert_subset_close(rank_out["tied"], reference)
        torch.testing.assert_close(rank_out["tied"]["blocks.0.token.weight"], rank_out["tied"]["blocks.3.1.weight"])


def test_tied_weights_with_k_equal_stages_train_as_on_one_device(distributed: list[dict[str, Any]]) -> None:
    # k = stages is end-to-end backprop: the trunk must equal plain one-device training of the tied GPT.
    torch.set_num_threads(1)
    plain = _materialised(_fit("auto", 1, tie_weights=True))
    trunk = {k: v for k, v in distributed[0]["tied-k4"].items() if not k.startswith(HEADS)}
    assert set(trunk) == set(plain)
    _assert_subset_close(trunk, plain)


@pytest.mark.parametrize("name", ["local-meta", "local-eager", "local-tied"])
def test_stage_local_trains_as_in_one_process(distributed: list[dict[str, Any]], name: str) -> None:
    # A module built on meta draws nothing from torch's stream, so the heads (drawn from it) differ from an
    # eager build's: the meta-built runs are compared with the same build in one process.
    meta = name != "local-eager"
    torch.set_num_threads(1)
    model = {"tie_weights": name == "local-tied", "build_in_configure_model": meta}
    reference = _materialised(_fit(_strategy(stage_local=meta), 1, **model))
    held: set[str] = set()
    for rank_out in distributed:
        _assert_subset_close(rank_out[name], reference)
        held |= set(rank_out[name])
    assert held == set(reference)  # every tensor (heads included) is held by some rank


@pytest.mark.parametrize("name", ["local-meta", "local-eager"])
def test_a_rank_materialises_only_its_stages_and_heads(distributed: list[dict[str, Any]], name: str) -> None:
    torch.set_num_threads(1)
    reference = _fit(_strategy(), 1, steps=1)
    blocks = list(reference.pipeline_blocks())
    heads = list(reference.interlocking_heads)

    def nbytes(modules: list[torch.nn.Module]) -> int:
        return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])

    # 4 blocks, 4 stages, 2 per rank: rank r holds blocks 2r, 2r+1 and the heads of stages 2r, 2r+1 (< 3).
    for rank, rank_out in enumerate(distributed):
        expected = nbytes(blocks[2 * rank : 2 * rank + 2]) + nbytes(heads[2 * rank : min(2 * rank + 2, 3)])
        assert rank_out[name + "-bytes"] == expected, rank


def test_stage_local_is_the_default_for_modules_built_in_configure_model(distributed: list[dict[str, Any]]) -> None:
    assert all(rank_out["local-tied-resolved"] is True for rank_out in distributed)
    strategy = _strategy()
    assert strategy.stage_local is None and not strategy.save_distributed_checkpoint  # resolved in setup


def test_sharded_checkpoint_resumes_exactly(distributed: list[dict[str, Any]]) -> None:
    assert Path(distributed[0]["path"]).is_dir()
    for rank_out in distributed:
        _assert_subset_close(rank_out["resumed"], rank_out["local-tied"], atol=1e-6)


def test_consolidated_checkpoint_loads_into_the_plain_module(distributed: list[dict[str, Any]], tmp_path: Path) -> None:
    checkpoint = consolidated_checkpoint(distributed[0]["path"])
    assert checkpoint["global_step"] == 2
    assert not any(key.startswith(HEADS) for key in checkpoint["state_dict"])
    assert set(checkpoint["interlocking"]["heads"]) == {f"{j}.{p}" for j in range(3) for p in ("weight", "bias")}
    torch.set_num_threads(1)
    model = {"tie_weights": True, "build_in_configure_model": True}  # as the checkpointed run (see above)
    reference = _materialised(_fit(_strategy(stage_local=True), 1, **model))
    two = _materialised(_fit(_strategy(stage_local=True), 1, steps=2, **model))
    _assert_subset_close(checkpoint["state_dict"], two)
    out = tmp_path / "one.ckpt"
    torch.save(checkpoint, out)
    loaded = GPTLanguageModel.load_from_checkpoint(out)  # strict: no head keys
    torch.testing.assert_close(loaded.state_dict(), checkpoint["state_dict"], rtol=0, atol=0)
    # Resuming the consolidated checkpoint in single-process mode (every stage in one process, single-file
    # checkpoint) continues the same run.
    resumed = _materialised(_fit(_strategy(), 1, ckpt_path=str(out), tie_weights=True))
    _assert_subset_close(resumed, reference)


def test_a_half_written_checkpoint_is_refused(distributed: list[dict[str, Any]]) -> None:
    for rank_out in distributed:
        assert "not a complete sharded checkpoint: pipeline_meta.pt missing" in rank_out["broken"]


def test_stage_local_arguments_are_checked(tmp_path: Path) -> None:
    from lightning_parallel.pipeline.stage_checkpoint import save_sharded
    from lightning_parallel.strategies import AuxNetStrategy

    with pytest.raises(ValueError, match="AuxNetStrategy does not support stage_local=True"):
        AuxNetStrategy(stages=2, stage_local=True)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=True needs stage_local=True"):
        AuxNetStrategy(stages=2, save_distributed_checkpoint=True)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False cannot write"):
        _strategy(stage_local=True, save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=True needs stage_local=True"):
        _strategy(stage_local=False, save_distributed_checkpoint=True)
    with pytest.raises(TypeError, match="stage_local='yes' must be True, False or None"):
        _strategy(stage_local="yes")
    # The default (None) is decided in setup: a meta-built module with single-file checkpoints asked for fails.
    deferred = _strategy(save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False cannot write"):
        deferred._resolve_stage_local(True)
    eager = _strategy(save_distributed_checkpoint=False)
    eager._resolve_stage_local(False)
    assert eager.stage_local is False and eager.save_distributed_checkpoint is False
    save_sharded(tmp_path, {"model/x": torch.zeros(1)}, {"checkpoint": {"interlocking": {"stages": 2}}})
    with pytest.raises(ValueError, match="resume it with stage_local=True"):
        _strategy().load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"written with stages=2 but this run has stages=4; .* only with the same"):
        _strategy(stage_local=True).load_checkpoint(tmp_path)
    single = tmp_path / "one.ckpt"
    torch.save({}, single)
    with pytest.raises(ValueError, match="single-file checkpoint; a stage_local=True run resumes sharded"):
        _strategy(stage_local=True).load_checkpoint(single)
