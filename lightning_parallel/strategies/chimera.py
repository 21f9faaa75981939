"""ChimeraStrategy: train a LightningModule that implements the pipeline protocol on a pipeline of ranks.

Design decisions:

- Setup, the gradient hand-over, the resume checks and the unsupported ``predict`` come from
  :class:`~lightning_parallel.strategies.pipeline_base.PipelineStrategy` (a :class:`DDPStrategy`). Ranks ``[p*D, (p+1)*D)`` form pipeline ``p``; with more processes than ``stages`` whole pipelines are
  replicated and each step's gradients are averaged across replicas (one flat all-reduce per step).
- Every rank keeps the whole LightningModule (so ``state_dict`` keys and hooks stay as the user wrote them)
  but trains only its stages: the optimizer built by ``configure_optimizers`` is cut down, param group by
  param group, to the held stages' parameters; Chimera's second copy of a stage is a ``deepcopy`` that
  takes the place of the original in the optimizer.
- The schedule runs inside ``training_step``; the module's own ``training_step`` is not called. The
  gradients it produces are set aside and installed in ``backward`` (averaged over replicas). The step's loss (and the
  module's ``pipeline_metrics``) are reduced over all ranks and logged as ``train_<name>`` on every rank;
  validation and test run the forward-only pipeline and log ``val_<name>`` / ``test_<name>``.
- Gradient clipping by norm uses the global norm over all stages (each stage counted once).
- Checkpoints are full and single-device shaped (see ``_pipeline_checkpoint``); they record the pipeline's
  shape under ``checkpoint["pipeline"]``, and resuming with a different ``stages`` is refused.
- Each batch is cut into micro-batches by :func:`~lightning_parallel.pipeline.micro_batches.split_micro_batches`
  (sizes differing by at most one, losses weighted by size).
- ``partition="profile"`` needs a micro-batch: the pipeline is then built at the first batch, profiled on
  global rank 0 and broadcast so that every rank uses the same partition. ``partition="flops"`` too (the
  floating-point operations of one micro-batch, counted on meta tensors).
- ``stage_local=True`` (by default for a module built in ``configure_model``): a rank holds only the weights
  of the stages it trains (see
  :class:`~lightning_parallel.strategies.stage_local_state.StageLocalState`). ``configure_model`` then runs
  on the meta device and only the held blocks are materialised (initialised by the module's
  ``pipeline_init_weights``, so the weights do not depend on the layout); an eagerly built module is cut
  down right after partitioning (the whole model exists once per rank until then). Checkpoints become
  sharded directories (``save_distributed_checkpoint``) that resume under another number of stages or
  schedule; after ``fit`` the weights stay where they were trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_parallel.pipeline.groups import PipelineGroups, build_pipeline_groups
from lightning_parallel.pipeline.micro_batches import split_micro_batches
from lightning_parallel.pipeline.partition import (
    PARTITION_METHODS,
    partition_blocks,
    profile_blocks,
    stage_slices,
)
from lightning_parallel.pipeline.recompute import RecomputedStage, recompute_stages
from lightning_parallel.pipeline.runtime import PipelineRuntime
from lightning_parallel.pipeline.schedule import SCHEDULE_KINDS, Schedule, build_schedule
from lightning_parallel.pipeline.stage_local import tied_parameters
from lightning_parallel.strategies._pipeline_checkpoint import (
    full_optimizer_state,
    local_optimizer_state,
    sync_stages,
)
from lightning_parallel.strategies._pipeline_steps import PipelineSteps
from lightning_parallel.strategies.pipeline_base import PipelineStrategy, StartMethod

ScheduleName = Literal["chimera", "chimera-zb", "1f1b", "gpipe"]


class ChimeraStrategy(PipelineStrategy):
    """Pipeline-parallel training with the Chimera bidirectional schedule (or GPipe / 1F1B).

    Args:
        stages: number of pipeline stages D. ``None`` (default) uses one pipeline over all processes.
            The world size (devices x nodes) must be a multiple of ``stages``; the quotient is the number of
            data-parallel pipeline replicas.
        micro_batches: micro-batches N per optimizer step; each pipeline's batch is split into N parts whose
            sizes differ by at most one. ``None`` (default) uses N = D. Chimera needs N to be a multiple of D.
        schedule: ``"chimera"`` (default), ``"chimera-zb"`` (zero-bubble Chimera), ``"1f1b"`` or ``"gpipe"``.
        partition: blocks per stage: ``"uniform"`` (equal block counts, default),
            ``"parameters"`` (balanced parameter counts), ``"profile"`` (balanced measured forward+backward
            time) or an explicit list of blocks per stage, e.g. ``[3, 2, 2, 1]``.
        forward_doubling: Chimera only: two forwards per slot when N > D (more memory, fewer bubbles).
        recompute: recompute stages' forward in backward instead of storing their activations
            (``torch.utils.checkpoint``, non-reentrant): ``True`` for the stages whose rank stores the most
            micro-batches at once in the schedule (the first stages under 1F1B), or a list of stages.
            Default False.
        stage_local: hold only the weights of this rank's stages (``configure_model`` on the meta device,
            or the other blocks freed right after partitioning). ``None`` (default): on for a module built in
            ``configure_model`` (it then runs on the meta device), off for one built eagerly in ``__init__``
            (every rank keeps the whole module, single-file checkpoints). ``False`` opts out for both.
        save_distributed_checkpoint: write sharded checkpoint directories (each rank its own stages, through
            ``torch.distributed.checkpoint``); ``None`` (default) means: when weights are stage-local. A
            stage-local run needs True; ``lightning-parallel consolidate DIR OUT.ckpt`` makes a single-device checkpoint.
        timeout_s: seconds a rank waits for a peer (process group and pipeline transfers). Default 300.
        start_method: how processes are launched: ``"popen"`` (re-run the script, default), ``"spawn"``,
            ``"fork"`` or ``"forkserver"``.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``accelerator``,
            ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``, ``precision_plugin``,
            ``process_group_backend``).
    """

    strategy_name = "chimera"
    supports_stage_local = True

    def __init__(
        self,
        stages: int | None = None,
        micro_batches: int | None = None,
        *,
        schedule: ScheduleName = "chimera",
        partition: str | Sequence[int] = "uniform",
        forward_doubling: bool = False,
        recompute: bool | Sequence[int] = False,
        stage_local: bool | None = None,
        save_distributed_checkpoint: bool | None = None,
        timeout_s: float = 300.0,
        start_method: StartMethod = "popen",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            stages, timeout_s=timeout_s, start_method=start_method, stage_local=stage_local,
            save_distributed_checkpoint=save_distributed_checkpoint, **kwargs,
        )
        if not isinstance(recompute, bool):
            recompute = [int(stage) for stage in recompute]
            bad = [s for s in recompute if s < 0 or (stages is not None and s >= stages)]
            if bad:
                raise ValueError(
                    f"recompute={recompute} names stages {bad} that do not exist; use True, False or stages "
                    f"0..{'D-1' if stages is None else stages - 1}."
                )
        self.recompute = recompute
        if micro_batches is not None and (
            isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1
        ):
            raise ValueError(f"micro_batches={micro_batches!r} must be positive, e.g. equal to stages.")
        if schedule not in SCHEDULE_KINDS:
            raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULE_KINDS}.")
        checked_partition = self._check_partition(partition, stages, methods=PARTITION_METHODS)
        if forward_doubling and not schedule.startswith("chimera"):
            raise ValueError(f"forward_doubling=True needs schedule='chimera', not schedule={schedule!r}.")
        self.micro_batches = micro_batches
        self.schedule = schedule
        self.partition: str | list[int] = "uniform" if checked_partition is None else checked_partition
        self.forward_doubling = forward_doubling
        if stages is not None:
            # Fails early on impossible shapes, e.g. Chimera with an odd number of stages.
            self._check_schedule(stages)
        self._steps: PipelineSteps | None = None
        self._pending_optimizer_states: list[dict[str, Any]] | None = None

    def _check_schedule(self, stages: int) -> Schedule:
        try:
            extra = {"first_stage_input_gradient": False} if self.schedule == "chimera-zb" else {}
            # The first stage's input is data (no input gradient): zero-bubble orders its work for that.
            return build_schedule(
                self.schedule, stages, self.micro_batches or stages, forward_doubling=self.forward_doubling, **extra
            )
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}(stages={stages}, micro_batches={self.micro_batches}, "
                f"schedule={self.schedule!r}) cannot run: {str(err).replace('kind=', 'schedule=')}"
            ) from err

    # ------------------------------------------------------------------ shape of the job
    @property
    def num_micro_batches(self) -> int:
        """N: the explicit ``micro_batches`` or, by default, D."""
        return self.micro_batches if self.micro_batches is not None else self.num_stages

    @property
    def data_parallel_size(self) -> int:
        """Number of replicas of the whole pipeline."""
        return self.world_size // self.num_stages

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank of a pipeline reads the same batch; pipelines read different ones.
        return {"num_replicas": self.data_parallel_size, "rank": self.global_rank // self.num_stages}

    @override
    def _configure_launcher(self) -> None:
        world = self.num_processes * self.num_nodes
        if self.stages is not None and world % self.stages != 0:
            raise ValueError(
                f"stages={self.stages} does not divide the world size {world} (devices {self.num_processes} "
                f"x nodes {self.num_nodes}); use a world size that is a multiple of {self.stages} "
                f"(devices={self.stages} for one pipeline) or a number of stages that divides {world}."
            )
        if self.stages is None and self.schedule.startswith("chimera") and world % 2 != 0:
            raise ValueError(
                f"schedule={self.schedule!r} needs an even number of stages; stages=None uses all {world} "
                "processes. Set stages to an even divisor of the world size or use devices=an even number."
            )
        super()._configure_launcher()

    # ------------------------------------------------------------------ setup
    @override
    def configure_stages(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Start every rank from global rank 0's weights, as DDP does.
        self.begin_stage_local(module)
        self._steps = PipelineSteps(
            module,
            self.set_aside,
            micro_batches=self.num_micro_batches,
            replicas=self.data_parallel_size,
            device=self.root_device,
            timeout_s=self.timeout_s,
        )
        if self.partition not in ("profile", "flops"):
            self._build_pipeline(None)

    @override
    def on_optimizers_ready(self, trainer: pl.Trainer) -> None:
        steps = self._require_steps()
        if self._stage_local is not None:
            self._stage_local.record_layouts(self.optimizers)
        if steps.runtime is not None:
            steps.localise_optimizers(self.optimizers)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm  # type: ignore[method-assign]

    def _build_pipeline(self, batch: Any) -> None:
        steps = self._require_steps()
        blocks = steps.blocks
        d, n = self.num_stages, self.num_micro_batches
        if self.partition == "profile":
            if self._stage_local is not None and self._stage_local.meta_built:
                raise ValueError(
                    "partition='profile' times real blocks, but this module was built on the meta device; use "
                    "partition='flops' (counted on meta tensors) or 'parameters'."
                )
            sizes_tensor = torch.zeros(d, dtype=torch.long, device=self.root_device)
            if self.global_rank == 0:
                sample = steps.hooks.pipeline_input(split_micro_batches(batch, n)[0])
                profiles = profile_blocks(blocks, sample)
                sizes = partition_blocks(blocks, d, "profile", profiles=profiles)
                sizes_tensor = torch.tensor(sizes, dtype=torch.long, device=self.root_device)
            dist.broadcast(sizes_tensor, src=0)
            sizes = [int(s) for s in sizes_tensor]
        elif self.partition == "flops":
            sample = steps.hooks.pipeline_input(split_micro_batches(batch, n)[0])
            sizes = partition_blocks(blocks, d, "flops", sample_input=sample)  # counted alike on every rank
        else:
            sizes = partition_blocks(blocks, d, self.partition)
        schedule = self._check_schedule(d)
        groups = build_pipeline_groups(self.world_size, d, timeout_s=self.timeout_s)
        local = self._stage_local
        if local is not None:
            slices = stage_slices(sizes)
            mine = schedule.stages_of(groups.pipeline_rank)
            held = sorted({i for _, stage in mine for i in range(slices[stage].start, slices[stage].stop)})
            local.materialize(held, self.root_device)
        recomputed = recompute_stages(schedule, self.recompute)
        tied = [] if local is None else tied_parameters(local.module, blocks, sizes)
        tied = [t for t in tied if len(t.stages) > 1]
        steps.build(
            schedule, groups, sizes, wrap=lambda stage, m: RecomputedStage(m) if stage in recomputed else m,
            allow_tied=local is not None,
        )
        if local is not None:
            owned = sorted(
                {i for replica, stage in mine if replica == 0 for i in range(slices[stage].start, slices[stage].stop)}
            )
            local.after_build(steps.stage_modules, steps.copies, owned)
            if tied:
                holders = [
                    [sorted({p * d + schedule.rank_of(r, s) for s in t.stages for r in range(schedule.replicas)})
                     for t in tied]
                    for p in range(self.data_parallel_size)
                ]
                local.record_aliases(tied)
                self.tied_gradients.prepare(
                    local.module, tied, steps.stage_modules, steps.copies, holders, self.global_rank // d
                )
        if self._pending_optimizer_states is not None:
            steps.localise_optimizers(self.optimizers)
            self._load_full_optimizer_states(self._pending_optimizer_states)
            self._pending_optimizer_states = None
        elif self.optimizers and not steps.localised:
            steps.localise_optimizers(self.optimizers)
        self.load_sharded_now()

    def _require_steps(self) -> PipelineSteps:
        if self._steps is None:
            raise RuntimeError(f"{type(self).__name__} is not set up; run it through a Trainer.")
        return self._steps

    @property
    @override
    def stages_built(self) -> bool:
        return self._steps is not None and self._steps.runtime is not None

    @override
    def build_stages(self, batch: Any) -> None:
        if not self.stages_built:
            self._build_pipeline(batch)

    def _ensure_pipeline(self, batch: Any) -> PipelineSteps:
        self.build_stages(batch)
        return self._require_steps()

    @property
    def pipeline_schedule(self) -> Schedule | None:
        """The schedule in use (``None`` before the pipeline is built)."""
        return None if self._steps is None else self._steps.schedule

    @property
    def pipeline_runtime(self) -> PipelineRuntime | None:
        """This rank's runtime (``None`` before the pipeline is built), e.g. for its ``trace``."""
        return None if self._steps is None else self._steps.runtime

    @property
    @override
    def held_stage_modules(self) -> dict[tuple[int, int], nn.Module]:
        """(replica, stage) -> the module this rank trains; Chimera's replica-1 entry is a copy that is not
        part of the LightningModule. Callbacks that change gradients must treat every entry alike."""
        return {} if self._steps is None else dict(self._steps.stage_modules)

    @property
    def pipeline_groups(self) -> PipelineGroups | None:
        """This rank's process groups (``None`` before the pipeline is built), e.g. for callbacks that
        must exchange data between the holders of a stage."""
        return None if self._steps is None else self._steps.groups

    @property
    def partition_sizes(self) -> list[int] | None:
        """Blocks per stage in use (``None`` before the pipeline is built)."""
        return None if self._steps is None else self._steps.sizes

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        args, kwargs = self.precision_plugin.convert_input((args, kwargs))
        batch = args[0] if args else kwargs["batch"]
        steps = self._ensure_pipeline(batch)
        with self.precision_plugin.train_step_context():
            return steps.train(batch)

    @override
    def install_gradients(self) -> None:
        steps = self._require_steps()
        self.reduce_tied_gradients()  # copies of a tied parameter: one sum
        steps.reduce_replicas()
        self.set_aside.install(accumulate_grad_batches=self._accumulate_grad_batches(), divide_by=steps.replicas)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._evaluate("val", args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._evaluate("test", args, kwargs)

    def _evaluate(self, split: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        args, kwargs = self.precision_plugin.convert_input((args, kwargs))
        batch = args[0] if args else kwargs["batch"]
        steps = self._ensure_pipeline(batch)
        plugin = self.precision_plugin
        context = plugin.val_step_context() if split == "val" else plugin.test_step_context()
        with context:
            return steps.evaluate(batch, split)

    def _clip_grad_by_global_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        if len(self.tied_gradients):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"Gradient clipping counts each of the {len(self.tied_gradients)} tied parameter(s) once per stage "
                "that uses it, so the global norm is a little larger than on one device.",
            )
        self._require_steps().clip_grad_norm(float(clip_val))

    # ------------------------------------------------------------------ checkpoints
    @override
    def sync_full_module(self) -> None:
        if self.stage_local:
            return  # the weights stay where they were trained
        steps = self._steps
        if steps is None or steps.runtime is None or steps.schedule is None or steps.groups is None:
            return
        slices = stage_slices(steps.sizes or [])
        owners = [steps.groups.global_rank_of(steps.schedule.rank_of(0, s)) for s in range(len(slices))]
        sync_stages([steps.blocks[sl] for sl in slices], owners, steps.groups.pipeline_group)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.stage_local:
            return {}
        steps = self._require_steps()
        if steps.groups is None or not steps.localised:
            return optimizer.state_dict()
        index = self.optimizers.index(optimizer)
        return full_optimizer_state(
            optimizer, steps.held[index], steps.full_groups[index], steps.groups.pipeline_group
        )

    @override
    def checkpoint_metadata(self) -> dict[str, Any]:
        return {
            **super().checkpoint_metadata(),
            "micro_batches": self.num_micro_batches,
            "schedule": self.schedule,
            "partition": None if self._steps is None else self._steps.sizes,
        }

    @override
    def on_checkpoint_metadata(self, metadata: dict[str, Any]) -> None:
        steps = self._steps
        if steps is not None and steps.runtime is None and metadata.get("partition"):
            # A profiled partition is not measured again on resume: the trajectory stays the same.
            self.partition = list(metadata["partition"])

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self.load_sharded_now():
            return
        super().load_model_state_dict(checkpoint, strict=strict)
        if self._steps is not None:
            self._steps.refresh_copies()

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._stage_local is not None and not any(checkpoint["optimizer_states"]):
            return  # sharded: loaded with the model (load_sharded_now)
        states = list(checkpoint["optimizer_states"])
        steps = self._require_steps()
        if steps.runtime is None:
            self._pending_optimizer_states = states
            return
        self._load_full_optimizer_states(states)

    def _load_full_optimizer_states(self, states: Sequence[dict[str, Any]]) -> None:
        from lightning.fabric.utilities.optimizer import _optimizer_to_device

        steps = self._require_steps()
        for index, (optimizer, full_state) in enumerate(zip(self.optimizers, states)):
            optimizer.load_state_dict(local_optimizer_state(full_state, optimizer, steps.held[index]))
            _optimizer_to_device(optimizer, self.root_device)
