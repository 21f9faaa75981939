"""InterlockingBackpropStrategy: depthwise model parallelism trained with k-wise local losses.

Design decisions:

- Setup, the gradient hand-over, the resume checks and the unsupported ``predict`` come from
  :class:`~lightning_parallel.strategies.pipeline_base.PipelineStrategy` (a :class:`DDPStrategy`; the module
  is never wrapped in ``DistributedDataParallel``); the no-flush stepping, ``synchronous``, the late logging,
  the full module and the gathered optimizer state from
  :class:`~lightning_parallel.strategies.local_learning.LocalLearningStrategy`, shared with AuxNet. Every rank reads the same batch and
  holds ``stages / world_size`` contiguous stages; with one process every stage runs in that process
  (single-process mode, for CPU experiments), with identical results.
- The auxiliary heads are built in ``setup`` (the module's ``pipeline_aux_head`` hook, else pool + linear
  for image features, linear for token features) from the shapes of one sample batch, and attached to the
  LightningModule as the submodule ``interlocking_heads`` (an ``nn.ModuleList``) *before*
  ``configure_optimizers`` runs, so ``self.parameters()`` (and so the optimizer) covers them. Every rank
  starts from global rank 0's weights, heads included.
- Every rank keeps the whole module and the whole optimizer, but only its stages (and their heads) get
  gradients; the optimizer skips parameters without one.
- The schedule runs inside ``training_step``; the module's own ``training_step`` is not called. Its
  gradients are set aside and installed in ``backward`` (which runs no autograd). Each batch is cut into
  ``micro_batches`` parts by :func:`~lightning_parallel.pipeline.micro_batches.split_micro_batches` (sizes
  differing by at most one, every micro-batch weighted by its size); a batch with fewer examples than
  ``micro_batches`` is refused, as under ChimeraStrategy.
- Logging: ``train_loss`` (the true loss) and ``train_head{j}_loss`` for every auxiliary head; validation
  and test log ``val_<metric>`` of the final output (from ``pipeline_metrics``, else the loss) and
  ``val_head{j}_<metric>`` of every head (usable for early exit). With several processes the step's losses
  are all-reduced asynchronously and logged one step later, so that no rank waits for the last stage
  (there is no global flush between steps); in single-process mode they are logged at once.
- ``synchronous=True`` adds the flush the asynchronous default avoids: after every optimizer step each rank
  waits until its messages have been received and then meets every other rank at a barrier, so no rank starts
  the next step's forwards before every stage has stepped; the losses are then logged in their own step.
  Every stage computes with the same weights in both modes, so the results are identical; only the idle
  time differs. Lightning itself broadcasts rank 0's SIGTERM flag at the start of every training batch, a
  collective that would make every rank wait for the slowest one each step; without ``synchronous`` that
  flag travels asynchronously and is acted on one step later.
- At the end of ``fit`` every rank's module is made complete again (each stage broadcast from its owner).
- Checkpoints are full and load on one device: ``state_dict`` is the module's own (stages gathered from
  their owners, heads left out), so ``YourModule.load_from_checkpoint(path)`` works; the heads are saved
  under ``checkpoint["interlocking"]["heads"]``; the optimizer state is the whole module's (heads
  included), gathered from the owners of each parameter. Resuming restores everything exactly.
- Gradient clipping by norm is per rank (the norm of the rank's own stages' gradients): stages are trained
  by different losses, so there is no single gradient to measure.

This file is a thin Lightning adapter over :mod:`lightning_parallel.interlocking.runtime`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.interlocking.heads import split_trunk
from lightning_parallel.interlocking.plan import InterlockingPlan, check_width, stages_of_rank
from lightning_parallel.interlocking.runtime import InterlockingRuntime
from lightning_parallel.pipeline.micro_batches import batch_size, split_micro_batches
from lightning_parallel.pipeline.stage_local import free_blocks, tied_parameters
from lightning_parallel.strategies.local_learning import LocalLearningStrategy
from lightning_parallel.strategies.pipeline_base import StartMethod

HEADS_ATTRIBUTE = "interlocking_heads"


class InterlockingBackpropStrategy(LocalLearningStrategy):
    """Interlocking backprop (Gomez et al. 2022): stage ``j`` is trained by the loss ``k - 1`` stages ahead.

    Args:
        k: interlocking width, ``1 <= k <= stages``: ``1`` is local learning (every stage trained by its own
            auxiliary head), ``stages`` is end-to-end backprop. Default 2.
        stages: number of stages S. ``None`` (default) uses one stage per process; in single-process mode
            (``devices=1``) give it explicitly. Must be a multiple of the world size.
        micro_batches: micro-batches per optimizer step (the batch is split into that many parts whose sizes
            differ by at most one; a smaller batch is refused). Default 4.
        partition: blocks per stage: ``None`` (default: equal counts, leftovers to the outer stages first),
            ``"uniform"`` (equal counts, leftovers to the first stages), ``"parameters"`` (balanced parameter
            counts) or an explicit list such as ``[2, 1, 1, 2]``; the same name and values as
            :class:`ChimeraStrategy` (but ``"profile"``).
        synchronous: flush the pipeline after every optimizer step: every process waits for all stages to
            finish the step before the next step's forwards start (same results, more idle time). Default
            False: no global flush, a process starts the next step as soon as its own stages have stepped.
        stage_local: hold only the weights of this rank's stages and their heads (``configure_model`` on the
            meta device, or the other blocks freed right after partitioning). ``None`` (default): on for a
            module built in ``configure_model``, off for one built eagerly; ``False`` opts out for both.
        save_distributed_checkpoint: sharded checkpoint directories (each rank its own stages and heads);
            ``None`` (default) means: when weights are stage-local, which needs True. They resume with the same ``stages``
            (any world size that divides it); ``lightning-parallel consolidate DIR OUT.ckpt`` makes a
            single-device checkpoint.
        timeout_s: seconds a rank waits for a peer (process group and transfers). Default 300.
        start_method: process launch: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``accelerator``,
            ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``, ``precision_plugin``,
            ``process_group_backend``).
        balance: deprecated name of ``partition`` (a list of blocks per stage); warns with a ``FutureWarning``.
    """

    strategy_name = "interlocking"
    checkpoint_key = "interlocking"
    companions_attribute = HEADS_ATTRIBUTE
    supports_stage_local = True
    reshards_stages = False  # the auxiliary heads belong to the stage boundaries

    def __init__(
        self,
        k: int = 2,
        stages: int | None = None,
        micro_batches: int = 4,
        *,
        partition: str | Sequence[int] | None = None,
        synchronous: bool = False,
        stage_local: bool | None = None,
        save_distributed_checkpoint: bool | None = None,
        timeout_s: float = 300.0,
        start_method: StartMethod = "popen",
        balance: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            stages, micro_batches, synchronous=synchronous, timeout_s=timeout_s, start_method=start_method,
            stage_local=stage_local, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs,
        )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"k={k!r} must be an integer >= 1 (1 = local learning, k = stages = end-to-end)."
            )
        if stages is not None:
            check_width(k, stages)
        self._partition_name = "partition"
        if balance is not None:
            if partition is not None:
                raise ValueError(f"balance={balance} and partition={partition} both given; give only partition.")
            warnings.warn(
                "InterlockingBackpropStrategy(balance=...) is deprecated: use partition=... (same values, the "
                "name ChimeraStrategy uses too).",
                FutureWarning,
                stacklevel=2,
            )
            partition, self._partition_name = list(balance), "balance"
        self.k = k
        self.partition = self._check_partition(
            partition, stages, methods=("uniform", "parameters"), name=self._partition_name
        )
        self.runtime: InterlockingRuntime | None = None

    # ------------------------------------------------------------------ shape of the job
    @override
    def _configure_launcher(self) -> None:
        world = self.num_processes * self.num_nodes
        stages = self.stages if self.stages is not None else world
        stages_of_rank(0, world, stages)  # ValueError when the stages do not fit the world size
        check_width(self.k, stages)
        self._check_partition(self.partition, stages, methods=("uniform", "parameters"), name=self._partition_name)
        super()._configure_launcher()

    # ------------------------------------------------------------------ setup
    @override
    def configure_stages(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        stages = self.num_stages
        check_width(self.k, stages)
        held = stages_of_rank(self.global_rank, self.world_size, stages)
        protocol = self.pipeline_module
        # One micro-batch, the shape the stages will see (a traced split is specialised on it).
        sample = split_micro_batches(self._sample_batch(trainer), self.micro_batches)[0]
        stage_blocks, heads = split_trunk(module, stages, sample, partition=self.partition)
        existing = getattr(module, HEADS_ATTRIBUTE, None)
        if isinstance(existing, nn.ModuleList) and len(existing) == len(heads):
            heads = list(existing)  # set up before (fit, then validate): keep the trained heads
        else:
            module.add_module(HEADS_ATTRIBUTE, nn.ModuleList(heads).to(self.root_device))
        local = self.begin_stage_local(module)  # every rank starts from global rank 0's weights, heads included
        blocks = list(protocol.pipeline_blocks())
        index_of = {id(block): index for index, block in enumerate(blocks)}
        held_blocks = sorted(index_of[id(block)] for s in held for block in stage_blocks[s])
        held_heads = [s for s in held if s < stages - 1]
        if local is not None:
            local.materialize(held_blocks, self.root_device)
        self.new_loss_group()
        self.runtime = InterlockingRuntime(
            InterlockingPlan(stages, self.k),
            stage_blocks,
            heads,
            protocol.pipeline_input,
            protocol.pipeline_loss,
            rank=self.global_rank,
            world_size=self.world_size,
            timeout_s=self.timeout_s,
        )
        self._held_stages = {(0, s): stage_blocks[s] for s in held}
        self._held_modules = [stage_blocks[s] for s in held] + [heads[s] for s in held_heads]
        self._stage_owners = [(stage_blocks[s], self._owner(s)) for s in range(stages)] + [
            (heads[s], self._owner(s)) for s in range(stages - 1)
        ]
        tied = tied_parameters(module, blocks, [len(stage) for stage in stage_blocks])
        if local is not None:
            local.record_aliases(tied)
            local.after_build(self._held_stages, [], held_blocks, companions=[heads[s] for s in held_heads])
            free_blocks(heads, held_heads)  # the other stages' heads live on their ranks
        # A parameter used by stages on several ranks: its gradient is summed over them before each step.
        across = [t for t in tied if len({self._owner(s) for s in t.stages}) > 1]
        if across and self.world_size > 1:
            holders = [[sorted({self._owner(s) for s in t.stages}) for t in across]]
            self.tied_gradients.prepare(module, across, self._held_stages, [], holders, 0)

    def _owner(self, stage: int) -> int:
        """The global rank that holds ``stage`` (contiguous runs of stages per rank)."""
        return stage * self.world_size // self.num_stages

    @override
    def on_optimizers_ready(self, trainer: pl.Trainer) -> None:
        super().on_optimizers_ready(trainer)
        local = self._stage_local
        if local is None:
            return
        # Stage-local: the optimizers keep only the held parameters (the others are meta, never stepped).
        local.record_layouts(self.optimizers)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) in local.param_names]

    # ------------------------------------------------------------------ steps
    def _require_runtime(self) -> InterlockingRuntime:
        if self.runtime is None:
            raise RuntimeError(f"{type(self).__name__} is not set up; run it through a Trainer.")
        return self.runtime

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        batch = args[0] if args else kwargs["batch"]
        runtime = self._require_runtime()
        module = self.lightning_module
        micro_batches = split_micro_batches(batch, self.micro_batches)
        with self.precision_plugin.train_step_context():
            losses = self.set_aside.compute(
                list(module.parameters()),  # type: ignore[union-attr]
                lambda: runtime.train_step(micro_batches),
            )
        vector = torch.zeros(self.num_stages)
        for stage, loss in losses.items():
            vector[stage] = loss
        done = self.reduce_late(vector)
        if done is None:
            return torch.zeros(())
        vector = done
        size = batch_size(batch)
        module.log("train_loss", vector[-1], prog_bar=True, batch_size=size)  # type: ignore[union-attr]
        for stage in range(self.num_stages - 1):
            module.log(f"train_head{stage}_loss", vector[stage], batch_size=size)  # type: ignore[union-attr]
        return vector[-1]

    @override
    def _evaluate(self, batch: Any, split: str) -> Tensor:
        runtime = self._require_runtime()
        module = self.lightning_module
        metrics_fn = self._metrics_fn()
        size = batch_size(batch)
        with self.precision_plugin.val_step_context():
            results = runtime.evaluate(split_micro_batches(batch, self.micro_batches), metrics_fn)
        names = sorted(next(iter(results.values())))
        table = torch.zeros(self.num_stages, len(names))
        for stage, values in results.items():
            table[stage] = torch.stack([values[name].float() for name in names])
        if self.world_size > 1:
            dist.all_reduce(table, group=self._loss_group)
        for column, name in enumerate(names):
            module.log(f"{split}_{name}", table[-1, column], prog_bar=True, batch_size=size)  # type: ignore[union-attr]
            for stage in range(self.num_stages - 1):
                module.log(f"{split}_head{stage}_{name}", table[stage, column], batch_size=size)  # type: ignore[union-attr]
        return table[-1, names.index("loss")] if "loss" in names else table[-1, 0]

    # ------------------------------------------------------------------ checkpoints
    @override
    def checkpoint_metadata(self) -> dict[str, Any]:
        heads = getattr(self.lightning_module, HEADS_ATTRIBUTE, None)
        return {
            "k": self.k,
            **super().checkpoint_metadata(),
            "heads": {}
            if heads is None or self.stage_local  # stage-local: in the shards, under their module names
            else {key: value.detach().cpu() for key, value in heads.state_dict().items()},
        }

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.stage_local and not Path(checkpoint_path).is_dir():
            raise ValueError(
                f"{checkpoint_path} is a single-file checkpoint; a stage_local=True run resumes sharded checkpoint "
                "directories only. Resume it with stage_local=False, or start from its weights "
                "(`YourModule.load_from_checkpoint(path)`)."
            )
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    @override
    def sharded_checkpoint_meta(self) -> dict[str, Any]:
        # Consolidation moves the heads out of state_dict, where a single-file checkpoint keeps them.
        return {"companions": {"prefix": HEADS_ATTRIBUTE + ".", "key": self.checkpoint_key, "entry": "heads"}}

    @override
    def load_companions(self, companions: nn.Module, metadata: Mapping[str, Any]) -> None:
        companions.load_state_dict(metadata["heads"])
