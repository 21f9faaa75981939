"""DEQStatistics under a Trainer: the logged iterations and residuals are the DEQ layer's own statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.callbacks import DEQStatistics
from lightning_parallel.implicit import DEQ


class _Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.lin(z) + x)


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.deq = DEQ(_Cell(), backward="implicit", tol=1e-5)
        self.head = nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.deq(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_logs_forward_and_backward_solver_statistics(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)),
        batch_size=8,
    )
    model, callback = _Net(), DEQStatistics()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, data)
    fwd, bwd = model.deq.forward_stats, model.deq.backward_stats
    assert fwd is not None and bwd is not None
    assert callback.last == {
        "deq/deq/forward_iterations": float(fwd.iterations),
        "deq/deq/forward_residual": fwd.residual,
        "deq/deq/backward_iterations": float(bwd.iterations),
        "deq/deq/backward_residual": bwd.residual,
    }
    assert fwd.residual <= 1e-5 and bwd.residual <= 1e-6
    assert float(trainer.logged_metrics["deq/deq/forward_iterations"]) == fwd.iterations
