"""DPKFAC (categorical Fisher) + AdamW against plain AdamW on a small random Hugging Face GPT-2.

``HFGPT2LanguageModel`` (E=64, 2 layers, 4 heads, 64 characters of context, random init) on the standard
library text (``TextDataModule``, batch 32), one CPU process and one thread, the same seed and data order for
both runs. Validation loss (20 batches) every 50 steps; training wall-clock excludes validation. Reports the
validation loss at equal steps (the last step) and at equal wall-clock (DPKFAC's loss, interpolated between
its validation points, at the time AdamW needed for all its steps).

    python benchmarks/kfac_hf_gpt2.py --steps 300 --seeds 0,1,2 --json kfac_hf_gpt2.json
    python benchmarks/kfac_hf_gpt2.py --quick   # 100 steps, one seed
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_parallel.callbacks import DPKFAC
from lightning_parallel.data import TextDataModule
from lightning_parallel.models import HFGPT2LanguageModel


class _Clock(pl.Callback):
    """Validation losses with the training seconds before each (validation time left out)."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []
        self.start = self.validating = 0.0
        self.paused = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validating = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        seconds = self.validating - self.start - self.paused
        self.paused += now - self.validating
        loss = float(trainer.callback_metrics["val_loss"])
        self.points.append({"step": trainer.global_step, "val_loss": loss, "train_seconds": round(seconds, 2)})


def run(kind: str, seed: int, steps: int) -> list[dict[str, float]]:
    pl.seed_everything(seed, verbose=False)
    torch.set_num_threads(1)
    model = HFGPT2LanguageModel(block_size=64, n_embd=64, n_layer=2, n_head=4, lr=3e-3)
    clock = _Clock()
    callbacks: list[pl.Callback] = [clock]
    if kind == "dpkfac":
        callbacks.append(
            DPKFAC(damping=0.003, kl_clip=0.001, factor_update_steps=1, inv_update_steps=10, fisher="categorical")
        )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, val_check_interval=50, check_val_every_n_epoch=None,
        limit_val_batches=20, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, TextDataModule(block_size=64, batch_size=32))
    return clock.points


def loss_at(curve: list[dict[str, float]], seconds: float) -> float:
    """The validation loss at ``seconds`` of training, linear between validation points (last one beyond)."""
    previous = None
    for point in curve:
        if seconds <= point["train_seconds"]:
            if previous is None:
                return point["val_loss"]
            span = point["train_seconds"] - previous["train_seconds"]
            w = (seconds - previous["train_seconds"]) / span
            return previous["val_loss"] + w * (point["val_loss"] - previous["val_loss"])
        previous = point
    return curve[-1]["val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="100 steps, seed 0")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    steps, seeds = (100, [0]) if args.quick else (args.steps, [int(s) for s in args.seeds.split(",")])
    records: list[dict[str, Any]] = []
    for seed in seeds:
        adamw, dpkfac = run("adamw", seed, steps), run("dpkfac", seed, steps)
        budget = adamw[-1]["train_seconds"]
        record = {
            "seed": seed,
            "steps": steps,
            "adamw_val_loss": adamw[-1]["val_loss"],
            "dpkfac_val_loss": dpkfac[-1]["val_loss"],
            "adamw_seconds": budget,
            "dpkfac_seconds": dpkfac[-1]["train_seconds"],
            "dpkfac_val_loss_at_adamw_time": round(loss_at(dpkfac, budget), 4),
            "adamw_curve": adamw,
            "dpkfac_curve": dpkfac,
        }
        records.append(record)
        print(
            f"seed {seed}: val loss at {steps} steps AdamW {record['adamw_val_loss']:.3f}, DPKFAC "
            f"{record['dpkfac_val_loss']:.3f}; at AdamW's {budget:.0f} s DPKFAC {record['dpkfac_val_loss_at_adamw_time']:.3f}"
            f" (DPKFAC took {record['dpkfac_seconds']:.0f} s)",
            flush=True,
        )
    for key in ("adamw_val_loss", "dpkfac_val_loss", "dpkfac_val_loss_at_adamw_time"):
        values = [r[key] for r in records]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: mean {statistics.mean(values):.3f} +- {spread:.3f} over {len(values)} seeds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
