"""DPKFAC under the zero-bubble Chimera schedule and with gradient accumulation under pipelines.

Two gloo processes train the MLP of ``test_dpkfac_chimera.py`` for a few optimizer steps with
K-FAC refreshed every step and KL-clip active: ``chimera-zb`` (the weight gradients computed in a
separate pass) and ``accumulate_grad_batches=2`` under ``chimera`` and ``1f1b``. The weights must
match single-device DPKFAC with the same settings (the same accumulation), data and seed.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from lightning_parallel.callbacks import DPKFAC
from lightning_parallel.strategies import ChimeraStrategy
from tests.callbacks.test_dpkfac_chimera import OPTIONS, _data, _model, _trainer
from tests.helpers.distributed import run_distributed

# name: (schedule, micro-batches, accumulate_grad_batches)
RUNS = {"chimera-zb": ("chimera-zb", 2, 1), "chimera-accumulate": ("chimera", 2, 2), "1f1b-accumulate": ("1f1b", 2, 2)}


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out = {}
    for name, (schedule, micro_batches, accumulate) in RUNS.items():
        model = _model()
        strategy = ChimeraStrategy(2, micro_batches, schedule=schedule)  # type: ignore[arg-type]
        _trainer(world_size, strategy, DPKFAC(**OPTIONS), accumulate_grad_batches=accumulate, max_steps=-1,
                 max_epochs=1).fit(model, _data())
        out[name] = [p.detach().clone() for p in model.parameters()]
    return out


@pytest.mark.slow
def test_zero_bubble_and_accumulation_match_single_device() -> None:
    results = run_distributed(_worker, 2, timeout=150.0)
    for name, (_, _, accumulate) in RUNS.items():
        reference = _model()
        _trainer(1, "auto", DPKFAC(**OPTIONS), accumulate_grad_batches=accumulate, max_steps=-1,
                 max_epochs=1).fit(reference, _data())
        for res in results:
            worst = max(float((a - b.detach()).abs().max()) for a, b in zip(res[name], reference.parameters()))
            assert worst < 1e-5, f"{name}: max |pipeline - single device| = {worst:.2e}"
