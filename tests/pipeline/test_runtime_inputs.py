"""Bad input to the runtime and the group layout, caught before any communication."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_parallel.pipeline.groups import PipelineGroups, build_pipeline_groups, check_layout
from lightning_parallel.pipeline.runtime import PipelineRuntime
from lightning_parallel.pipeline.schedule import build_schedule


def _groups(stages: int, pipeline_rank: int = 0, *, pairs: bool = True) -> PipelineGroups:
    return PipelineGroups(
        world_size=stages,
        stages=stages,
        global_rank=pipeline_rank,
        pipeline_rank=pipeline_rank,
        pipeline_index=0,
        data_parallel_size=1,
        pipeline_group=None,
        data_parallel_group=None,
        stage_groups={s: None for s in range(stages)} if pairs else {},
    )


def _runtime(schedule_kind: str = "chimera", stages: int = 2, **kwargs: object) -> PipelineRuntime:
    schedule = build_schedule(schedule_kind, stages, stages)
    modules = {rs: nn.Linear(2, 2) for rs in schedule.stages_of(0)}
    options = {"groups": _groups(stages), "stage_modules": modules, **kwargs}
    return PipelineRuntime(schedule, input_fn=lambda b: b, loss_fn=lambda o, b: o.sum(), **options)  # type: ignore[arg-type]


def test_layout_must_fit_the_world() -> None:
    with pytest.raises(
        ValueError, match=r"world_size=6 cannot be split into pipelines of stages=4.*multiple of stages"
    ):
        check_layout(6, 4)
    with pytest.raises(ValueError, match="stages=0 must be a positive integer"):
        check_layout(4, 0)
    check_layout(8, 4)


def test_build_groups_checks_layout_before_touching_the_process_group() -> None:
    with pytest.raises(ValueError, match="world_size=3"):
        build_pipeline_groups(3, 2)
    with pytest.raises(ValueError, match="timeout_s=0"):
        build_pipeline_groups(2, 2, timeout_s=0)
    with pytest.raises(RuntimeError, match=r"initialised torch\.distributed"):
        build_pipeline_groups(2, 2)


def test_global_rank_of() -> None:
    groups = PipelineGroups(8, 4, 6, 2, 1, 2, None, None)
    assert groups.global_rank_of(3) == 7
    assert groups.pipeline_global_ranks == [4, 5, 6, 7]


def test_stage_modules_must_match_the_held_stages() -> None:
    schedule = build_schedule("chimera", 4, 4)
    with pytest.raises(
        ValueError, match=r"holds \(replica, stage\) \[\(0, 1\), \(1, 2\)\].*has \[\(0, 1\)\]"
    ):
        PipelineRuntime(schedule, _groups(4, 1), {(0, 1): nn.Linear(2, 2)}, lambda b: b, lambda o, b: o.sum())


def test_schedule_and_groups_must_agree() -> None:
    schedule = build_schedule("1f1b", 4, 4)
    with pytest.raises(ValueError, match="stages=4 but the groups were built for stages=2"):
        PipelineRuntime(schedule, _groups(2), {(0, 0): nn.Linear(2, 2)}, lambda b: b, lambda o, b: o.sum())
    with pytest.raises(ValueError, match=r"needs the stage groups of an even stages count\."):
        PipelineRuntime(
            build_schedule("chimera", 2, 2),
            _groups(2, pairs=False),
            {(0, 0): nn.Linear(2, 2), (1, 1): nn.Linear(2, 2)},
            lambda b: b,
            lambda o, b: o.sum(),
        )


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s=-1 must be positive"):
        _runtime(timeout_s=-1)


def test_micro_batch_count_must_match_the_schedule() -> None:
    runtime = _runtime()
    with pytest.raises(ValueError, match="runs micro_batches=2 per step; got 3 micro-batches"):
        runtime.train_step([1, 2, 3])
    with pytest.raises(ValueError, match="runs micro_batches=2 per step; got 1"):
        runtime.forward_only([1])
