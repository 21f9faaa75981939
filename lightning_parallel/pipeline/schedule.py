"""Pipeline schedules: the per-rank action lists of GPipe, 1F1B, Chimera and zero-bubble Chimera.

A schedule is, for each pipeline rank, the ordered list of actions that rank runs in one optimizer step:
forward (``F``), backward (``B``), or backward split into input-gradient (``I``) and weight-gradient (``W``)
work, of a (replica, stage, micro-batch), plus all-reduce points (``R``) where the gradients of one
(replica, stage) are complete and may be summed with the other replica's copy.

Vocabulary: D = ``stages`` (= pipeline ranks), N = ``micro_batches`` per optimizer step over all replicas.
Replica 0 ("down") places stage s on rank s; replica 1 ("up", Chimera only) places stage s on rank D-1-s.

Design decisions:

- Micro-batches alternate between the replicas: even ones run down, odd ones up (pairs alternate with
  forward doubling). Chimera's basic unit is N = D micro-batches, D/2 per replica; its per-rank order follows the paper's construction (with ``half = D/2``,
  ``a = half - r`` folded to ``1 - a`` when not positive, ``b = half - a``: ``a`` forwards of the rank's
  own direction, ``b`` pairs (other, own), then ``a`` pairs (forward, backward), ``b`` pairs of backwards and
  ``a`` backwards; the backwards take the forwards' direction sequence with the directions swapped).
  N > D concatenates units. ``forward_doubling`` groups micro-batches in pairs (units of 2D micro-batches)
  and runs each slot of the basic order for both micro-batches of a pair back to back.
- ``chimera-zb`` is built by list scheduling with unit costs F = I = W = 1: a free rank runs a ready
  input-gradient first, else a ready forward (at most D stored activations per rank), else a ready
  weight-gradient, oldest micro-batch first. It reaches the lower bound 3N + D/2 - 1.
- All-reduce points are emitted for Chimera only (two replicas); single-replica schedules leave data
  parallelism to the caller.

This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

SCHEDULE_KINDS = ("gpipe", "1f1b", "chimera", "chimera-zb")


class ActionKind(str, Enum):
    """What an action does."""

    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"
    ALL_REDUCE = "R"


@dataclass(frozen=True)
class Action:
    """One unit of work on one rank.

    Args:
        kind: forward, backward, input-gradient, weight-gradient or all-reduce point.
        replica: 0 for the "down" pipeline, 1 for the "up" pipeline.
        stage: the stage index within the replica.
        micro_batch: the micro-batch index in the optimizer step, ``-1`` for an all-reduce point.
    """

    kind: ActionKind
    replica: int
    stage: int
    micro_batch: int

    def __str__(self) -> str:
        if self.kind is ActionKind.ALL_REDUCE:
            return f"R{'du'[self.replica]}{self.stage}"
        return f"{self.kind.value}{'du'[self.replica]}{self.stage}:{self.micro_batch}"


@dataclass(frozen=True)
class Schedule:
    """The per-rank action lists of one optimizer step.

    Args:
        kind: one of ``"gpipe"``, ``"1f1b"``, ``"chimera"``, ``"chimera-zb"``.
        stages: the number of stages D (= pipeline ranks).
        micro_batches: the number of micro-batches N per optimizer step over all replicas.
        replicas: 1, or 2 for Chimera.
        actions: for each pipeline rank, its actions in execution order.
        forward_doubling: whether Chimera's forward slots run two micro-batches.
    """

    kind: str
    stages: int
    micro_batches: int
    replicas: int
    actions: tuple[tuple[Action, ...], ...]
    forward_doubling: bool = False
    _replica_of: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def rank_of(self, replica: int, stage: int) -> int:
        """The pipeline rank that holds ``stage`` of ``replica``."""
        return stage if replica == 0 else self.stages - 1 - stage

    def stages_of(self, rank: int) -> list[tuple[int, int]]:
        """The (replica, stage) pairs held by pipeline ``rank``, down replica first."""
        return [(replica, self.stage_on(replica, rank)) for replica in range(self.replicas)]

    def stage_on(self, replica: int, rank: int) -> int:
        """The stage of ``replica`` held by pipeline ``rank``."""
        return rank if replica == 0 else self.stages - 1 - rank

    def replica_of(self, micro_batch: int) -> int:
        """The replica (pipeline) that micro-batch ``micro_batch`` runs in."""
        if self._replica_of:
            return self._replica_of[micro_batch]
        return 0

    def is_split_backward(self) -> bool:
        """Whether backward is split into input-gradient and weight-gradient actions."""
        return any(a.kind is ActionKind.BACKWARD_INPUT for rank in self.actions for a in rank)


def build_schedule(
    kind: str,
    stages: int,
    micro_batches: int,
    *,
    forward_doubling: bool = False,
    first_stage_input_gradient: bool = True,
) -> Schedule:
    """Build and validate the schedule of one optimizer step.

    Args:
        kind: ``"gpipe"``, ``"1f1b"``, ``"chimera"`` or ``"chimera-zb"``.
        stages: the number of stages D (>= 1; even and >= 2 for Chimera).
        micro_batches: the number of micro-batches N per step (>= 1; for Chimera a multiple of D, or of
            2D with ``forward_doubling``; for chimera-zb a multiple of D).
        forward_doubling: Chimera only: run every forward slot for two micro-batches.
        first_stage_input_gradient: chimera-zb only: order the work assuming the first stage computes an
            input gradient (I = W = 1 everywhere, the textbook case). ``False`` orders it for a first stage
            whose input needs no gradient, so its whole backward is weight-gradient work (I = 0, W = 2),
            which is what the runtime does for data inputs.

    Raises:
        ValueError: for an unknown kind or a (stages, micro_batches) pair the kind cannot schedule.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"Unknown schedule kind={kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}.")
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages={stages!r} must be a positive integer.")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be a positive integer.")
    if forward_doubling and kind != "chimera":
        raise ValueError(f"forward_doubling=True needs kind='chimera', got kind={kind!r}.")
    if kind.startswith("chimera"):
        if stages < 2 or stages % 2:
            raise ValueError(
                f"{kind} needs an even number of stages >= 2 (two mirrored pipelines); got stages={stages}. "
                f"Use stages={max(2, stages + stages % 2)} or kind='1f1b'."
            )
        unit = 2 * stages if forward_doubling else stages
        if micro_batches % unit:
            what = "2 * stages (forward doubling)" if forward_doubling else "stages"
            raise ValueError(
                f"{kind} with stages={stages} needs micro_batches a multiple of {what} = {unit}; got "
                f"micro_batches={micro_batches}. Use micro_batches={unit * max(1, round(micro_batches / unit))}."
            )
    if kind == "gpipe":
        schedule = _gpipe(stages, micro_batches)
    elif kind == "1f1b":
        schedule = _one_f_one_b(stages, micro_batches)
    elif kind == "chimera":
        schedule = _chimera(stages, micro_batches, forward_doubling)
    else:
        schedule = _chimera_zero_bubble(stages, micro_batches, first_stage_input_gradient)
    validate_schedule(schedule)
    return schedule


