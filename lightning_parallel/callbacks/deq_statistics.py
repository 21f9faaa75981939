"""A callback that logs the solver statistics of every ``DEQ`` layer of the trained module."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_parallel.implicit import DEQ


class DEQStatistics(Callback):
    """After each training batch (its backward included), logs ``deq/<layer>/<pass>_iterations`` and
    ``deq/<layer>/<pass>_residual`` for the forward solve and, with the implicit backward, the adjoint solve.

    Args:
        prog_bar: also show the forward iterations in the progress bar. Default ``False``.
    """

    def __init__(self, *, prog_bar: bool = False) -> None:
        self.prog_bar = prog_bar
        self.last: dict[str, float] = {}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        values: dict[str, float] = {}
        for name, module in pl_module.named_modules():
            if not isinstance(module, DEQ):
                continue
            for phase, stats in (("forward", module.forward_stats), ("backward", module.backward_stats)):
                if stats is not None:
                    values[f"deq/{name}/{phase}_iterations"] = float(stats.iterations)
                    values[f"deq/{name}/{phase}_residual"] = stats.residual
        for key, value in values.items():
            show = self.prog_bar and key.endswith("forward_iterations")
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=show)
        self.last = values
