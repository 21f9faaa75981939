"""Activation compression: memory saved, gradient fidelity, step time and accuracy.

For the ResNet on digits (32x32) and the GPT on the text corpus, trains uncompressed and then
with each codec setting, from the same seed for the same number of steps, and reports per run:

- ``compression_ratio``: raw / packed bytes over the unique storages autograd holds (mean over steps);
- ``peak_saved_bytes``: peak bytes of saved tensors alive at once (last step);
- ``grad_cosine``: cosine similarity between the compressed and the exact gradient of the whole
  model on the same batch, averaged over a few checkpoints of training (measured on a copy of
  the model, so that training itself is untouched);
- ``step_time_ratio``: median training-step time over the uncompressed run's, same process;
- ``step_cpu_time_ratio``: the same with the CPU time of the training thread (``time.thread_time``),
  which other processes on a shared machine disturb less (meaningful on CPU runs only);
- ``val_metric`` / ``baseline_val_metric``: validation accuracy (ResNet) or loss (GPT).

With a GPU the runs use it and also report ``peak_cuda_bytes`` (``torch.cuda.max_memory_allocated``).

    python benchmarks/activation_compression.py --quick --json results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_parallel.compression import SavedTensorCompressor
from lightning_parallel.data import DigitsDataModule, TextDataModule
from lightning_parallel.models import GPTLanguageModel, ResNetClassifier
from lightning_parallel.plugins import CompressedActivationPrecision


@dataclass
class _Probe(pl.Callback):
    """Times training steps, averages the compression ratio and measures gradient cosines."""

    plugin: CompressedActivationPrecision | None
    cosine_every: int
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    peak_saved: int = 0
    _t0: float = 0.0
    _c0: float = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.plugin is not None and batch_idx % self.cosine_every == 0:
            self.cosines.append(_grad_cosine(pl_module, batch, self.plugin))
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        self._c0 = time.thread_time()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.thread_time() - self._c0)
        if self.plugin is not None:
            self.ratios.append(self.plugin.last_stats.compression_ratio)
            self.peak_saved = self.plugin.last_stats.peak_saved_bytes


def _grads(model: Any, batch: Any, compressor: SavedTensorCompressor | None) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(1234)
    ctx = compressor if compressor is not None else torch.enable_grad()
    with ctx:
        loss = model.pipeline_loss(model(model.pipeline_input(batch)), batch)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _grad_cosine(module: Any, batch: Any, plugin: CompressedActivationPrecision) -> float:
    rng = torch.random.get_rng_state()  # the uncompressed run measures nothing: keep the same RNG stream
    try:
        return _grad_cosine_on_copy(module, batch, plugin)
    finally:
        torch.random.set_rng_state(rng)


def _grad_cosine_on_copy(module: Any, batch: Any, plugin: CompressedActivationPrecision) -> float:
    model = copy.deepcopy(module)  # BN statistics and gradients of the trained model stay untouched
    model.train()
    exact = _grads(model, batch, None)
    compressor = SavedTensorCompressor(
        plugin.compressor.codec,
        min_numel=plugin.compressor.min_numel,
        compress_masks=plugin.compressor.compress_masks,
        policy=plugin.controller,
    )
    compressor.exclude(model)
    got = _grads(model, batch, compressor)
    return float(F.cosine_similarity(got, exact, dim=0))


def _run(
    make: Callable[[], tuple[pl.LightningModule, pl.LightningDataModule]],
    plugin: CompressedActivationPrecision | None,
    steps: int,
    cosine_every: int,
    val_batches: int,
    metric: str,
    accelerator: str,
) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model, data = make()
    probe = _Probe(plugin, cosine_every)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        plugins=[plugin] if plugin is not None else None,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, data)
    peak_cuda = torch.cuda.max_memory_allocated() if accelerator == "gpu" else None
    val_trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=val_batches,
    )
    val = float(val_trainer.validate(model, data, verbose=False)[0][metric])
    times = probe.times[2:] or probe.times  # the first steps warm up allocators
    cpu_times = probe.cpu_times[2:] or probe.cpu_times
    return {
        "step_time": statistics.median(times),
        "step_cpu_time": statistics.median(cpu_times),
        "compression_ratio": statistics.mean(probe.ratios) if probe.ratios else 1.0,
        "peak_saved_bytes": probe.peak_saved,
        "grad_cosine": statistics.mean(probe.cosines) if probe.cosines else 1.0,
        "val_metric": val,
        "peak_cuda_bytes": peak_cuda,
    }


SETTINGS: dict[str, dict[str, Any]] = {
    "kbit-2": {"codec": "kbit", "bits": 2},
    "kbit-2-nomask": {"codec": "kbit", "bits": 2, "zero_mask": False},
    "kbit-4": {"codec": "kbit", "bits": 4},
    "eb-rel-1e-2": {"codec": "error_bounded", "error_bound": 1e-2},
    "eb-rel-1e-2-zstd": {"codec": "error_bounded", "error_bound": 1e-2, "lossless": "zstd"},
    "eb-adaptive-0.3": {
        "codec": "error_bounded",
        "adaptive": True,
        "target_error": 0.3,
        "adapt_interval": 25,
    },
    "eb-adaptive-0.5": {
        "codec": "error_bounded",
        "adaptive": True,
        "target_error": 0.5,
        "adapt_interval": 25,
    },
    "eb-adaptive-0.3-zstd": {
        "codec": "error_bounded",
        "adaptive": True,
        "target_error": 0.3,
        "adapt_interval": 25,
        "lossless": "zstd",
    },
    "eb-adaptive-0.5-zstd": {
        "codec": "error_bounded",
        "adaptive": True,
        "target_error": 0.5,
        "adapt_interval": 25,
        "lossless": "zstd",
    },
}
FULL = {
    "resnet": [
        "kbit-2",
        "kbit-2-nomask",
        "kbit-4",
        "eb-rel-1e-2",
        "eb-rel-1e-2-zstd",
        "eb-adaptive-0.3",
        "eb-adaptive-0.5",
        "eb-adaptive-0.3-zstd",
    ],
    "gpt": [
        "kbit-2",
        "kbit-4",
        "eb-rel-1e-2",
        "eb-rel-1e-2-zstd",
        "eb-adaptive-0.3",
        "eb-adaptive-0.3-zstd",
        "eb-adaptive-0.5-zstd",
    ],
}
QUICK = {"resnet": ["kbit-2", "eb-adaptive-0.3-zstd"], "gpt": ["eb-adaptive-0.3"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and settings (under two minutes)")
    parser.add_argument("--json", type=str, default=None, help="write the records to this path")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default 20 quick, 150)"
    )
    parser.add_argument(
        "--settings", nargs="+", default=None, choices=sorted(SETTINGS), help="only these settings"
    )
    parser.add_argument("--models", nargs="+", default=["resnet", "gpt"], choices=["resnet", "gpt"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    steps = args.steps or (20 if args.quick else 150)
    cosine_every = 10 if args.quick else 30
    val_batches: int | float = 3 if args.quick else 1.0
    models: dict[str, tuple[Callable[[], tuple[pl.LightningModule, pl.LightningDataModule]], str]] = {
        "resnet": (
            lambda: (ResNetClassifier(lr=3e-3), DigitsDataModule(batch_size=64, image_size=32)),
            "val_acc",
        ),
        "gpt": (
            lambda: (
                GPTLanguageModel(n_layer=2, n_head=4, n_embd=128),
                TextDataModule(block_size=64, batch_size=32, max_chars=200_000),
            ),
            "val_loss",
        ),
    }
    records: list[dict[str, Any]] = []
    header = f"{'model':7} {'codec':14} {'setting':18} {'ratio':>6} {'peak MB':>8} {'cos':>6} {'time x':>6} {'cpu x':>6} {'val':>7} {'base':>7}"
    print(header)
    for name in args.models:
        make, metric = models[name]
        base = _run(make, None, steps, cosine_every, val_batches, metric, accelerator)  # type: ignore[arg-type]
        for setting in args.settings or (QUICK if args.quick else FULL)[name]:
            kwargs = dict(SETTINGS[setting])
            plugin = CompressedActivationPrecision(**kwargs, log_stats=False)
            res = _run(make, plugin, steps, cosine_every, val_batches, metric, accelerator)  # type: ignore[arg-type]
            rec = {
                "model": name,
                "codec": kwargs["codec"],
                "setting": setting,
                "compression_ratio": round(res["compression_ratio"], 3),
                "peak_saved_bytes": res["peak_saved_bytes"],
                "grad_cosine": round(res["grad_cosine"], 4),
                "step_time_ratio": round(res["step_time"] / base["step_time"], 3),
                "step_cpu_time_ratio": round(res["step_cpu_time"] / base["step_cpu_time"], 3),
                "val_metric": round(res["val_metric"], 4),
                "baseline_val_metric": round(base["val_metric"], 4),
            }
            if accelerator == "gpu":
                rec["peak_cuda_bytes"] = res["peak_cuda_bytes"]
                rec["baseline_peak_cuda_bytes"] = base["peak_cuda_bytes"]
            records.append(rec)
            print(
                f"{name:7} {rec['codec']:14} {setting:18} {rec['compression_ratio']:6.2f} "
                f"{rec['peak_saved_bytes'] / 2**20:8.2f} {rec['grad_cosine']:6.3f} {rec['step_time_ratio']:6.2f} {rec['step_cpu_time_ratio']:6.2f} "
                f"{rec['val_metric']:7.4f} {rec['baseline_val_metric']:7.4f}",
                flush=True,
            )
        print(f"# {name}: uncompressed step {base['step_time'] * 1e3:.1f} ms, {steps} steps, {metric}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
