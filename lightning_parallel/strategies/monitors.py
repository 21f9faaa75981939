"""Warn early when a callback monitors a key that a pipeline strategy will never log.

Design: a pipeline strategy runs its own forward for validation and logs ``val_loss`` (``test_loss``), plus
``val_<name>`` for every metric the module's ``pipeline_metrics(output, batch)`` returns, and ``train_loss``
while training; the module's own ``validation_step`` and ``training_step`` are not called. A
``ModelCheckpoint(monitor="val_acc")`` whose key the user logs there then fails at the first validation with
Lightning's "did you call log" hint. The key may still be logged from another hook, so this warns (once, at
setup) instead of refusing.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["warn_unlogged_monitors"]

_LOGGED = re.compile(r"(train|val|test)_(loss|head\d+_loss)")


def warn_unlogged_monitors(trainer: pl.Trainer, module: Any, strategy_name: str) -> list[str]:
    """Warns about every callback ``monitor`` the strategy will not log; returns those keys.

    Args:
        trainer: the trainer whose callbacks are checked.
        module: the LightningModule (its ``pipeline_metrics`` hook adds ``val_<name>`` / ``test_<name>`` keys,
            unknown until it runs).
        strategy_name: the strategy's class name, for the message.
    """
    has_metrics = callable(getattr(module, "pipeline_metrics", None))
    missing = []
    for callback in getattr(trainer, "callbacks", []):
        monitor = getattr(callback, "monitor", None)
        if not isinstance(monitor, str) or _LOGGED.fullmatch(monitor):
            continue
        if has_metrics and monitor.startswith(("val_", "test_")):
            continue
        missing.append(monitor)
        rank_zero_warn(
            f"{type(callback).__name__}(monitor={monitor!r}) under {strategy_name}: the strategy does not call "
            "your validation_step or training_step; it logs train_loss, val_loss and val_<name> for each metric "
            f"of a `pipeline_metrics(output, batch)` hook{' (your module has none)' if not has_metrics else ''}. "
            f"Unless {monitor!r} is logged from another hook, monitor 'val_loss' or return "
            f"{{{monitor.split('_', 1)[-1]!r}: ...}} from pipeline_metrics."
        )
    return missing
