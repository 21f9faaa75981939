"""DP-KFAC benchmark: convergence against tuned SGD/Adam, dp vs replicated at 2 and 4 gloo workers,
and per-step overhead.

    python benchmarks/kfac.py [--quick] [--json PATH]

(a) ``convergence``: steps (median over seeds) to a training target on two digits tasks, every
    optimizer with its learning rate tuned over a small grid in the same run: ``autoencoder``
    (64-128-64-32-16-32-64-128-64 tanh, MSE, batch 128, full-train MSE <= 0.0125) and ``cnn``
    (small CNN, batch 64, full-train cross-entropy <= 0.05). K-FAC runs on top of SGD with momentum,
    as ``kfac`` (the sampled Fisher of the task's likelihood: Gaussian for the autoencoder,
    categorical for the CNN) and ``kfac_empirical`` (the gradients of the training loss).
(b) ``distributed``: per worker and per step, K-FAC compute (CPU seconds of factor building,
    decomposition and preconditioning), bytes communicated and bytes of curvature state, for
    ``dp`` with each ``placement`` (``owner``, ``all``, ``auto``) and ``replicated`` on the digits ResNet at 2 and 4 gloo workers; once with factors and
    decompositions refreshed every step (the paper's setting), once with 10 / 100.
(c) ``overhead``: time per training step with K-FAC (factor_update_steps=10,
    inv_update_steps=100) over the plain optimizer's, the two trained side by side and timed step
    by step alternately (wall and CPU time); for the eigen and inverse methods and the empirical and
    sampled Fisher.

(d) ``time_to_target``: seconds and steps to a loss target for SGD, AdamW, Muon, SOAP and K-FAC on
    the autoencoder, the CNN and a small GPT, every run interleaved in one process (see
    ``kfac_time_to_target.py``).
(e) ``step_cost``: ms per plain, factor-update and decomposition step of K-FAC settings against
    AdamW and SGD, interleaved in one process (see ``kfac_step_cost.py``).

The training loops call ``KFACPreconditioner.step`` directly, which is what the ``DPKFAC``
callback does in ``on_before_optimizer_step``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner

# ---------------------------------------------------------------------------------------------- data


def digits(train_fraction: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, scaled to [0, 1], the fixed training split (first 80% of a seeded permutation)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n = int(train_fraction * len(y))
    return x[perm[:n]], y[perm[:n]]


def autoencoder() -> nn.Module:
    sizes = [64, 128, 64, 32, 16, 32, 64, 128, 64]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(inplace=True),
        nn.Linear(64, 10),
    )


TASKS: dict[str, dict[str, Any]] = {
    # the autoencoder trains on the squared error summed over the 64 outputs, averaged over the batch
    # (the classic K-FAC setting); its target is on the MSE (that loss / 64)
    "autoencoder": {
        "model": autoencoder,
        "batch": 128,
        "target": 0.0125,
        "loss": lambda out, x, y: F.mse_loss(out, x, reduction="sum") / x.shape[0],
        "metric": lambda out, x, y: F.mse_loss(out, x),
        "fisher": "gaussian",
    },
    "cnn": {
        "model": cnn,
        "batch": 64,
        "target": 0.05,
        "loss": lambda out, x, y: F.cross_entropy(out, y),
        "metric": lambda out, x, y: F.cross_entropy(out, y),
        "fisher": "categorical",
    },
}


def train_step(
    spec: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    kfac: KFACPreconditioner | None,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """One training step of a task: backward, K-FAC (when given), the optimizer's step."""
    optimizer.zero_grad(set_to_none=True)
    spec["loss"](model(x), x, y).backward()
    if kfac is not None:
        kfac.step(optimizer)
    optimizer.step()


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


KFAC_SETTINGS = {"damping": 0.01, "kl_clip": 0.001, "factor_update_steps": 1, "inv_update_steps": 10}


