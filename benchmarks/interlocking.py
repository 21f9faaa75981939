"""Interlocking backprop: accuracy ladder on digits and simulated-compute pipeline throughput.

(a) Accuracy: a 4-stage ResNet with narrow stages (channels 4/8/16/32, one residual block each; the stem
    goes with the first stage, pool + linear with the last), GroupNorm, the default pool + linear auxiliary
    heads, native 8x8 digits, all 1,257 training images, batch 64, Adam lr 3e-3, trained for 15 epochs with
    k = 1, 2, 3 and end-to-end backprop (k = 4, which gives exactly the end-to-end parameters), over 20 seeds;
    mean validation accuracy of the final output with a 95% t-interval, and the share of the k=1 -> e2e gap
    that k=2 recovers with a paired bootstrap interval. The runs use the single-process interlocking runtime
    in a plain torch loop (the math the Lightning strategy runs; a test checks the two agree).
    GroupNorm, as in the pipeline tests and configs: it does not depend on the batch, so the ladder is the
    same whatever the micro-batch split (the strategy's default is 4 micro-batches per step); with 4 channels
    it is an instance norm, so stage 0's pooled features carry little signal and local learning loses
    accuracy, the regime the ladder is meant to measure. BatchNorm (one micro-batch of 64) makes local
    learning much stronger here (k=1 about 92%, gap about 4 points); ``--norm batch`` runs that variant.
(b) Throughput: 4 processes (gloo), 4 micro-batches per optimizer step, simulated compute: every stage
    forward sleeps one unit, every input-gradient and every weight-gradient computation one unit each (a full
    backward is two). Interlocking runs steps back to back without a flush; the end-to-end baseline is the
    pipeline engine's 1F1B schedule (``lightning_parallel.pipeline.runtime``) with forward one unit and
    backward two. Efficiency = ideal step time (the busiest rank's compute) / measured step time; the
    "simulated" column is the same ratio from an event simulation of the runtime's order without any
    overhead (what the schedule allows on an idle machine).

    python benchmarks/interlocking.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_parallel.interlocking.heads import split_trunk
from lightning_parallel.interlocking.plan import InterlockingPlan
from lightning_parallel.interlocking.runtime import InterlockingRuntime
from lightning_parallel.interlocking.stage import SimulatedCost

if TYPE_CHECKING:
    from lightning_parallel.models.resnet import NormName

STAGES = 4
WIDTHS = (4, 8, 16, 32)
LADDER: list[int | str] = [1, 2, 3, "e2e"]


# ----------------------------------------------------------------------------------------- accuracy
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from lightning_parallel.data import DigitsDataModule

    data = DigitsDataModule(batch_size=64, image_size=8)
    data.setup()
    train, val = data.train_set, data.val_set
    return train.tensors[0], train.tensors[1], val.tensors[0], val.tensors[1]  # type: ignore[union-attr]


def train_one(
    k: int | str, seed: int, epochs: int, lr: float, data: tuple[torch.Tensor, ...], norm: NormName = "group"
) -> float:
    """Validation accuracy of the final output after ``epochs`` epochs of interlocking training with width k."""
    from lightning_parallel.models import ResNetClassifier

    x_train, y_train, x_val, y_val = data
    width = STAGES if k == "e2e" else int(k)
    torch.manual_seed(seed)
    model = ResNetClassifier(widths=WIDTHS, lr=lr, norm=norm)
    stage_blocks, heads = split_trunk(model, STAGES, (x_train[:64], y_train[:64]))
    runtime = InterlockingRuntime(
        InterlockingPlan(STAGES, width), stage_blocks, heads, model.pipeline_input, model.pipeline_loss
    )
    params = [*model.parameters(), *(p for h in heads for p in h.parameters())]
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for head in heads:
        head.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            optimizer.zero_grad(set_to_none=True)
            runtime.train_step([(x_train[index], y_train[index])])
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_val).argmax(-1) == y_val).float().mean())


def _ladder_worker(job: tuple[int | str, int, int, float, NormName]) -> tuple[int | str, int, float]:
    torch.set_num_threads(1)
    k, seed, epochs, lr, norm = job
    return k, seed, train_one(k, seed, epochs, lr, _digits(), norm)


def accuracy_ladder(
    seeds: int, epochs: int, lr: float, workers: int, norm: NormName = "group"
) -> list[dict[str, Any]]:
    jobs = [(k, seed, epochs, lr, norm) for seed in range(seeds) for k in LADDER]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_ladder_worker, jobs)
    else:
        results = [_ladder_worker(job) for job in jobs]
    rows = []
    for k in LADDER:
        accs = [acc for kk, _, acc in results if kk == k]
        mean = statistics.fmean(accs)
        half = _t975(len(accs) - 1) * statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else 0.0
        rows.append(
            {
                "k": k,
                "val_accuracy": mean,
                "val_accuracy_ci95": [mean - half, mean + half],
                "seeds": len(accs),
                "per_seed": [acc for kk, _, acc in sorted(results, key=lambda r: r[1]) if kk == k],
            }
        )
    return rows


def gap_recovered(rows: list[dict[str, Any]], resamples: int = 4000) -> tuple[float, list[float]]:
    """Share of the k=1 -> e2e gap that k=2 recovers (of the means), with a paired bootstrap 95% interval."""
    per = {r["k"]: torch.tensor(r["per_seed"]) for r in rows}

    def share(index: torch.Tensor) -> float:
        k1, k2, e2e = (float(per[k][index].mean()) for k in (1, 2, "e2e"))
        return (k2 - k1) / (e2e - k1) if e2e != k1 else float("nan")

    n = len(per[1])
    gen = torch.Generator().manual_seed(0)
    samples = torch.tensor([share(torch.randint(0, n, (n,), generator=gen)) for _ in range(resamples)])
    samples = samples[~samples.isnan()]
    return share(torch.arange(n)), [float(samples.quantile(0.025)), float(samples.quantile(0.975))]


def _t975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


# ----------------------------------------------------------------------------------------- throughput
class _Sleep(torch.autograd.Function):
    """Identity that sleeps ``unit`` seconds in forward and ``2 * unit`` in backward (engine baseline)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, unit: float) -> torch.Tensor:
        ctx.unit = unit
        time.sleep(unit)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(2 * ctx.unit)
        return grad, None


