"""InterlockingBackpropStrategy under the Trainer: end-to-end equality, the plain loop, logging, checkpoints."""

from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.interlocking.heads import split_trunk
from lightning_parallel.interlocking.plan import InterlockingPlan
from lightning_parallel.interlocking.runtime import InterlockingRuntime
from lightning_parallel.models import ResNetClassifier
from lightning_parallel.pipeline.micro_batches import split_micro_batches
from lightning_parallel.strategies import InterlockingBackpropStrategy
from tests.helpers.distributed import run_distributed

BATCH = 16


def _model() -> ResNetClassifier:
    torch.manual_seed(0)
    return ResNetClassifier(widths=(4, 8, 16, 32), norm="group", lr=1e-2, optimizer="adam")


def _data(batches: int = 2, seed: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * BATCH, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batches * BATCH,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _trainer(strategy: Any = "auto", devices: int = 1, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "use_distributed_sampler": False,  # keep the loader's order, as single-device training does
    }
    options.update(kwargs)
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **options)


def _trunk(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("interlocking_heads.")}


def _assert_close(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            torch.as_tensor(a[key]), torch.as_tensor(b[key]), rtol=0, atol=atol, msg=key
        )


def test_k_equals_stages_is_end_to_end_training_and_heads_are_optimized() -> None:
    model, reference = _model(), _model()
    trainer = _trainer(InterlockingBackpropStrategy(k=4, stages=4, micro_batches=4), max_epochs=2)
    trainer.fit(model, _data())
    _trainer(max_epochs=2).fit(reference, _data())
    _assert_close(_trunk(model), _trunk(reference), atol=1e-5)
    heads = model.interlocking_heads
    assert isinstance(heads, nn.ModuleList) and len(heads) == 3
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in heads.parameters())
    assert all(trainer.optimizers[0].state[p] for p in heads.parameters())  # Adam stepped them


