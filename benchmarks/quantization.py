"""Quantized training against fp32: accuracy, weight and optimizer-state bytes, step time.

Trains the ResNet on scikit-learn's digits and the character-level GPT on the text corpus with the same seed and
data order in each mode (``fp32``, ``qat-int8``, ``qat-int4``, ``adam8bit``), through a real ``Trainer`` with
:class:`~lightning_parallel.plugins.QuantizationPrecision`, and writes one record per model and mode::

    {"model", "mode", "val_metric", "baseline_val_metric", "weight_bytes", "optimizer_state_bytes",
     "step_time_ratio", ...}

``val_metric`` is the validation accuracy for the ResNet and the validation loss for the GPT (digits accuracy is
nearly saturated, so the GPT's loss is the discriminating measure); every record also has ``val_loss`` and
``val_acc``. ``weight_bytes`` counts the weights of the quantized layers (Linear/Conv2d outside
``ignore_modules``) as stored after :func:`~lightning_parallel.quantization.export_quantized` (codes plus float16
step sizes) and ``fp32_weight_bytes`` the same weights in float32; ``exported_val_metric`` is the exported model's
metric. ``step_time_ratio`` is the median training-step time over fp32's, measured in the same process;
``interleaved_step_time_ratio`` measures the same with the two models' steps alternating in one loop (plain
PyTorch, no Trainer), which cancels drift in machine load between runs.

    python benchmarks/quantization.py --quick --json quantization.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_parallel.data import DigitsDataModule, TextDataModule
from lightning_parallel.models import GPTLanguageModel, ResNetClassifier
from lightning_parallel.plugins import QuantizationPrecision
from lightning_parallel.quantization import export_quantized, weight_bytes
from lightning_parallel.quantization.bnb import optimizer_state_bytes

MODES = ("fp32", "qat-int8", "qat-int4", "adam8bit")


class StepTimer(pl.Callback):
    """Wall time of each training step (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)


def _setups(quick: bool) -> list[dict[str, Any]]:
    return [
        {
            "name": "resnet-digits",
            "model": lambda: ResNetClassifier(widths=(16, 32, 64), lr=3e-3, optimizer="adam"),
            "data": lambda: DigitsDataModule(batch_size=64, image_size=8),
            "ignore": ["blocks.0.0", "blocks.4"],  # first conv and the classifier stay in float
            "steps": 100 if quick else 400,
            "metric": "val_acc",
        },
        {
            "name": "gpt-text",
            "model": lambda: GPTLanguageModel(block_size=32, n_layer=2, n_head=4, n_embd=128, lr=3e-3),
            "data": lambda: TextDataModule(block_size=32, batch_size=16, max_chars=200_000),
            "ignore": [],
            "steps": 120 if quick else 600,
            "metric": "val_loss",
        },
    ]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, max_batches: int) -> dict[str, float]:
    """Mean validation loss and accuracy of ``model`` (a pipeline-protocol classifier) over ``loader``."""
    model.eval()
    losses, accs = [], []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        metrics = model.pipeline_metrics(model(model.pipeline_input(batch)), batch)  # type: ignore[operator]
        losses.append(float(metrics["loss"]))
        accs.append(float(metrics["acc"]))
    return {"val_loss": statistics.fmean(losses), "val_acc": statistics.fmean(accs)}


