"""A callback monitoring a key the pipeline strategies never log is named at setup, not at the first validation."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_parallel.strategies.monitors import warn_unlogged_monitors


class _Plain:
    pass


class _WithMetrics:
    def pipeline_metrics(self, output: Any, batch: Any) -> dict[str, Any]:
        return {}


def _trainer(*callbacks: Any) -> Any:
    return SimpleNamespace(callbacks=list(callbacks))


def test_monitor_logged_only_in_validation_step_is_named() -> None:
    trainer = _trainer(ModelCheckpoint(monitor="val_acc"), EarlyStopping(monitor="val_loss"))
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='val_acc'\) under ChimeraStrategy: .*your module has none"):
        missing = warn_unlogged_monitors(trainer, _Plain(), "ChimeraStrategy")
    assert missing == ["val_acc"]


@pytest.mark.parametrize(
    ("monitor", "module"),
    [("val_loss", _Plain()), ("train_loss", _Plain()), ("val_head1_loss", _Plain()), ("val_acc", _WithMetrics())],
)
def test_keys_the_strategy_logs_are_quiet(monitor: str, module: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unlogged_monitors(_trainer(ModelCheckpoint(monitor=monitor)), module, "ChimeraStrategy") == []


def test_no_monitor_is_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unlogged_monitors(_trainer(ModelCheckpoint()), _Plain(), "InterlockingBackpropStrategy") == []