# --------------------------------------------------------------------------------- (a) convergence
def steps_to_target(
    task: str, optimizer_name: str, setting: tuple[float, ...], seed: int, max_steps: int, eval_every: int
) -> tuple[int | None, float]:
    """Trains until the full-train loss reaches the task's target; returns (steps, seconds) or (None, s).

    ``setting`` is ``(lr,)`` for SGD and Adam, ``(lr, damping, kl_clip)`` for K-FAC (on SGD with momentum);
    ``optimizer_name`` is ``"kfac"`` (the sampled Fisher matching the task's likelihood: ``"gaussian"``
    for the autoencoder, ``"categorical"`` for the CNN) or ``"kfac_empirical"`` (the empirical Fisher).
    """
    lr = setting[0]
    spec = TASKS[task]
    x, y = digits()
    torch.manual_seed(seed)
    model = spec["model"]()
    use_kfac = optimizer_name.startswith("kfac")
    optimizer = make_optimizer("sgd" if use_kfac else optimizer_name, model.parameters(), lr)
    kfac = None
    if use_kfac:
        fisher = spec["fisher"] if optimizer_name == "kfac" else "empirical"
        options = KFACOptions(
            **{**KFAC_SETTINGS, "damping": setting[1], "kl_clip": setting[2], "fisher": fisher}
        )
        kfac = KFACPreconditioner(model, options)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    cursor, seconds = 0, 0.0
    for step in range(1, max_steps + 1):
        if cursor + spec["batch"] > len(y):
            order, cursor = torch.randperm(len(y), generator=gen), 0
        idx = order[cursor : cursor + spec["batch"]]
        cursor += spec["batch"]
        start = time.perf_counter()
        train_step(spec, model, optimizer, kfac, x[idx], y[idx])
        seconds += time.perf_counter() - start
        if step % eval_every == 0:
            with torch.no_grad():
                loss = spec["metric"](model(x), x, y).item()
            if loss != loss or loss > 1e6:
                return None, seconds
            if loss <= spec["target"]:
                return step, seconds
    return None, seconds


def convergence(quick: bool) -> list[dict[str, Any]]:
    # K-FAC settings are (lr, damping, kl_clip); the "kfac" grids hold the best points of a preliminary
    # exploration of the sampled Fisher (see RESULTS.md), so the first-order grids get five or more
    # points each (Adam on the autoencoder all nine points it was tried at)
    grids: dict[str, dict[str, list[tuple[float, ...]]]] = {
        "autoencoder": {
            "sgd": [(0.01,), (0.02,), (0.03,), (0.05,), (0.1,)],
            "adam": [(0.003,), (0.004,), (0.005,), (0.006,), (0.007,), (0.008,), (0.01,), (0.02,), (0.03,)],
            "kfac": [(0.3, 0.05, 0.01), (0.3, 0.1, 0.01), (0.3, 0.2, 0.02)],
            "kfac_empirical": [(3.0, 0.3, 0.01), (3.0, 1.0, 0.01), (10.0, 1.0, 0.01)],
        },
        "cnn": {
            "sgd": [(0.03,), (0.05,), (0.1,), (0.2,), (0.3,)],
            "adam": [(0.003,), (0.005,), (0.01,), (0.02,), (0.03,)],
            "kfac": [(0.1, 0.003, 0.001), (0.3, 0.01, 0.001), (0.3, 0.03, 0.001)],
            "kfac_empirical": [(0.1, 0.003, 0.001), (0.3, 0.01, 0.001), (1.0, 0.1, 0.01)],
        },
    }
    seeds = [0, 1, 2]
    max_steps = {"autoencoder": 2000, "cnn": 600}
    if quick:  # two grid points around each full run's best, one seed
        quick_points = {
            "autoencoder": {"sgd": [2, 3], "adam": [3, 5], "kfac": [0, 1], "kfac_empirical": [1, 2]},
            "cnn": {"sgd": [2, 3], "adam": [3, 4], "kfac": [1, 2], "kfac_empirical": [1, 2]},
        }
        grids = {
            task: {name: [grid[k] for k in quick_points[task][name]] for name, grid in by_opt.items()}
            for task, by_opt in grids.items()
        }
        seeds = [0]
        max_steps = {"autoencoder": 1000, "cnn": 300}
    rows = []
    for task, grid in grids.items():
        for name, settings in grid.items():
            best: dict[str, Any] | None = None
            for setting in settings:
                results = [
                    steps_to_target(task, name, setting, s, max_steps[task], eval_every=10) for s in seeds
                ]
                steps = [r[0] if r[0] is not None else float("inf") for r in results]
                median = statistics.median(steps)
                print(f"  {task:12s} {name:14s} setting={setting} steps={steps}", flush=True)
                if best is None or median < best["median"]:
                    seconds = statistics.median([r[1] for r in results])
                    best = {"median": median, "setting": setting, "seconds": seconds, "steps": steps}
            assert best is not None
            reached = best["median"] != float("inf")
            rows.append(
                {
                    "task": task,
                    "optimizer": name,
                    "target": TASKS[task]["target"],
                    "steps_to_target": int(best["median"]) if reached else None,
                    "seconds_to_target": round(best["seconds"], 3) if reached else None,
                    "seeds": len(seeds),
                    "setting": list(best["setting"]),
                    "steps_per_seed": [s if s != float("inf") else None for s in best["steps"]],
                    "max_steps": max_steps[task],
                }
            )
    return rows


# --------------------------------------------------------------------------------- (b) distributed
def _resnet() -> nn.Module:
    from lightning_parallel.models import ResNetClassifier

    torch.manual_seed(0)
    return ResNetClassifier(widths=(16, 32, 64), blocks_per_stage=1, norm="group")


