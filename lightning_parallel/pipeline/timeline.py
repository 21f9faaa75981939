"""Draw a schedule, or a measured trace, as a rank x time grid (text) or as a PNG (plot extra).

A timeline is, per rank, a list of (action, start, end). For a schedule it comes from the cost model
(``simulate``); for a run it is each rank's ``PipelineRuntime.trace`` (seconds since the step began).

Text cells: forwards are ``F``, backwards ``B``, input- and weight-gradient work ``I`` and ``W``, followed by
the micro-batch; the up replica of Chimera uses lower case (``f3``, ``b3``) like the papers' two colours.
Idle time is ``.``. One column is one ``quantum`` of time (the shortest action by default).

The ``lightning-parallel schedule`` subcommand that prints these lives in :mod:`lightning_parallel.cli`. This
module imports no Lightning; matplotlib is imported only when a PNG is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_parallel.pipeline.schedule import Action, ActionKind, Schedule
from lightning_parallel.pipeline.simulate import SimulationResult

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
