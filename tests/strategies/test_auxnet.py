"""AuxNetStrategy under the Trainer: the plain engine loop, end-to-end validation, checkpoints, resume, errors."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from lightning_parallel.auxnet import AuxNetOptions, AuxNetRuntime, split_trunk_with_aux_nets
from lightning_parallel.models import ResNetClassifier
from lightning_parallel.pipeline.micro_batches import split_micro_batches as split_batch
from lightning_parallel.strategies import AuxNetStrategy
from tests.helpers.distributed import run_distributed
from tests.strategies.test_interlocking import _assert_close, _data, _model, _trainer

OPTIONS: dict[str, Any] = {
    "loss": "augmented_lagrangian",
    "rho": 2.0,
    "aux_update_interval": 2,
    "aux_steps": 2,
}


def _trunk(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("auxnet_aux_nets.")}


def _strategy(**kwargs: Any) -> AuxNetStrategy:
    return AuxNetStrategy(**{"stages": 4, "micro_batches": 2, **OPTIONS, **kwargs})


def test_trainer_path_equals_the_plain_engine_loop_and_validation_is_end_to_end() -> None:
    class Recording(AuxNetStrategy):
        def setup(self, trainer: pl.Trainer) -> None:
            super().setup(trainer)
            self.initial = copy.deepcopy(self.lightning_module.auxnet_aux_nets.state_dict())

    model, plain = _model(), _model()
    strategy = Recording(stages=4, micro_batches=2, **OPTIONS)
    trainer = _trainer(strategy, max_epochs=2, limit_val_batches=1)
    trainer.fit(model, _data(), _data(1, seed=5))
    loader = _data()
    stage_blocks, aux_nets = split_trunk_with_aux_nets(plain, 4, next(iter(loader)))
    nn.ModuleList(aux_nets).load_state_dict(strategy.initial)
    runtime = AuxNetRuntime(
        stage_blocks, aux_nets, plain.pipeline_input, plain.pipeline_loss, AuxNetOptions(**OPTIONS)
    )
    optimizer = torch.optim.Adam(
        [*plain.parameters(), *(p for a in aux_nets for p in a.parameters())], lr=1e-2
    )
    for _ in range(2):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            runtime.train_step(split_batch(batch, 2))
            optimizer.step()
    _assert_close(_trunk(model), _trunk(plain), atol=1e-6)
    _assert_close(model.auxnet_aux_nets.state_dict(), nn.ModuleList(aux_nets).state_dict(), atol=1e-6)
    # the logged validation is the model's own end-to-end output, not the auxiliary networks'
    x, y = next(iter(_data(1, seed=5)))
    plain.eval()
    with torch.no_grad():
        expected = float((plain(x).argmax(-1) == y).float().mean())
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(expected, abs=1e-6)
    assert {"train_loss", "train_penalty1", "train_residual3"} <= set(trainer.callback_metrics)


def _fit_resume(tmp: str, devices: int) -> dict[str, Any]:
    """Two epochs straight vs one epoch, a checkpoint, and a resumed second epoch."""
    full = _model()
    trainer = _trainer(_strategy(), devices, max_epochs=2, limit_val_batches=1)
    trainer.fit(full, _data(3), _data(1, seed=5))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    first = _model()
    trainer = _trainer(_strategy(), devices, max_epochs=1)
    trainer.fit(first, _data(3))
    path = os.path.join(tmp, f"first-{devices}.ckpt")
    trainer.save_checkpoint(path)
    resumed = _model()
    trainer = _trainer(_strategy(), devices, max_epochs=2)
    trainer.fit(resumed, _data(3), ckpt_path=path)
    trainer.strategy.barrier()
    numpy = lambda state: {k: v.numpy() for k, v in state.items()}  # noqa: E731
    return {
        "full": numpy(_trunk(full)),
        "aux": numpy(full.auxnet_aux_nets.state_dict()),
        "resumed": numpy(_trunk(resumed)),
        "resumed_aux": numpy(resumed.auxnet_aux_nets.state_dict()),
        "multipliers": numpy(trainer.strategy.runtime.state_dict()["multipliers"]),
        "metrics": metrics,
        "path": path,
    }


def _distributed(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = _fit_resume(tmp, world_size)
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # One intra-op thread, as in the workers of run_distributed: Lightning's launcher of a one-process run
    # calls torch.set_num_threads(cpu_count) unless OMP_NUM_THREADS is set, and a convolution's backward sums
    # in another order with another thread count (2 threads vs 1: weights 1e-5 apart after 6 steps, gradients
    # 2.5e-6 relative at step 1). With the same thread count the runs are bit-identical.
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            return _fit_resume(str(tmp_path_factory.mktemp("auxnet")), 1)
        finally:
            torch.set_num_threads(threads)


def test_resume_is_exact(single: dict[str, Any]) -> None:
    _assert_close(single["resumed"], single["full"], atol=0)
    _assert_close(single["resumed_aux"], single["aux"], atol=0)


def test_checkpoint_holds_aux_nets_and_multipliers_and_loads_into_the_plain_module(
    single: dict[str, Any],
) -> None:
    checkpoint = torch.load(single["path"], weights_only=False)
    saved = checkpoint["auxnet"]
    assert saved["stages"] == 4 and set(saved["runtime"]["multipliers"]) == {1, 2, 3}
    assert saved["runtime"]["step"] == 3 and set(saved["runtime"]["refit_optimizers"]) == {1, 2, 3}
    assert any(key.startswith("2.") for key in saved["aux_nets"])
    plain = ResNetClassifier.load_from_checkpoint(single["path"])  # strict: no auxiliary keys in state_dict
    assert not hasattr(plain, "auxnet_aux_nets")
    assert any(not torch.equal(v, _model().state_dict()[k]) for k, v in plain.state_dict().items())


@pytest.mark.slow
def test_two_processes_equal_single_process(single: dict[str, Any], tmp_path: Any) -> None:
    distributed = run_distributed(_distributed, 2, str(tmp_path), timeout=300)[0]
    # exact: both runs use one thread (see `single`), the same micro-batch order and the same reductions
    for key in ("full", "aux", "resumed", "resumed_aux"):
        _assert_close(distributed[key], single[key], atol=0)
    held = distributed["multipliers"]  # rank 0 keeps the multipliers of its stages' inputs
    _assert_close(held, {b: single["multipliers"][b] for b in held}, atol=0)
    for name in ("val_loss", "val_acc"):
        assert distributed["metrics"][name] == pytest.approx(single["metrics"][name], abs=1e-6), name


def test_resume_with_other_stages_is_refused(single: dict[str, Any]) -> None:
    trainer = _trainer(AuxNetStrategy(stages=2, micro_batches=2), max_epochs=2)
    with pytest.raises(
        ValueError, match=r"written with stages=4 but this run has stages=2\. Resume with stages=4"
    ):
        trainer.fit(_model(), _data(3), ckpt_path=single["path"])


def test_registered_name() -> None:
    assert "auxnet" in StrategyRegistry
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="auxnet", logger=False)
    assert isinstance(trainer.strategy, AuxNetStrategy) and trainer.strategy.num_stages == 2


@pytest.mark.parametrize(
    ("kwargs", "devices", "match"),
    [
        ({"loss": "admm"}, 1, r"loss='admm' is not one of \('penalty', 'augmented_lagrangian'\)"),
        ({"rho": -1.0}, 1, r"rho=-1.0 must be a positive finite penalty weight"),
        ({"rho_growth": 0.5}, 1, r"rho_growth=0.5 must be a finite factor >= 1"),
        ({"rho": 2.0, "rho_max": 1.0}, 1, r"rho_max=1.0 must be >= rho=2.0"),
        ({"aux_update_interval": 1.5}, 1, r"aux_update_interval=1.5 must be an integer >= 0"),
        ({"aux_steps": 0}, 1, r"aux_steps=0 must be an integer >= 1"),
        ({"aux_lr": -0.1}, 1, r"aux_lr=-0.1 must be a positive learning rate"),
        ({"oracle": 1}, 1, r"oracle=1 must be True or False"),
        ({"stages": 3}, 2, r"stages=3 must be a multiple of the world size \(2 processes\)"),
        ({"stages": 4, "micro_batches": 0}, 1, r"micro_batches=0 must be a positive integer"),
        ({"stages": 4, "partition": [1, 2]}, 1, r"partition=\[1, 2\] lists 2 stages but stages=4"),
        ({"stages": 4, "partition": "profile"}, 1, r"partition='profile' is not one of \('uniform', 'parameters'\)"),
        ({"timeout_s": 0}, 1, r"timeout_s=0 must be positive"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], devices: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pl.Trainer(accelerator="cpu", devices=devices, strategy=AuxNetStrategy(**kwargs), logger=False)


def test_a_module_without_the_pipeline_protocol_is_refused() -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(64, 10)

        def training_step(self, batch: Any) -> torch.Tensor:
            return self.layer(batch[0].flatten(1)).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(
        TypeError, match=r"AuxNetStrategy needs a module that implements the pipeline protocol"
    ):
        _trainer(AuxNetStrategy(stages=2)).fit(Plain(), _data())


def test_defaults_are_the_engines() -> None:
    assert AuxNetStrategy(stages=2).options == AuxNetOptions()
