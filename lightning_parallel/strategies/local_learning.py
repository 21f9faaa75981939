"""LocalLearningStrategy: what the pipeline strategies trained by local losses share (interlocking, AuxNet).

Both run every stage from the same batch on every rank, train each stage by a loss that needs at most its
neighbours, and so step without a global flush. What they share on the Lightning side lives here once:

- every rank reads the same batch (``num_replicas=1``);
- ``synchronous=True`` adds the flush after every optimizer step (messages received, then a barrier); by
  default there is none, and Lightning's blocking per-batch SIGTERM broadcast is replaced by an asynchronous
  one acted on one step later; so is the preemption agreement of ``PreemptionCheckpoint``
  (:meth:`agree_on_signal`: ``SignalFlag.agreed_late`` on the gloo statistics group);
- the step's statistics are all-reduced asynchronously and logged one step later with several processes
  (:meth:`reduce_late`), at once in single-process mode;
- a sample batch of the run's data for building heads or auxiliary networks in ``setup``;
- ``validation_step`` / ``test_step`` delegate to the subclass's ``_evaluate(batch, split)``;
- the full module on every rank (each stage and each of its companions broadcast from its owner), and the
  optimizer state gathered from the owners of each parameter.

Subclasses set ``self.runtime`` (anything with ``finish()``), ``self._held_modules`` (what this rank trains),
``self._held_stages`` and ``self._stage_owners`` (module, owner rank) in ``configure_stages``, and create
``self._loss_group`` with :meth:`new_loss_group`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_parallel.preemption import SignalFlag
from lightning_parallel.strategies._pipeline_checkpoint import broadcast_tensors, module_tensors
from lightning_parallel.strategies.pipeline_base import PipelineStrategy, StartMethod


class LocalLearningStrategy(PipelineStrategy):
    """Base of the pipeline strategies trained by local losses, without a flush between steps.

    The modules a subclass adds to the LightningModule for training (auxiliary heads, auxiliary networks) live
    under the submodule :attr:`companions_attribute`; they are left out of ``state_dict`` (so a checkpoint
    loads into the plain module) and saved in the checkpoint's metadata instead.

    Args:
        stages: number of stages S; ``None`` uses one per process.
        micro_batches: micro-batches per optimizer step. Default 4.
        synchronous: flush after every optimizer step (same results, more idle time). Default False.
        timeout_s: seconds a rank waits for a peer. Default 300.
        start_method: process launch, as for :class:`PipelineStrategy`.
        **kwargs: passed to :class:`PipelineStrategy`.
    """

    companions_attribute: ClassVar[str] = "pipeline_companions"
    """The submodule of the LightningModule holding the heads or auxiliary networks (not in ``state_dict``)."""

    def __init__(
        self,
        stages: int | None = None,
        micro_batches: int = 4,
        *,
        synchronous: bool = False,
        timeout_s: float = 300.0,
        start_method: StartMethod = "popen",
        **kwargs: Any,
    ) -> None:
        super().__init__(stages, timeout_s=timeout_s, start_method=start_method, **kwargs)
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches!r} must be a positive integer, e.g. 4.")
        if not isinstance(synchronous, bool):
            raise ValueError(f"synchronous={synchronous!r} must be True or False.")
        self.micro_batches = micro_batches
        self.synchronous = synchronous
        self.runtime: Any = None
        self._pending_losses: list[tuple[Any, Tensor]] = []
        self._pending_sigterm: list[tuple[Any, Tensor]] = []
        self._loss_group: Any = None
        self._held_modules: list[nn.Module] = []
        self._held_stages: dict[tuple[int, int], nn.Module] = {}
        self._stage_owners: list[tuple[nn.Module, int]] = []

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}  # every rank reads the same batch

    @property
    @override
    def held_stage_modules(self) -> dict[tuple[int, int], nn.Module]:
        """(0, stage) -> the blocks of each stage this rank trains (heads / auxiliary networks not included)."""
        return dict(self._held_stages)

    def new_loss_group(self) -> None:
        """Create the gloo group of the statistics and the checkpoint gathers (collective; several processes)."""
        if self.world_size > 1:
            self._loss_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))

    # ------------------------------------------------------------------ no flush between steps
    @override
    def on_optimizers_ready(self, trainer: pl.Trainer) -> None:
        self._defer_sigterm_check(trainer)

    def _defer_sigterm_check(self, trainer: pl.Trainer) -> None:
        """Replace Lightning's blocking per-batch SIGTERM broadcast by an asynchronous one (no flush per step)."""
        loop = trainer.fit_loop.epoch_loop
        if self.world_size > 1 and not self.synchronous and hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = self._broadcast_sigterm_deferred  # type: ignore[method-assign]

    @override
    def agree_on_signal(self, flag: SignalFlag) -> int | None:
        if self.world_size > 1 and not self.synchronous and self._loss_group is not None:
            return flag.agreed_late(group=self._loss_group)
        return super().agree_on_signal(flag)

    def _broadcast_sigterm_deferred(self) -> None:
        trainer = self.lightning_module.trainer  # type: ignore[union-attr]
        flag = torch.tensor([1 if getattr(trainer, "received_sigterm", False) else 0])
        handle = dist.broadcast(flag, src=0, group=self._loss_group, async_op=True)
        previous = _one_step_late(self._pending_sigterm, handle, flag, late=True)
        if previous is not None and int(previous.item()) == 1:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()

    def reduce_late(self, vector: Tensor) -> Tensor | None:
        """Sum ``vector`` over the ranks; with several processes and no flush, return the previous step's sum.

        Returns:
            The summed vector to log, or ``None`` at the first step of an asynchronous multi-process run.
        """
        if self.world_size == 1:
            return vector
        handle = dist.all_reduce(vector, group=self._loss_group, async_op=True)
        return _one_step_late(self._pending_losses, handle, vector, late=not self.synchronous)

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
    def teardown(self) -> None:
        # after an exception (a dead peer, a preemption) no rank waits for another: its peer may be gone
        interrupted = self.interrupted_by is not None
        if self.runtime is not None and self.world_size > 1 and dist.is_initialized() and not interrupted:
            for handle, _ in self._pending_losses + self._pending_sigterm:
                handle.wait()
            self.runtime.finish()
        self._pending_losses, self._pending_sigterm = [], []
        super().teardown()

    # ------------------------------------------------------------------ setup and evaluation

    def _metrics_fn(self) -> Callable[[Tensor, Any], Mapping[str, Tensor]]:
        """The module's ``pipeline_metrics``, else its loss alone as ``{"loss": ...}``."""
        module = self.lightning_module
        metrics_fn: Any = getattr(module, "pipeline_metrics", None)
        if callable(metrics_fn):
            return metrics_fn  # type: ignore[no-any-return]
        loss_fn: Any = getattr(module, "pipeline_loss")  # noqa: B009 - typed as Any on purpose

        def loss_only(output: Tensor, micro_batch: Any) -> dict[str, Tensor]:
            return {"loss": loss_fn(output, micro_batch)}

        return loss_only

    def _evaluate(self, batch: Any, split: str) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _evaluate.")

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._evaluate(args[0] if args else kwargs["batch"], "val")

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._evaluate(args[0] if args else kwargs["batch"], "test")

    # ------------------------------------------------------------------ full module and optimizer state
    @override
    def sync_full_module(self) -> None:
        """Make every rank's copy of every stage (and its companions) equal to its owner's (collective)."""
        if self.world_size == 1 or self.runtime is None or self.stage_local:
            return
        for module, owner in self._stage_owners:
            tensors = module_tensors([module])
            if tensors:
                broadcast_tensors(tensors, src=owner)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.stage_local:
            return {}  # sharded checkpoints write it by parameter name
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

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        prefix = self.companions_attribute + "."
        return {key: value for key, value in state.items() if not key.startswith(prefix)}

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        if module is None or self.load_sharded_now():
            return
        result = module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = [key for key in result.missing_keys if not key.startswith(self.companions_attribute + ".")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"The checkpoint does not fit {type(module).__name__}: missing keys {missing}, unexpected keys "
                f"{result.unexpected_keys}."
            )
        saved = checkpoint.get(self.checkpoint_key)
        companions = getattr(module, self.companions_attribute, None)
        if saved is not None and companions is not None:
            # written with the same stages: PipelineStrategy.load_checkpoint refuses others
            self.load_companions(companions, saved)

    def load_companions(self, companions: nn.Module, metadata: Mapping[str, Any]) -> None:
        """Restore the heads or auxiliary networks (and anything else) from ``checkpoint[checkpoint_key]``."""


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
