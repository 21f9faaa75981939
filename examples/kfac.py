"""K-FAC preconditioning with distributed preconditioning (DP-KFAC) under 2-process DDP.

    python examples/kfac.py

Each Linear/Conv2d layer gets one owner process that builds its curvature factors, decomposes them and
broadcasts the preconditioned gradient; the optimizer (here SGD with momentum) then steps as usual.
"""

import lightning.pytorch as pl

from lightning_parallel.callbacks import DPKFAC, MetricsSummary
from lightning_parallel.data import DigitsDataModule
from lightning_parallel.models import ResNetClassifier


def main() -> None:
    pl.seed_everything(0)
    model = ResNetClassifier(widths=[16, 32, 64], optimizer="sgd", lr=0.05)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=4,
        callbacks=[DPKFAC(damping=1e-3, factor_update_steps=1, inv_update_steps=10, assignment="dp"), MetricsSummary()],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=64))


if __name__ == "__main__":
    main()
