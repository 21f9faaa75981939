"""Pipeline schedules: ours (gpipe, 1f1b, chimera, chimera-zb) against torch.distributed.pipelining's.

Simulated compute (default): every stage's forward sleeps t_f, its backward 2 * t_f (half on the
input-gradient path, half on the weight-gradient path, so schedules that split backward can move the
weight half), while real (micro-batch, 64) fp32 tensors travel between gloo processes. Every rank does
the same compute per step in every schedule: torch's two-stage-per-rank schedules (Interleaved1F1B,
ZBVZeroBubble, DualPipeV) get stages of t_f / 2. The first stage's input needs no gradient, so its
whole backward sits on the weight path (in both implementations alike).

efficiency = N * 3 * t_f / measured step time (median of the timed steps, after warm-up; a step is timed
from a barrier to the slowest rank's end). predicted_efficiency replays the same per-rank order with the
same costs and no communication delay (ours: ``lightning_parallel.pipeline.simulate``; torch's: its
``pipeline_order`` replayed by the same rules; for its single-stage GPipe and 1F1B, our model of the same
textbook order). The run also measures the gloo send/recv round trip.

``--real`` runs real compute instead: transformer blocks (one thread per rank) and reports samples/s.

    python benchmarks/pipeline_schedules.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_parallel.pipeline.groups import build_pipeline_groups
from lightning_parallel.pipeline.runtime import PipelineRuntime
from lightning_parallel.pipeline.schedule import build_schedule
from lightning_parallel.pipeline.simulate import simulate
from lightning_parallel.pipeline.timeline import gather_traces, render_text

OURS = ("gpipe", "1f1b", "chimera", "chimera-zb")
TORCH = (
    "ScheduleGPipe",
    "Schedule1F1B",
    "ScheduleInterleaved1F1B",
    "ScheduleZBVZeroBubble",
    "ScheduleDualPipeV",
)
WIDTH = 64
MICRO = 4


class _Sleep(torch.autograd.Function):
    """Identity that sleeps ``fwd`` seconds in forward and ``bwd`` in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fwd: float, bwd: float) -> Tensor:
        ctx.bwd = bwd
        if fwd:
            time.sleep(fwd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.bwd:
            time.sleep(ctx.bwd)
        return grad, None, None


class SleepStage(nn.Module):
    """A stage of simulated compute: forward ``t`` s, input-gradient ``t`` s, weight-gradient ``t`` s."""

    def __init__(self, t: float, first: bool) -> None:
        super().__init__()
        self.t, self.first = t, first
        self.weight = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        h = _Sleep.apply(x, self.t, self.t)  # the input-gradient path (absent when x needs no gradient)
        w = _Sleep.apply(self.weight, 0.0, 2 * self.t if self.first else self.t)  # the weight-gradient path
        return h + w


class RealStage(nn.Module):
    def __init__(self, layers: int, first: bool, last: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH) if first else None
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(WIDTH, WIDTH) if last else None

    def forward(self, x: Tensor) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean()


def _batch(n: int, real: bool) -> tuple[Tensor, Tensor]:
    shape = (n * MICRO, 16, WIDTH) if real else (n * MICRO, WIDTH)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _make_stage(index: int, num_stages: int, t: float, cfg: dict[str, Any], v: int = 1) -> nn.Module:
    """Stage ``index`` of ``num_stages``; ``v`` stages per rank share one rank's compute."""
    if cfg["real"]:
        return RealStage(cfg["layers_per_rank"] // v, index == 0, index == num_stages - 1)
    return SleepStage(t, index == 0)


def _timed(step: Any, cfg: dict[str, Any]) -> list[float]:
    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        dist.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= cfg["warmup"]:
            times.append(float(elapsed))
    return times


def _round_trip(rank: int) -> float:
    buf = torch.zeros(MICRO, WIDTH)
    times = []
    for _ in range(30):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append(time.perf_counter() - start)
    value = torch.tensor([statistics.median(times[5:])], dtype=torch.float64)
    dist.broadcast(value, 0)
    return float(value)


def _run_ours(kind: str, rank: int, d: int, n: int, groups: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    # the first stage's input needs no gradient: order chimera-zb for that (its I is free, its W double)
    extra = {"first_stage_input_gradient": False} if kind == "chimera-zb" else {}
    schedule = build_schedule(kind, d, n, **extra)
    t = cfg["t_forward"]
    # Chimera's ranks hold two stages, each seeing half the micro-batches: the same compute per rank
    modules = {(rep, s): _make_stage(s, d, t, cfg) for rep, s in schedule.stages_of(rank)}
    runtime = PipelineRuntime(schedule, groups, modules, lambda mb: mb[0], lambda out, mb: _loss(out, mb[1]))
    x, y = _batch(n, cfg["real"])
    micro_batches = list(zip(x.chunk(n), y.chunk(n)))

    def step() -> None:
        for m in modules.values():
            m.zero_grad()
        runtime.train_step(micro_batches)

    times = _timed(step, cfg)
    if cfg["trace"]:
        traces = gather_traces(runtime.trace)  # the last timed step, measured
        if rank == 0:
            path = Path(f"{cfg['trace']}-{kind}-D{d}-N{n}.txt")
            path.write_text(render_text(traces, quantum=t / 2 if not cfg["real"] else None) + "\n")
    bin_ = [0.0] + [t] * (d - 1)
    bw = [2 * t] + [t] * (d - 1)
    predicted = None
    if not cfg["real"]:
        predicted = simulate(
            schedule, forward=t, backward=2 * t, backward_input=bin_, backward_weight=bw
        ).efficiency
    return _record(kind, "lightning_parallel", d, n, times, predicted, cfg)


def _run_torch(name: str, rank: int, d: int, n: int, cfg: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed import pipelining

    cls = getattr(pipelining, name)
    if name == "ScheduleDualPipeV" and n < 2 * d:
        return {
            **_record(name, "torch", d, n, [], None, cfg),
            "status": f"refused: needs micro_batches >= {2 * d}",
        }
    multi = name not in ("ScheduleGPipe", "Schedule1F1B")
    v = 2 if multi else 1
    t = cfg["t_forward"] / v
    if not multi:
        indices = [rank]
    elif name == "ScheduleInterleaved1F1B":
        indices = [rank, rank + d]
    else:
        indices = [rank, 2 * d - 1 - rank]
    stages = [
        pipelining.PipelineStage(_make_stage(i, d * v, t, cfg, v), i, d * v, torch.device("cpu"))
        for i in indices
    ]
    schedule = cls(stages if multi else stages[0], n_microbatches=n, loss_fn=_loss)
    x, y = _batch(n, cfg["real"])
    first, last = 0 in indices, d * v - 1 in indices

    def step() -> None:
        for st in stages:
            st.submod.zero_grad()
        args = (x,) if first else ()
        kwargs: dict[str, Any] = {"target": y, "losses": []} if last else {}
        schedule.step(*args, **kwargs)

    times = _timed(step, cfg)
    if cfg["real"]:
        predicted = None
    elif multi:
        predicted = _replay_torch(schedule, d, v, cfg["t_forward"])
    else:
        # torch's single-stage schedules run the textbook GPipe/1F1B loops (the pipeline_order they
        # publish for display skips micro-batch 0 on the last rank of 1F1B), the same orders as ours
        ours = build_schedule("gpipe" if name == "ScheduleGPipe" else "1f1b", d, n)
        bw = [2 * t] + [t] * (d - 1)
        predicted = simulate(ours, forward=t, backward=2 * t, backward_weight=bw).efficiency
    return _record(name, "torch", d, n, times, predicted, cfg)


def _replay_torch(schedule: Any, d: int, v: int, t_forward: float) -> float | None:
    """The efficiency of torch's per-rank order with our costs and no communication delay."""
    order = getattr(schedule, "pipeline_order", None)
    if order is None:
        return None
    num_stages = d * v
    t = t_forward / v
    cost = {
        "F": [t] * num_stages,
        "B": [2 * t] * num_stages,
        "I": [0.0] + [t] * (num_stages - 1),
        "W": [2 * t] + [t] * (num_stages - 1),
    }
    per_rank: dict[int, list[tuple[str, int, int]]] = {}
    for r, actions in order.items():
        flat: list[tuple[str, int, int]] = []
        for a in actions:
            if a is None:
                continue
            subs = a.sub_actions if a.sub_actions is not None else (a,)
            for sub in subs:
                kind = sub.computation_type.value
                if kind in cost:
                    flat.append((kind, sub.stage_index, sub.microbatch_index))
        per_rank[r] = flat
    # the input gradient of (s, m) comes from an "I" or, for schedules that mix both, a full "B"
    grad_end: dict[tuple[int, int], float] = {}
    done: dict[tuple[str, int, int], float] = {}
    free = dict.fromkeys(per_rank, 0.0)
    pos = dict.fromkeys(per_rank, 0)
    total = sum(len(a) for a in per_rank.values())
    while len(done) < total:
        progressed = False
        for r, acts in per_rank.items():
            while pos[r] < len(acts):
                kind, s, m = acts[pos[r]]
                ready: list[float | None] = []
                if kind == "F" and s > 0:
                    ready.append(done.get(("F", s - 1, m)))
                elif kind in ("B", "I"):
                    ready.append(done.get(("F", s, m)))
                    if s < num_stages - 1:
                        ready.append(grad_end.get((s + 1, m)))
                elif kind == "W":
                    ready.append(done.get(("I", s, m)))
                if any(t_ready is None for t_ready in ready):
                    break
                start = max([free[r], *[t_ready for t_ready in ready if t_ready is not None]])
                done[(kind, s, m)] = free[r] = start + cost[kind][s]
                if kind in ("B", "I"):
                    grad_end[(s, m)] = free[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            return None
    busy = sum(cost[k][s] for acts in per_rank.values() for k, s, _ in acts)
    return busy / (len(per_rank) * max(done.values()))


def _record(
    schedule: str, impl: str, d: int, n: int, times: list[float], predicted: float | None, cfg: dict[str, Any]
) -> dict[str, Any]:
    step_seconds = statistics.median(times) if times else None
    ideal = n * 3 * cfg["t_forward"]
    record: dict[str, Any] = {
        "schedule": schedule,
        "impl": impl,
        "stages": d,
        "micro_batches": n,
        "step_seconds": step_seconds,
        "efficiency": ideal / step_seconds if step_seconds and not cfg["real"] else None,
        "predicted_efficiency": predicted,
        "status": "ok",
    }
    if cfg["real"] and step_seconds:
        record["samples_per_second"] = n * MICRO / step_seconds
    return record


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _point_worker(rank: int, d: int, n: int, port: int, cfg: dict[str, Any], results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=d, timeout=timedelta(seconds=cfg["timeout"]))
        if rank == 0:
            _log(f"(D={d}, N={n}) process group up")
        groups = build_pipeline_groups(d, d, timeout_s=cfg["timeout"])
        if rank == 0:
            _log(f"(D={d}, N={n}) pipeline groups up")
        rtt = _round_trip(rank)
        if rank == 0:
            results.put(("rtt", rtt))
        for kind in cfg["ours"]:
            record = _run_ours(kind, rank, d, n, groups, cfg)
            if rank == 0:
                results.put(("record", {**record, "rtt_seconds": rtt}))
        for name in cfg["torch"]:
            try:
                record = _run_torch(name, rank, d, n, cfg)
            except Exception as err:  # a torch schedule that refuses a point is reported, not fatal
                record = {**_record(name, "torch", d, n, [], None, cfg), "status": f"error: {err}"[:200]}
            if rank == 0:
                results.put(("record", {**record, "rtt_seconds": rtt}))
        dist.barrier()
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank == 0:
            results.put(("done", None))


def run_point(d: int, n: int, cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], float | None]:
    """Run every schedule at (D, N) in D fresh processes; return rank 0's records and the round trip."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork: the parent has imported torch already, and spawning 8 fresh interpreters takes minutes on a
    # loaded 2-core machine; the parent runs no torch work, so the children inherit no thread state
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_point_worker, args=(r, d, n, port, cfg, results), daemon=True) for r in range(d)
    ]
    for proc in procs:
        proc.start()
    records: list[dict[str, Any]] = []
    rtt = None
    deadline = time.monotonic() + cfg["point_timeout"]
    try:
        while time.monotonic() < deadline:
            try:
                what, value = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if what == "rtt":
                rtt = value
            elif what == "record":
                records.append(value)
                _print_row(value)
            elif what == "error":
                print(value, file=sys.stderr)
            else:
                break
        else:
            print(f"(D={d}, N={n}) timed out after {cfg['point_timeout']} s", file=sys.stderr)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    return records, rtt


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_row(r: dict[str, Any]) -> None:
    extra = f"  {r['samples_per_second']:.1f} samples/s" if "samples_per_second" in r else ""
    status = "" if r["status"] == "ok" else f"  ({r['status']})"
    print(
        f"{r['stages']:>2} {r['micro_batches']:>3}  {r['impl']:<18} {r['schedule']:<24} "
        f"{_fmt(r['step_seconds'], 4):>8} {_fmt(r['efficiency']):>6} {_fmt(r['predicted_efficiency']):>6}{extra}{status}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="(4,4) and (8,8) only, one warm-up step (under 2 min)"
    )
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    parser.add_argument("--t-forward", type=float, default=0.02, help="simulated forward time per stage, s")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--points", default=None, help="comma-separated DxN, e.g. 4x4,8x8")
    parser.add_argument("--real", action="store_true", help="real compute: transformer blocks, samples/s")
    parser.add_argument(
        "--layers-per-rank",
        type=int,
        default=2,
        help="--real: transformer blocks per rank (even: split over two stages)",
    )
    parser.add_argument(
        "--trace", default=None, help="write measured text timelines of our schedules to PREFIX-*.txt"
    )
    parser.add_argument("--ours", default=",".join(OURS), help="our schedules to run")
    parser.add_argument("--torch", default=",".join(TORCH), help="torch schedules to run ('' for none)")
    args = parser.parse_args(argv)
    points = [(4, 4), (4, 8), (8, 8), (8, 16)]
    t_forward = args.t_forward
    warmup = args.warmup
    if args.quick:
        points, warmup = [(4, 4), (8, 8)], 1
    if args.points:
        points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]  # type: ignore[misc]
    cfg = {
        "t_forward": t_forward,
        "steps": args.steps,
        "warmup": warmup,
        "real": args.real,
        "layers_per_rank": args.layers_per_rank,
        "ours": [k for k in args.ours.split(",") if k],
        "torch": [k for k in args.torch.split(",") if k],
        "trace": args.trace,
        "timeout": 120.0,
        "point_timeout": 600.0,
    }
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; t_f = {t_forward * 1000:.0f} ms")
    print(" D   N  impl               schedule                 step(s)    eff   pred")
    all_records: list[dict[str, Any]] = []
    for d, n in points:
        records, rtt = run_point(d, n, cfg)
        print(f"   (D={d}, N={n}) gloo send/recv round trip {_fmt(rtt and rtt * 1e3, 2)} ms")
        all_records += records
    if args.json:
        Path(args.json).write_text(json.dumps(all_records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
