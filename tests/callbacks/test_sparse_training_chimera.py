"""SparseTraining (masked) under ChimeraStrategy equals single-device SparseTraining on the whole batch.

Each rank keeps the masks of the stages it trains (Chimera's second copy included); the two copies of a stage
take the same decisions, and every held layer's mask equals the single-device run's mask exactly, its weights
up to the rounding of the copies' gradient sum. RigL and SET, with ``stage_local`` True and False; 2 processes
in the default suite, 4 processes (and a checkpoint resume) under ``slow``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.callbacks import SparseTraining
from lightning_parallel.models.mlp import MLPClassifier
from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.sparse import SparseEngine
from lightning_parallel.strategies.chimera import ChimeraStrategy
from tests.helpers.distributed import run_distributed

BATCH = 16
STEPS = 8
OPTIONS: dict[str, Any] = dict(
    sparsity=0.8, distribution="uniform", update_interval=2, stop_at=7, drop_fraction=0.5, seed=3
)
CASES = [  # (method, stage_local, schedule, execution)
    ("rigl", False, "chimera", "masked"), ("set", True, "chimera", "masked"), ("set", False, "chimera", "masked"),
    ("rigl", True, "chimera", "masked"),
    ("set", True, "1f1b", "masked"),  # 1F1B: one holder per stage, so a rank draws SET's numbers of the others' layers
    ("rigl", False, "chimera", "sparse"),  # RigL's dense gradient summed over both copies' micro-batches
    ("rigl", False, "1f1b", "sparse"),  # a rank holds one stage: the other sparse layers are dropped
]


def _model(stages: int) -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(16, (24,) * (2 * stages - 1), 4, optimizer="adam", lr=0.02)


def _data(steps: int = STEPS) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(steps * BATCH, 16, generator=g), torch.randint(0, 4, (steps * BATCH,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _trainer(devices: int, strategy: Any, callback: SparseTraining, root: str, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_steps", STEPS)
    return pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, default_root_dir=root, **kwargs,
    )


def _masks(callback: SparseTraining) -> dict[str, list[int]]:
    """Active positions of every layer this rank holds: masked layers' masks, sparse layers' patterns."""
    assert callback.engine is not None
    out = {name: mask.flatten().nonzero().squeeze(1).tolist() for name, mask in callback.engine.masks.items()}
    out.update({name: layer.indices.tolist() for name, layer in callback.engine.sparse.items()})
    return out


def _run(
    world_size: int, method: str, stage_local: bool, root: str, schedule: str, execution: str
) -> dict[str, Any]:
    stages = world_size
    model = _model(stages)
    strategy = ChimeraStrategy(stages, 2 * stages, schedule=schedule, stage_local=stage_local)  # type: ignore[arg-type]
    callback = SparseTraining(method, execution=execution, **OPTIONS)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(world_size, strategy, callback, root).fit(model, _data())
    return {
        "masks": _masks(callback),
        "copies": {key: [p.detach().tolist() for p in m.parameters()] for key, m in strategy.held_stage_modules.items()},
        "sizes": strategy.partition_sizes,
    }


def _resume(world_size: int, root: str) -> dict[str, Any]:
    """Two epochs in one go vs one epoch, a checkpoint (every rank takes part) and a resumed second."""
    def fit(model: MLPClassifier, epochs: int, ckpt: str | None = None) -> tuple[pl.Trainer, SparseTraining]:
        callback = SparseTraining("set", **{**OPTIONS, "stop_at": 2 * STEPS - 1})
        trainer = _trainer(world_size, ChimeraStrategy(world_size, 2 * world_size), callback, root,
                           max_steps=-1, max_epochs=epochs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, _data(), ckpt_path=ckpt)
        return trainer, callback

    full = _model(world_size)
    _, straight = fit(full, 2)
    first = _model(world_size)
    trainer, _ = fit(first, 1)
    path = f"{root}/sparse.ckpt"
    trainer.save_checkpoint(path)
    trainer.strategy.barrier()
    saved = torch.load(path, weights_only=False)["callbacks"]
    names = sorted(next(v for k, v in saved.items() if "SparseTraining" in k)["masks"])
    resumed = _model(world_size)
    _, again = fit(resumed, 2, path)
    gap = max(float((a - b).abs().max()) for a, b in zip(full.parameters(), resumed.parameters(), strict=True))
    return {"gap": gap, "names": names, "same_masks": _masks(straight) == _masks(again)}


def _worker(rank: int, world_size: int, root: str, resume: bool) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {"-".join(map(str, case)): _run(world_size, *case[:2], root, *case[2:]) for case in CASES}
    if resume:
        out["resume"] = _resume(world_size, root)
    return out


def _reference(
    stages: int, method: str, root: Path, execution: str = "masked"
) -> tuple[dict[str, list[int]], list[torch.Tensor], Any]:
    model = _model(stages)
    callback = SparseTraining(method, execution=execution, **OPTIONS)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(1, "auto", callback, str(root)).fit(model, _data())
    return _masks(callback), list(model.pipeline_blocks()), model


def _check(results: list[dict[str, Any]], stages: int, root: Path) -> None:
    for case in CASES:
        name, run_names, execution = "-".join(map(str, case)), case[0], case[3]
        masks, blocks, model = _reference(stages, run_names, root, execution)
        engine_options = {k: v for k, v in OPTIONS.items() if k not in ("update_interval", "stop_at")}
        initial = SparseEngine(_model(stages), method=run_names, **engine_options).masks
        changed = [n for n, v in initial.items() if v.flatten().nonzero().squeeze(1).tolist() != masks[n]]
        assert changed, f"{name}: no mask moved, the test would not see a wrong decision"
        holders: dict[str, int] = {}
        worst = 0.0
        for res in results:
            run = res[name]
            for layer, indices in run["masks"].items():
                assert indices == masks[layer], f"{name}: mask of {layer} differs from single device"
                holders[layer] = holders.get(layer, 0) + 1
            slices = stage_slices(run["sizes"])
            for (_replica, stage), params in run["copies"].items():
                reference = list(torch.nn.Sequential(*blocks[slices[stage]]).parameters())
                for got, ref in zip(params, reference, strict=True):
                    worst = max(worst, float((torch.tensor(got) - ref.detach()).abs().max()))
        copies = 1 if "1f1b" in name else 2  # Chimera: two ranks hold (and update) each stage's masks
        assert holders == {layer: copies for layer in masks}, f"{name}: holders {holders}"
        assert worst < 1e-5, f"{name}: max |pipeline - single device| = {worst:.2e}"
        del model


def test_chimera_two_processes_match_single_device(tmp_path: Path) -> None:
    results = run_distributed(_worker, 2, str(tmp_path), False, timeout=240.0)
    _check(results, 2, tmp_path)


@pytest.mark.slow  # 4 processes on 2 loaded cores, plus a checkpoint resume
def test_chimera_four_processes_match_single_device_and_resume(tmp_path: Path) -> None:
    results = run_distributed(_worker, 4, str(tmp_path), True, timeout=900.0)
    _check(results, 4, tmp_path)
    for res in results:
        assert res["resume"]["names"] == sorted(_reference(4, "set", tmp_path)[0]), res["resume"]["names"]
        assert res["resume"]["same_masks"]
        assert res["resume"]["gap"] < 1e-6, res["resume"]["gap"]