def test_gradient_accumulation_and_a_later_validate() -> None:
    model, reference = _model(), _model()
    _trainer(InterlockingBackpropStrategy(k=4, stages=4, micro_batches=2), accumulate_grad_batches=2).fit(
        model, _data(4)
    )
    _trainer(accumulate_grad_batches=2).fit(reference, _data(4))
    _assert_close(_trunk(model), _trunk(reference), atol=1e-5)
    strategy = InterlockingBackpropStrategy(k=4, stages=4, micro_batches=2)  # a fresh one reuses the heads
    metrics = _trainer(strategy, limit_val_batches=1.0).validate(model, _data(1, seed=5), verbose=False)[0]
    expected = _trainer(limit_val_batches=1.0).validate(reference, _data(1, seed=5), verbose=False)[0]
    assert metrics["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-5)
    assert "val_head2_acc" in metrics


def test_trainer_path_equals_the_plain_loop_of_the_benchmark() -> None:
    class Recording(InterlockingBackpropStrategy):
        def setup(self, trainer: pl.Trainer) -> None:
            super().setup(trainer)
            self.initial_heads = copy.deepcopy(self.lightning_module.interlocking_heads.state_dict())

    model, plain = _model(), _model()
    strategy = Recording(k=2, stages=4, micro_batches=2)
    _trainer(strategy).fit(model, _data())
    loader = _data()
    stage_blocks, heads = split_trunk(plain, 4, next(iter(loader)))
    nn.ModuleList(heads).load_state_dict(strategy.initial_heads)
    runtime = InterlockingRuntime(
        InterlockingPlan(4, 2), stage_blocks, heads, plain.pipeline_input, plain.pipeline_loss
    )
    params = [*plain.parameters(), *(p for h in heads for p in h.parameters())]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        runtime.train_step(split_micro_batches(batch, 2))
        optimizer.step()
    _assert_close(_trunk(model), _trunk(plain), atol=1e-6)
    for mine, theirs in zip(model.interlocking_heads, heads):
        _assert_close(mine.state_dict(), theirs.state_dict(), atol=1e-6)


def test_logs_the_true_loss_and_every_heads_loss_and_metrics() -> None:
    trainer = _trainer(InterlockingBackpropStrategy(k=2, stages=4, micro_batches=2), limit_val_batches=1)
    trainer.fit(_model(), _data(), _data(1, seed=5))
    names = set(trainer.callback_metrics)
    assert {"train_loss", "val_loss", "val_acc"} <= names
    assert {f"train_head{j}_loss" for j in range(3)} <= names
    assert {f"val_head{j}_{m}" for j in range(3) for m in ("loss", "acc")} <= names


def _fit_resume(tmp: str, devices: int) -> dict[str, Any]:
    """Two epochs straight vs one epoch, a checkpoint, and a resumed second epoch (k=2, 4 stages)."""

    def strategy() -> InterlockingBackpropStrategy:
        return InterlockingBackpropStrategy(k=2, stages=4, micro_batches=2)

    full = _model()
    trainer = _trainer(strategy(), devices, max_epochs=2, limit_val_batches=1)
    trainer.fit(full, _data(), _data(1, seed=5))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    first = _model()
    trainer = _trainer(strategy(), devices, max_epochs=1)
    trainer.fit(first, _data())
    path = os.path.join(tmp, f"first-{devices}.ckpt")
    trainer.save_checkpoint(path)
    resumed = _model()
    _trainer(strategy(), devices, max_epochs=2).fit(resumed, _data(), ckpt_path=path)
    trainer.strategy.barrier()
    as_numpy = {k: v.numpy() for k, v in _trunk(full).items()}
    return {
        "full": as_numpy,
        "heads": {k: v.numpy() for k, v in full.interlocking_heads.state_dict().items()},
        "resumed": {k: v.numpy() for k, v in _trunk(resumed).items()},
        "metrics": metrics,
        "path": path,
    }


def _distributed(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = _fit_resume(tmp, world_size)
    # a full checkpoint: every rank's copy of the trunk equals the owners' after saving
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def single_and_distributed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp = str(tmp_path_factory.mktemp("interlocking"))
    torch.set_num_threads(1)
    single = _fit_resume(tmp, 1)
    distributed = run_distributed(_distributed, 2, tmp, timeout=300)[0]
    return single, distributed


def test_distributed_equals_single_process(
    single_and_distributed: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    single, distributed = single_and_distributed
    _assert_close(distributed["full"], single["full"], atol=1e-5)
    _assert_close(distributed["heads"], single["heads"], atol=1e-5)
    for name in ("val_loss", "val_acc", "val_head0_acc", "val_head2_loss"):
        assert distributed["metrics"][name] == pytest.approx(single["metrics"][name], abs=1e-5), name


def test_resume_is_exact(single_and_distributed: tuple[dict[str, Any], dict[str, Any]]) -> None:
    single, distributed = single_and_distributed
    _assert_close(single["resumed"], single["full"], atol=1e-6)
    _assert_close(distributed["resumed"], distributed["full"], atol=1e-6)


def test_checkpoint_loads_into_the_plain_module(
    single_and_distributed: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    _, distributed = single_and_distributed
    checkpoint = torch.load(distributed["path"], weights_only=False)
    assert (
        len(checkpoint["optimizer_states"][0]["state"]) == len(list(_model().parameters())) + 6
    )  # 3 heads x 2
    assert set(checkpoint["interlocking"]["heads"]) == {
        f"{j}.2.{p}" for j in range(3) for p in ("weight", "bias")
    }
    plain = ResNetClassifier.load_from_checkpoint(distributed["path"])  # strict: no head keys in state_dict
    assert not hasattr(plain, "interlocking_heads")
    trained_one_epoch = copy.deepcopy(plain.state_dict())
    assert any(not torch.equal(v, _model().state_dict()[k]) for k, v in trained_one_epoch.items())


def test_uneven_last_batch_is_split_by_size() -> None:
    batch = (torch.arange(10).reshape(10, 1).float(), torch.arange(10))
    parts = split_micro_batches(batch, 4)
    assert [len(p[1]) for p in parts] == [2, 3, 3, 2] and torch.equal(
        torch.cat([p[1] for p in parts]), batch[1]
    )
    model, reference = _model(), _model()
    loader = DataLoader(
        TensorDataset(torch.randn(22, 1, 8, 8), torch.randint(0, 10, (22,))), batch_size=BATCH
    )
    trainer = _trainer(InterlockingBackpropStrategy(k=4, stages=4, micro_batches=4))
    trainer.fit(model, loader)  # last batch: 6
    _trainer().fit(reference, loader)
    _assert_close(_trunk(model), _trunk(reference), atol=1e-5)
    stages = trainer.strategy.trained_stages()  # type: ignore[attr-defined]
    assert sorted(stages) == [(0, s) for s in range(4)]  # one process trains every stage
    held = [id(p) for s in sorted(stages) for p in stages[s].parameters()]
    assert held == [id(p) for block in model.pipeline_blocks() for p in block.parameters()]


def test_batch_smaller_than_micro_batches_is_refused() -> None:
    loader = DataLoader(TensorDataset(torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))), batch_size=2)
    strategy = InterlockingBackpropStrategy(k=2, stages=2, micro_batches=4)
    with pytest.raises(ValueError, match=r"A batch of 2 examples cannot feed micro_batches=4"):
        _trainer(strategy).fit(_model(), loader)


def test_balance_is_a_deprecated_name_of_partition() -> None:
    with pytest.warns(FutureWarning, match=r"balance=\.\.\.\) is deprecated: use partition="):
        old = InterlockingBackpropStrategy(stages=4, balance=[1, 1, 1, 3])
    assert old.partition == [1, 1, 1, 3] == InterlockingBackpropStrategy(stages=4, partition=[1, 1, 1, 3]).partition
    with pytest.raises(ValueError, match=r"partition=\[1, 2\] lists 2 stages but stages=4"):
        InterlockingBackpropStrategy(stages=4, partition=[1, 2])
    with pytest.raises(ValueError, match=r"partition='profile' is not one of \('uniform', 'parameters'\)"):
        InterlockingBackpropStrategy(stages=2, partition="profile")
    with pytest.raises(ValueError, match=r"balance=\[1, 1\] and partition=uniform both given"):
        InterlockingBackpropStrategy(stages=2, partition="uniform", balance=[1, 1])


def test_registered_name() -> None:
    assert "interlocking" in StrategyRegistry
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="interlocking", logger=False)
    assert isinstance(trainer.strategy, InterlockingBackpropStrategy)
    assert trainer.strategy.num_stages == 2 and trainer.strategy.k == 2


@pytest.mark.parametrize(
    ("kwargs", "devices", "match"),
    [
        ({"k": 0}, 1, r"k=0 must be an integer >= 1"),
        ({"k": 5, "stages": 4}, 1, r"k=5 must be an integer with 1 <= k <= stages=4"),
        ({"k": 3}, 2, r"k=3 must be an integer with 1 <= k <= stages=2"),
        ({"stages": 3}, 2, r"stages=3 must be a multiple of the world size \(2 processes\)"),
        ({"micro_batches": 0}, 1, r"micro_batches=0 must be a positive integer"),
        ({"stages": 4, "balance": [1, 2]}, 1, r"balance=\[1, 2\] lists 2 stages but stages=4"),
        ({"timeout_s": 0}, 1, r"timeout_s=0 must be positive"),
        ({"synchronous": "yes"}, 1, r"synchronous='yes' must be True or False"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], devices: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pl.Trainer(
            accelerator="cpu", devices=devices, strategy=InterlockingBackpropStrategy(**kwargs), logger=False
        )


def test_one_stage_per_process_needs_stages_in_single_process_mode() -> None:
    with pytest.raises(ValueError, match=r"k=2 must be an integer with 1 <= k <= stages=1"):
        pl.Trainer(accelerator="cpu", devices=1, strategy=InterlockingBackpropStrategy(k=2), logger=False)


class _StepTimes(pl.Callback):
    """Records when each training batch starts, when each optimizer step ends and the logged true loss after
    each batch; rank 1 steps late."""

    def __init__(self, delay: float) -> None:
        self.delay, self.starts, self.steps, self.losses = delay, [], [], []  # type: ignore[var-annotated]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.steps.append(time.monotonic()))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.starts.append(time.monotonic())

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == 1:
            time.sleep(self.delay)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.losses.append(float(trainer.callback_metrics.get("train_loss", float("nan"))))


def _synchronous_and_not(rank: int, world_size: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for synchronous in (False, True):
        model, times = _model(), _StepTimes(delay=0.3)
        strategy = InterlockingBackpropStrategy(k=2, stages=4, micro_batches=2, synchronous=synchronous)
        trainer = _trainer(strategy, world_size, callbacks=[times], limit_val_batches=1)
        trainer.fit(model, _data(3), _data(1, seed=5))
        out[f"trunk_{synchronous}"] = {k: v.numpy() for k, v in _trunk(model).items()}
        out[f"heads_{synchronous}"] = {k: v.numpy() for k, v in model.interlocking_heads.state_dict().items()}
        out[f"metrics_{synchronous}"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        out[f"times_{synchronous}"] = (times.starts, times.steps)
        out[f"losses_{synchronous}"] = times.losses
    return out


def test_synchronous_flush_waits_for_every_stage_and_changes_no_result() -> None:
    ranks = run_distributed(_synchronous_and_not, 2, timeout=120)
    zero, one = ranks
    _assert_close(zero["trunk_True"], zero["trunk_False"], atol=0)
    _assert_close(zero["heads_True"], zero["heads_False"], atol=0)
    for name in ("val_loss", "val_acc", "val_head0_loss", "val_head1_acc"):
        assert zero["metrics_True"][name] == pytest.approx(zero["metrics_False"][name], abs=1e-6), name
    # the same true losses; without the flush each is logged one step late
    assert zero["losses_True"][:2] == pytest.approx(zero["losses_False"][1:], abs=1e-6)
    for synchronous in (False, True):
        starts = zero[f"times_{synchronous}"][0]
        last_steps = one[f"times_{synchronous}"][1]  # rank 1 sleeps 0.3 s before each optimizer step
        assert len(starts) == len(last_steps) == 3
        waited = [starts[n + 1] >= last_steps[n] for n in range(2)]
        # with the flush rank 0 starts a step only after rank 1 stepped; without, it runs ahead
        assert waited == [synchronous, synchronous], synchronous


def test_gradient_scaler_is_refused() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = _trainer(InterlockingBackpropStrategy(k=2, stages=2), plugins=[scaled])
    with pytest.raises(ValueError, match=r"InterlockingBackpropStrategy does not support a gradient scaler"):
        trainer.fit(_model(), _data())
