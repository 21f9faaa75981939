"""AuxNet against interlocking backprop (k=1, k=2) and end-to-end 1F1B, on the interlocking benchmark's setup.

(a) Throughput, simulated compute: 4 gloo processes, one stage each, 4 micro-batches of 8 per optimizer step,
    every stage forward sleeps one unit, every input-gradient and weight-gradient computation one unit each
    (``benchmarks/interlocking.py``'s workers and units, reused). AuxNet: the same stages, an auxiliary network
    per stage >= 1 that sleeps ``aux_ratio`` units per forward and per backward, where ``aux_ratio`` is the
    measured FLOP ratio of the default auxiliary networks to their stages on the ResNet ladder below (mean over
    stages 1-3); a refit (every ``aux_update_interval`` steps) runs the serial end-to-end forward (one unit per
    stage and micro-batch) and ``aux_steps`` auxiliary forward+backward passes. Stage work per micro-batch:
    stage 0 two units (forward, weight gradient), the others three (plus the input gradient that trains the
    auxiliary network), as many as end-to-end backprop. Efficiency = the busiest rank's work (refits included)
    / measured step time. Per rank and step it also reports the seconds blocked in receives and in refits.
    AuxNet variants (``--throughput-methods``, ``--methods``): ``auxnet@INTERVAL`` refits every INTERVAL steps
    (10 is the strategy's default, 0 never); ``+true`` adds ``true_input_loss``, ``+constant`` sets
    ``stage_input_gradient=False`` (the stages >= 1 then do two units, no input gradient), ``+rhoR`` sets rho.
(b) Accuracy: the interlocking benchmark's ladder (4-stage GroupNorm ResNet, channels 4/8/16/32, native 8x8
    digits, batch 64, Adam lr 3e-3, 15 epochs, single-process runtimes in a plain torch loop) for k=1, k=2,
    end-to-end (k=4) and AuxNet (default options: penalty, rho 10, aux_lr 3e-3, 1 refit step, and the variants
    above), over seeds;
    mean validation accuracy of the model's own end-to-end output with a 95% bootstrap interval, and AuxNet's
    place between k=1 (0) and end-to-end (1) with a paired bootstrap interval.

    python benchmarks/auxnet.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import interlocking as base

from lightning_parallel.auxnet import AuxNetOptions, AuxNetRuntime, split_trunk_with_aux_nets
from lightning_parallel.interlocking.stage import SimulatedCost

STAGES, MICRO, SIZE, FEATURES = base.STAGES, 4, 8, 16


# ----------------------------------------------------------------------------------------- cost of an aux net
def aux_flop_ratio() -> list[float]:
    """FLOPs of each default auxiliary network / FLOPs of its stage's forward, on the ResNet ladder (stages 1-3)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_parallel.models import ResNetClassifier

    torch.manual_seed(0)
    model = ResNetClassifier(widths=base.WIDTHS, norm="group")
    x = torch.randn(64, 1, 8, 8)
    stage_blocks, aux_nets = split_trunk_with_aux_nets(model, STAGES, (x, torch.zeros(64, dtype=torch.long)))

    def flops(module: nn.Module, inp: torch.Tensor) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(inp)
        return int(counter.get_total_flops())

    ratios, h = [], x
    for s in range(STAGES - 1):
        h_next = stage_blocks[s](h).detach()
        ratios.append(flops(aux_nets[s], x) / flops(stage_blocks[s + 1], h_next))
        h = h_next
    return ratios


# ----------------------------------------------------------------------------------------- variants
_FLAGS = {"true": ("true_input_loss", True), "constant": ("stage_input_gradient", False)}


def auxnet_variant(kind: str) -> tuple[int, dict[str, Any]]:
    """``auxnet@INTERVAL[+true][+constant][+rhoR]`` -> (refit interval, further AuxNetOptions).

    ``+true``: ``true_input_loss=True``; ``+constant``: ``stage_input_gradient=False``; ``+rhoR``: ``rho=R``.
    """
    interval, *flags = kind.split("@")[1].split("+")
    options: dict[str, Any] = {}
    for flag in flags:
        if flag.startswith("rho"):
            options["rho"] = float(flag[3:])
        else:
            name, value = _FLAGS[flag]
            options[name] = value
    return int(interval), options


def variant_name(kind: str) -> str:
    """The JSON ``method`` of an AuxNet kind, e.g. ``auxnet_refit_every_step_true_input_loss``."""
    interval, options = auxnet_variant(kind)
    name = {10: "auxnet", 1: "auxnet_refit_every_step", 0: "auxnet_never_refit"}.get(interval, f"auxnet_refit{interval}")
    if options.get("true_input_loss"):
        name += "_true_input_loss"
    if options.get("stage_input_gradient") is False:
        name += "_constant_inputs"
    if "rho" in options:
        name += f"_rho{options['rho']:g}"
    return name


