"""lightning-parallel: PyTorch Lightning plugins for faster, leaner deep-network training.

Each technique is one Lightning object that drops into an existing ``Trainer`` or LightningCLI YAML.
Importing the package registers the strategies' short names (``strategy="chimera"``, ...) and imports no
optional dependency (bitsandbytes, matplotlib, zstandard).
"""

from lightning_parallel import strategies as strategies  # registers the strategies' short names
from lightning_parallel.data import DigitsDataModule, SyntheticDataModule, TextDataModule
from lightning_parallel.models import GPTLanguageModel, MLPClassifier, ResNetClassifier

__version__ = "0.1.0"

__all__ = [
    "DigitsDataModule",
    "GPTLanguageModel",
    "MLPClassifier",
    "ResNetClassifier",
    "SyntheticDataModule",
    "TextDataModule",
    "__version__",
]
