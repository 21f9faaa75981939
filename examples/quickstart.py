"""Train the example ResNet on scikit-learn's digits with plain DDP: the baseline every plugin plugs into.

    python examples/quickstart.py

Each other script in this folder changes one argument of this Trainer to add one technique.
"""

import lightning.pytorch as pl

from lightning_parallel.callbacks import MetricsSummary
from lightning_parallel.data import DigitsDataModule
from lightning_parallel.models import ResNetClassifier


def main() -> None:
    pl.seed_everything(0)
    model = ResNetClassifier(widths=[16, 32, 64], lr=3e-3, scheduler="cosine")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=6,
        callbacks=[MetricsSummary()],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    main()
