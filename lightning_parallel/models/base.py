"""Shared base of the example models: training written in terms of the pipeline protocol.

Every example model is a classifier over the last block's output (images -> 10 classes, characters -> the
next character). The base class implements ``training_step``, ``validation_step`` and ``test_step`` through
:meth:`pipeline_input`, :meth:`pipeline_blocks` and :meth:`pipeline_loss`, so the same module trains on one
device, under DDP, or split into stages by a pipeline strategy.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

OptimizerName = Literal["sgd", "adam", "adamw"]
SchedulerName = Literal["none", "cosine"]
_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULERS = ("none", "cosine")


class PipelineClassifier(pl.LightningModule):
    """A classifier whose trunk is an ordered ``nn.Sequential`` of blocks (the pipeline protocol).

    Subclasses build ``self.blocks`` and may override :meth:`pipeline_input` and :meth:`_logits_and_targets`.

    Args:
        num_classes: number of classes of the last block's output.
        lr: learning rate.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``.
        weight_decay: L2 penalty passed to the optimizer. Default 0.
        momentum: SGD momentum. Default 0.9.
        scheduler: ``"none"`` or ``"cosine"`` (cosine decay over ``trainer.max_steps`` or the estimated steps).
    """

    blocks: nn.Sequential

    def __init__(
        self,
        *,
        num_classes: int,
        lr: float,
        optimizer: OptimizerName = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be at least 2.")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive, e.g. 1e-3.")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not one of {_OPTIMIZERS}.")
        if scheduler not in _SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not one of {_SCHEDULERS}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0.")
        self.num_classes = num_classes
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.scheduler_name = scheduler
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    # ----------------------------------------------------------------- pipeline protocol
    def pipeline_blocks(self) -> nn.Sequential:
        """The ordered blocks: the output of block i is the input of block i+1."""
        return self.blocks

    def pipeline_input(self, batch: Any) -> torch.Tensor:
        """The first block's input: the first element of the ``(inputs, targets)`` batch."""
        return batch[0]

    def pipeline_loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Cross-entropy of the last block's output, averaged over the batch's predictions."""
        logits, targets = self._logits_and_targets(output, batch)
        return F.cross_entropy(logits, targets)

    def pipeline_metrics(self, output: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        """Loss and accuracy of the last block's output (used by the strategies for validation)."""
        logits, targets = self._logits_and_targets(output, batch)
        return {
            "loss": F.cross_entropy(logits, targets),
            "acc": (logits.argmax(dim=-1) == targets).float().mean(),
        }

    def _logits_and_targets(self, output: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return output.reshape(-1, output.shape[-1]), batch[1].reshape(-1)

    # ----------------------------------------------------------------- Lightning hooks
    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        output = self(self.pipeline_input(batch))
        loss = self.pipeline_loss(output, batch)
        logits, targets = self._logits_and_targets(output.detach(), batch)
        self.train_acc(logits, targets)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: Any, split: str, metric: MulticlassAccuracy) -> torch.Tensor:
        output = self(self.pipeline_input(batch))
        loss = self.pipeline_loss(output, batch)
        logits, targets = self._logits_and_targets(output, batch)
        metric(logits, targets)
        self.log(f"{split}_loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}_acc", metric, prog_bar=True)
        return loss

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(self.pipeline_input(batch)).argmax(dim=-1)

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler_name == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
