"""Where a K-FAC step's time goes, by kind of step, for the options that make steps cheaper.

    python benchmarks/kfac_step_cost.py [--quick] [--json PATH]
    python benchmarks/kfac.py --parts step_cost [--quick]   (the same, as a part of kfac.py)

On the digits CNN (and the autoencoder) of ``kfac.py``, AdamW, SGD and several K-FAC settings on
SGD train side by side in one process, interleaved step by step (the same batches), so machine load
falls on all alike. Each step is timed from ``zero_grad`` to the end of ``optimizer.step`` and
filed by kind: ``plain`` (preconditioning only), ``factor`` (the hooks record and the factors are
updated) and ``decomposition`` (factors and decompositions). The record gives the median ms of
each kind, the mean over the run (what a run to target pays), and that mean over AdamW's. K-FAC's
own counters (CPU time) split it into factor building, decomposition and preconditioning.

Settings (factors every 5 steps, decompositions every 50, the CNN's time-to-target interval):
``full`` (the previous code's defaults), ``subsample2`` (``factor_subsample=2``, the previous
best), ``rank32`` (``factor_rank=32``: truncated eigenbases), ``rank32_subsample2``,
``rank32_subsample2_positions2`` (also ``position_subsample=2``) and ``rank32_stagger``
(``stagger_decompositions=True``: the same work, spread over the interval).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kfac import TASKS, digits, train_step
from kfac_time_to_target import cli

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner

FUS, IUS = 5, 50
SETTINGS: dict[str, dict[str, Any] | None] = {
    "adamw": None,
    "sgd": None,
    "full": {},
    "subsample2": {"factor_subsample": 2},
    "rank32": {"factor_rank": 32},
    "rank32_subsample2": {"factor_rank": 32, "factor_subsample": 2},
    "rank32_subsample2_positions2": {"factor_rank": 32, "factor_subsample": 2, "position_subsample": 2},
    "rank32_stagger": {"factor_rank": 32, "factor_subsample": 2, "stagger_decompositions": True},
}


def step_cost(quick: bool, tasks: tuple[str, ...] = ("cnn", "autoencoder")) -> list[dict[str, Any]]:
    steps = 300 if quick else 1000
    x, y = digits()
    rows = []
    for task in tasks:
        spec = TASKS[task]
        runs = {}
        for name, extra in SETTINGS.items():
            torch.manual_seed(0)
            model = spec["model"]()
            kfac = None
            if name == "adamw":
                optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
            else:
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if extra is not None:
                options = KFACOptions(damping=0.03, kl_clip=0.001, factor_update_steps=FUS, inv_update_steps=IUS, **extra)
                kfac = KFACPreconditioner(model, options)
                kfac.clock = time.process_time  # CPU time: the breakdown holds up on a loaded machine
            runs[name] = (model, optimizer, kfac, {"plain": [], "factor": [], "decomposition": []})
        b = spec["batch"]
        load = os.getloadavg()[0]
        for step in range(steps):
            idx = torch.arange(step * b, (step + 1) * b) % len(y)
            kind = "decomposition" if step % IUS == 0 else "factor" if step % FUS == 0 else "plain"
            for model, optimizer, kfac, times in runs.values():
                start = time.perf_counter()
                train_step(spec, model, optimizer, kfac, x[idx], y[idx])
                times[kind].append(time.perf_counter() - start)
        mean_adamw = statistics.fmean(t for ts in runs["adamw"][3].values() for t in ts)
        for name, (_, _, kfac, times) in runs.items():
            mean = statistics.fmean(t for ts in times.values() for t in ts)
            row: dict[str, Any] = {
                "task": task,
                "setting": name,
                "options": SETTINGS[name],
                "factor_update_steps": FUS,
                "inv_update_steps": IUS,
                "steps": steps,
                **{f"{kind}_ms": round(1e3 * statistics.median(ts), 3) for kind, ts in times.items()},
                "mean_ms_per_step": round(1e3 * mean, 3),
                "vs_adamw": round(mean / mean_adamw, 3),
                "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
            }
            if kfac is not None:
                metrics = kfac.metrics()
                for key in ("factor_seconds", "decomposition_seconds", "precondition_seconds"):
                    row[key.replace("_seconds", "_cpu_ms_per_step")] = round(1e3 * metrics[key] / steps, 3)
            rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        parts = "" if "factor_cpu_ms_per_step" not in r else (
            f" (CPU ms/step: factors {r['factor_cpu_ms_per_step']}, decompositions"
            f" {r['decomposition_cpu_ms_per_step']}, preconditioning {r['precondition_cpu_ms_per_step']})"
        )
        print(f"step_cost {r['task']:12s} {r['setting']:30s} plain {r['plain_ms']:.2f} factor {r['factor_ms']:.2f}"
              f" decomposition {r['decomposition_ms']:.2f} mean {r['mean_ms_per_step']:.2f} ms"
              f" ({r['vs_adamw']:.2f}x AdamW){parts}")


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__ or "", "step_cost", step_cost, print_rows, "cnn,autoencoder")


if __name__ == "__main__":
    main()
