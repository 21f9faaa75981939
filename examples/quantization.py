"""Quantization-aware training (int8 weights and activations, learned step sizes) with bitsandbytes' 8-bit
Adam, then export of real int8 weights. Needs the quant extra: pip install "lightning-parallel[quant]".

    python examples/quantization.py
"""

import lightning.pytorch as pl
import torch

from lightning_parallel.callbacks import MetricsSummary
from lightning_parallel.data import DigitsDataModule
from lightning_parallel.models import ResNetClassifier
from lightning_parallel.plugins import QuantizationPrecision
from lightning_parallel.quantization import export_quantized, weight_bytes


def main() -> None:
    pl.seed_everything(0)
    model = ResNetClassifier(widths=[16, 32, 64], lr=3e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        # The stem conv and the classifier stay in float, as is usual for QAT.
        plugins=[QuantizationPrecision(mode="qat-int8", optimizer="adam8bit", ignore_modules=["blocks.0.0", "blocks.4"])],
        callbacks=[MetricsSummary()],
        logger=False,
        enable_checkpointing=False,
    )
    data = DigitsDataModule(batch_size=64)
    trainer.fit(model, data)

    exported = export_quantized(model).eval()  # int8 codes + step sizes in place of the QAT layers
    stored, fp32 = weight_bytes(exported)
    x, _ = next(iter(data.val_dataloader()))
    with torch.no_grad():
        drift = (exported(x) - model.eval()(x)).abs().max().item()
    print(f"exported weights: {stored} bytes vs {fp32} in fp32 ({fp32 / stored:.2f}x smaller); max logit drift {drift:.2e}")


if __name__ == "__main__":
    main()