def run(setup: dict[str, Any], mode: str, seed: int, val_batches: int) -> dict[str, Any]:
    """Train one model in one mode; return its measurements."""
    pl.seed_everything(seed, verbose=False)
    model = setup["model"]()
    data = setup["data"]()
    plugins: list[Any] = []
    if mode.startswith("qat"):
        plugins = [QuantizationPrecision(mode, ignore_modules=setup["ignore"])]  # type: ignore[arg-type]
    elif mode == "adam8bit":
        plugins = [QuantizationPrecision(None, optimizer="adam8bit")]
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=setup["steps"],
        plugins=plugins,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    loader = data.val_dataloader()
    record: dict[str, Any] = {"model": setup["name"], "mode": mode, "steps": setup["steps"]}
    record.update(evaluate(model, loader, val_batches))
    record["val_metric"] = record[setup["metric"]]
    record["optimizer_state_bytes"] = optimizer_state_bytes(trainer.optimizers[0])
    warm = timer.times[len(timer.times) // 5 :]  # drop the first fifth (allocator and thread-pool warm-up)
    record["step_time_s"] = statistics.median(warm)
    if mode.startswith("qat"):
        exported = export_quantized(model, inplace=True)
        stored, full = weight_bytes(exported)
        record["weight_bytes"], record["fp32_weight_bytes"] = stored, full
        record["exported_val_metric"] = evaluate(exported, loader, val_batches)[setup["metric"]]
    else:
        qat_like = QuantizationPrecision("qat-int8", ignore_modules=setup["ignore"])
        layers = qat_like.convert_module(setup["model"]())  # same layer selection, to count their fp32 bytes
        _, full = weight_bytes(export_quantized(layers, inplace=True))
        record["weight_bytes"], record["fp32_weight_bytes"] = full, full
    return record


def interleaved_step_ratio(setup: dict[str, Any], mode: str, seed: int, repeats: int) -> float:
    """Median step time of the quantized model over the fp32 model's, alternating steps in one loop.

    Trainer runs happen one after the other, so a change in machine load between them shows up in their
    ratio; alternating single steps of the two models cancels that drift.
    """
    pl.seed_everything(seed, verbose=False)
    data = setup["data"]()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    models = []
    for m in ("fp32", mode):
        pl.seed_everything(seed, verbose=False)
        model = setup["model"]()
        if m.startswith("qat"):
            QuantizationPrecision(m, ignore_modules=setup["ignore"]).convert_module(model)  # type: ignore[arg-type]
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if m == "adam8bit":
            from lightning_parallel.quantization import to_8bit_optimizer

            opt = to_8bit_optimizer(opt)
        models.append((model, opt))
    times: list[list[float]] = [[], []]
    for i in range(repeats):
        for j, (model, opt) in enumerate(models):
            start = time.perf_counter()
            loss = model.pipeline_loss(model(model.pipeline_input(batch)), batch)  # type: ignore[operator]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= repeats // 5:
                times[j].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (under two minutes)")
    parser.add_argument("--json", type=str, default=None, help="write the records to this path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives steadier timings)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--models", nargs="+", default=["resnet-digits", "gpt-text"], choices=["resnet-digits", "gpt-text"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    records: list[dict[str, Any]] = []
    if "fp32" not in args.modes:
        args.modes.insert(0, "fp32")  # the anchor of every ratio
    for setup in [s for s in _setups(args.quick) if s["name"] in args.models]:
        val_batches = 10 if args.quick else 60
        results = {mode: run(setup, mode, args.seed, val_batches) for mode in args.modes}
        base = results.get("fp32")
        for mode, rec in results.items():
            if base is not None:
                rec["baseline_val_metric"] = base["val_metric"]
                rec["baseline_val_loss"] = base["val_loss"]
                rec["step_time_ratio"] = rec["step_time_s"] / base["step_time_s"]
                rec["weight_size_ratio"] = rec["fp32_weight_bytes"] / rec["weight_bytes"]
                rec["optimizer_state_ratio"] = base["optimizer_state_bytes"] / max(
                    rec["optimizer_state_bytes"], 1
                )
            if mode != "fp32":
                rec["interleaved_step_time_ratio"] = interleaved_step_ratio(
                    setup, mode, args.seed, 25 if args.quick else 60
                )
            records.append(rec)

    header = (
        f"{'model':<14}{'mode':<10}{'val_metric':>11}{'fp32':>9}{'val_loss':>10}{'weight KB':>11}{'w ratio':>9}"
        f"{'opt KB':>9}{'opt ratio':>10}{'step ms':>9}{'t ratio':>9}{'t alt':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        print(
            f"{r['model']:<14}{r['mode']:<10}{r['val_metric']:>11.4f}{r.get('baseline_val_metric', math.nan):>9.4f}"
            f"{r['val_loss']:>10.4f}{r['weight_bytes'] / 1024:>11.1f}{r.get('weight_size_ratio', math.nan):>9.2f}"
            f"{r['optimizer_state_bytes'] / 1024:>9.1f}{r.get('optimizer_state_ratio', math.nan):>10.2f}"
            f"{r['step_time_s'] * 1e3:>9.1f}{r.get('step_time_ratio', math.nan):>9.2f}"
            f"{r.get('interleaved_step_time_ratio', math.nan):>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
