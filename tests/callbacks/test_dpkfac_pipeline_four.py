"""DPKFAC under 4-stage pipelines on 4 gloo processes equals single-device DPKFAC (slow).

The 4-process counterparts of ``test_dpkfac_pipeline_schedules.py`` and
``tests/kfac/test_pipeline_empty_stage.py``: ``chimera-zb``, ``accumulate_grad_batches=2`` under
``chimera``, and a model whose middle stages hold no ``nn.Linear`` (under Chimera with 4 stages,
ranks 1 and 2 hold stages 1 and 2 only: they precondition nothing but must take part in the
KL-clip all-reduce, or ranks 0 and 3 would wait). Weights within 1e-5 of single-device DPKFAC.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_parallel.callbacks import DPKFAC
from lightning_parallel.models.mlp import MLPClassifier
from lightning_parallel.strategies import ChimeraStrategy
from tests.callbacks.test_dpkfac_chimera import OPTIONS, _data, _trainer
from tests.helpers.distributed import run_distributed

# name: (model, schedule, micro-batches, accumulate_grad_batches)
RUNS = {
    "chimera-zb": ("mlp", "chimera-zb", 4, 1),
    "chimera-accumulate": ("mlp", "chimera", 4, 2),
    "empty-middle-stages": ("hollow", "chimera", 4, 1),
}


class HollowMLP(MLPClassifier):
    """Four blocks, the middle two without a Linear: ``[Linear, Tanh], [Tanh], [Tanh], [Linear]``."""

    def build_blocks(self) -> nn.Sequential:
        return nn.Sequential(
            nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Tanh()),
            nn.Sequential(nn.Tanh()),
            nn.Sequential(nn.Tanh()),
            nn.Sequential(nn.Linear(32, 4)),
        )


def _model(kind: str) -> MLPClassifier:
    torch.manual_seed(0)
    if kind == "hollow":
        return HollowMLP(16, (32,), 4, optimizer="sgd", lr=0.1)
    return MLPClassifier(16, (32, 32, 32), 4, optimizer="sgd", lr=0.1)


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (kind, schedule, micro_batches, accumulate) in RUNS.items():
        model = _model(kind)
        strategy = ChimeraStrategy(4, micro_batches, schedule=schedule)  # type: ignore[arg-type]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _trainer(world_size, strategy, DPKFAC(**OPTIONS), accumulate_grad_batches=accumulate, max_steps=-1,
                     max_epochs=1).fit(model, _data())
        out[name] = [p.detach().clone() for p in model.parameters()]
        out[name + "_empty"] = any("have no nn.Linear or nn.Conv2d layer" in str(w.message) for w in caught)
    return out


@pytest.mark.slow
def test_four_stage_pipelines_match_single_device() -> None:
    results = run_distributed(_worker, 4, timeout=400.0)
    for name, (kind, _, _, accumulate) in RUNS.items():
        reference = _model(kind)
        _trainer(1, "auto", DPKFAC(**OPTIONS), accumulate_grad_batches=accumulate, max_steps=-1,
                 max_epochs=1).fit(reference, _data())
        for rank, res in enumerate(results):
            worst = max(float((a - b.detach()).abs().max()) for a, b in zip(res[name], reference.parameters()))
            assert worst < 1e-5, f"{name}, rank {rank}: max |pipeline - single device| = {worst:.2e}"
    assert [res["empty-middle-stages_empty"] for res in results] == [False, True, True, False]
