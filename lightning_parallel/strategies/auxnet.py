"""AuxNetStrategy: forward-unlocked layer-parallel training with auxiliary networks and penalty / AL losses.

Design decisions:

- The execution is :class:`lightning_parallel.auxnet.AuxNetRuntime` (objectives written down in
  :mod:`lightning_parallel.auxnet.objective`); this file only adapts it to the Trainer.
- A sibling of :class:`InterlockingBackpropStrategy` on
  :class:`~lightning_parallel.strategies.local_learning.LocalLearningStrategy` (itself a
  :class:`~lightning_parallel.strategies.pipeline_base.PipelineStrategy`), which owns what the two share:
  launching, every rank reading the same batch, the sample batch of ``setup``, no flush between steps (and
  the asynchronous SIGTERM flag), ``synchronous``, gradients set aside in ``training_step`` and installed in
  ``backward``, the full module handed back at the end of ``fit``, optimizer state gathered from the owners,
  the stages check on resume, predict refused.
- The auxiliary networks are built in ``setup`` (the module's ``pipeline_aux_net`` hook, else the default) from
  one sample batch and attached to the LightningModule as ``auxnet_aux_nets`` (an ``nn.ModuleList``) *before*
  ``configure_optimizers`` runs, so the optimizer trains them with the stages. Their refits use the runtime's
  own Adam optimizers (``aux_lr``), one per stage.
- Logging: ``train_loss`` is the last stage's task loss on its auxiliary input (what the step optimises),
  ``train_penalty{s}`` and ``train_residual{s}`` the constraint term and mean squared residual at stage ``s``'s
  input. With several processes they are all-reduced asynchronously and logged one step later (as in
  interlocking backprop). Validation and test run the real end-to-end forward (stage after stage, without
  auxiliary networks) and log ``val_<metric>`` / ``test_<metric>`` of the model's own output.
- Checkpoints are full and load on one device: ``state_dict`` is the module's own (stages gathered from their
  owners, auxiliary networks left out), so ``YourModule.load_from_checkpoint(path)`` works. Under
  ``checkpoint["auxnet"]``: ``stages``, the options, the auxiliary networks, the multipliers, the step count
  (``rho`` schedule, refit interval) and the refit optimizers, gathered from every rank. Resuming restores
  everything exactly; resuming with another ``stages`` is refused by the base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from lightning_parallel.auxnet import AuxNetOptions, AuxNetRuntime, split_trunk_with_aux_nets
from lightning_parallel.auxnet.objective import LossName
from lightning_parallel.interlocking.plan import stages_of_rank
from lightning_parallel.pipeline.micro_batches import batch_size, split_micro_batches
from lightning_parallel.strategies._pipeline_checkpoint import broadcast_tensors, module_tensors
from lightning_parallel.strategies.local_learning import LocalLearningStrategy
from lightning_parallel.strategies.pipeline_base import StartMethod

AUX_NETS_ATTRIBUTE = "auxnet_aux_nets"


class AuxNetStrategy(LocalLearningStrategy):
    """AuxNet (Sun, Dong et al. 2021): every stage trains from an auxiliary network's prediction of its input.

    Args:
        stages: number of stages S. ``None`` (default) uses one stage per process; in single-process mode
            (``devices=1``) give it explicitly. Must be a multiple of the world size.
        micro_batches: micro-batches per optimizer step. Default 4.
        partition: blocks per stage: ``None`` (default: equal counts, leftovers to the outer stages first),
            ``"uniform"``, ``"parameters"`` or an explicit list such as ``[2, 1, 1, 2]`` (as for
            :class:`InterlockingBackpropStrategy`).
        loss: ``"penalty"`` or ``"augmented_lagrangian"``. Default ``"penalty"``.
        rho: penalty weight at step 0. Default 10.0.
        rho_growth: factor applied to ``rho`` per training step (1 keeps it constant). Default 1.0.
        rho_max: upper bound of ``rho`` (``None``: unbounded). Default ``None``.
        aux_update_interval: refit the auxiliary networks to the stages' true inputs every this many training
            steps (0: never). Each refit costs one end-to-end forward. Default 10.
        aux_steps: Adam steps per refit. Default 1.
        aux_lr: learning rate of the refits. Default 3e-3.
        oracle: feed every stage the previous stage's true output instead of its auxiliary network's (serial;
            for tests). Default False.
        stage_input_gradient: differentiate each stage's local loss through the stage into its auxiliary input
            (one input-gradient pass per stage and micro-batch); False trains the stages on their auxiliary
            inputs as constants. Default True.
        true_input_loss: at every refit the last stage also trains on its true input with the task loss.
            Default False.
        synchronous: flush after every optimizer step (same results, more idle time). Default False.
        timeout_s: seconds a rank waits for a peer (process group and transfers). Default 300.
        start_method: process launch: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy`.
    """

    strategy_name = "auxnet"
    checkpoint_key = "auxnet"
    companions_attribute = AUX_NETS_ATTRIBUTE

    def __init__(
        self,
        stages: int | None = None,
        micro_batches: int = 4,
        *,
        partition: str | Sequence[int] | None = None,
        loss: LossName = "penalty",
        rho: float = 10.0,
        rho_growth: float = 1.0,
        rho_max: float | None = None,
        aux_update_interval: int = 10,
        aux_steps: int = 1,
        aux_lr: float = 3e-3,
        oracle: bool = False,
        stage_input_gradient: bool = True,
        true_input_loss: bool = False,
        synchronous: bool = False,
        timeout_s: float = 300.0,
        start_method: StartMethod = "popen",
        **kwargs: Any,
    ) -> None:
        self.options = AuxNetOptions(
            loss=loss,
            rho=rho,
            rho_growth=rho_growth,
            rho_max=rho_max,
            aux_update_interval=aux_update_interval,
            aux_steps=aux_steps,
            aux_lr=aux_lr,
            oracle=oracle,
            stage_input_gradient=stage_input_gradient,
            true_input_loss=true_input_loss,
        )
        super().__init__(
            stages,
            micro_batches,
            synchronous=synchronous,
            timeout_s=timeout_s,
            start_method=start_method,
            **kwargs,
        )
        self.partition = self._check_partition(partition, stages, methods=("uniform", "parameters"))
        self.runtime: AuxNetRuntime | None = None
        self._metric_names: list[str] | None = None

    @override
    def _configure_launcher(self) -> None:
        world = self.num_processes * self.num_nodes
        stages = self.stages if self.stages is not None else world
        stages_of_rank(0, world, stages)  # ValueError when the stages do not fit the world size
        self._check_partition(self.partition, stages, methods=("uniform", "parameters"))
        super()._configure_launcher()

    # ------------------------------------------------------------------ setup
    @override
    def configure_stages(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        stages = self.num_stages
        held = stages_of_rank(self.global_rank, self.world_size, stages)
        protocol = self.pipeline_module
        stage_blocks, aux_nets = split_trunk_with_aux_nets(
            module, stages, self._sample_batch(trainer), partition=self.partition
        )
        existing = getattr(module, AUX_NETS_ATTRIBUTE, None)
        if isinstance(existing, nn.ModuleList) and len(existing) == len(aux_nets):
            aux_nets = list(existing)  # set up before (fit, then validate): keep the trained networks
        else:
            module.add_module(AUX_NETS_ATTRIBUTE, nn.ModuleList(aux_nets).to(self.root_device))
        if self.world_size > 1:
            broadcast_tensors(module_tensors([module]), src=0)
        self.new_loss_group()
        self.runtime = AuxNetRuntime(
            stage_blocks,
            aux_nets,
            protocol.pipeline_input,
            protocol.pipeline_loss,
            self.options,
            rank=self.global_rank,
            world_size=self.world_size,
            timeout_s=self.timeout_s,
        )
        owner = [s * self.world_size // stages for s in range(stages)]
        self._held_stages = {(0, s): stage_blocks[s] for s in held}
        self._held_modules = [stage_blocks[s] for s in held] + [aux_nets[s - 1] for s in held if s > 0]
        self._stage_owners = [(stage_blocks[s], owner[s]) for s in range(stages)] + [
            (aux_nets[s - 1], owner[s]) for s in range(1, stages)
        ]

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        batch = args[0] if args else kwargs["batch"]
        runtime = self._auxnet_runtime()
        module = self.lightning_module
        micro_batches = split_micro_batches(batch, self.micro_batches)
        with self.precision_plugin.train_step_context():
            stats = self.set_aside.compute(
                list(module.parameters()),  # type: ignore[union-attr]
                lambda: runtime.train_step(micro_batches),
            )
        stages = self.num_stages
        vector = torch.zeros(2 * stages - 1)  # loss, penalty 1 .. S-1, residual 1 .. S-1
        for stage, values in stats.items():
            if "loss" in values:
                vector[0] = values["loss"]
            if stage > 0:
                vector[stage] = values["penalty"]
                vector[stages - 1 + stage] = values["residual"]
        done = self.reduce_late(vector)
        if done is None:
            return torch.zeros(())
        vector = done
        size = batch_size(batch)
        log: Any = module.log  # type: ignore[union-attr]
        log("train_loss", vector[0], prog_bar=True, batch_size=size)
        for stage in range(1, stages):
            log(f"train_penalty{stage}", vector[stage], batch_size=size)
            log(f"train_residual{stage}", vector[stages - 1 + stage], batch_size=size)
        return vector[0]

    @override
    def _evaluate(self, batch: Any, split: str) -> Tensor:
        runtime = self._auxnet_runtime()
        module = self.lightning_module
        metrics_fn = self._metrics_fn()
        with self.precision_plugin.val_step_context():
            results = runtime.evaluate(split_micro_batches(batch, self.micro_batches), metrics_fn)
        last = self.world_size - 1
        if self._metric_names is None:  # only the last rank has the final output: it names the metrics
            known = [sorted(results)]
            if self.world_size > 1:
                dist.broadcast_object_list(known, src=last, group=self._loss_group)
            self._metric_names = known[0]
        names = self._metric_names
        table = torch.stack([results[n].float() for n in names]) if results else torch.zeros(len(names))
        if self.world_size > 1:
            dist.broadcast(table, src=last, group=self._loss_group)
        size = batch_size(batch)
        for column, name in enumerate(names):
            module.log(f"{split}_{name}", table[column], prog_bar=True, batch_size=size)  # type: ignore[union-attr]
        return table[names.index("loss")] if "loss" in names else table[0]

    def _auxnet_runtime(self) -> AuxNetRuntime:
        if self.runtime is None:
            raise RuntimeError(f"{type(self).__name__} is not set up; run it through a Trainer.")
        return self.runtime

    # ------------------------------------------------------------------ checkpoints
    @override
    def checkpoint_metadata(self) -> dict[str, Any]:
        nets = getattr(self.lightning_module, AUX_NETS_ATTRIBUTE, None)
        return {
            **super().checkpoint_metadata(),
            "options": vars(self.options).copy(),
            "aux_nets": {} if nets is None else {k: v.detach().cpu() for k, v in nets.state_dict().items()},
            "runtime": self._runtime_state(),
        }

    def _runtime_state(self) -> dict[str, Any]:
        """The runtime's step, multipliers and refit optimizers, merged over the ranks (collective)."""
        if self.runtime is None:
            return {}
        local = self.runtime.state_dict()
        parts: list[Any] = [local]
        if self.world_size > 1:
            parts = [None] * self.world_size
            dist.all_gather_object(parts, local, group=self._loss_group)
        merged: dict[str, Any] = {"step": local["step"], "multipliers": {}, "refit_optimizers": {}}
        for part in parts:
            merged["multipliers"].update({b: v.cpu() for b, v in part["multipliers"].items()})
            merged["refit_optimizers"].update(part["refit_optimizers"])
        return merged

    @override
    def load_companions(self, companions: nn.Module, metadata: Mapping[str, Any]) -> None:
        companions.load_state_dict(metadata["aux_nets"])
        if self.runtime is not None and metadata.get("runtime"):
            self.runtime.load_state_dict(metadata["runtime"])
