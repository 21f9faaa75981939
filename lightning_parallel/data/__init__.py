"""Example DataModules whose data ships offline: digits, Python source text, synthetic."""

from lightning_parallel.data.digits import DigitsDataModule
from lightning_parallel.data.resumable import EpochRandomSampler, ResumableDataLoader
from lightning_parallel.data.synthetic import SyntheticDataModule
from lightning_parallel.data.text import TextDataModule

__all__ = ["DigitsDataModule", "EpochRandomSampler", "ResumableDataLoader", "SyntheticDataModule", "TextDataModule"]
