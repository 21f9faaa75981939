"""Process groups of a pipeline-parallel job: pipelines, data-parallel groups and Chimera stage pairs.

Layout: the world is ``world_size / stages`` pipelines of ``stages`` consecutive global ranks (pipeline p is
global ranks ``[p*D, (p+1)*D)``). Data-parallel groups join equal pipeline ranks across pipelines. For an
even D, Chimera places stage s of the down replica on pipeline rank s and of the up replica on D-1-s, so
pipeline ranks r and D-1-r hold the two copies of stages r and D-1-r: the *pair group* joins them, and one
*stage group* per stage (same two ranks) lets the two stages' all-reduces run independently of each other's
issue order.

Every ``new_group`` call is collective over the whole world, so every rank creates every group, in the
same order. This module imports no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist


@dataclass
class PipelineGroups:
    """This rank's place in the pipeline layout and the process groups it communicates over.

    Args:
        world_size: the number of processes.
        stages: the number of stages D per pipeline.
        global_rank: this process's rank in the default group.
        pipeline_rank: this process's rank within its pipeline (0 .. D-1).
        pipeline_index: which pipeline this process belongs to.
        data_parallel_size: the number of pipelines.
        pipeline_group: the D ranks of this pipeline.
        data_parallel_group: the ranks with this pipeline rank in every pipeline.
        pair_group: pipeline ranks r and D-1-r of this pipeline (None for odd D).
        stage_groups: stage -> the group of the two ranks of this pipeline that hold that stage's copies.
        p2p_groups: per replica, the group its point-to-point messages use (``None``: the default group).
            The up replica gets its own copy of the world group, so that on a backend that matches messages
            between two ranks by order rather than by tag (NCCL), each stream carries one replica's
            messages, which both ends handle in micro-batch order.
        timeout_s: how long a blocking wait may take before it fails.
    """

    world_size: int
    stages: int
    global_rank: int
    pipeline_rank: int
    pipeline_index: int
    data_parallel_size: int
    pipeline_group: Any
    data_parallel_group: Any
    pair_group: Any = None
    stage_groups: dict[int, Any] = field(default_factory=dict)
    timeout_s: float = 300.0
    p2p_groups: tuple[Any, ...] = (None, None)

    def global_rank_of(self, pipeline_rank: int) -> int:
        """The global rank of ``pipeline_rank`` in this rank's pipeline."""
        return self.pipeline_index * self.stages + pipeline_rank

    @property
    def pipeline_global_ranks(self) -> list[int]:
        """The global ranks of this pipeline, by pipeline rank."""
        return [self.global_rank_of(r) for r in range(self.stages)]


def check_layout(world_size: int, stages: int) -> None:
    """Raise a ``ValueError`` when ``world_size`` processes cannot form pipelines of ``stages`` ranks."""
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages={stages!r} must be a positive integer.")
    if not isinstance(world_size, int) or world_size < 1 or world_size % stages:
        raise ValueError(
            f"world_size={world_size} cannot be split into pipelines of stages={stages} ranks: world_size must be "
            f"a multiple of stages (e.g. {stages} or {2 * stages})."
        )


def build_pipeline_groups(
    world_size: int, stages: int, *, backend: str | None = None, timeout_s: float = 300.0
) -> PipelineGroups:
    """Create the pipeline, data-parallel and Chimera pair groups (collective: every rank calls it).

    Args:
        world_size: the number of processes (must equal the default group's size).
        stages: the number of stages D per pipeline; ``world_size`` must be a multiple of it.
        backend: backend of the new groups (default: the default group's).
        timeout_s: timeout of the new groups' collectives and of the runtime's waits, in seconds.

    Raises:
        ValueError: if the layout does not fit the world.
        RuntimeError: if ``torch.distributed`` is not initialised.
    """
    check_layout(world_size, stages)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be positive.")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_pipeline_groups needs an initialised torch.distributed process group.")
    if dist.get_world_size() != world_size:
        raise ValueError(
            f"world_size={world_size} differs from the process group's size {dist.get_world_size()}; "
            "pass dist.get_world_size()."
        )
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)
    num_pipelines = world_size // stages

    def group(ranks: list[int]) -> Any:
        return dist.new_group(ranks=ranks, timeout=timeout, backend=backend)

    pipeline_group = data_parallel_group = pair_group = None
    stage_groups: dict[int, Any] = {}
    for p in range(num_pipelines):
        g = group(list(range(p * stages, (p + 1) * stages)))
        if rank // stages == p:
            pipeline_group = g
    for r in range(stages):
        g = group([p * stages + r for p in range(num_pipelines)])
        if rank % stages == r:
            data_parallel_group = g
    if stages % 2 == 0:
        for p in range(num_pipelines):
            for r in range(stages // 2):
                members = sorted([p * stages + r, p * stages + stages - 1 - r])
                g = group(members)
                if rank in members:
                    pair_group = g
            for s in range(stages):
                members = sorted([p * stages + s, p * stages + stages - 1 - s])
                g = group(members)
                if rank in members:
                    stage_groups[s] = g
    up_group = group(list(range(world_size))) if stages % 2 == 0 else None
    return PipelineGroups(
        world_size=world_size,
        stages=stages,
        global_rank=rank,
        pipeline_rank=rank % stages,
        pipeline_index=rank // stages,
        data_parallel_size=num_pipelines,
        pipeline_group=pipeline_group,
        data_parallel_group=data_parallel_group,
        pair_group=pair_group,
        stage_groups=stage_groups,
        timeout_s=timeout_s,
        p2p_groups=(None, up_group),
    )
