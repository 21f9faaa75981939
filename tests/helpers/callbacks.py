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


class StepMarker(pl.Callback):
    """For tests that signal or kill a real run: writes ``rank<r>.pid`` at the start of training, appends
    ``step loss`` to ``rank<r>.losses`` after every batch, and sleeps ``sleep_s`` so the run lasts."""

    def __init__(self, directory: str, sleep_s: float = 0.0) -> None:
        self.directory = directory
        self.sleep_s = sleep_s

    def _file(self, trainer: pl.Trainer, suffix: str) -> str:
        import os

        return os.path.join(self.directory, f"rank{trainer.global_rank}.{suffix}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        import os

        os.makedirs(self.directory, exist_ok=True)
        with open(self._file(trainer, "pid"), "w") as handle:
            handle.write(str(os.getpid()))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        import time

        with open(self._file(trainer, "losses"), "a") as handle:
            handle.write(f"{trainer.global_step} {float(outputs['loss']):.9g}\n")
        time.sleep(self.sleep_s)
