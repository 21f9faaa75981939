"""The cost model: replay a schedule with given per-stage costs and measure makespan, bubbles and memory.

Every rank runs its action list in order. An action starts when its rank is free and every dependency has
finished, plus ``transfer`` when the dependency ran on another rank (one activation or gradient hand-off).
All-reduce points take no rank time: the runtime issues them asynchronously.

- efficiency: the mean over ranks of busy time / makespan (1 - bubble ratio). For GPipe and 1F1B with
  uniform costs it is N / (N + D - 1).
- peak activations: per rank, the most micro-batches stored at once, counted from a forward until the
  backward (or weight-gradient) that frees it, following the rank's order.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_parallel.pipeline.schedule import Action, ActionKind, Schedule, dependencies, execution_order

Cost = float | Sequence[float]


@dataclass(frozen=True)
class SimulationResult:
    """What the cost model predicts for one optimizer step.

    Args:
        makespan: time from the first action's start to the last action's end.
        efficiency: mean busy time per rank / makespan.
        bubble_ratio: ``1 - efficiency``.
        peak_activations: per rank, the most micro-batches whose activations are stored at once.
        busy: per rank, the total compute time.
        times: per action, its (start, end) time.
    """

    makespan: float
    efficiency: float
    bubble_ratio: float
    peak_activations: list[int]
    busy: list[float]
    times: dict[Action, tuple[float, float]]


def _per_stage(name: str, cost: Cost, stages: int) -> list[float]:
    if isinstance(cost, (int, float)):
        values = [float(cost)] * stages
    else:
        values = [float(c) for c in cost]
        if len(values) != stages:
            raise ValueError(f"{name} has {len(values)} per-stage costs; expected one per stage ({stages}).")
    if any(v < 0 for v in values):
        raise ValueError(f"{name}={cost!r} must be non-negative.")
    return values


def simulate(
    schedule: Schedule,
    *,
    forward: Cost = 1.0,
    backward: Cost = 2.0,
    transfer: float = 0.0,
    backward_input: Cost | None = None,
    backward_weight: Cost | None = None,
) -> SimulationResult:
    """Replay ``schedule`` with per-stage costs.

    Args:
        schedule: the schedule to replay.
        forward: forward time of one micro-batch, one value or one per stage.
        backward: full backward time (used by F/B schedules; split evenly into I and W by default).
        transfer: time of one hand-off between ranks.
        backward_input: input-gradient time (split schedules); default ``backward / 2``.
        backward_weight: weight-gradient time (split schedules); default ``backward / 2``.
    """
    d = schedule.stages
    if transfer < 0:
        raise ValueError(f"transfer={transfer!r} must be non-negative.")
    fwd = _per_stage("forward", forward, d)
    bwd = _per_stage("backward", backward, d)
    bin_ = (
        _per_stage("backward_input", backward_input, d)
        if backward_input is not None
        else [b / 2 for b in bwd]
    )
    bw = (
        _per_stage("backward_weight", backward_weight, d)
        if backward_weight is not None
        else [b / 2 for b in bwd]
    )
    cost = {
        ActionKind.FORWARD: fwd,
        ActionKind.BACKWARD: bwd,
        ActionKind.BACKWARD_INPUT: bin_,
        ActionKind.BACKWARD_WEIGHT: bw,
        ActionKind.ALL_REDUCE: [0.0] * d,
    }
    free = [0.0] * d
    busy = [0.0] * d
    times: dict[Action, tuple[float, float]] = {}
    for action in execution_order(schedule):
        r = schedule.rank_of(action.replica, action.stage)
        start = free[r]
        for dep in dependencies(schedule, action):
            hop = transfer if schedule.rank_of(dep.replica, dep.stage) != r else 0.0
            start = max(start, times[dep][1] + hop)
        duration = cost[action.kind][action.stage]
        times[action] = (start, start + duration)
        if action.kind is not ActionKind.ALL_REDUCE:
            free[r] = start + duration
            busy[r] += duration
    makespan = max(end for _, end in times.values()) if times else 0.0
    efficiency = sum(busy) / (d * makespan) if makespan > 0 else 1.0
    return SimulationResult(
        makespan=makespan,
        efficiency=efficiency,
        bubble_ratio=1.0 - efficiency,
        peak_activations=[peak_activations(order) for order in schedule.actions],
        busy=busy,
        times=times,
    )


def peak_activations(order: Sequence[Action]) -> int:
    """The most micro-batches stored at once by a rank running ``order``."""
    split = any(a.kind is ActionKind.BACKWARD_INPUT for a in order)
    release = ActionKind.BACKWARD_WEIGHT if split else ActionKind.BACKWARD
    held = peak = 0
    for action in order:
        if action.kind is ActionKind.FORWARD:
            held += 1
            peak = max(peak, held)
        elif action.kind is release:
            held -= 1
    return peak