def _distributed_worker(
    rank: int, world_size: int, port: int, configs: list[tuple[Any, ...]], queue: Any
) -> None:
    """One process of the pool; runs every configuration, on a subgroup of the first P ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    groups = {p: dist.new_group(list(range(p))) for p in sorted({c[0] for c in configs})}
    x, y = digits()
    batch = 32
    try:
        for index, (size, assignment, placement, fus, ius, steps) in enumerate(configs):
            if rank < size:
                group = groups[size]
                model = _resnet()
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                options = KFACOptions(
                    assignment=assignment, placement=placement, factor_update_steps=fus, inv_update_steps=ius
                )
                kfac = KFACPreconditioner(model, options, group=group)
                kfac.clock = time.process_time  # CPU time: robust to oversubscribed cores
                before: dict[str, float] = {}
                for step in range(steps + 1):
                    if step == 1:  # step 0 fixes the dp owners from one replicated factor pass: not counted
                        before = kfac.metrics()
                    start = (rank * batch + step * batch * size) % (len(y) - batch)
                    xb, yb = x[start : start + batch].reshape(-1, 1, 8, 8), y[start : start + batch]
                    optimizer.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    for param in model.parameters():  # what DDP does
                        if param.grad is not None:
                            dist.all_reduce(param.grad, group=group)
                            param.grad /= size
                    kfac.step(optimizer)
                    optimizer.step()
                after = kfac.metrics()
                queue.put(
                    (
                        index,
                        rank,
                        (after["kfac_seconds"] - before["kfac_seconds"]) / steps,
                        (after["bytes_communicated"] - before["bytes_communicated"]) / steps,
                        after["curvature_bytes"],
                        kfac.placement,
                        kfac.costs_by_placement,
                    )
                )
                kfac.remove_hooks()
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_pool(configs: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Runs the configurations ``(world_size, assignment, placement, fus, ius, steps)`` in one pool of processes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    size = max(c[0] for c in configs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_distributed_worker, args=(r, size, port, configs, queue)) for r in range(size)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=900) for _ in range(sum(c[0] for c in configs))]
    for proc in procs:
        proc.join(timeout=60)
    return results


def distributed(quick: bool) -> list[dict[str, Any]]:
    settings = [(1, 1, 4 if quick else 10), (10, 100, 20 if quick else 100)]
    # dp with each placement (auto: the cost model's choice), and replicated
    placements = [("dp", "owner"), ("dp", "all"), ("dp", "auto"), ("replicated", "auto")]
    configs = [
        (size, assignment, placement, fus, ius, steps)
        for size in (2, 4)
        for fus, ius, steps in settings
        for assignment, placement in placements
    ]
    results = run_pool(configs)
    rows = []
    for index, (size, assignment, placement, fus, ius, steps) in enumerate(configs):
        res = [r[1:] for r in results if r[0] == index]
        resolved = res[0][4]
        model = res[0][5][resolved if assignment == "dp" else "replicated"]
        row = {
            "world_size": size,
            "assignment": assignment,
            # where the decomposition is used: the option as given, and what "auto" resolved to
            "placement": placement if placement != "auto" else f"auto:{resolved}",
            "kfac_seconds_per_worker": statistics.mean(r[1] for r in res),
            "bytes_communicated_per_worker": statistics.mean(r[2] for r in res),
            "curvature_bytes_per_worker": statistics.mean(r[3] for r in res),
            "factor_update_steps": fus,
            "inv_update_steps": ius,
            "steps": steps,
            "kfac_seconds_max_worker": max(r[1] for r in res),
            "curvature_bytes_max_worker": max(r[3] for r in res),
            "model_bytes_per_step": model["bytes_per_step"],
            "model_curvature_bytes_max_worker": model["curvature_bytes"],
        }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- (c) overhead
def paired_step_times(
    task: str, steps: int, fus: int, ius: int, method: str = "eigen", fisher: str = "empirical"
) -> dict[str, Any]:
    """Trains the plain optimizer and K-FAC side by side, alternating step by step, so that both see
    the same machine load; returns the summed wall and CPU seconds of each and K-FAC's counters."""
    spec = TASKS[task]
    x, y = digits()
    runs = []
    for use_kfac in (False, True):
        torch.manual_seed(0)
        model = spec["model"]()
        optimizer = make_optimizer("sgd", model.parameters(), 0.05)
        kfac = None
        if use_kfac:
            settings = {
                **KFAC_SETTINGS,
                "factor_update_steps": fus,
                "inv_update_steps": ius,
                "method": method,
                "fisher": fisher,
            }
            kfac = KFACPreconditioner(model, KFACOptions(**settings))
            kfac.clock = time.process_time  # CPU time: the breakdown holds up on a loaded machine
        runs.append((model, optimizer, kfac))
    b = spec["batch"]
    wall, cpu = [0.0, 0.0], [0.0, 0.0]
    for step in range(steps):
        idx = torch.arange(step * b, (step + 1) * b) % len(y)
        for k, (model, optimizer, kfac) in enumerate(runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(spec, model, optimizer, kfac, x[idx], y[idx])
            wall[k] += time.perf_counter() - start
            cpu[k] += time.process_time() - start_cpu
    kfac = runs[1][2]
    assert kfac is not None
    return {"wall": wall, "cpu": cpu, "counters": kfac.metrics()}


def overhead(quick: bool) -> list[dict[str, Any]]:
    rows = []
    steps, repeats = (200, 3) if quick else (400, 5)
    configs = [
        ("cnn", "eigen", "empirical"),
        ("cnn", "inverse", "empirical"),
        ("cnn", "eigen", "categorical"),
        ("autoencoder", "eigen", "empirical"),
    ]
    for task, method, fisher in configs:
        runs = [paired_step_times(task, steps, 10, 100, method, fisher) for _ in range(repeats)]
        ratio = statistics.median(r["wall"][1] / r["wall"][0] for r in runs)
        cpu_ratio = statistics.median(r["cpu"][1] / r["cpu"][0] for r in runs)

        def ms(values: Any) -> float:
            return round(statistics.median(values) / steps * 1e3, 3)

        row = {
            "task": task,
            "factor_update_steps": 10,
            "inv_update_steps": 100,
            "step_time_ratio": round(ratio, 3),
            "method": method,
            "fisher": fisher,
            "cpu_time_ratio": round(cpu_ratio, 3),
            "plain_ms_per_step": ms(r["wall"][0] for r in runs),
            "kfac_ms_per_step": ms(r["wall"][1] for r in runs),
            # K-FAC's own counters (CPU time), per step: hooks and factor updates, decompositions,
            # preconditioning (with the finiteness check, KL-clip and the write-back)
            "factor_ms_per_step": ms(r["counters"]["factor_seconds"] for r in runs),
            "decomposition_ms_per_step": ms(r["counters"]["decomposition_seconds"] for r in runs),
            "precondition_ms_per_step": ms(r["counters"]["precondition_seconds"] for r in runs),
        }
        print(
            f"  {task:12s} {method:8s} {fisher:12s} plain {row['plain_ms_per_step']:.2f} ms/step,"
            f" K-FAC {row['kfac_ms_per_step']:.2f} ms/step, x{ratio:.2f} (CPU time x{cpu_ratio:.2f};"
            f" factors {row['factor_ms_per_step']}, decompositions {row['decomposition_ms_per_step']},"
            f" preconditioning {row['precondition_ms_per_step']} ms/step)",
            flush=True,
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller grids and fewer steps (under 2 minutes)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--parts",
        default="convergence,distributed,overhead,time_to_target,step_cost",
        help="comma-separated parts to run",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    out: dict[str, Any] = {"load_average": os.getloadavg()[0], "quick": args.quick}
    from kfac_step_cost import step_cost
    from kfac_time_to_target import time_to_target

    funcs: dict[str, Callable[[bool], list[dict[str, Any]]]] = {
        "convergence": convergence,
        "distributed": distributed,
        "overhead": overhead,
        "time_to_target": time_to_target,
        "step_cost": step_cost,
    }
    for part in parts:
        print(f"[{part}]", flush=True)
        out[part] = funcs[part](args.quick)
    print_tables(out)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def print_tables(out: dict[str, Any]) -> None:
    for row in out.get("convergence", []):
        print(
            f"convergence {row['task']:12s} {row['optimizer']:14s} setting={row['setting']}"
            f" steps={row['steps_to_target']} seconds={row['seconds_to_target']} per seed={row['steps_per_seed']}"
        )
    for row in out.get("distributed", []):
        print(
            f"distributed P={row['world_size']} {row['assignment']:10s} {row['placement']:10s}"
            f" fus/ius={row['factor_update_steps']}/{row['inv_update_steps']}"
            f" kfac_s={row['kfac_seconds_per_worker']:.4f} bytes={row['bytes_communicated_per_worker']:.0f}"
            f" curvature={row['curvature_bytes_per_worker']:.0f}"
        )
    if out.get("time_to_target"):
        from kfac_time_to_target import print_rows

        print_rows(out["time_to_target"])
    if out.get("step_cost"):
        from kfac_step_cost import print_rows as print_step_cost

        print_step_cost(out["step_cost"])
    for row in out.get("overhead", []):
        print(
            f"overhead {row['task']:12s} {row['method']:8s} {row['fisher']:12s}"
            f" step_time_ratio={row['step_time_ratio']} cpu_time_ratio={row['cpu_time_ratio']}"
        )


if __name__ == "__main__":
    main()
