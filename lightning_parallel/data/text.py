"""A character-level corpus built from the Python standard library's own source files: no download.

Files ``*.py`` under the running interpreter's stdlib directory are read in sorted path order and joined
until ``max_chars`` characters. Symbols are the 128 ASCII codes (anything else becomes ``?``), so the
vocabulary is fixed (``VOCAB_SIZE = 128``) whatever the corpus. The corpus is cut into non-overlapping
windows of ``block_size + 1`` characters; the split is contiguous (train first, then validation, then test),
so no window straddles two splits.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_parallel.data.resumable import EpochRandomSampler, ResumableDataLoader
from lightning_parallel.data.validation import check_batch_size, check_fractions

VOCAB_SIZE = 128


def stdlib_corpus(max_chars: int) -> str:
    """The first ``max_chars`` characters of the standard library's ``*.py`` files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    if len(corpus) < max_chars // 2:
        raise RuntimeError(f"Found only {len(corpus)} characters of Python source under {root}.")
    return corpus


def encode(text: str) -> torch.Tensor:
    """ASCII codes of ``text`` as a ``(len(text),)`` long tensor; non-ASCII characters become ``?``."""
    data = text.encode("ascii", errors="replace")  # every code < 128; "?" marks what was not ASCII
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(ids: torch.Tensor) -> str:
    """The characters of a 1-D tensor of ids."""
    return "".join(chr(int(i)) for i in ids)


class TextDataModule(pl.LightningDataModule):
    """Next-character prediction on Python source: batches ``(idx, targets)`` of shape ``(B, block_size)``.

    Args:
        block_size: characters per example. Default 64.
        batch_size: examples per batch (per process under DDP). Default 32.
        max_chars: corpus size in characters. Default 400,000.
        val_fraction: share of the corpus used for validation. Default 0.1.
        test_fraction: share used for testing. Default 0.05.
        num_workers: DataLoader workers. Default 0.
    """

    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        *,
        max_chars: int = 400_000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.05,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1, e.g. 64.")
        if max_chars < 10 * (block_size + 1):
            raise ValueError(
                f"max_chars={max_chars} is too small for block_size={block_size}; "
                f"use at least {10 * (block_size + 1)}."
            )
        check_fractions(val_fraction, test_fraction)
        windows = max_chars // (block_size + 1)
        check_batch_size(batch_size, int(windows * (1 - val_fraction - test_fraction)), "training")
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        self.splits: dict[str, TensorDataset] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        ids = encode(stdlib_corpus(self.max_chars))
        window = self.block_size + 1
        windows = ids[: len(ids) // window * window].view(-1, window)  # (W, T + 1)
        n_val = max(1, int(len(windows) * self.val_fraction))
        n_test = max(1, int(len(windows) * self.test_fraction)) if self.test_fraction > 0 else 0
        n_train = len(windows) - n_val - n_test
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(windows))}
        for split, (start, stop) in bounds.items():
            part = windows[start:stop]
            self.splits[split] = TensorDataset(part[:, :-1].contiguous(), part[:, 1:].contiguous())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        data = self.splits[split]
        if shuffle:
            sampler = EpochRandomSampler(data)
            return ResumableDataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
