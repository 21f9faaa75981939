"""Example DataModules whose data ships offline: digits, Python source text, synthetic, 2-D toy densities."""

from lightning_parallel.data.digits import DigitsDataModule
from lightning_parallel.data.resumable import EpochRandomSampler, ResumableDataLoader
from lightning_parallel.data.synthetic import SyntheticDataModule
from lightning_parallel.data.text import TextDataModule
from lightning_parallel.data.toy2d import Toy2DDataModule

__all__ = [
    "DigitsDataModule",
    "EpochRandomSampler",
    "ResumableDataLoader",
    "SyntheticDataModule",
    "TextDataModule",
    "Toy2DDataModule",
]
