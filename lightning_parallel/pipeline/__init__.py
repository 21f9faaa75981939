"""The pipeline engine: schedules, a point-to-point runtime, partitioning and timelines. Imports no Lightning.

- :func:`build_schedule` / :func:`validate_schedule`: per-rank action lists for ``gpipe``, ``1f1b``,
  ``chimera`` and ``chimera-zb``, and a proof that one is complete and cannot deadlock.
- :func:`simulate`: the cost model (makespan, efficiency, bubble ratio, peak stored activations per rank).
- :func:`build_pipeline_groups` and :class:`PipelineRuntime`: run one rank's actions over torch.distributed.
- :func:`partition_blocks`: contiguous, balanced stages (``uniform``, ``parameters``, ``profile``).
- :func:`render_text` / :func:`render_png`: timelines of a schedule or a measured trace.
"""

from lightning_parallel.pipeline.groups import PipelineGroups, build_pipeline_groups
from lightning_parallel.pipeline.partition import partition_blocks
from lightning_parallel.pipeline.runtime import PipelineRuntime
from lightning_parallel.pipeline.schedule import (
    Action,
    ActionKind,
    Schedule,
    build_schedule,
    validate_schedule,
)
from lightning_parallel.pipeline.simulate import SimulationResult, simulate
from lightning_parallel.pipeline.timeline import render_png, render_text

__all__ = [
    "Action",
    "ActionKind",
    "PipelineGroups",
    "PipelineRuntime",
    "Schedule",
    "SimulationResult",
    "build_pipeline_groups",
    "build_schedule",
    "partition_blocks",
    "render_png",
    "render_text",
    "simulate",
    "validate_schedule",
]
