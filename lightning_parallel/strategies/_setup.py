"""The first part of ``setup`` shared by the pipeline strategies."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import Strategy

from lightning_parallel.pipeline.protocol import check_pipeline_protocol


def begin_pipeline_setup(strategy: Strategy, trainer: pl.Trainer) -> pl.LightningModule:
    """Set up the accelerator, check the module and let the precision plugin convert it.

    Follows the order of Lightning's own ``Strategy.setup``: the precision plugin converts the module before
    it moves to the device and before the optimizers exist (a plugin may swap layers, e.g. for QAT ones).

    Raises:
        TypeError: if the module lacks the pipeline protocol.
        ValueError: if the module uses manual optimization, or the precision plugin has a gradient scaler.
    """
    name = type(strategy).__name__
    if strategy.accelerator is None:
        raise RuntimeError(f"{name}.setup called before an accelerator was set.")
    strategy.accelerator.setup(trainer)
    module = strategy.lightning_module
    if module is None:
        raise RuntimeError(f"{name}.setup called without a LightningModule.")
    check_pipeline_protocol(module, who=name)
    if not module.automatic_optimization:
        raise ValueError(
            f"{name} runs the optimization itself; {type(module).__name__} sets "
            "automatic_optimization=False. Use automatic optimization (the default)."
        )
    if getattr(strategy.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"{name} does not support a gradient scaler (precision='16-mixed'); use "
            "precision='bf16-mixed' or '32-true'."
        )
    if strategy.model is not None:
        strategy.model = strategy.precision_plugin.convert_module(strategy.model)
    return module
