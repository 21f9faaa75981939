"""Compress the activations autograd saves for backward (2-bit per-group quantization with exact zero masks),
wrapped around quantization-aware training: Lightning takes one precision plugin, so ours nest.

    python examples/compressed_activations.py
"""

import lightning.pytorch as pl

from lightning_parallel.callbacks import MetricsSummary
from lightning_parallel.data import DigitsDataModule
from lightning_parallel.models import ResNetClassifier
from lightning_parallel.plugins import CompressedActivationPrecision, QuantizationPrecision


def main() -> None:
    pl.seed_everything(0)
    model = ResNetClassifier(widths=[16, 32, 64], lr=3e-3)
    qat = QuantizationPrecision(mode="qat-int8", ignore_modules=["blocks.0.0", "blocks.4"])
    precision = CompressedActivationPrecision(inner=qat, codec="kbit", bits=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        plugins=[precision],
        callbacks=[MetricsSummary()],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=64, image_size=32))


if __name__ == "__main__":
    main()
