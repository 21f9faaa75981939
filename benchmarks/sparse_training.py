"""Sparse-training benchmark: accuracy of SET/RigL against dense and Lightning's ModelPruning on digits, and the
memory and step time of truly sparse execution on wide MLPs.

    python benchmarks/sparse_training.py [--quick] [--json PATH]

(a) ``accuracy``: ``MLPClassifier`` (64-256-256-10) and, without ``--quick``, ``ResNetClassifier`` (16-32-64) on
    scikit-learn's digits through the Lightning ``Trainer``: dense, ``SparseTraining`` RigL and SET (masked, ERK,
    ``update_interval`` 25, ``stop_at`` 0.75) and ``ModelPruning`` (global L1 magnitude pruning of every Linear/Conv2d
    weight, the same per-epoch amount of the remaining weights over the first half of the epochs so that the final
    sparsity matches,
    ``use_lottery_ticket_hypothesis=False``), at 80% and 90% sparsity, mean over seeds 0-2 of the final
    validation accuracy (MLP: 30 epochs; ``--quick``: 6 epochs, 90% only). rigl-torch is reported, not run (see
    ``RIGL_TORCH``).

``--quick`` (about a minute on an idle core) keeps every part and every record kind at a smaller size; the
figures in ``benchmarks/RESULTS.md`` that meet the issue's targets come from the full settings.
(b) ``memory``: a 64-W-W-W-10 ReLU MLP, batch 128, SGD with momentum 0.9 (SET's reference optimiser), every layer at
    the same density: weight bytes (parameters and buffers: masks, sparse index structures), optimizer-state bytes
    and the median step time (forward, backward, step and, masked, the mask work) of ``dense``, ``masked`` and
    ``sparse`` at the same width; then ``sparse`` alone at widths whose dense form does not fit in this machine's
    memory: their dense bytes are computed from the masked run's measured bytes per weight, never allocated.
(c) ``neurons``: the digits MLP (64-512-512-10) with ``SparseTraining("set", sparsity=0.5)`` with and without neuron
    importance pruning (``prune_neurons`` 0.3 every 5 epochs after epoch 10, 33 epochs; ``--quick``: every 2
    epochs after epoch 2, 7 epochs), mean over seeds 0-2:
    validation accuracy, neurons removed, parameters, and the step time of the trained model (median of timed
    forward+backward+step passes at batch 256, shrunk and unshrunk stepped alternately).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_parallel.sparse import SparseEngine, SparseLinear

RIGL_TORCH = (
    "rigl-torch 0.5.2 (PyPI, Nov 2020) declares no dependencies in its wheel, so `pip install --no-deps rigl-torch` "
    "succeeds on torch 2.13, but `import rigl_torch` fails: rigl_torch/util.py imports torchvision (for isinstance "
    "checks on torchvision's ResNet blocks), which this project does not install; not run."
)
GIB = 1 << 30


# ------------------------------------------------------------------------------------------------ (a) accuracy
def _model(name: str, seed: int) -> Any:
    from lightning_parallel.models import MLPClassifier, ResNetClassifier

    torch.manual_seed(seed)
    if name == "mlp":
        return MLPClassifier(hidden=(256, 256), lr=2e-3)
    return ResNetClassifier(widths=(16, 32, 64), lr=2e-3)


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return 1.0 - sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def accuracy_run(model_name: str, method: str, sparsity: float, seed: int, epochs: int) -> dict[str, float]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelPruning

    from lightning_parallel.callbacks import SparseTraining
    from lightning_parallel.data import DigitsDataModule

    pl.seed_everything(seed, verbose=False)
    model = _model(model_name, seed)
    callbacks: list[Any] = []
    if method in ("rigl", "set"):
        callbacks.append(SparseTraining(method, sparsity=sparsity, update_interval=25, stop_at=0.75, seed=seed))
    elif method == "pruning":
        prune_epochs = max(1, epochs // 2)
        per_epoch = 1.0 - (1.0 - sparsity) ** (1.0 / prune_epochs)
        callbacks.append(ModelPruning(
            "l1_unstructured", amount=lambda epoch: per_epoch if epoch < prune_epochs else 0.0,
            parameters_to_prune=[(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))],
            use_global_unstructured=True, use_lottery_ticket_hypothesis=False, make_pruning_permanent=True, verbose=0,
        ))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )
    data = DigitsDataModule(batch_size=64)
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    metrics = trainer.validate(model, data, verbose=False)[0]
    return {"val_metric": float(metrics["val_acc"]), "measured_sparsity": _sparsity(model), "seconds": seconds}


def accuracy(quick: bool, models: list[str] | None = None, sparsities: list[float] | None = None) -> list[dict[str, Any]]:
    models = models or (["mlp"] if quick else ["mlp", "resnet"])
    sparsities = sparsities or ([0.9] if quick else [0.8, 0.9])
    epochs = {"mlp": 6 if quick else 30, "resnet": 15}
    seeds = [0, 1, 2]
    records = []
    for model_name in models:
        dense = [accuracy_run(model_name, "dense", 0.0, s, epochs[model_name]) for s in seeds]
        dense_mean = statistics.mean(r["val_metric"] for r in dense)
        records.append(_accuracy_record(model_name, "dense", 0.0, dense, dense_mean))
        for sparsity in sparsities:
            for method in ("rigl", "set", "pruning"):
                runs = [accuracy_run(model_name, method, sparsity, s, epochs[model_name]) for s in seeds]
                records.append(_accuracy_record(model_name, method, sparsity, runs, dense_mean))
                print(_line(records[-1]), flush=True)
    return records


def _accuracy_record(model: str, method: str, sparsity: float, runs: list[dict[str, float]], dense: float) -> dict[str, Any]:
    values = [r["val_metric"] for r in runs]
    return {
        "benchmark": "accuracy", "model": f"{model}-digits", "method": method,
        "execution": "dense" if method in ("dense", "pruning") else "masked", "sparsity": sparsity,
        "val_metric": statistics.mean(values), "val_metric_seeds": values,
        "val_metric_std": statistics.stdev(values) if len(values) > 1 else 0.0, "dense_val_metric": dense,
        "measured_sparsity": statistics.mean(r["measured_sparsity"] for r in runs),
        "weight_bytes": None, "optimizer_state_bytes": None,
        "step_time_ratio": None, "train_seconds": statistics.mean(r["seconds"] for r in runs),
    }


# ------------------------------------------------------------------------------------------------- (b) memory
def _wide_mlp(width: int, execution: str, density: float, seed: int) -> tuple[nn.Module, SparseEngine | None]:
    widths = [64, width, width, width, 10]
    gen = torch.Generator().manual_seed(seed)
    if execution == "sparse":  # built sparse: the dense form of the widest ones does not fit in memory
        layers = [SparseLinear.random(a, b, density, generator=gen) for a, b in pairwise(widths)]
    else:
        torch.manual_seed(seed)
        layers = [nn.Linear(a, b) for a, b in pairwise(widths)]
    body: list[nn.Module] = []
    for layer in layers:
        body += [layer, nn.ReLU()]
    model = nn.Sequential(*body[:-1])
    engine = None
    if execution != "dense":
        engine = SparseEngine(model, method="set", sparsity=1.0 - density, distribution="uniform", seed=seed)
    return model, engine


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_run(width: int, execution: str, density: float, steps: int, seed: int = 0) -> dict[str, Any]:
    model, engine = _wide_mlp(width, execution, density, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps + 1):  # the first step (allocating the momentum buffers) is not timed
        x, y = torch.randn(128, 64, generator=gen), torch.randint(0, 10, (128,), generator=gen)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        if engine is not None:
            engine.mask_gradients()
        opt.step()
        if engine is not None:
            engine.apply_masks()
        times.append(time.perf_counter() - start)
    dense_weights = sum(a * b for a, b in zip([64, width, width, width], [width, width, width, 10]))
    weight_bytes = _bytes(model.parameters()) + _bytes(model.buffers())
    if engine is not None:
        weight_bytes += _bytes(engine.masks.values())
    state = _bytes(s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor))
    return {
        "benchmark": "memory", "model": f"mlp-64-3x{width}-10", "method": "set" if engine else "dense",
        "execution": execution, "sparsity": 1.0 - density if execution != "dense" else 0.0,
        "val_metric": None, "dense_val_metric": None, "weight_bytes": weight_bytes,
        "optimizer_state_bytes": state, "grad_bytes": _bytes(p.grad for p in model.parameters() if p.grad is not None),
        "step_time_s": statistics.median(times[1:]), "dense_weights": dense_weights,
        "nnz": sum(engine.nnz().values()) if engine else dense_weights,
    }


def memory(quick: bool) -> list[dict[str, Any]]:
    width = 2000 if quick else 6000
    steps = 3 if quick else 5
    records = []
    for density in (0.01, 0.001):
        group = {e: memory_run(width, e, density, steps) for e in ("dense", "masked", "sparse")}
        for rec in group.values():
            rec["step_time_ratio"] = rec["step_time_s"] / group["dense"]["step_time_s"]
            rec["step_time_vs_masked"] = rec["step_time_s"] / group["masked"]["step_time_s"]
            total = rec["weight_bytes"] + rec["optimizer_state_bytes"]
            masked = group["masked"]["weight_bytes"] + group["masked"]["optimizer_state_bytes"]
            rec["memory_vs_masked"] = masked / total
            records.append(rec)
            print(_line(rec), flush=True)
    masked = next(r for r in records if r["execution"] == "masked")
    per_weight = (masked["weight_bytes"] + masked["optimizer_state_bytes"] + masked["grad_bytes"]) / masked["dense_weights"]
    big_widths = [] if quick else [20000, 50000]
    for big in big_widths:
        for density in (0.01, 0.001) if big == 20000 else (0.001,):
            rec = memory_run(big, "sparse", density, 1 if big > 20000 else steps)
            rec["masked_bytes_computed"] = per_weight * rec["dense_weights"]
            rec["masked_gib_computed"] = rec["masked_bytes_computed"] / GIB
            rec["sparse_gib_measured"] = (rec["weight_bytes"] + rec["optimizer_state_bytes"] + rec["grad_bytes"]) / GIB
            rec["step_time_ratio"] = None
            records.append(rec)
            print(_line(rec), flush=True)
    return records


# ------------------------------------------------------------------------------------------------ (c) neurons
def _time_steps(models: list[nn.Module], steps: int = 12) -> list[float]:
    """Median step time of each model, the models stepped alternately (so machine load hits all alike)."""
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in models]
    x, y = torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(steps):
        for model, opt, record in zip(models, opts, times):
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            record.append(time.perf_counter() - start)
    return [statistics.median(t[2:]) for t in times]


def neurons_run(
    prune: float, seed: int, epochs: int, every: int = 5, after: int = 10
) -> tuple[dict[str, Any], nn.Module]:
    import lightning.pytorch as pl

    from lightning_parallel.callbacks import SparseTraining
    from lightning_parallel.data import DigitsDataModule
    from lightning_parallel.models import MLPClassifier

    pl.seed_everything(seed, verbose=False)
    model = MLPClassifier(hidden=(512, 512), lr=2e-3)
    callback = SparseTraining(
        "set", sparsity=0.5, distribution="uniform", update_interval=25, seed=seed, prune_neurons=prune,
        prune_neurons_every=every, prune_neurons_after=after,
    )
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], num_sanity_val_steps=0,
    )
    data = DigitsDataModule(batch_size=64)
    trainer.fit(model, data)
    acc = float(trainer.validate(model, data, verbose=False)[0]["val_acc"])
    params = sum(p.numel() for p in model.parameters())
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    return {"val_metric": acc, "params": params, "neurons_removed": sum(callback.neurons_removed.values()),
            "hidden_widths": widths}, model


def neurons(quick: bool) -> list[dict[str, Any]]:
    # prunings at the ends of epochs 15, 20, 25, 30 (full) / 4, 6 (quick), then epochs to recover
    epochs, every, after = (7, 2, 2) if quick else (33, 5, 10)
    records = []
    seeds = [0, 1, 2]
    base = [neurons_run(0.0, s, epochs) for s in seeds]
    pruned = [neurons_run(0.3, s, epochs, every, after) for s in seeds]
    pairs = [_time_steps([p[1], b[1]]) for p, b in zip(pruned, base)]
    ratio = statistics.median(t_pruned / t_base for t_pruned, t_base in pairs)
    dense_metric = statistics.mean(r[0]["val_metric"] for r in base)
    for label, runs in (("set", base), ("set+neuron-pruning", pruned)):
        records.append({
            "benchmark": "neurons", "model": "mlp-64-2x512-10-digits", "method": label, "execution": "masked",
            "sparsity": 0.5, "val_metric": statistics.mean(r[0]["val_metric"] for r in runs),
            "val_metric_seeds": [r[0]["val_metric"] for r in runs], "dense_val_metric": dense_metric,
            "params": statistics.mean(r[0]["params"] for r in runs),
            "neurons_removed": statistics.mean(r[0]["neurons_removed"] for r in runs),
            "hidden_widths": runs[0][0]["hidden_widths"], "weight_bytes": None, "optimizer_state_bytes": None,
            "step_time_ratio": ratio if label != "set" else 1.0,
        })
        print(_line(records[-1]), flush=True)
    return records


def _line(rec: dict[str, Any]) -> str:
    keys = ("model", "method", "execution", "sparsity", "val_metric", "dense_val_metric", "weight_bytes",
            "optimizer_state_bytes", "step_time_s", "step_time_ratio", "step_time_vs_masked", "memory_vs_masked",
            "masked_gib_computed", "sparse_gib_measured", "neurons_removed", "params", "hidden_widths")
    return "  ".join(f"{k}={rec[k]:.4g}" if isinstance(rec.get(k), float) else f"{k}={rec.get(k)}" for k in keys
                     if k in rec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true",
        help="MLP at 90%% for 6 epochs, width 2000, no wide sparse-only runs, neuron pruning over 7 epochs",
    )
    parser.add_argument("--json", type=str, default=None, help="write the records to this path")
    parts = ["memory", "accuracy", "neurons"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=None, choices=["mlp", "resnet"], help="accuracy models")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None, help="accuracy sparsities")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(RIGL_TORCH)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    if "memory" in args.parts:
        records += memory(args.quick)
    if "accuracy" in args.parts:
        records += accuracy(args.quick, args.models, args.sparsities)
    if "neurons" in args.parts:
        records += neurons(args.quick)
    seconds = time.perf_counter() - start
    print(f"wall time {seconds:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rigl_torch": RIGL_TORCH, "wall_seconds": seconds, "records": records}, indent=1)
        )


if __name__ == "__main__":
    main()
