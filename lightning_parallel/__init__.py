"""lightning-parallel: PyTorch Lightning plugins for faster, leaner deep-network training.

Each technique is one Lightning object that drops into an existing ``Trainer`` or LightningCLI YAML.
Importing the package registers the strategies' short names (``strategy="chimera"``, ...) and imports no
optional dependency (bitsandbytes, matplotlib, zstandard).
"""

from lightning_parallel.callbacks import DPKFAC, MetricsSummary, SparseTraining
from lightning_parallel.data import DigitsDataModule, SyntheticDataModule, TextDataModule
from lightning_parallel.models import GPTLanguageModel, MLPClassifier, ResNetClassifier
from lightning_parallel.plugins import CompressedActivationPrecision, QuantizationPrecision
from lightning_parallel.strategies import ChimeraStrategy, InterlockingBackpropStrategy

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - plain sorted order
    "ChimeraStrategy",
    "CompressedActivationPrecision",
    "DPKFAC",
    "DigitsDataModule",
    "GPTLanguageModel",
    "InterlockingBackpropStrategy",
    "MLPClassifier",
    "MetricsSummary",
    "QuantizationPrecision",
    "ResNetClassifier",
    "SparseTraining",
    "SyntheticDataModule",
    "TextDataModule",
    "__version__",
]
