"""ChimeraStrategy through ``Trainer.fit`` vs the raw pipeline engine, peak activations, partitioning.

Simulated compute: every block sleeps a fixed time in forward and twice that in backward, while real
(B, width) tensors travel between 4 gloo processes (one thread each). Three measurements, all in one
group of spawned processes:

(a) Throughput (micro-batches per second) of the same model and schedule run by ``Trainer.fit`` with
    ``ChimeraStrategy`` and by the engine alone (``PipelineRuntime.train_step`` + an SGD step in a plain
    loop), at (D, N) = (4, 8), for ``chimera`` and ``1f1b``; ratio Trainer / engine; efficiency = ideal
    step time (the busiest rank's compute) / measured step time.
(b) Per-rank peak stored activations, measured during the Trainer runs: the largest number of stage
    activations (one micro-batch through one stage) alive on a rank at once.
(c) Partitioning of a model with deliberately unequal blocks (equal parameters, two blocks 6x slower):
    ``uniform``, ``parameters`` and ``profile`` partitions through ``Trainer.fit`` (1F1B, D=4, N=8), with
    the slowest stage's cost and the best contiguous partition's cost from brute force.

    python benchmarks/chimera_trainer.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl

from lightning_parallel.pipeline.groups import build_pipeline_groups
from lightning_parallel.pipeline.micro_batches import split_micro_batches
from lightning_parallel.pipeline.partition import partition_blocks, stage_costs, stage_slices
from lightning_parallel.pipeline.runtime import PipelineRuntime
from lightning_parallel.pipeline.schedule import build_schedule
from lightning_parallel.strategies.chimera import ChimeraStrategy

WORLD = 4
D, N = 4, 8
WIDTH = 64
MICRO = 4  # examples per micro-batch


# ----------------------------------------------------------------------------- simulated model
class _Activations:
    """Stage activations alive on this rank (counted at each stage's first block)."""

    alive = 0
    peak = 0


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, seconds: float, first: bool) -> Tensor:  # type: ignore[override]
        ctx.seconds, ctx.first = seconds, first
        if first:  # the caller passes first=False under no_grad (autograd disables grad in here)
            _Activations.alive += 1
            _Activations.peak = max(_Activations.peak, _Activations.alive)
        time.sleep(seconds)
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        time.sleep(2 * ctx.seconds)
        if ctx.first:
            _Activations.alive -= 1
        return grad, None, None


