"""ChimeraStrategy through the Trainer: exactness against single-device training, checkpoints, bad input.

The multi-process part runs once per module (one spawn of 4 CPU processes, which later split into two
independent 2-process worlds) and returns every run's numbers; the tests compare them with single-device
references computed in this process.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_parallel.strategies
from lightning_parallel.models.mlp import MLPClassifier
from lightning_parallel.strategies.chimera import ChimeraStrategy
from lightning_parallel.strategies.pipeline_base import PipelineStrategy
from tests.helpers.callbacks import LossRecorder
from tests.helpers.distributed import free_port, run_distributed

GLOBAL_BATCH = 32
STEPS = 10
SEED = 0


# ----------------------------------------------------------------------------- shared pieces
def make_model(**kwargs: Any) -> MLPClassifier:
    torch.manual_seed(SEED)
    options: dict[str, Any] = {"optimizer": "sgd", "lr": 0.1, **kwargs}
    return MLPClassifier(16, (32, 32, 32), 4, **options)


def dataset(size: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(size, 16, generator=g), torch.randint(0, 4, (size,), generator=g))


def probe() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(7))


def trainer_for(strategy: Any, devices: int, **kwargs: Any) -> tuple[pl.Trainer, LossRecorder]:
    recorder = LossRecorder()
    options: dict[str, Any] = {
        "max_steps": STEPS,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    options["callbacks"] = [recorder, *options.get("callbacks", [])]
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **options), recorder


def pipeline_fit(strategy: ChimeraStrategy, world: int, batch: int, model_kwargs: Any = None, **kwargs: Any) -> Any:
    """Fit under ``strategy`` with each pipeline reading ``batch`` examples per step."""
    model = make_model(**(model_kwargs or {}))
    trainer, recorder = trainer_for(strategy, world, **kwargs)
    train = DataLoader(dataset(STEPS * GLOBAL_BATCH), batch_size=batch)
    val = DataLoader(dataset(46, seed=2), batch_size=16)
    trainer.fit(model, train, val if kwargs.get("limit_val_batches") else None)
    return model, trainer, recorder.losses


def reference_fit(model_kwargs: Any = None, **kwargs: Any) -> Any:
    """Single-device training on the batches a shuffling DistributedSampler(seed=0) gives one replica."""
    model = make_model(**(model_kwargs or {}))
    trainer, recorder = trainer_for("auto", 1, **kwargs)
    data = dataset(STEPS * GLOBAL_BATCH)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    val = DataLoader(dataset(46, seed=2), batch_size=16)
    trainer.fit(model, DataLoader(data, batch_size=GLOBAL_BATCH, sampler=order), val if kwargs.get("limit_val_batches") else None)
    return model, trainer, recorder.losses


# ----------------------------------------------------------------------------- the distributed run
EXACT = {
    # name: (world, stages, schedule, micro_batches)
    "chimera-D4": (4, 4, "chimera", 4),
    "1f1b-D4": (4, 4, "1f1b", 4),
    "gpipe-D4": (4, 4, "gpipe", 8),
    "chimera-zb-D4": (4, 4, "chimera-zb", 4),
    "chimera-2xD2": (4, 2, "chimera", 2),
    "1f1b-2xD2": (4, 2, "1f1b", 2),
    "gpipe-2xD2": (4, 2, "gpipe", 4),
    "chimera-D2": (2, 2, "chimera", 4),
    "1f1b-D2": (2, 2, "1f1b", 2),
    "gpipe-D2": (2, 2, "gpipe", 2),
}
FEATURES = {"gradient_clip_val": 0.05, "accumulate_grad_batches": 2, "max_steps": 5, "limit_val_batches": 1.0}
CKPT_DATA = 128


def _exact(name: str, world: int) -> list[float]:
    _, stages, schedule, n = EXACT[name]
    strategy = ChimeraStrategy(stages, n, schedule=schedule)  # type: ignore[arg-type]
    return pipeline_fit(strategy, world, GLOBAL_BATCH * stages // world)[2]


def _checkpoint_runs(rank: int, tmp: str) -> dict[str, Any]:
    """Uninterrupted 2 epochs vs 1 epoch + resume, Adam, Chimera D=4."""

    def run(epochs: int, ckpt_path: str | None, save: bool) -> tuple[Any, list[float]]:
        model = make_model(optimizer="adam", lr=0.01)
        callbacks = [ModelCheckpoint(dirpath=tmp, save_last=True, save_top_k=0)] if save else []
        trainer, recorder = trainer_for(
            ChimeraStrategy(4, 4), 4, max_steps=-1, max_epochs=epochs, enable_checkpointing=save, callbacks=callbacks
        )
        trainer.fit(model, DataLoader(dataset(CKPT_DATA), batch_size=32), ckpt_path=ckpt_path)
        return model, recorder.losses

    full_model, full = run(2, None, False)
    first_model, first = run(1, None, True)
    path = os.path.join(tmp, "last.ckpt")
    _, resumed = run(2, path, False)
    with torch.no_grad():
        full_out = full_model(probe()).tolist()
        first_out = first_model(probe()).tolist()
    return {"full": full, "first": first, "resumed": resumed, "path": path, "full_out": full_out, "first_out": first_out}


def _two_process_world(rank: int, ports: list[int], tmp: str) -> dict[str, Any]:
    """Ranks 0-1 and 2-3 become two independent worlds of 2 processes."""
    dist.destroy_process_group()
    sub_rank = rank % 2
    port = ports[rank // 2]
    os.environ.update(RANK=str(sub_rank), LOCAL_RANK=str(sub_rank), WORLD_SIZE="2", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=sub_rank, world_size=2, timeout=timedelta(seconds=120)
    )
    out: dict[str, Any] = {}
    if rank // 2 == 0:
        out["chimera-D2"] = _exact("chimera-D2", 2)
        out["1f1b-D2"] = _exact("1f1b-D2", 2)
        try:
            strategy = ChimeraStrategy(2, 2)
            trainer, _ = trainer_for(strategy, 2, max_steps=-1, max_epochs=2)
            trainer.fit(make_model(optimizer="adam", lr=0.01), DataLoader(dataset(CKPT_DATA), batch_size=32),
                        ckpt_path=os.path.join(tmp, "last.ckpt"))
            out["mismatch"] = "no error"
        except ValueError as err:
            out["mismatch"] = str(err)
    else:
        out["gpipe-D2"] = _exact("gpipe-D2", 2)
        strategy = ChimeraStrategy(2, 2, partition="profile")
        out["profile"] = pipeline_fit(strategy, 2, GLOBAL_BATCH)[2]
        out["profile_sizes"] = strategy.partition_sizes
        out["bf16"] = pipeline_fit(ChimeraStrategy(2, 2), 2, GLOBAL_BATCH, precision="bf16-mixed")[2]
        # A precision plugin's `connect` runs after the optimizers exist, so it can swap them for 8-bit ones.
        from lightning_parallel.plugins import QuantizationPrecision

        _, trainer, losses = pipeline_fit(
            ChimeraStrategy(2, 2), 2, GLOBAL_BATCH, {"optimizer": "adam", "lr": 0.01},
            plugins=[QuantizationPrecision(mode=None, optimizer="adam8bit")],
        )
        out["adam8bit"] = {"optimizer": type(trainer.optimizers[0]).__name__, "losses": losses}
    return out


def _world(rank: int, world_size: int, ports: list[int], tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    for name, (world, *_rest) in EXACT.items():
        if world == 4:
            out[name] = _exact(name, 4)
    strategy = ChimeraStrategy(4, 4)
    model, trainer, losses = pipeline_fit(strategy, 4, GLOBAL_BATCH, {"scheduler": "cosine"}, **FEATURES)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tested = trainer.test(model, DataLoader(dataset(46, seed=2), batch_size=16), verbose=False)[0]
    with torch.no_grad():
        out["features"] = {
            "losses": losses,
            "metrics": metrics,
            "test": tested,
            "held": sorted(strategy.held_stage_modules),
            "out": model(probe()).tolist(),  # plain lists: tensors cannot outlive the worker in a queue
        }
    out["ckpt"] = _checkpoint_runs(rank, tmp)
    out.update(_two_process_world(rank, ports, tmp))
    return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = str(tmp_path_factory.mktemp("chimera"))
    return run_distributed(_world, 4, [free_port(), free_port()], tmp, timeout=400.0)


def _by_name(results: list[dict[str, Any]], name: str) -> list[list[float]]:
    return [r[name] for r in results if name in r]


def assert_close(actual: list[float], expected: list[float], rel: float = 1e-4) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=rel), (actual, expected)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    return reference_fit()[2]


@pytest.mark.parametrize("name", list(EXACT))
def test_losses_match_single_device(distributed: list[dict[str, Any]], reference_losses: list[float], name: str) -> None:
    expected = reference_losses
    per_rank = _by_name(distributed, name)
    assert len(per_rank) == EXACT[name][0]
    for losses in per_rank:  # every rank returns the same (broadcast) loss
        assert_close(losses, expected)


def test_clipping_accumulation_scheduler_validation_and_test(distributed: list[dict[str, Any]]) -> None:
    model, trainer, expected = reference_fit({"scheduler": "cosine"}, **FEATURES)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tested = trainer.test(model, DataLoader(dataset(46, seed=2), batch_size=16), verbose=False)[0]
    with torch.no_grad():
        expected_out = model(probe())
    for rank, result in enumerate(distributed):
        got = result["features"]
        # Chimera, D=4: rank r holds stage r of the down pipeline and stage D-1-r of the up pipeline.
        assert got["held"] == [(0, rank), (1, 3 - rank)]
        assert_close(got["losses"], expected)
        for key in ("train_loss", "val_loss", "val_acc"):
            assert math.isclose(got["metrics"][key], metrics[key], rel_tol=1e-4, abs_tol=1e-6), key
        for key in ("test_loss", "test_acc"):
            assert math.isclose(got["test"][key], tested[key], rel_tol=1e-4, abs_tol=1e-6), key
        # After fit every rank's module holds all trained stages.
        torch.testing.assert_close(torch.tensor(got["out"]), expected_out, rtol=1e-4, atol=1e-5)


def test_checkpoint_is_full_and_resume_is_exact(distributed: list[dict[str, Any]]) -> None:
    ckpt = distributed[0]["ckpt"]
    steps_per_epoch = CKPT_DATA // 32
    assert len(ckpt["full"]) == 2 * steps_per_epoch
    assert ckpt["first"] == ckpt["full"][:steps_per_epoch]
    assert_close(ckpt["resumed"], ckpt["full"][steps_per_epoch:], rel=1e-6)
    # A plain module loads the pipeline's checkpoint on one device ...
    loaded = MLPClassifier.load_from_checkpoint(ckpt["path"], map_location="cpu")
    checkpoint = torch.load(ckpt["path"], map_location="cpu", weights_only=False)
    assert checkpoint["pipeline"]["stages"] == 4
    assert set(checkpoint["state_dict"]) == set(make_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe()), torch.tensor(ckpt["first_out"]), rtol=1e-5, atol=1e-6)
    # ... and the full optimizer state resumes single-device training on the same trajectory.
    model = make_model(optimizer="adam", lr=0.01)
    trainer, recorder = trainer_for("auto", 1, max_steps=-1, max_epochs=2)
    data = dataset(CKPT_DATA)
    orders = [torch.randperm(len(data), generator=torch.Generator().manual_seed(e)).tolist() for e in (0, 1)]

    class EpochOrder(torch.utils.data.Sampler[int]):
        def __init__(self) -> None:
            self.epoch = 1

        def __iter__(self) -> Any:
            return iter(orders[self.epoch])

        def __len__(self) -> int:
            return len(data)

    trainer.fit(model, DataLoader(data, batch_size=32, sampler=EpochOrder()), ckpt_path=ckpt["path"])
    assert_close(recorder.losses, ckpt["full"][steps_per_epoch:], rel=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(probe()), torch.tensor(ckpt["full_out"]), rtol=1e-4, atol=1e-5)


def test_checkpoint_from_different_stages_is_refused(distributed: list[dict[str, Any]]) -> None:
    message = distributed[0]["mismatch"]
    assert "written with stages=4 but this run has stages=2" in message
    assert "Resume with stages=4" in message


def test_profile_partition_and_bf16(distributed: list[dict[str, Any]], reference_losses: list[float]) -> None:
    result = distributed[2]
    sizes = result["profile_sizes"]
    assert len(sizes) == 2 and sum(sizes) == 4 and min(sizes) >= 1
    assert result["profile_sizes"] == distributed[3]["profile_sizes"]
    assert_close(result["profile"], reference_losses)
    bf16 = result["bf16"]
    assert all(math.isfinite(v) for v in bf16)
    assert_close(bf16, reference_losses, rel=5e-2)


def test_precision_plugin_swaps_the_optimizer(distributed: list[dict[str, Any]]) -> None:
    for result in distributed[2:]:
        run = result["adam8bit"]
        assert "8bit" in run["optimizer"], run["optimizer"]
        assert all(math.isfinite(v) for v in run["losses"]) and run["losses"][-1] < run["losses"][0]


# ----------------------------------------------------------------------------- single process
class NoProtocol(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WithBatchNorm(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(16, (8,), 4)
        self.blocks[0].append(nn.BatchNorm1d(8))


def _single(module: pl.LightningModule, batch: int = 6, **strategy: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    trainer, _ = trainer_for(ChimeraStrategy(**{"stages": 1, "schedule": "1f1b", **strategy}), 1, max_steps=1)
    trainer.fit(module, DataLoader(dataset(12), batch_size=batch))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"stages=0 must be a positive number"):
        ChimeraStrategy(0)
    with pytest.raises(ValueError, match=r"micro_batches=0 must be positive"):
        ChimeraStrategy(2, 0)
    with pytest.raises(ValueError, match=r"schedule='pipedream' is not one of"):
        ChimeraStrategy(2, schedule="pipedream")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"partition='random' is not one of"):
        ChimeraStrategy(2, partition="random")
    with pytest.raises(ValueError, match=r"partition=\[1, 1, 1\] lists 3 stages but stages=2"):
        ChimeraStrategy(2, partition=[1, 1, 1])
    with pytest.raises(ValueError, match=r"forward_doubling=True needs schedule='chimera'"):
        ChimeraStrategy(2, schedule="1f1b", forward_doubling=True)
    with pytest.raises(ValueError, match=r"timeout_s=0 must be positive"):
        ChimeraStrategy(2, timeout_s=0)
    with pytest.raises(ValueError, match=r"ChimeraStrategy\(stages=3, .*needs an even number of stages"):
        ChimeraStrategy(3)
    with pytest.raises(ValueError, match=r"stages=2 does not divide the world size 3"):
        pl.Trainer(accelerator="cpu", devices=3, strategy=ChimeraStrategy(2), logger=False)


def test_registered_names() -> None:
    importlib.reload(lightning_parallel.strategies)  # importing twice is harmless
    for name, schedule in (("chimera", "chimera"), ("pipeline_1f1b", "1f1b"), ("pipeline_gpipe", "gpipe")):
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert isinstance(trainer.strategy, ChimeraStrategy)
        assert trainer.strategy.schedule == schedule
        assert trainer.strategy.num_stages == 2


def test_module_without_protocol_names_the_hooks() -> None:
    with pytest.raises(TypeError, match=r"NoProtocol lacks pipeline_blocks, pipeline_input, pipeline_loss"):
        _single(NoProtocol())


def test_batch_smaller_than_micro_batches() -> None:
    with pytest.raises(ValueError, match=r"A batch of 3 examples cannot feed micro_batches=4"):
        _single(make_model(), batch=3, micro_batches=4)


class WithIds(MLPClassifier):
    """Batches are (x, y, ids) with x[:, 0] = the example's number: records what each micro-batch carried."""

    def __init__(self) -> None:
        torch.manual_seed(SEED)
        super().__init__(16, (8,), 4)
        self.seen: list[tuple[list[str], list[str]]] = []

    def pipeline_loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        x, _, ids = batch
        self.seen.append((list(ids), [f"id{int(v)}" for v in x[:, 0]]))
        return super().pipeline_loss(output, batch)