class _SleepStage(nn.Module):
    def __init__(self, features: int, unit: float) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(self.linear(x), self.unit)


def _loss(output: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.cross_entropy(output, batch[1])


def _throughput_worker(
    rank: int, world: int, port: int, jobs: list[tuple[str, float]], steps: int, warmup: int, out: Any
) -> None:
    """One process of the 4-process world; runs every (kind, unit) job in turn (one start-up for all)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind, unit in jobs:
            result = _measure(rank, world, kind, unit, steps, warmup)
            if rank == 0:
                out.put((kind, unit, *result))
    finally:
        dist.destroy_process_group()


def _measure(
    rank: int, world: int, kind: str, unit: float, steps: int, warmup: int = 2
) -> tuple[float, float, int]:
    """Seconds for ``steps`` timed steps (slowest rank), ideal seconds per step, samples."""
    torch.manual_seed(0)
    features, micro, size = 16, 4, 8
    gen = torch.Generator().manual_seed(1)
    batches = [
        [
            (
                torch.randn(size, features, generator=gen),
                torch.randint(0, features, (size,), generator=gen),
            )
            for _ in range(micro)
        ]
        for _ in range(steps + warmup)
    ]
    if kind == "e2e":
        from lightning_parallel.pipeline.groups import build_pipeline_groups
        from lightning_parallel.pipeline.runtime import PipelineRuntime
        from lightning_parallel.pipeline.schedule import build_schedule

        stage: nn.Module = _SleepStage(features, unit)
        runtime: Any = PipelineRuntime(
            build_schedule("1f1b", world, micro),
            build_pipeline_groups(world, world),
            {(0, rank): stage},
            lambda b: b[0],
            _loss,
            timeout_s=120,
        )
        params = list(stage.parameters())
        ideal = micro * 3 * unit
    else:
        plan = InterlockingPlan(world, int(kind))
        blocks = [nn.Linear(features, features) for _ in range(world)]
        heads: list[nn.Module | None] = [nn.Linear(features, features) for _ in range(world - 1)]
        cost = SimulatedCost(forward=unit, backward_input=unit, backward_weight=unit)
        runtime = InterlockingRuntime(
            plan,
            blocks,
            heads,
            lambda b: b[0],
            _loss,
            rank=rank,
            world_size=world,
            cost=cost,
            timeout_s=120,
        )
        params = [*blocks[rank].parameters(), *(heads[rank].parameters() if rank < world - 1 else [])]  # type: ignore[union-attr]
        ideal = micro * max(_units(plan, s) for s in range(world)) * unit
    optimizer = torch.optim.SGD(params, lr=0.01)

    def step(batch: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        runtime.train_step(batch)
        optimizer.step()

    for batch in batches[:warmup]:  # warm up (shapes, connections)
        step(batch)
    if kind != "e2e":
        runtime.finish()
    dist.barrier()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    if kind != "e2e":
        runtime.finish()
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    dist.barrier()
    return float(elapsed), ideal, steps * micro * size


def simulated_step_units(plan: InterlockingPlan, micro: int, steps: int = 50) -> float:
    """Steady-state step time in compute units of the runtime's order, by event simulation (no overheads).

    Mirrors :class:`InterlockingRuntime`: ``F(m)`` sends its output after the forward (1 unit), then the own
    loss's input gradient (sent back), then its weight gradient; ``B(m)`` waits for the next stage's early
    (and late) message, computes input gradients (sent back), then weight gradients.
    """
    stages = plan.stages

    def own(s: int) -> tuple[int, int]:
        here = s in plan.passes(s)
        return (int(here and plan.needs_input(s, s)), int(here and plan.needs_weight(s, s)))

    def relayed(s: int) -> tuple[int, int]:
        return (
            sum(plan.needs_input(s, t) for t in plan.received(s)),
            sum(plan.needs_weight(s, t) for t in plan.received(s)),
        )

    orders = []
    for s in range(stages):
        warm = plan.depth(s) if plan.has_backward(s) else 0
        acts: list[tuple[str, int, int]] = []
        for st in range(steps):
            if not plan.has_backward(s):
                acts += [("F", st, m) for m in range(micro)]
                continue
            acts += [("F", st, m) for m in range(min(warm, micro))]
            for m in range(micro):
                if m + warm < micro:
                    acts.append(("F", st, m + warm))
                acts.append(("B", st, m))
        orders.append(acts)
    events: dict[tuple[str, int, int, int], float] = {}
    clock, index = [0.0] * stages, [0] * stages
    progress = True
    while progress:
        progress = False
        for s in range(stages):
            while index[s] < len(orders[s]):
                kind, st, m = orders[s][index[s]]
                if kind == "F":
                    deps = [("out", s - 1, st, m)] if s > 0 else []
                else:
                    deps = [("early", s + 1, st, m)] if plan.sent_early(s + 1) else []
                    deps += [("late", s + 1, st, m)] if plan.sent_late(s + 1) else []
                if any(d not in events for d in deps):
                    break
                start = max([clock[s]] + [events[d] for d in deps])
                if kind == "F":
                    i, w = own(s)
                    events[("out", s, st, m)] = start + 1
                    events[("early", s, st, m)] = start + 1 + i
                    clock[s] = start + 1 + i + w
                else:
                    i, w = relayed(s)
                    events[("late", s, st, m)] = start + i
                    clock[s] = start + i + w
                index[s] += 1
                progress = True
    return max(clock) / steps


def _units(plan: InterlockingPlan, stage: int) -> int:
    """Compute units per micro-batch at ``stage``: one forward plus one per input and weight gradient."""
    return 1 + sum(plan.needs_weight(stage, t) + plan.needs_input(stage, t) for t in plan.passes(stage))


def throughput(jobs: list[tuple[str, float]], steps: int, warmup: int = 2) -> list[dict[str, Any]]:
    """Run every (kind, unit) job in one 4-process gloo world; one result row per job."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_throughput_worker, args=(r, STAGES, port, jobs, steps, warmup, out))
        for r in range(STAGES)
    ]
    for proc in procs:
        proc.start()
    rows = []
    for _ in jobs:
        kind, unit, elapsed, ideal, samples = out.get(timeout=900)
        if kind == "e2e":
            simulated = 4 / (4 + STAGES - 1)  # 1F1B: N / (N + D - 1)
        else:
            plan = InterlockingPlan(STAGES, int(kind))
            simulated = 4 * max(_units(plan, s) for s in range(STAGES)) / simulated_step_units(plan, 4)
        rows.append(
            {
                "k": kind if kind == "e2e" else int(kind),
                "samples_per_second": samples / elapsed,
                "efficiency": ideal * steps / elapsed,
                "step_seconds": elapsed / steps,
                "simulated_efficiency": simulated,
                "unit_ms": unit * 1000,
            }
        )
    for proc in procs:
        proc.join(timeout=60)
    return rows


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds x 3 epochs in-process, 1 warm-up + 3 timed steps, 50 ms units",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--norm", choices=["group", "batch"], default="group", help="normalization of the ResNet"
    )
    parser.add_argument(
        "--unit",
        type=float,
        nargs="+",
        default=None,
        help="seconds per simulated compute unit, one run each (default 0.02 and 0.05; with --quick 0.05)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per throughput run")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the accuracy runs (default 2; 1 with --quick)",
    )
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 20)
    epochs = args.epochs or (3 if args.quick else 15)
    steps = args.steps or (3 if args.quick else 10)
    units = args.unit or ([0.05] if args.quick else [0.02, 0.05])
    result: dict[str, Any] = {"accuracy": [], "throughput": []}
    started = time.perf_counter()
    if not args.skip_throughput:
        load = os.getloadavg()[0]
        measured = throughput(
            [(str(k), unit) for unit in units for k in LADDER], steps, 1 if args.quick else 2
        )
        for unit in units:
            rows = [r for r in measured if r["unit_ms"] == unit * 1000]
            base = next(r for r in rows if r["k"] == "e2e")["samples_per_second"]
            print(
                f"\nthroughput: 4 stages, 4 micro-batches/step, unit {unit * 1000:.0f} ms, {steps} timed steps"
            )
            print(
                f"{'k':>5} {'samples/s':>10} {'vs e2e 1F1B':>12} {'efficiency':>11} {'simulated':>10} {'step s':>8}"
            )
            for r in rows:
                r["speedup_vs_e2e"] = r["samples_per_second"] / base
                print(
                    f"{r['k']!s:>5} {r['samples_per_second']:>10.1f} {r['speedup_vs_e2e']:>11.2f}x "
                    f"{r['efficiency']:>11.3f} {r['simulated_efficiency']:>10.3f} {r['step_seconds']:>8.3f}"
                )
            result["throughput"] += rows
        result["load_average"] = [load, os.getloadavg()[0]]
        print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.skip_accuracy:
        rows = accuracy_ladder(seeds, epochs, args.lr, args.workers or (1 if args.quick else 2), args.norm)
        print(
            f"\naccuracy: ResNet {list(WIDTHS)} ({args.norm} norm), {STAGES} stages, digits 8x8, {epochs} epochs, "
            f"{seeds} seeds, Adam lr {args.lr}"
        )
        print(f"{'k':>5} {'val acc':>8} {'95% interval':>17}")
        for r in rows:
            lo, hi = r["val_accuracy_ci95"]
            print(f"{r['k']!s:>5} {r['val_accuracy']:>8.4f}   [{lo:.4f}, {hi:.4f}]")
        recovered, interval = gap_recovered(rows)
        result["k2_gap_recovered"] = recovered
        result["k2_gap_recovered_ci95"] = interval
        acc = {r["k"]: r["val_accuracy"] for r in rows}
        print(
            f"k=2 recovers {recovered:.0%} of the k=1 -> e2e gap ({(acc['e2e'] - acc[1]) * 100:.1f} points); "
            f"paired bootstrap 95% interval {interval[0]:.0%} .. {interval[1]:.0%}"
        )
        result["accuracy"] = rows
    result["seconds"] = time.perf_counter() - started
    result["config"] = {
        "quick": args.quick,
        "seeds": seeds,
        "epochs": epochs,
        "lr": args.lr,
        "norm": args.norm,
        "units": units,
        "steps": steps,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