class SleepBlock(nn.Module):
    """A linear layer whose forward takes ``seconds`` and backward twice that."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.first = False
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return _Sleep.apply(self.linear(x), self.seconds, self.first and torch.is_grad_enabled())


class SimulatedModel(pl.LightningModule):
    """A pipeline-protocol module of sleeping blocks (times in seconds per micro-batch)."""

    def __init__(self, block_seconds: list[float]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[SleepBlock(s) for s in block_seconds])


    def pipeline_blocks(self) -> nn.Sequential:
        return self.blocks

    def pipeline_input(self, batch: Any) -> Tensor:
        return batch[0]

    def pipeline_loss(self, output: Tensor, batch: Any) -> Tensor:
        return F.mse_loss(output, batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.pipeline_input(batch)
        for block in self.blocks:
            out = block(out)
        return self.pipeline_loss(out, batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _batches(steps: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    size = steps * N * MICRO
    return TensorDataset(torch.randn(size, WIDTH, generator=g), torch.randn(size, WIDTH, generator=g))


# ----------------------------------------------------------------------------- the two paths
class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            dist.barrier()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def trainer_run(block_seconds: list[float], schedule: str, partition: Any, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SimulatedModel(block_seconds)
    strategy = ChimeraStrategy(D, N, schedule=schedule, partition=partition)  # type: ignore[arg-type]
    timer = _StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=warmup + steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    _Activations.alive = _Activations.peak = 0
    original_build = strategy._build_pipeline

    def build_and_mark(batch: Any) -> None:
        original_build(batch)
        runtime = strategy.pipeline_runtime
        if runtime is not None:
            for stage_module in runtime.stage_modules.values():
                cast(SleepBlock, next(iter(stage_module.children()))).first = True

    strategy._build_pipeline = build_and_mark  # type: ignore[method-assign]
    trainer.fit(model, DataLoader(_batches(warmup + steps), batch_size=N * MICRO))
    seconds = _max_over_ranks(timer.end - timer.start)
    return {
        "throughput": steps * N / seconds,
        "step_s": seconds / steps,
        "peak_activations": _gather_int(_Activations.peak),
        "sizes": strategy.partition_sizes,
    }


def engine_run(block_seconds: list[float], schedule_kind: str, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SimulatedModel(block_seconds)
    sizes = partition_blocks(list(model.blocks), D, "uniform")
    schedule = build_schedule(schedule_kind, D, N)
    groups = build_pipeline_groups(WORLD, D)
    slices = stage_slices(sizes)
    modules: dict[tuple[int, int], nn.Module] = {}
    for replica, stage in schedule.stages_of(groups.pipeline_rank):
        seq = nn.Sequential(*list(model.blocks)[slices[stage]])
        modules[(replica, stage)] = seq if replica == 0 else copy.deepcopy(seq)
        cast(SleepBlock, next(iter(modules[(replica, stage)].children()))).first = True
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    runtime = PipelineRuntime(schedule, groups, modules, model.pipeline_input, model.pipeline_loss)
    data = _batches(warmup + steps)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            start = time.perf_counter()
        batch = data[step * N * MICRO : (step + 1) * N * MICRO]
        optimizer.zero_grad(set_to_none=True)
        loss = runtime.train_step(split_micro_batches(batch, N))
        dist.all_reduce(loss.detach().clone(), group=groups.pipeline_group)
        optimizer.step()
    seconds = _max_over_ranks(time.perf_counter() - start)
    return {"throughput": steps * N / seconds, "step_s": seconds / steps}


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def _gather_int(value: int) -> list[int]:
    out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value]))
    return [int(t) for t in out]


def ideal_step_s(block_seconds: list[float], sizes: list[int], schedule_kind: str) -> float:
    """The busiest rank's compute per step: N x (forward + 2 x forward) of the stages it holds, divided evenly
    for Chimera (each rank runs N/2 micro-batches through each of its two stages)."""
    costs = stage_costs(block_seconds, sizes)
    if schedule_kind.startswith("chimera"):
        return max(3 * N / 2 * (costs[r] + costs[D - 1 - r]) for r in range(D))
    return 3 * N * max(costs)


# ----------------------------------------------------------------------------- driver
def _worker(rank: int, port: int, quick: bool, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300))
    unit = 0.004 if quick else 0.01  # forward seconds of one block per micro-batch
    steps, warmup = (4, 2) if quick else (12, 3)
    equal = [unit] * 8  # two blocks per stage
    results = []
    for kind in ("chimera", "1f1b"):
        engine = engine_run(equal, kind, steps, warmup)
        trainer = trainer_run(equal, kind, "uniform", steps, warmup)
        ideal = ideal_step_s(equal, [2] * D, kind)
        results.append({
            "schedule": kind, "D": D, "N": N,
            "engine_throughput": engine["throughput"], "trainer_throughput": trainer["throughput"],
            "trainer_vs_engine": trainer["throughput"] / engine["throughput"],
            "engine_efficiency": ideal / engine["step_s"], "trainer_efficiency": ideal / trainer["step_s"],
            "peak_activations": trainer["peak_activations"],
        })
    unequal = [unit, unit, unit, unit, 6 * unit, unit, unit, 6 * unit]
    best = min(
        max(stage_costs(unequal, [b - a for a, b in itertools.pairwise((0, *cuts, 8))]))
        for cuts in itertools.combinations(range(1, 8), D - 1)
    )
    partitions = []
    for method in ("uniform", "parameters", "profile"):
        run = trainer_run(unequal, "1f1b", method, steps, warmup)
        partitions.append({
            "partition": method, "sizes": run["sizes"],
            "slowest_stage_ms": 3 * 1000 * max(stage_costs(unequal, run["sizes"])),
            "optimum_ms": 3 * 1000 * best, "trainer_throughput": run["throughput"],
        })
    if rank == 0:
        Path(out_path).write_text(json.dumps({"throughput": results, "partition": partitions}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter sleeps and fewer steps (under two minutes)")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.json")
        started = time.perf_counter()
        mp.start_processes(_worker, args=(port, args.quick, out_path), nprocs=WORLD, start_method="spawn")
        data = json.loads(Path(out_path).read_text())
    data["config"] = {
        "world": WORLD, "D": D, "N": N, "micro_batch": MICRO, "width": WIDTH, "quick": args.quick,
        "load_average": os.getloadavg()[0], "wall_s": time.perf_counter() - started,
    }
    print(f"(a) Trainer.fit vs engine, D={D}, N={N}, {WORLD} processes")
    print(f"{'schedule':<9}{'engine mb/s':>13}{'trainer mb/s':>14}{'ratio':>8}{'eff engine':>12}{'eff trainer':>13}")
    for r in data["throughput"]:
        print(f"{r['schedule']:<9}{r['engine_throughput']:>13.1f}{r['trainer_throughput']:>14.1f}"
              f"{r['trainer_vs_engine']:>8.3f}{r['engine_efficiency']:>12.3f}{r['trainer_efficiency']:>13.3f}")
    print("\n(b) peak stored stage activations per rank (measured, Trainer path)")
    for r in data["throughput"]:
        print(f"{r['schedule']:<9}{r['peak_activations']}")
    print("\n(c) partitions of unequal blocks (1F1B through Trainer.fit)")
    print(f"{'partition':<11}{'sizes':<16}{'slowest stage ms':>17}{'optimum ms':>12}{'mb/s':>8}")
    for r in data["partition"]:
        print(f"{r['partition']:<11}{r['sizes']!s:<16}{r['slowest_stage_ms']:>17.1f}{r['optimum_ms']:>12.1f}"
              f"{r['trainer_throughput']:>8.1f}")
    print(f"\nload average {data['config']['load_average']:.1f}, wall {data['config']['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