def test_per_example_ids_are_split_with_their_micro_batch() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    x, y = dataset(12).tensors
    x[:, 0] = torch.arange(12).float()
    rows = [(x[i], y[i], f"id{i}") for i in range(12)]
    model = WithIds()
    trainer, _ = trainer_for(ChimeraStrategy(1, 3, schedule="gpipe"), 1, max_steps=1)
    trainer.fit(model, DataLoader(rows, batch_size=6))  # type: ignore[arg-type]
    assert len(model.seen) == 3
    assert all(ids == expected and len(ids) == 2 for ids, expected in model.seen), model.seen
    strategy = trainer.strategy
    assert isinstance(strategy, PipelineStrategy) and strategy.stages_built
    (only,) = strategy.trained_stages().values()
    assert [id(p) for p in only.parameters()] == [id(p) for p in model.blocks.parameters()]


def test_batchnorm_inside_stages_warns() -> None:
    with pytest.warns(UserWarning, match=r"BatchNorm inside pipeline stages normalises each micro-batch"):
        _single(WithBatchNorm(), batch=6, micro_batches=2)


def test_uneven_micro_batches_match_plain_training() -> None:
    # 32 examples in 3 micro-batches (11, 10, 11) and a last batch of 20 (7, 6, 7): weighted to the batch mean.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    model = make_model()
    trainer, recorder = trainer_for(ChimeraStrategy(1, 3, schedule="gpipe"), 1, max_steps=3)
    data = dataset(84)
    trainer.fit(model, DataLoader(data, batch_size=GLOBAL_BATCH))
    reference = make_model()
    trainer, expected = trainer_for("auto", 1, max_steps=3)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    trainer.fit(reference, DataLoader(data, batch_size=GLOBAL_BATCH, sampler=order))
    assert_close(recorder.losses, expected.losses)
