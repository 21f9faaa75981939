"""DPKFAC under ChimeraStrategy on 2 gloo processes equals single-device DPKFAC on the whole batch.

Chimera (2 stages, both pipeline replicas, 2 and 4 micro-batches) and 1F1B train a small MLP for a
few steps with K-FAC refreshed every step and KL-clip active; the final weights, and the weights of
every stage copy a rank holds (Chimera's second copy included), must match single-process training
with the same callback settings, data and seed. ``assignment="dp"`` over data-parallel pipeline
replicas is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.callbacks import DPKFAC
from lightning_parallel.kfac import KFACOptions, PipelineKFACPreconditioner
from lightning_parallel.models.mlp import MLPClassifier
from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.strategies.chimera import ChimeraStrategy
from tests.helpers.distributed import run_distributed

BATCH = 32
STEPS = 3
OPTIONS: dict[str, Any] = {"damping": 0.01, "kl_clip": 0.001, "inv_update_steps": 1, "factor_decay": 0.9}
RUNS = {"chimera": ("chimera", 2), "chimera-n4": ("chimera", 4), "1f1b": ("1f1b", 2)}


def _model() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(16, (32, 32, 32), 4, optimizer="sgd", lr=0.1)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(STEPS * BATCH, 16, generator=g), torch.randint(0, 4, (STEPS * BATCH,), generator=g))
    return DataLoader(data, batch_size=BATCH)


def _trainer(devices: int, strategy: Any, callback: DPKFAC, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_steps", STEPS)
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        **kwargs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )


def _resume(world_size: int, root: str) -> dict[str, Any]:
    """Two epochs in one go vs one epoch, a checkpoint (every rank takes part) and a resumed second."""
    full = _model()
    _trainer(world_size, ChimeraStrategy(2, 2), DPKFAC(**OPTIONS), max_steps=-1, max_epochs=2).fit(full, _data())
    first = _model()
    trainer = _trainer(world_size, ChimeraStrategy(2, 2), DPKFAC(**OPTIONS), max_steps=-1, max_epochs=1)
    trainer.fit(first, _data())
    path = f"{root}/kfac.ckpt"
    trainer.save_checkpoint(path)
    trainer.strategy.barrier()
    saved = torch.load(path, weights_only=False)["callbacks"]
    layers = sorted(next(v for k, v in saved.items() if "DPKFAC" in k)["layers"])
    resumed = _model()
    _trainer(world_size, ChimeraStrategy(2, 2), DPKFAC(**OPTIONS), max_steps=-1, max_epochs=2).fit(
        resumed, _data(), ckpt_path=path
    )
    gap = max(float((a - b).abs().max()) for a, b in zip(full.parameters(), resumed.parameters(), strict=True))
    return {"gap": gap, "layers": layers}


def _worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    for name, (schedule, micro_batches) in RUNS.items():
        model = _model()
        strategy = ChimeraStrategy(2, micro_batches, schedule=schedule)  # type: ignore[arg-type]
        callback = DPKFAC(**OPTIONS)
        _trainer(world_size, strategy, callback).fit(model, _data())
        assert callback.preconditioner is not None
        out[name] = {
            "params": [p.detach().tolist() for p in model.parameters()],
            "copies": {
                key: [p.detach().tolist() for p in module.parameters()]
                for key, module in strategy.held_stage_modules.items()
            },
            "sizes": strategy.partition_sizes,
            "layers": sorted(layer.name for layer in callback.preconditioner.layers),
            "bytes": callback.preconditioner.metrics()["bytes_communicated"],
        }
    with pytest.raises(ValueError, match=r"`assignment='dp'` with 2 data-parallel pipeline replicas"):
        PipelineKFACPreconditioner(
            {(0, 0): torch.nn.Linear(2, 2)}, KFACOptions(assignment="dp"), data_parallel_group=dist.group.WORLD
        )
    out["refused"] = True
    out["resume"] = _resume(world_size, root)
    return out


def test_chimera_matches_single_device(tmp_path: Path) -> None:
    results = run_distributed(_worker, 2, str(tmp_path), timeout=120.0)
    reference = _model()
    _trainer(1, "auto", DPKFAC(**OPTIONS)).fit(reference, _data())
    want = [p.detach() for p in reference.parameters()]
    blocks = reference.pipeline_blocks()
    assert all(res["refused"] for res in results)  # assignment="dp" across pipeline replicas
    for res in results:  # the checkpoint holds every stage copy's curvature; resume is exact
        assert len(res["resume"]["layers"]) == 2 * 4, res["resume"]["layers"]
        assert res["resume"]["gap"] < 1e-6, res["resume"]
    for name in RUNS:
        worst = 0.0
        for res in results:
            run = res[name]
            for got, ref in zip(run["params"], want, strict=True):
                worst = max(worst, float((torch.tensor(got) - ref).abs().max()))
            slices = stage_slices(run["sizes"])
            for (_replica, stage), params in run["copies"].items():
                stage_params = list(torch.nn.Sequential(*blocks[slices[stage]]).parameters())
                for got, ref in zip(params, stage_params, strict=True):
                    worst = max(worst, float((torch.tensor(got) - ref.detach()).abs().max()))
        assert worst < 1e-5, f"{name}: max |pipeline - single device| = {worst:.2e}"
        for rank, res in enumerate(results):
            run = res[name]
            if name.startswith("chimera"):
                assert run["bytes"] > 0, f"{name}: the two copies exchanged no factors on rank {rank}"
                assert {n.split(".")[0] for n in run["layers"]} == {"replica0", "replica1"}
            else:
                assert run["bytes"] == 0, f"{name}: one holder per stage needs no exchange"
    # K-FAC changed the trajectory: plain SGD ends elsewhere.
    plain = _model()
    pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(plain, _data())
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(plain.parameters(), want, strict=True)) > 1e-3

