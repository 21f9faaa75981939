"""lightning-parallel: PyTorch Lightning plugins for faster, leaner deep-network training.

Each technique is one Lightning object that drops into an existing ``Trainer`` or LightningCLI YAML.
Importing the package registers the strategies' short names (``strategy="chimera"``, ...) and imports no
optional dependency (bitsandbytes, matplotlib, zstandard).
"""

from lightning_parallel.callbacks import DPKFAC, DEQStatistics, MetricsSummary, SparseTraining
from lightning_parallel.data import DigitsDataModule, SyntheticDataModule, TextDataModule, Toy2DDataModule
from lightning_parallel.models import (
    CNFDensityModel,
    DEQClassifier,
    GPTLanguageModel,
    MLPClassifier,
    ODEClassifier,
    ResNetClassifier,
)
from lightning_parallel.plugins import CompressedActivationPrecision, QuantizationPrecision
from lightning_parallel.strategies import AuxNetStrategy, ChimeraStrategy, InterlockingBackpropStrategy

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - plain sorted order
    "AuxNetStrategy",
    "CNFDensityModel",
    "ChimeraStrategy",
    "CompressedActivationPrecision",
    "DEQClassifier",
    "DEQStatistics",
    "DPKFAC",
    "DigitsDataModule",
    "GPTLanguageModel",
    "InterlockingBackpropStrategy",
    "MLPClassifier",
    "MetricsSummary",
    "ODEClassifier",
    "QuantizationPrecision",
    "ResNetClassifier",
    "SparseTraining",
    "SyntheticDataModule",
    "TextDataModule",
    "Toy2DDataModule",
    "__version__",
]
