"""Handwritten digits from scikit-learn's bundled ``load_digits`` (1,797 8x8 images): no download.

The split is fixed by ``split_seed`` (stratified), independent of the training seed, so every run and every
rank sees the same train/val/test sets. Pixel values 0..16 are scaled to [0, 1] and standardised with the
training set's mean and standard deviation.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from lightning_parallel.data.resumable import EpochRandomSampler, ResumableDataLoader
from lightning_parallel.data.validation import check_batch_size, check_fractions


class _Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random shifts by up to ``max_shift`` pixels (zero padding): light augmentation for tiny images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int) -> None:
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        s = self.max_shift
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))
        padded = F.pad(image, (s, s, s, s))
        h, w = image.shape[-2:]
        return padded[:, s + dy : s + dy + h, s + dx : s + dx + w], self.labels[index]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as ``(B, 1, S, S)`` float images and ``(B,)`` labels.

    Args:
        batch_size: examples per batch (per process under DDP). Default 64.
        image_size: 8 (native) or 32 (bilinear upsampling, CIFAR-sized). Default 8.
        val_fraction: share of the 1,797 images held out for validation. Default 0.15.
        test_fraction: share held out for testing. Default 0.15.
        augment: random shifts of up to one pixel per 8 on training images. Default False.
        split_seed: seed of the fixed stratified split. Default 0.
        num_workers: DataLoader workers. Default 0 (the data is in memory).
    """

    def __init__(
        self,
        batch_size: int = 64,
        image_size: Literal[8, 32] = 8,
        *,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        augment: bool = False,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if image_size not in (8, 32):
            raise ValueError(f"image_size={image_size} is not supported; use 8 (native) or 32 (upsampled).")
        check_fractions(val_fraction, test_fraction)
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.augment = augment
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_set: Dataset[tuple[torch.Tensor, torch.Tensor]] | TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        n_train = round(1797 * (1 - val_fraction - test_fraction))
        check_batch_size(batch_size, n_train, "training")

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
        labels = torch.tensor(digits.target, dtype=torch.long)
        index = torch.arange(len(labels)).numpy()
        held = self.val_fraction + self.test_fraction
        train_idx, rest_idx = train_test_split(
            index, test_size=held, random_state=self.split_seed, stratify=labels.numpy()
        )
        val_idx, test_idx = train_test_split(
            rest_idx,
            test_size=self.test_fraction / held,
            random_state=self.split_seed,
            stratify=labels.numpy()[rest_idx],
        )
        if self.image_size == 32:
            images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
        train_images = images[train_idx]
        mean, std = train_images.mean(), train_images.std()
        images = (images - mean) / std

        def subset(idx: object) -> TensorDataset:
            t = torch.as_tensor(idx)
            return TensorDataset(images[t], labels[t])

        if self.augment:
            t = torch.as_tensor(train_idx)
            self.train_set = _Augmented(images[t], labels[t], max_shift=self.image_size // 8)
        else:
            self.train_set = subset(train_idx)
        self.val_set = subset(val_idx)
        self.test_set = subset(test_idx)

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup()
        return ResumableDataLoader(
            self.train_set,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            sampler=EpochRandomSampler(self.train_set),  # type: ignore[arg-type]
            num_workers=self.num_workers,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)  # type: ignore[arg-type]

    @override
    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)  # type: ignore[arg-type]