# ----------------------------------------------------------------------------------------- throughput
def _auxnet_measure(
    rank: int, world: int, unit: float, aux_ratio: float, kind: str, steps: int, warmup: int
) -> tuple[float, float, int, int, dict[str, list[float]]]:
    """Seconds for ``steps`` timed steps (slowest rank), ideal seconds per step, samples, bytes per step (max)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batches = [
        [
            (torch.randn(SIZE, FEATURES, generator=gen), torch.randint(0, FEATURES, (SIZE,), generator=gen))
            for _ in range(MICRO)
        ]
        for _ in range(steps + warmup)
    ]
    blocks = [nn.Linear(FEATURES, FEATURES) for _ in range(world)]
    aux_nets = [nn.Linear(FEATURES, FEATURES) for _ in range(world - 1)]
    interval, extra = auxnet_variant(kind)
    options = AuxNetOptions(aux_update_interval=interval, **extra)
    runtime = AuxNetRuntime(
        blocks,
        aux_nets,
        lambda b: b[0],
        base._loss,
        options,
        rank=rank,
        world_size=world,
        cost=SimulatedCost(forward=unit, backward_input=unit, backward_weight=unit),
        aux_cost=SimulatedCost(forward=aux_ratio * unit, backward_weight=aux_ratio * unit),
        timeout_s=120,
    )
    params = [*blocks[rank].parameters(), *(aux_nets[rank - 1].parameters() if rank > 0 else [])]
    optimizer = torch.optim.SGD(params, lr=0.01)
    refit_seconds = [0.0]
    refit = runtime.refit

    def timed_refit(micro_batches: Any) -> dict[int, float]:
        begin = time.perf_counter()
        try:
            return refit(micro_batches)
        finally:
            refit_seconds[0] += time.perf_counter() - begin

    runtime.refit = timed_refit  # type: ignore[method-assign]

    def step(batch: Any) -> int:
        optimizer.zero_grad(set_to_none=True)
        runtime.train_step(batch)
        optimizer.step()
        return runtime.last_step_bytes

    for batch in batches[:warmup]:
        step(batch)
    runtime.finish()
    dist.barrier()
    refit_seconds[0], runtime.messenger.wait_seconds = 0.0, 0.0
    start = time.perf_counter()
    sent = max(step(batch) for batch in batches[warmup:])
    runtime.finish()
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    # per rank: seconds blocked in receives (refit receives included) and seconds in refits
    mine = torch.tensor([runtime.messenger.wait_seconds, refit_seconds[0]])
    spent = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(spent, mine)
    dist.barrier()
    # the busiest rank (any stage >= 1): 3 units (2 without the input gradient) + an aux forward and backward
    # per micro-batch, and per refit one forward unit per micro-batch plus aux_steps aux forward+backward
    # passes (the last stage: one weight-gradient unit more with the true-input loss)
    per_step = MICRO * ((3 if options.stage_input_gradient else 2) + 2 * aux_ratio)
    if interval:
        per_step += MICRO * (1 + options.aux_steps * 2 * aux_ratio + options.true_input_loss) / interval
    waits = {"wait_seconds_per_rank": [float(t[0]) for t in spent], "refit_seconds_per_rank": [float(t[1]) for t in spent]}
    return float(elapsed), per_step * unit, steps * MICRO * SIZE, sent, waits


def _worker(
    rank: int, world: int, port: int, jobs: list[tuple[str, float]], aux_ratio: float, steps: int, out: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind, unit in jobs:
            if kind.startswith("auxnet"):
                result: tuple[Any, ...] = _auxnet_measure(rank, world, unit, aux_ratio, kind, steps, 2)
            else:
                result = (*base._measure(rank, world, kind, unit, steps, 2), 0, {})
            if rank == 0:
                out.put((kind, unit, *result))
    finally:
        dist.destroy_process_group()


def throughput(jobs: list[tuple[str, float]], aux_ratio: float, steps: int) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, STAGES, port, jobs, aux_ratio, steps, out))
        for r in range(STAGES)
    ]
    for proc in procs:
        proc.start()
    rows = []
    for _ in jobs:
        kind, unit, elapsed, ideal, samples, sent, waits = out.get(timeout=900)
        rows.append(
            {
                **{k: [round(t / steps, 4) for t in v] for k, v in waits.items()},  # seconds per step
                "kind": kind,
                "samples_per_second": samples / elapsed,
                "efficiency": ideal * steps / elapsed,
                "step_seconds": elapsed / steps,
                "bytes_per_step_rank0": sent,
                "unit_ms": unit * 1000,
            }
        )
    for proc in procs:
        proc.join(timeout=60)
    return rows


# ----------------------------------------------------------------------------------------- accuracy
def train_auxnet(
    seed: int, epochs: int, lr: float, data: tuple[torch.Tensor, ...], interval: int, **options: Any
) -> float:
    """Validation accuracy of the model's end-to-end output after AuxNet training (the ladder's loop)."""
    from lightning_parallel.models import ResNetClassifier

    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = ResNetClassifier(widths=base.WIDTHS, lr=lr, norm="group")
    stage_blocks, aux_nets = split_trunk_with_aux_nets(model, STAGES, (x_train[:64], y_train[:64]))
    runtime = AuxNetRuntime(
        stage_blocks,
        aux_nets,
        model.pipeline_input,
        model.pipeline_loss,
        AuxNetOptions(aux_update_interval=interval, **options),
    )
    optimizer = torch.optim.Adam([*model.parameters(), *(p for a in aux_nets for p in a.parameters())], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
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


def _accuracy_job(job: tuple[str, int, int, float]) -> tuple[str, int, float]:
    torch.set_num_threads(1)
    method, seed, epochs, lr = job
    data = base._digits()
    if method.startswith("auxnet"):
        interval, options = auxnet_variant(method)
        return method, seed, train_auxnet(seed, epochs, lr, data, interval, **options)
    return method, seed, base.train_one(method if method == "e2e" else int(method), seed, epochs, lr, data)


def bootstrap_mean(values: torch.Tensor, resamples: int = 4000) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    n = len(values)
    means = torch.stack([values[torch.randint(0, n, (n,), generator=gen)].mean() for _ in range(resamples)])
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def place_between(
    per: dict[str, torch.Tensor], method: str, resamples: int = 4000
) -> tuple[float, list[float]]:
    """(method - k1) / (e2e - k1) of the means, with a paired bootstrap 95% interval over the seeds."""

    def share(index: torch.Tensor) -> float:
        k1, e2e, value = (float(per[m][index].mean()) for m in ("1", "e2e", method))
        return (value - k1) / (e2e - k1) if e2e != k1 else float("nan")

    n = len(per["1"])
    gen = torch.Generator().manual_seed(0)
    samples = torch.tensor([share(torch.randint(0, n, (n,), generator=gen)) for _ in range(resamples)])
    samples = samples[~samples.isnan()]
    return share(torch.arange(n)), [float(samples.quantile(0.025)), float(samples.quantile(0.975))]


# ----------------------------------------------------------------------------------------- main
METHODS = {  # kind -> (method, k) of the JSON records; AuxNet kinds are named by variant_name
    "1": ("interlocking", 1),
    "2": ("interlocking", 2),
    "e2e": ("end_to_end_1f1b", "e2e"),
}
THROUGHPUT_KINDS = ["auxnet@10", "auxnet@1", "auxnet@0", "auxnet@10+constant", "auxnet@1+true", "1", "2", "e2e"]
ACCURACY_KINDS = ["1", "2", "e2e", "auxnet@10", "auxnet@1", "auxnet@1+true"]
QUICK_THROUGHPUT_KINDS = ["auxnet@10", "auxnet@10+constant", "1", "2", "e2e"]
QUICK_ACCURACY_KINDS = ["1", "2", "e2e", "auxnet@10", "auxnet@1+true"]


def _record_of(kind: str) -> tuple[str, Any]:
    return (variant_name(kind), None) if kind.startswith("auxnet") else METHODS[kind]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="2 seeds x 3 epochs, fewer AuxNet variants (QUICK_*_KINDS)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    parser.add_argument("--seeds", type=int, default=None, help="default 10 (2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default 15 (3 with --quick)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--unit", type=float, default=0.05, help="seconds per simulated compute unit")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 10: one refit at the default interval)"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes for the accuracy runs")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="accuracy runs: interlocking widths (1, 2), e2e, auxnet@INTERVAL[+true][+constant][+rhoR] (refit "
        "interval, true_input_loss, stage_input_gradient=False, rho); place needs 1 and e2e",
    )
    parser.add_argument(
        "--throughput-methods", nargs="+", default=None, help=f"as --methods; default {THROUGHPUT_KINDS}"
    )
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 10)
    epochs = args.epochs or (3 if args.quick else 15)
    steps = args.steps or 10  # 2 warm-up steps, then steps 2-11: one refit at the default interval
    if args.methods is None:
        args.methods = QUICK_ACCURACY_KINDS if args.quick else ACCURACY_KINDS
    if args.throughput_methods is None:
        args.throughput_methods = QUICK_THROUGHPUT_KINDS if args.quick else THROUGHPUT_KINDS
    started = time.perf_counter()
    ratios = aux_flop_ratio()
    aux_ratio = sum(ratios) / len(ratios)
    print(f"default auxiliary network FLOPs / stage FLOPs on the ladder: {[round(r, 3) for r in ratios]}")
    kinds_run = list(dict.fromkeys([*args.throughput_methods, *args.methods]))
    records: dict[str, dict[str, Any]] = {
        kind: {
            "method": method, "k": k, "samples_per_second": None, "efficiency": None, "val_accuracy": None,
            "seeds": None,
        }
        for kind, (method, k) in ((kind, _record_of(kind)) for kind in kinds_run)
    }
    load = os.getloadavg()[0]
    if not args.skip_throughput:
        rows = throughput([(kind, args.unit) for kind in args.throughput_methods], aux_ratio, steps)
        e2e = next(r for r in rows if r["kind"] == "e2e")["samples_per_second"]
        print(
            f"\nthroughput: 4 stages, 4 micro-batches/step, unit {args.unit * 1000:.0f} ms, {steps} timed steps"
        )
        print(f"{'method':>40} {'samples/s':>10} {'vs 1F1B':>8} {'efficiency':>11} {'bytes/step r0':>14}")
        for r in rows:
            rec = records[r["kind"]]
            rec.update(
                {
                    k: r[k]
                    for k in (
                        "samples_per_second", "efficiency", "step_seconds", "bytes_per_step_rank0",
                        "wait_seconds_per_rank", "refit_seconds_per_rank",
                    )
                    if k in r
                }
            )
            rec["speedup_vs_e2e_1f1b"] = r["samples_per_second"] / e2e
            name = f"{rec['method']}" + (f" k={rec['k']}" if rec["method"] == "interlocking" else "")
            print(
                f"{name:>40} {r['samples_per_second']:>10.1f} {rec['speedup_vs_e2e_1f1b']:>7.2f}x "
                f"{r['efficiency']:>11.3f} {r['bytes_per_step_rank0']:>14}"
                + (f"  wait/step per rank {r['wait_seconds_per_rank']}  refit/step {r['refit_seconds_per_rank']}"
                   if "wait_seconds_per_rank" in r else "")
            )
    if not args.skip_accuracy:
        kinds = list(args.methods)
        jobs = [(kind, seed, epochs, args.lr) for seed in range(seeds) for kind in kinds]
        if args.workers > 1:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                results = pool.map(_accuracy_job, jobs)
        else:
            results = [_accuracy_job(job) for job in jobs]
        per = {
            kind: torch.tensor([acc for k, _, acc in sorted(results, key=lambda r: r[1]) if k == kind])
            for kind in kinds
        }
        print(f"\naccuracy: GroupNorm ResNet {list(base.WIDTHS)}, digits 8x8, {epochs} epochs, {seeds} seeds")
        print(f"{'method':>40} {'val acc':>8} {'95% bootstrap':>18} {'between k=1 (0) and e2e (1)':>30}")
        for kind in kinds:
            rec = records[kind]
            rec.update(
                val_accuracy=float(per[kind].mean()),
                val_accuracy_ci95=bootstrap_mean(per[kind]),
                seeds=seeds,
                per_seed=per[kind].tolist(),
            )
            place = ""
            if (kind.startswith("auxnet") or kind == "2") and {"1", "e2e"} <= set(kinds):
                share, interval = place_between(per, kind)
                rec.update(place_between_k1_and_e2e=share, place_ci95=interval)
                place = f"{share:>8.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"
            lo, hi = rec["val_accuracy_ci95"]
            name = f"{rec['method']}" + (f" k={rec['k']}" if rec["method"] == "interlocking" else "")
            print(f"{name:>40} {rec['val_accuracy']:>8.4f}   [{lo:.4f}, {hi:.4f}] {place:>30}")
    result = {
        "records": list(records.values()),
        "aux_flop_ratio": ratios,
        "seconds": time.perf_counter() - started,
        "load_average": [load, os.getloadavg()[0]],
        "config": {
            "quick": args.quick,
            "seeds": seeds,
            "epochs": epochs,
            "lr": args.lr,
            "unit": args.unit,
            "steps": steps,
        },
    }
    print(
        f"{result['seconds']:.0f} s; load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
