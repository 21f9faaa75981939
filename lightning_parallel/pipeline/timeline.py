"""Draw a schedule, or a measured trace, as a rank x time grid (text) or as a PNG (plot extra).

A timeline is, per rank, a list of (action, start, end). For a schedule it comes from the cost model
(``simulate``); for a run it is each rank's ``PipelineRuntime.trace`` (seconds since the step began).

Text cells: forwards are ``F``, backwards ``B``, input- and weight-gradient work ``I`` and ``W``, followed by
the micro-batch; the up replica of Chimera uses lower case (``f3``, ``b3``) like the papers' two colours.
Idle time is ``.``. One column is one ``quantum`` of time (the shortest action by default).

``schedule_command`` is the ``lightning-parallel schedule`` subcommand. This module imports no Lightning;
matplotlib is imported only when a PNG is asked for.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lightning_parallel.pipeline.schedule import SCHEDULE_KINDS, Action, ActionKind, Schedule, build_schedule
from lightning_parallel.pipeline.simulate import SimulationResult, simulate

Timeline = Sequence[Sequence[tuple[Action, float, float]]]

_COLORS = {
    ActionKind.FORWARD: ("#4c72b0", "#a6bddb"),
    ActionKind.BACKWARD: ("#dd8452", "#fdd0a2"),
    ActionKind.BACKWARD_INPUT: ("#c44e52", "#f4a6a8"),
    ActionKind.BACKWARD_WEIGHT: ("#55a868", "#b8e0c0"),
}


def schedule_timeline(
    schedule: Schedule, result: SimulationResult
) -> list[list[tuple[Action, float, float]]]:
    """The per-rank (action, start, end) of a simulated schedule, all-reduce points left out."""
    out: list[list[tuple[Action, float, float]]] = [[] for _ in range(schedule.stages)]
    for r, order in enumerate(schedule.actions):
        for action in order:
            if action.kind is not ActionKind.ALL_REDUCE:
                start, end = result.times[action]
                out[r].append((action, start, end))
    return out


def gather_traces(
    trace: Sequence[tuple[Action, float, float]], group: Any = None
) -> list[list[tuple[Action, float, float]]]:
    """Collect every pipeline rank's measured ``PipelineRuntime.trace`` (collective over ``group``).

    Each rank's times are relative to its own step start; ranks start a step within a barrier's skew of each
    other, so call it after steps that began with a barrier for a faithful picture.

    Args:
        trace: this rank's ``PipelineRuntime.trace``.
        group: the pipeline's process group (default: the world); its ranks are ordered by pipeline rank.
    """
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, [(a, float(s), float(e)) for a, s, e in trace], group=group)
    return [list(rank) for rank in gathered]


def _label(action: Action, width: int) -> str:
    letter = action.kind.value if action.replica == 0 else action.kind.value.lower()
    return f"{letter}{action.micro_batch}"[:width].ljust(width)


def render_text(
    timeline: Timeline, *, quantum: float | None = None, cell: int = 3, max_columns: int = 400
) -> str:
    """Render a timeline as a rank x time grid.

    Args:
        timeline: per rank, (action, start, end) in any time unit.
        quantum: time per column (default: the shortest action, or the span / ``max_columns`` if larger).
        cell: characters per column.
        max_columns: the most columns drawn.
    """
    if cell < 1:
        raise ValueError(f"cell={cell} must be at least 1 character.")
    durations = [end - start for rank in timeline for _, start, end in rank if end > start]
    span = max((end for rank in timeline for _, _, end in rank), default=0.0)
    if not durations:
        return "\n".join(f"rank {r}: (idle)" for r in range(len(timeline)))
    if quantum is None:
        quantum = max(min(durations), span / max_columns)
    if quantum <= 0:
        raise ValueError(f"quantum={quantum} must be positive.")
    columns = max(1, round(span / quantum))
    lines = []
    for r, rank in enumerate(timeline):
        row = ["." * cell] * columns
        for action, start, end in rank:
            if action.kind is ActionKind.ALL_REDUCE:
                continue  # asynchronous, takes no rank time
            first = min(columns - 1, round(start / quantum))
            last = max(first + 1, min(columns, round(end / quantum)))
            row[first] = _label(action, cell)
            for c in range(first + 1, last):
                row[c] = "-" * cell if cell > 1 else "-"
        lines.append(f"rank {r:>2} |" + "".join(row) + "|")
    return "\n".join(lines)


def render_png(timeline: Timeline, path: str, *, title: str = "", time_unit: str = "units") -> None:
    """Draw a timeline as a Gantt chart (one row per rank) into a PNG file; needs matplotlib.

    Raises:
        ModuleNotFoundError: if matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            'Drawing a PNG timeline needs matplotlib: pip install "lightning-parallel[plot]"'
        ) from err
    ranks = len(timeline)
    fig, ax = plt.subplots(figsize=(12, 0.5 * ranks + 1.2))
    for r, rank in enumerate(timeline):
        for action, start, end in rank:
            if action.kind is ActionKind.ALL_REDUCE:
                continue
            color = _COLORS[action.kind][action.replica]
            ax.broken_barh(
                [(start, end - start)], (r - 0.4, 0.8), facecolors=color, edgecolors="black", linewidth=0.5
            )
            ax.text((start + end) / 2, r, str(action.micro_batch), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_title(title)
    kinds = sorted(
        {a.kind for rank in timeline for a, _, _ in rank} - {ActionKind.ALL_REDUCE}, key=lambda k: k.value
    )
    replicas = sorted({a.replica for rank in timeline for a, _, _ in rank})
    handles = [
        Patch(facecolor=_COLORS[k][rep], label=f"{k.name.lower()}{' (up)' if rep else ''}")
        for k in kinds
        for rep in replicas
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(handles), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(schedule: Schedule, result: SimulationResult) -> str:
    """The cost model's summary: makespan, efficiency, bubble ratio and stored activations per rank."""
    peaks = ", ".join(str(p) for p in result.peak_activations)
    return (
        f"{schedule.kind}: stages={schedule.stages} micro_batches={schedule.micro_batches} "
        f"replicas={schedule.replicas}\n"
        f"makespan {result.makespan:g}  efficiency {result.efficiency:.3f}  bubble ratio {result.bubble_ratio:.3f}\n"
        f"peak stored activations per rank (micro-batches): [{peaks}]"
    )


def schedule_command(argv: list[str] | None = None) -> int:
    """``lightning-parallel schedule``: print a schedule's grid, bubble ratio and memory per rank.

    Args:
        argv: the arguments after ``schedule`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-parallel schedule",
        description="Draw a pipeline schedule and print the cost model's bubble ratio and memory per rank.",
    )
    parser.add_argument("--kind", choices=SCHEDULE_KINDS, default="chimera", help="the schedule")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages D (= ranks)")
    parser.add_argument(
        "--micro-batches", type=int, default=None, help="micro-batches N per step (default: D)"
    )
    parser.add_argument("--forward-doubling", action="store_true", help="Chimera: two forwards per slot")
    parser.add_argument("--forward", type=float, default=1.0, help="forward time of one micro-batch")
    parser.add_argument(
        "--backward", type=float, default=2.0, help="backward time (split evenly into I and W)"
    )
    parser.add_argument("--transfer", type=float, default=0.0, help="time of one hand-off between ranks")
    parser.add_argument(
        "--first-stage-without-input-gradient",
        action="store_true",
        help="the first stage's input needs no gradient: its whole backward is weight-gradient work "
        "(chimera-zb orders for it)",
    )
    parser.add_argument("--png", default=None, help="also draw the timeline into this PNG file (plot extra)")
    args = parser.parse_args(argv)
    try:
        micro_batches = args.micro_batches if args.micro_batches is not None else args.stages
        no_input_gradient = args.first_stage_without_input_gradient
        extra = (
            {"first_stage_input_gradient": False} if no_input_gradient and args.kind == "chimera-zb" else {}
        )
        schedule = build_schedule(
            args.kind, args.stages, micro_batches, forward_doubling=args.forward_doubling, **extra
        )
        costs: dict[str, list[float]] = {}
        if no_input_gradient and args.stages > 1:
            half = args.backward / 2
            costs = {
                "backward_input": [0.0] + [half] * (args.stages - 1),
                "backward_weight": [args.backward] + [half] * (args.stages - 1),
            }
        result = simulate(
            schedule, forward=args.forward, backward=args.backward, transfer=args.transfer, **costs
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    timeline = schedule_timeline(schedule, result)
    print(render_text(timeline))
    print(describe(schedule, result))
    if args.png:
        try:
            render_png(
                timeline, args.png, title=f"{schedule.kind} D={schedule.stages} N={schedule.micro_batches}"
            )
        except ModuleNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(schedule_command())
