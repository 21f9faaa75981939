"""SparseTraining next to DPKFAC (preconditioned gradients re-masked) and QuantizationPrecision (QAT layers keep
the masked weights): each Trainer run equals a manual loop of the pure pieces in the same order."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from lightning_parallel.callbacks import DPKFAC, SparseTraining
from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from lightning_parallel.plugins import QuantizationPrecision
from lightning_parallel.quantization import QATLinear, convert_to_qat
from lightning_parallel.sparse import SparseEngine
from tests.callbacks.test_sparse_training import SparseNet, _loader, _trainer

SPARSE: dict[str, Any] = dict(method="rigl", sparsity=0.8, distribution="uniform", seed=3)
KFAC: dict[str, Any] = dict(damping=0.01, kl_clip=0.01, inv_update_steps=3)


def _reference(model: SparseNet, *, kfac: bool, steps: int) -> SparseEngine:
    engine = SparseEngine(model, **SPARSE)
    if not kfac:
        convert_to_qat(model)
    opt = model.configure_optimizers()
    preconditioner = KFACPreconditioner(model, KFACOptions(**KFAC)) if kfac else None
    for step, (x, y) in enumerate((list(_loader()) * 3)[:steps]):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if preconditioner is not None:
            preconditioner.step(opt)
        if engine.is_update_step(step, update_interval=3, stop_at=10):
            engine.update(step, stop_at=10, optimizer=opt)
        engine.mask_gradients()
        opt.step()
        engine.apply_masks()
    return engine


@pytest.mark.parametrize("partner", ["dpkfac", "qat"])
def test_composition_equals_the_manual_loop(tmp_path: Path, partner: str) -> None:
    model = SparseNet(conv=False)
    callback = SparseTraining(update_interval=3, stop_at=10, **SPARSE)
    callbacks: list[Any] = [DPKFAC(**KFAC), callback] if partner == "dpkfac" else [callback]
    plugins = [QuantizationPrecision("qat-int8")] if partner == "qat" else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, callbacks, max_steps=-1, max_epochs=3, plugins=plugins).fit(model, _loader())
    reference = SparseNet(conv=False)
    engine = _reference(reference, kfac=partner == "dpkfac", steps=12)
    assert callback.engine is not None
    initial = SparseEngine(SparseNet(conv=False), **SPARSE).masks
    assert any(not torch.equal(initial[n], m) for n, m in callback.engine.masks.items())  # masks moved
    for name, mask in engine.masks.items():
        assert torch.equal(callback.engine.masks[name], mask), name
        assert not model.get_submodule(name).weight[~mask].any()
    if partner == "qat":
        assert isinstance(model.net[1], QATLinear)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)
