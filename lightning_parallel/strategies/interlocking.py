"""InterlockingBackpropStrategy: depthwise model parallelism trained with k-wise local losses.

Design decisions:

- Setup, the gradient hand-over, the resume checks and the unsupported ``predict`` come from
  :class:`~lightning_parallel.strategies.pipeline_base.PipelineStrategy` (a :class:`DDPStrategy`; the module
  is never wrapped in ``DistributedDataParallel``). Every rank reads the same batch and
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

This file is a thin Lightning adapter over :mod:`lightning_parallel.pipeline.interlocking_runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_parallel.pipeline.interlocking import InterlockingPlan, check_width, stages_of_rank
from lightning_parallel.pipeline.interlocking_heads import split_trunk
from lightning_parallel.pipeline.interlocking_runtime import InterlockingRuntime
from lightning_parallel.pipeline.micro_batches import batch_size, split_micro_batches
from lightning_parallel.strategies._pipeline_checkpoint import broadcast_tensors, module_tensors
from lightning_parallel.strategies.pipeline_base import PipelineStrategy, StartMethod

HEADS_ATTRIBUTE = "interlocking_heads"


class InterlockingBackpropStrategy(PipelineStrategy):
    """Interlocking backprop (Gomez et al. 2022): stage ``j`` is trained by the loss ``k - 1`` stages ahead.

    Args:
        k: interlocking width, ``1 <= k <= stages``: ``1`` is local learning (every stage trained by its own
            auxiliary head), ``stages`` is end-to-end backprop. Default 2.
        stages: number of stages S. ``None`` (default) uses one stage per process; in single-process mode
            (``devices=1``) give it explicitly. Must be a multiple of the world size.
        micro_batches: micro-batches per optimizer step (the batch is split into that many parts whose sizes
            differ by at most one; a smaller batch is refused). Default 4.
        balance: blocks per stage, e.g. ``[2, 1, 1, 2]``; default: equal counts, leftovers to the outer stages.
        synchronous: flush the pipeline after every optimizer step: every process waits for all stages to
            finish the step before the next step's forwards start (same results, more idle time). Default
            False: no global flush, a process starts the next step as soon as its own stages have stepped.
        timeout_s: seconds a rank waits for a peer (process group and transfers). Default 300.
        start_method: process launch: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``accelerator``,
            ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``, ``precision_plugin``,
            ``process_group_backend``).
    """

    strategy_name = "interlocking"
    checkpoint_key = "interlocking"

    def __init__(
        self,
        k: int = 2,
        stages: int | None = None,
        micro_batches: int = 4,
        *,
        balance: Sequence[int] | None = None,
        synchronous: bool = False,
        timeout_s: float = 300.0,
        start_method: StartMethod = "popen",
        **kwargs: Any,
    ) -> None:
        super().__init__(stages, timeout_s=timeout_s, start_method=start_method, **kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"k={k!r} must be an integer >= 1 (1 = local learning, k = stages = end-to-end)."
            )
        if stages is not None:
            check_width(k, stages)
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches!r} must be a positive integer, e.g. 4.")
        if not isinstance(synchronous, bool):
            raise ValueError(f"synchronous={synchronous!r} must be True or False.")
        if balance is not None:
            balance = [int(b) for b in balance]
            if stages is not None and len(balance) != stages:
                raise ValueError(
                    f"balance={balance} lists {len(balance)} stages but stages={stages}; give one block count "
                    "per stage."
                )
        self.k = k
        self.micro_batches = micro_batches
        self.balance = balance
        self.synchronous = synchronous
        self.runtime: InterlockingRuntime | None = None
        self._pending_losses: list[tuple[Any, Tensor]] = []
        self._pending_sigterm: list[tuple[Any, Tensor]] = []
        self._loss_group: Any = None
        self._held_modules: list[nn.Module] = []
        self._held_stages: dict[tuple[int, int], nn.Module] = {}
        self._stage_owners: list[tuple[nn.Module, int]] = []

    # ------------------------------------------------------------------ shape of the job
    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}  # every rank reads the same batch

    @override
    def _configure_launcher(self) -> None:
        world = self.num_processes * self.num_nodes
        stages = self.stages if self.stages is not None else world
        stages_of_rank(0, world, stages)  # ValueError when the stages do not fit the world size
        check_width(self.k, stages)
        if self.balance is not None and len(self.balance) != stages:
            raise ValueError(
                f"balance={self.balance} lists {len(self.balance)} stages but there are {stages}; give one "
                "block count per stage."
            )
        super()._configure_launcher()

    # ------------------------------------------------------------------ setup
    @override
    def configure_stages(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        stages = self.num_stages
        check_width(self.k, stages)
        held = stages_of_rank(self.global_rank, self.world_size, stages)
        protocol = self.pipeline_module
        stage_blocks, heads = split_trunk(module, stages, self._sample_batch(trainer), balance=self.balance)
        existing = getattr(module, HEADS_ATTRIBUTE, None)
        if isinstance(existing, nn.ModuleList) and len(existing) == len(heads):
            heads = list(existing)  # set up before (fit, then validate): keep the trained heads
        else:
            module.add_module(HEADS_ATTRIBUTE, nn.ModuleList(heads).to(self.root_device))
        if self.world_size > 1:
            broadcast_tensors(module_tensors([module]), src=0)
            self._loss_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
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
        self._held_modules = [stage_blocks[s] for s in held] + [heads[s] for s in held if s < stages - 1]
        self._stage_owners = [(stage_blocks[s], s * self.world_size // stages) for s in range(stages)] + [
            (heads[s], s * self.world_size // stages) for s in range(stages - 1)
        ]

    @override
    def on_optimizers_ready(self, trainer: pl.Trainer) -> None:
        self._defer_sigterm_check(trainer)

    @property
    @override
    def held_stage_modules(self) -> dict[tuple[int, int], nn.Module]:
        """(0, stage) -> the blocks of each stage this rank trains (their auxiliary heads are not included)."""
        return dict(self._held_stages)

    def _defer_sigterm_check(self, trainer: pl.Trainer) -> None:
        """Replace Lightning's blocking per-batch SIGTERM broadcast by an asynchronous one (no flush per step)."""
        loop = trainer.fit_loop.epoch_loop
        if self.world_size > 1 and not self.synchronous and hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = self._broadcast_sigterm_deferred  # type: ignore[method-assign]

    def _broadcast_sigterm_deferred(self) -> None:
        trainer = self.lightning_module.trainer  # type: ignore[union-attr]
        flag = torch.tensor([1 if getattr(trainer, "received_sigterm", False) else 0])
        handle = dist.broadcast(flag, src=0, group=self._loss_group, async_op=True)
        previous = _one_step_late(self._pending_sigterm, handle, flag, late=True)
        if previous is not None and int(previous.item()) == 1:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()

    @staticmethod
    def _sample_batch(trainer: pl.Trainer) -> Any:
        """One batch of the data the run starts with (to size the heads), without touching the global RNG."""
        loops: dict[Any, Any] = {
            TrainerFn.FITTING: trainer.fit_loop,
            TrainerFn.VALIDATING: trainer.validate_loop,
            TrainerFn.TESTING: trainer.test_loop,
        }
        loop = loops.get(trainer.state.fn)
        try:
            loaders = loop._data_source.dataloader()  # type: ignore[union-attr]
            if isinstance(loaders, Mapping):
                loaders = next(iter(loaders.values()))
            if isinstance(loaders, Sequence):
                loaders = loaders[0]
            with torch.random.fork_rng(devices=[]):
                return next(iter(loaders))
        except Exception as error:
            raise RuntimeError(
                "InterlockingBackpropStrategy needs one batch of the run's dataloader during setup to size the "
                f"auxiliary heads, and could not get it ({type(error).__name__}: {error}). Pass the data to "
                "trainer.fit/validate/test as a DataLoader or a LightningDataModule."
            ) from error

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
        if self.world_size > 1:
            handle = dist.all_reduce(vector, group=self._loss_group, async_op=True)
            done = _one_step_late(self._pending_losses, handle, vector, late=not self.synchronous)
            if done is None:
                return torch.zeros(())
            vector = done
        size = batch_size(batch)
        module.log("train_loss", vector[-1], prog_bar=True, batch_size=size)  # type: ignore[union-attr]
        for stage in range(self.num_stages - 1):
            module.log(f"train_head{stage}_loss", vector[stage], batch_size=size)  # type: ignore[union-attr]
        return vector[-1]

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.synchronous:
            self.flush()
        return output

    def flush(self) -> None:
        """Wait until every rank has finished the current step: its messages received, its optimizer stepped."""
        if self.runtime is None or self.world_size == 1 or not dist.is_initialized():
            return
        self.runtime.finish()
        dist.barrier(group=self._loss_group)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._evaluate(args[0] if args else kwargs["batch"], "val")

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._evaluate(args[0] if args else kwargs["batch"], "test")

    def _evaluate(self, batch: Any, split: str) -> Tensor:
        runtime = self._require_runtime()
        module = self.lightning_module
        metrics_fn: Any = getattr(module, "pipeline_metrics", None)
        if not callable(metrics_fn):
            loss_fn: Any = getattr(module, "pipeline_loss")  # noqa: B009 - typed as Any on purpose

            def loss_only(output: Tensor, micro_batch: Any) -> dict[str, Tensor]:
                return {"loss": loss_fn(output, micro_batch)}

            metrics_fn = loss_only

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

    @override
    def teardown(self) -> None:
        if self.runtime is not None and self.world_size > 1 and dist.is_initialized():
            for handle, _ in self._pending_losses + self._pending_sigterm:
                handle.wait()
            self.runtime.finish()
        self._pending_losses, self._pending_sigterm = [], []
        super().teardown()

    # ------------------------------------------------------------------ checkpoints
    @override
    def sync_full_module(self) -> None:
        """Make every rank's copy of every stage and head equal to its owner's (collective)."""
        if self.world_size == 1 or self.runtime is None:
            return
        for module, owner in self._stage_owners:
            tensors = module_tensors([module])
            if tensors:
                broadcast_tensors(tensors, src=owner)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        return {key: value for key, value in state.items() if not key.startswith(HEADS_ATTRIBUTE + ".")}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()
        if self.world_size == 1 or self.runtime is None:
            return state
        params = [p for group in optimizer.param_groups for p in group["params"]]
        mine = {id(p) for module in self._held_modules for p in module.parameters()}
        local = {index: value for index, value in state["state"].items() if id(params[index]) in mine}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=self._loss_group)
        merged: dict[int, Any] = {}
        for part in gathered:
            merged.update(part)
        return {"state": dict(sorted(merged.items())), "param_groups": state["param_groups"]}

    @override
    def checkpoint_metadata(self) -> dict[str, Any]:
        heads = getattr(self.lightning_module, HEADS_ATTRIBUTE, None)
        return {
            "k": self.k,
            **super().checkpoint_metadata(),
            "heads": {}
            if heads is None
            else {key: value.detach().cpu() for key, value in heads.state_dict().items()},
        }

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        if module is None:
            return
        result = module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = [key for key in result.missing_keys if not key.startswith(HEADS_ATTRIBUTE + ".")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"The checkpoint does not fit {type(module).__name__}: missing keys {missing}, unexpected keys "
                f"{result.unexpected_keys}."
            )
        saved = checkpoint.get("interlocking")
        heads = getattr(module, HEADS_ATTRIBUTE, None)
        if saved is not None and heads is not None:
            # Written with the same stages: PipelineStrategy.load_checkpoint refuses others.
            heads.load_state_dict(saved["heads"])


def _one_step_late(queue: list[tuple[Any, Tensor]], handle: Any, tensor: Tensor, late: bool) -> Tensor | None:
    """Queues an asynchronous collective and returns the oldest queued tensor once its collective is done.

    With ``late`` the first call returns ``None`` and every later call the previous step's tensor, so no rank
    waits for this step's collective; without it, this step's tensor.
    """
    queue.append((handle, tensor))
    if late and len(queue) < 2:
        return None
    handle, tensor = queue.pop(0)
    handle.wait()
    return tensor
