"""Callbacks: add them to ``Trainer(callbacks=[...])``."""

from lightning_parallel.callbacks.deq_statistics import DEQStatistics
from lightning_parallel.callbacks.dpkfac import DPKFAC
from lightning_parallel.callbacks.preemption import PreemptionCheckpoint
from lightning_parallel.callbacks.sparse_training import SparseTraining
from lightning_parallel.callbacks.summary import MetricsSummary

__all__ = ["DPKFAC", "DEQStatistics", "MetricsSummary", "PreemptionCheckpoint", "SparseTraining"]
