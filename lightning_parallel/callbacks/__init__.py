"""Callbacks: add them to ``Trainer(callbacks=[...])``."""

from lightning_parallel.callbacks.summary import MetricsSummary

__all__ = ["MetricsSummary"]