def _gpipe(d: int, n: int) -> Schedule:
    ranks = []
    for r in range(d):
        fwd = [Action(ActionKind.FORWARD, 0, r, m) for m in range(n)]
        bwd = [Action(ActionKind.BACKWARD, 0, r, m) for m in range(n)]
        ranks.append(tuple(fwd + bwd))
    return Schedule("gpipe", d, n, 1, tuple(ranks))


def _one_f_one_b(d: int, n: int) -> Schedule:
    ranks = []
    for r in range(d):
        warmup = min(d - 1 - r, n)
        order = [Action(ActionKind.FORWARD, 0, r, m) for m in range(warmup)]
        for m in range(warmup, n):
            order.append(Action(ActionKind.FORWARD, 0, r, m))
            order.append(Action(ActionKind.BACKWARD, 0, r, m - warmup))
        order += [Action(ActionKind.BACKWARD, 0, r, m) for m in range(n - warmup, n)]
        ranks.append(tuple(order))
    return Schedule("1f1b", d, n, 1, tuple(ranks))


def _chimera_replicas(n: int, group: int) -> tuple[int, ...]:
    """Replica of each micro-batch: groups of ``group`` consecutive micro-batches alternate down, up."""
    return tuple((m // group) % 2 for m in range(n))


def _chimera_basic_directions(d: int, r: int) -> tuple[list[bool], list[str]]:
    """The basic unit's per-rank pattern: forward directions (True = own) and the F/B slot sequence."""
    half = d // 2
    a = half - r
    if a <= 0:
        a = 1 - a
    b = half - a
    forwards = [True] * a + [False, True] * b + [False] * a
    slots = ["F"] * a + ["F", "F"] * b + ["F", "B"] * a + ["B", "B"] * b + ["B"] * a
    return forwards, slots


def _chimera(d: int, n: int, forward_doubling: bool) -> Schedule:
    group = 2 if forward_doubling else 1
    replica_of = _chimera_replicas(n, group)
    unit = d * group
    ranks = []
    for r in range(d):
        own = 0 if r < d // 2 else 1
        forwards, slots = _chimera_basic_directions(d, r)
        backwards = [not is_own for is_own in forwards]
        order: list[Action] = []
        for u in range(n // unit):
            # micro-batches of this unit per replica, in injection order, grouped for forward doubling
            mbs = {
                rep: [m for m in range(u * unit, (u + 1) * unit) if replica_of[m] == rep] for rep in (0, 1)
            }
            queues = {
                (kind, rep): [mbs[rep][i : i + group] for i in range(0, len(mbs[rep]), group)]
                for kind in "FB"
                for rep in (0, 1)
            }
            f_iter, b_iter = iter(forwards), iter(backwards)
            for slot in slots:
                is_own = next(f_iter) if slot == "F" else next(b_iter)
                rep = own if is_own else 1 - own
                kind = ActionKind.FORWARD if slot == "F" else ActionKind.BACKWARD
                stage = r if rep == 0 else d - 1 - r
                for m in queues[(slot, rep)].pop(0):
                    order.append(Action(kind, rep, stage, m))
        ranks.append(tuple(_with_all_reduce(order)))
    return Schedule("chimera", d, n, 2, tuple(ranks), forward_doubling, replica_of)


def _with_all_reduce(order: list[Action]) -> list[Action]:
    """Insert an all-reduce point right after the last backward work of each (replica, stage)."""
    last: dict[tuple[int, int], int] = {}
    for i, action in enumerate(order):
        if action.kind in (ActionKind.BACKWARD, ActionKind.BACKWARD_WEIGHT):
            last[(action.replica, action.stage)] = i
    out: list[Action] = []
    for i, action in enumerate(order):
        out.append(action)
        for (rep, stage), idx in last.items():
            if idx == i:
                out.append(Action(ActionKind.ALL_REDUCE, rep, stage, -1))
    return out


def _chimera_zero_bubble(d: int, n: int, first_stage_input_gradient: bool) -> Schedule:
    replica_of = _chimera_replicas(n, 1)
    skeleton = Schedule("chimera-zb", d, n, 2, tuple(() for _ in range(d)), False, replica_of)
    input_cost = [1] * d if first_stage_input_gradient else [0] + [1] * (d - 1)
    weight_cost = [1] * d if first_stage_input_gradient else [2] + [1] * (d - 1)
    orders = list_schedule(skeleton, max_activations=d, input_cost=input_cost, weight_cost=weight_cost)
    return Schedule(
        "chimera-zb", d, n, 2, tuple(tuple(_with_all_reduce(o)) for o in orders), False, replica_of
    )


def list_schedule(
    skeleton: Schedule,
    *,
    max_activations: int,
    input_cost: Sequence[int] | None = None,
    weight_cost: Sequence[int] | None = None,
) -> list[list[Action]]:
    """Order split-backward work greedily: I before F before W, oldest micro-batch first.

    Time advances in whole units; a forward costs 1.

    Args:
        skeleton: gives D, N, the replicas and the micro-batch placement (its actions are ignored).
        max_activations: the most micro-batches a rank may hold between a forward and its weight-gradient.
        input_cost: per stage, the input-gradient cost in units (default 1; 0 makes it instantaneous).
        weight_cost: per stage, the weight-gradient cost in units (default 1).
    """
    d, n = skeleton.stages, skeleton.micro_batches
    cost = {
        ActionKind.FORWARD: [1] * d,
        ActionKind.BACKWARD_INPUT: list(input_cost) if input_cost is not None else [1] * d,
        ActionKind.BACKWARD_WEIGHT: list(weight_cost) if weight_cost is not None else [1] * d,
    }
    end: dict[Action, int] = {}
    orders: list[list[Action]] = [[] for _ in range(d)]
    pending: list[set[Action]] = [set() for _ in range(d)]
    for m in range(n):
        rep = skeleton.replica_of(m)
        for s in range(d):
            for kind in cost:
                pending[skeleton.rank_of(rep, s)].add(Action(kind, rep, s, m))
    busy_until = [0] * d
    t = 0
    priority = {ActionKind.BACKWARD_INPUT: 0, ActionKind.FORWARD: 1, ActionKind.BACKWARD_WEIGHT: 2}
    limit = 10 * (3 * n + d) * d * (1 + max(max(c) for c in cost.values()))
    while any(pending):
        for r in range(d):
            while busy_until[r] <= t and pending[r]:
                held = sum(
                    1 if a.kind is ActionKind.FORWARD else -1
                    for a in orders[r]
                    if a.kind is ActionKind.FORWARD or (a.kind is ActionKind.BACKWARD_WEIGHT and end[a] <= t)
                )
                ready = [
                    a
                    for a in pending[r]
                    if _ready(a, end, t, d) and not (a.kind is ActionKind.FORWARD and held >= max_activations)
                ]
                if not ready:
                    break
                best = min(ready, key=lambda a: (priority[a.kind], a.micro_batch))
                pending[r].discard(best)
                orders[r].append(best)
                end[best] = busy_until[r] = t + cost[best.kind][best.stage]
        t += 1
        if t > limit:
            raise RuntimeError("list scheduling made no progress; this is a bug")
    return orders


def _ready(action: Action, end: dict[Action, int], t: int, d: int) -> bool:
    rep, s, m = action.replica, action.stage, action.micro_batch

    def done(kind: ActionKind, stage: int) -> bool:
        finish = end.get(Action(kind, rep, stage, m))
        return finish is not None and finish <= t

    if action.kind is ActionKind.FORWARD:
        return s == 0 or done(ActionKind.FORWARD, s - 1)
    if action.kind is ActionKind.BACKWARD_INPUT:
        return done(ActionKind.FORWARD, s) and (s == d - 1 or done(ActionKind.BACKWARD_INPUT, s + 1))
    return done(ActionKind.BACKWARD_INPUT, s)


def dependencies(schedule: Schedule, action: Action) -> list[Action]:
    """The actions whose results ``action`` needs (on any rank)."""
    rep, s, m, d = action.replica, action.stage, action.micro_batch, schedule.stages
    split = schedule.is_split_backward()
    grad_kind = ActionKind.BACKWARD_INPUT if split else ActionKind.BACKWARD
    if action.kind is ActionKind.FORWARD:
        return [] if s == 0 else [Action(ActionKind.FORWARD, rep, s - 1, m)]
    if action.kind in (ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT):
        deps = [Action(ActionKind.FORWARD, rep, s, m)]
        if s < d - 1:
            deps.append(Action(grad_kind, rep, s + 1, m))
        return deps
    if action.kind is ActionKind.BACKWARD_WEIGHT:
        return [Action(ActionKind.BACKWARD_INPUT, rep, s, m)]
    last_kind = ActionKind.BACKWARD_WEIGHT if split else ActionKind.BACKWARD
    return [
        Action(last_kind, rep, s, mb)
        for mb in range(schedule.micro_batches)
        if schedule.replica_of(mb) == rep
    ]


def validate_schedule(schedule: Schedule) -> None:
    """Check that a schedule is complete, respects dependencies and cannot deadlock.

    Complete: every micro-batch runs, in its replica only, forward then backward (or input-gradient then
    weight-gradient) exactly once per stage, on the rank that holds the stage; a two-replica schedule has
    one all-reduce point per (replica, stage), after that stage's last backward work. Deadlock-free: executing every rank's list in
    order, where an action waits for its dependencies on other ranks, finishes.

    Raises:
        ValueError: naming the first problem found.
    """
    d, n = schedule.stages, schedule.micro_batches
    if len(schedule.actions) != d:
        raise ValueError(f"schedule.actions has {len(schedule.actions)} ranks; expected stages={d}.")
    split = schedule.is_split_backward()
    backward_kinds = (
        (ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT) if split else (ActionKind.BACKWARD,)
    )
    expected: set[Action] = set()
    for m in range(n):
        rep = schedule.replica_of(m)
        for s in range(d):
            expected.update(Action(k, rep, s, m) for k in (ActionKind.FORWARD, *backward_kinds))
    if schedule.replicas == 2:
        expected.update(Action(ActionKind.ALL_REDUCE, rep, s, -1) for rep in (0, 1) for s in range(d))
    seen: set[Action] = set()
    for r, order in enumerate(schedule.actions):
        for action in order:
            if action in seen:
                raise ValueError(f"Action {action} appears twice in the schedule (rank {r}).")
            if action not in expected:
                raise ValueError(
                    f"Action {action} on rank {r} is not part of a complete {schedule.kind} step."
                )
            if schedule.rank_of(action.replica, action.stage) != r:
                raise ValueError(
                    f"Action {action} is on rank {r}, but stage {action.stage} of replica {action.replica} "
                    f"lives on rank {schedule.rank_of(action.replica, action.stage)}."
                )
            seen.add(action)
    missing = expected - seen
    if missing:
        first = min(missing, key=lambda a: (a.micro_batch, a.stage, a.kind.value))
        raise ValueError(f"The schedule is incomplete: {len(missing)} actions are missing, e.g. {first}.")
    execution_order(schedule)


def execution_order(schedule: Schedule) -> list[Action]:
    """A global order in which every rank runs its list in order and every dependency runs first.

    Raises:
        ValueError: if the ranks would wait on each other forever (deadlock), naming the blocked actions.
    """
    done: set[Action] = set()
    position = [0] * schedule.stages
    out: list[Action] = []
    total = sum(len(o) for o in schedule.actions)
    while len(out) < total:
        progressed = False
        for r, order in enumerate(schedule.actions):
            while position[r] < len(order):
                action = order[position[r]]
                if not all(dep in done for dep in dependencies(schedule, action)):
                    break
                done.add(action)
                out.append(action)
                position[r] += 1
                progressed = True
        if not progressed:
            blocked = [str(o[p]) for o, p in zip(schedule.actions, position) if p < len(o)]
            raise ValueError(f"The schedule deadlocks: every rank waits, next actions {blocked}.")
    return out


__all__ = [
    "SCHEDULE_KINDS",
    "Action",
    "ActionKind",
    "Schedule",
    "build_schedule",
    "dependencies",
    "execution_order",
    "list_schedule",
    "validate_schedule",
]
