"""DPKFAC with a sampled Fisher under ChimeraStrategy equals single-device DPKFAC with the same seed.

On factor-update steps the sampled Fisher's second backward rides the pipeline schedule from the
last stage's output (``SampledFisherPass``); the whole batch's random numbers are drawn in one call,
so the sampled labels are the ones one device draws whatever the micro-batches. 2 gloo processes:
Chimera with 2 and 4 micro-batches and 1F1B, ``fisher="categorical"`` (and ``"gaussian"`` once,
with factors every 2nd step, so the pass is skipped on the others); the final weights of every
stage copy must match single-process training within 1e-5. The 4-process variant (Chimera and
chimera-zb over 4 stages) is marked slow.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_parallel.callbacks import DPKFAC
from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.strategies.chimera import ChimeraStrategy
from tests.callbacks.test_dpkfac_chimera import OPTIONS, _data, _model, _trainer
from tests.helpers.distributed import run_distributed

# name: (schedule, stages, micro-batches, extra DPKFAC options)
RUNS_2 = {
    "chimera-n4": ("chimera", 2, 4, {"fisher": "categorical"}),
    "1f1b": ("1f1b", 2, 2, {"fisher": "categorical"}),
    "1f1b-gaussian-every-2": ("1f1b", 2, 4, {"fisher": "gaussian", "factor_update_steps": 2}),
}
RUNS_4 = {
    "chimera-4": ("chimera", 4, 4, {"fisher": "categorical"}),
    "chimera-zb-4": ("chimera-zb", 4, 4, {"fisher": "categorical"}),
    "1f1b-4": ("1f1b", 4, 4, {"fisher": "categorical"}),
}


def _options(extra: dict[str, Any]) -> dict[str, Any]:
    return {**OPTIONS, "fisher_seed": 7, **extra}


def _worker(rank: int, world_size: int, runs: dict[str, Any]) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    for name, (schedule, stages, micro_batches, extra) in runs.items():
        model = _model()
        strategy = ChimeraStrategy(stages, micro_batches, schedule=schedule)
        callback = DPKFAC(**_options(extra))
        _trainer(world_size, strategy, callback).fit(model, _data())
        out[name] = {
            "copies": {
                key: [p.detach().tolist() for p in module.parameters()]
                for key, module in strategy.held_stage_modules.items()
            },
            "sizes": strategy.partition_sizes,
        }
    return out


def _check(results: list[dict[str, Any]], runs: dict[str, Any]) -> None:
    for name, (_schedule, _stages, _micro, extra) in runs.items():
        reference = _model()
        _trainer(1, "auto", DPKFAC(**_options(extra))).fit(reference, _data())
        empirical = _model()
        _trainer(1, "auto", DPKFAC(**_options({**extra, "fisher": "empirical"}))).fit(empirical, _data())
        blocks = reference.pipeline_blocks()
        worst, held = 0.0, 0
        for res in results:
            run = res[name]
            slices = stage_slices(run["sizes"])
            for (_replica, stage), params in run["copies"].items():
                stage_params = list(torch.nn.Sequential(*blocks[slices[stage]]).parameters())
                for got, ref in zip(params, stage_params, strict=True):
                    worst = max(worst, float((torch.tensor(got) - ref.detach()).abs().max()))
                    held += 1
        assert held > 0
        assert worst < 1e-5, f"{name}: max |pipeline - single device| = {worst:.2e}"
        # the sampled Fisher changed the trajectory: the empirical one ends elsewhere
        gap = max(float((a - b).abs().max()) for a, b in zip(reference.parameters(), empirical.parameters()))
        assert gap > 1e-4, f"{name}: sampled and empirical Fisher agree ({gap:.2e}): the test could not fail"


def test_sampled_fisher_under_chimera_matches_single_device() -> None:
    results = run_distributed(_worker, 2, RUNS_2, timeout=180.0)
    _check(results, RUNS_2)


@pytest.mark.slow
def test_sampled_fisher_under_four_stage_pipelines_matches_single_device() -> None:
    results = run_distributed(_worker, 4, RUNS_4, timeout=400.0)
    _check(results, RUNS_4)


def _resume(rank: int, world_size: int, root: str) -> float:
    """1F1B (rank 0 holds no last stage, so it never draws): two epochs vs one, a checkpoint, a resume."""
    warnings.filterwarnings("ignore")
    options = _options({"fisher": "categorical"})
    full = _model()
    _trainer(
        world_size, ChimeraStrategy(2, 2, schedule="1f1b"), DPKFAC(**options), max_steps=-1, max_epochs=2
    ).fit(full, _data())
    first = _model()
    trainer = _trainer(
        world_size, ChimeraStrategy(2, 2, schedule="1f1b"), DPKFAC(**options), max_steps=-1, max_epochs=1
    )
    trainer.fit(first, _data())
    path = f"{root}/sampled.ckpt"
    trainer.save_checkpoint(path)
    trainer.strategy.barrier()
    resumed = _model()
    _trainer(
        world_size, ChimeraStrategy(2, 2, schedule="1f1b"), DPKFAC(**options), max_steps=-1, max_epochs=2
    ).fit(resumed, _data(), ckpt_path=path)
    return max(
        float((a - b).abs().max()) for a, b in zip(full.parameters(), resumed.parameters(), strict=True)
    )


@pytest.mark.slow
def test_sampled_fisher_resume_under_1f1b_is_exact(tmp_path: Path) -> None:
    """The checkpoint carries the generator of a rank that draws (the last stage's), for every rank."""
    gaps = run_distributed(_resume, 2, str(tmp_path), timeout=300.0)
    assert max(gaps) < 1e-6, gaps
