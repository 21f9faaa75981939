"""LightningModules written the way users write them: no pipeline protocol hooks.

Used by the adapter tests and by the "lines of user code" count in benchmarks/RESULTS.md. Each trains on one
device as it is; the pipeline strategies reach them only through their adapter options.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Plain(pl.LightningModule):
    """``training_step`` = cross-entropy of ``self(x)``; SGD with momentum."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SequentialCNN(_Plain):
    """A small CNN that is one ``nn.Sequential`` (``self.net``): 3x8x8 images -> 4 classes."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class EncoderClassifier(_Plain):
    """Token classifier around torch's ``nn.TransformerEncoder``: embed -> encoder -> pool -> head."""

    def __init__(self, vocab: int = 32, width: int = 16, layers: int = 4, classes: int = 4, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def pool(self, h: Tensor) -> Tensor:
        return h.mean(dim=1)  # (B, T, C) -> (B, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.encoder(self.embed(x))))  # type: ignore[no-any-return]


def cnn_data(size: int, seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g))


def token_data(size: int, seq: int = 8, vocab: int = 32, seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randint(0, vocab, (size, seq), generator=g), torch.randint(0, 4, (size,), generator=g)
    )
