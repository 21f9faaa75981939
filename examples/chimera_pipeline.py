"""Pipeline-parallel training of the example GPT with Chimera over 4 CPU processes.

    python examples/chimera_pipeline.py

The only change from a DDP run is the ``strategy`` argument: the module's ``pipeline_blocks()`` are split into
4 balanced stages, and two pipelines (down and up) run 8 micro-batches per step.
"""

import lightning.pytorch as pl

from lightning_parallel.data import TextDataModule
from lightning_parallel.models import GPTLanguageModel
from lightning_parallel.strategies import ChimeraStrategy


def main() -> None:
    pl.seed_everything(0)
    model = GPTLanguageModel(block_size=64, n_layer=4, n_head=4, n_embd=64, lr=3e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=ChimeraStrategy(stages=4, micro_batches=8, schedule="chimera"),
        max_steps=50,
        limit_val_batches=10,
        val_check_interval=25,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, TextDataModule(block_size=64, batch_size=32, max_chars=100_000))


if __name__ == "__main__":
    main()
