"""Synthetic data for benchmarks: inputs from a fixed generator, labels from a fixed random teacher.

Labels come from a random linear teacher over the inputs (argmax of ``x @ W``), so the task is learnable
and a loss that falls means training works. Token data is a random walk over the vocabulary whose targets
are the next token, for language models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_parallel.data.resumable import EpochRandomSampler, ResumableDataLoader
from lightning_parallel.data.validation import check_batch_size


def make_synthetic(
    kind: Literal["vector", "image", "tokens"],
    num_samples: int,
    shape: Sequence[int],
    num_classes: int,
    seed: int,
) -> TensorDataset:
    """A dataset of ``num_samples`` examples of ``shape`` (``(T,)`` for tokens) with teacher labels."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        (length,) = shape
        steps = torch.randint(-2, 3, (num_samples, length + 1), generator=generator)
        start = torch.randint(0, num_classes, (num_samples, 1), generator=generator)
        walk = (start + steps.cumsum(dim=1)) % num_classes  # (N, T + 1)
        return TensorDataset(walk[:, :-1].contiguous(), walk[:, 1:].contiguous())
    x = torch.randn(num_samples, *shape, generator=generator)
    teacher = torch.randn(x[0].numel(), num_classes, generator=generator)
    y = (x.flatten(1) @ teacher).argmax(dim=1)
    return TensorDataset(x, y)


class SyntheticDataModule(pl.LightningDataModule):
    """Synthetic classification or language-model data of any shape.

    Args:
        kind: ``"vector"`` (``(B, *shape)`` floats), ``"image"`` (``(B, C, H, W)`` floats) or ``"tokens"``
            (``(B, T)`` ids with next-token targets). Default ``"vector"``.
        shape: shape of one input, e.g. ``[64]``, ``[1, 8, 8]`` or ``[64]`` tokens. Default ``[64]``.
        num_classes: classes (vocabulary size for tokens). Default 10.
        num_samples: training examples; validation gets a quarter as many. Default 2,048.
        batch_size: examples per batch. Default 64.
        seed: seed of the generator. Default 0.
    """

    def __init__(
        self,
        kind: Literal["vector", "image", "tokens"] = "vector",
        shape: Sequence[int] = (64,),
        num_classes: int = 10,
        *,
        num_samples: int = 2048,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("vector", "image", "tokens"):
            raise ValueError(f"kind={kind!r} is not one of ('vector', 'image', 'tokens').")
        if kind == "image" and len(shape) != 3:
            raise ValueError(f"kind='image' needs shape=[C, H, W], got shape={list(shape)}.")
        if kind == "tokens" and len(shape) != 1:
            raise ValueError(f"kind='tokens' needs shape=[T], got shape={list(shape)}.")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2.")
        check_batch_size(batch_size, num_samples, "training")
        self.kind = kind
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = make_synthetic(self.kind, self.num_samples, self.shape, self.num_classes, self.seed)
            self.val_set = make_synthetic(
                self.kind, max(self.batch_size, self.num_samples // 4), self.shape, self.num_classes, self.seed + 1
            )

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup()
        return ResumableDataLoader(
            self.train_set,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=EpochRandomSampler(self.train_set),  # type: ignore[arg-type]
        )

    @override
    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size)  # type: ignore[arg-type]
