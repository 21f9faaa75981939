"""2-D toy densities for continuous normalising flows: samples from a fixed generator, no download.

``moons``: two interleaved half circles with Gaussian noise; ``gaussians``: eight Gaussians on a circle.
A batch is ``(x,)`` with ``x`` of shape ``(B, 2)``; validation draws its own samples (another seed).
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_parallel.data.validation import check_batch_size

DENSITIES = ("moons", "gaussians")


def sample_toy2d(density: str, num_samples: int, seed: int) -> torch.Tensor:
    """``(num_samples, 2)`` points of the named density, standardised to roughly unit scale."""
    g = torch.Generator().manual_seed(seed)
    if density == "moons":
        angle = torch.rand(num_samples, generator=g) * math.pi
        upper = torch.rand(num_samples, generator=g) < 0.5
        x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        points = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
        return points + 0.1 * torch.randn(num_samples, 2, generator=g)
    centre = torch.randint(0, 8, (num_samples,), generator=g).float() * (2 * math.pi / 8)
    points = 2.0 * torch.stack([torch.cos(centre), torch.sin(centre)], dim=1)
    return points + 0.2 * torch.randn(num_samples, 2, generator=g)


class Toy2DDataModule(pl.LightningDataModule):
    """Samples of a 2-D toy density.

    Args:
        density: ``"moons"`` (default) or ``"gaussians"``.
        num_samples: training points; validation gets a quarter as many. Default 4,096.
        batch_size: points per batch. Default 256.
        seed: seed of the training points (validation uses ``seed + 1``). Default 0.
    """

    def __init__(
        self,
        density: Literal["moons", "gaussians"] = "moons",
        num_samples: int = 4096,
        batch_size: int = 256,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if density not in DENSITIES:
            raise ValueError(f"density={density!r} is not one of {DENSITIES}.")
        if num_samples < 4:
            raise ValueError(f"num_samples={num_samples} must be at least 4.")
        check_batch_size(batch_size, num_samples, "training")
        self.density, self.num_samples, self.batch_size, self.seed = density, num_samples, batch_size, seed

    @override
    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(sample_toy2d(self.density, self.num_samples, self.seed))
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        data = TensorDataset(sample_toy2d(self.density, max(self.num_samples // 4, 1), self.seed + 1))
        return DataLoader(data, batch_size=self.batch_size)
