"""A callback that prints the final validation metrics as a table when training ends."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class MetricsSummary(Callback):
    """Print the last logged metrics whose names start with ``prefix`` once ``fit`` ends (rank 0 only).

    Args:
        prefix: only metrics whose name starts with this are shown. Default ``"val_"``.
    """

    def __init__(self, prefix: str = "val_") -> None:
        self.prefix = prefix
        self.final: dict[str, float] = {}

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.final = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(self.prefix) and value.numel() == 1
        }

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.final:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Final validation metrics", caption=f"epoch {trainer.current_epoch}, step {trainer.global_step}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in sorted(self.final.items()):
            table.add_row(name, f"{value:.4f}")
        Console().print(table)
