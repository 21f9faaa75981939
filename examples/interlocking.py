"""Interlocking backprop (k = 2) on the digits ResNet: 4 stages on 4 CPU processes, each trained by the loss
one stage ahead, with auxiliary heads added by the strategy.

    python examples/interlocking.py
"""

import lightning.pytorch as pl

from lightning_parallel.data import DigitsDataModule
from lightning_parallel.models import ResNetClassifier
from lightning_parallel.strategies import InterlockingBackpropStrategy


def main() -> None:
    pl.seed_everything(0)
    model = ResNetClassifier(widths=[8, 16, 32, 64], norm="group", lr=3e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=InterlockingBackpropStrategy(k=2, stages=4, micro_batches=4),
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=64))


if __name__ == "__main__":
    main()
