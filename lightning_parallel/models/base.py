"""Shared base of the example models: training written in terms of the pipeline protocol.

Every example model is a classifier over the last block's output (images -> 10 classes, characters -> the
next character). The base class implements ``training_step``, ``validation_step`` and ``test_step`` through
:meth:`pipeline_input`, :meth:`pipeline_blocks` and :meth:`pipeline_loss`, so the same module trains on one
device, under DDP, or split into stages by a pipeline strategy.

Initial weights do not depend on the layout: block i is initialised by :meth:`pipeline_init_weights` from a
random stream seeded by ``(init_seed, i)`` alone, so one device, DDP and a pipeline whose ranks each
materialise only their own blocks (on the meta device until then) start from the same weights. With
``build_in_configure_model=True`` the blocks are built in :meth:`configure_model`, inside the strategy's
initialisation context (the meta device for stage-local pipeline strategies), not in ``__init__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
_SEED_MODULUS = 2**31 - 1


def block_seed(init_seed: int, index: int) -> int:
    """The seed of block ``index``'s initial weights: a function of ``(init_seed, index)`` alone."""
    # A multiplier coprime to the modulus keeps neighbouring blocks' seeds far apart.
    return (int(init_seed) * 1_000_003 + 7_919 * (int(index) + 1)) % _SEED_MODULUS


@contextmanager
def seeded_random(seed: int, devices: list[torch.device] | None = None) -> Iterator[None]:
    """Run the body with torch's random streams (CPU and the given CUDA devices) seeded by ``seed``, then
    put the streams back as they were: the caller's random numbers do not change."""
    cuda = [d for d in devices or [] if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


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
        init_seed: seed of the initial weights (block i uses ``block_seed(init_seed, i)``). ``None``
            (default) draws it from torch's random stream, so ``seed_everything(s)`` fixes it.
        build_in_configure_model: build the blocks in :meth:`configure_model` (under the strategy's
            initialisation context, e.g. on the meta device) instead of in ``__init__``. Default False.
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
        init_seed: int | None = None,
        build_in_configure_model: bool = False,
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
        if init_seed is None:
            # On the CPU explicitly: under a meta-device context a default tensor would have no value.
            init_seed = int(torch.randint(0, _SEED_MODULUS, (), device="cpu"))
        self.init_seed = int(init_seed)
        self.build_in_configure_model = build_in_configure_model

    # ----------------------------------------------------------------- building and initial weights
    def build_blocks(self) -> nn.Sequential:
        """The model's blocks, freshly constructed (their values are set by :meth:`init_block`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_blocks().")

    def init_block(self, index: int, block: nn.Module) -> None:
        """Set block ``index``'s initial values in place from torch's (already seeded) random stream.

        The default calls ``reset_parameters()`` of every submodule that has one, in ``modules()`` order.
        """
        for module in block.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()

    def pipeline_init_weights(self, index: int, block: nn.Module) -> None:
        """Initialise block ``index`` in place from a random stream seeded by ``(init_seed, index)`` only.

        Pipeline strategies call this for each block a rank materialises, so initial weights do not depend
        on which other blocks the rank holds. The caller's random stream is left unchanged.
        """
        devices = sorted({t.device for t in [*block.parameters(), *block.buffers()]}, key=str)
        with seeded_random(block_seed(self.init_seed, index), devices):
            self.init_block(index, block)

    def reset_pipeline_weights(self) -> None:
        """Initialise every block with :meth:`pipeline_init_weights`."""
        for index, block in enumerate(self.blocks):
            self.pipeline_init_weights(index, block)

    def _build_unless_deferred(self) -> None:
        # Subclasses call this at the end of __init__, once build_blocks has what it needs.
        if not self.build_in_configure_model:
            self.configure_model()

    @override
    def configure_model(self) -> None:
        """Build and initialise the blocks, once (later calls do nothing)."""
        if "blocks" in self._modules:
            return
        self.blocks = self.build_blocks()
        self.reset_pipeline_weights()

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
