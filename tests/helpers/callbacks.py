"""Small Lightning callbacks shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class LossRecorder(pl.Callback):
    """Records the loss every training step returns."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
