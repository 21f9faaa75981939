"""The per-rank state of a pipeline strategy: held stages, their optimizer slice, steps and reductions.

Kept apart from :mod:`lightning_parallel.strategies.chimera` so that the strategy file stays a thin
Lightning adapter; it gets the job's shape (micro-batches, replicas, device, timeout) at construction and
knows nothing of the strategy. Every collective here runs on every rank in the same order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_parallel.pipeline.groups import PipelineGroups
from lightning_parallel.pipeline.micro_batches import batch_size, split_micro_batches
from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.pipeline.protocol import PipelineProtocol, check_pipeline_protocol
from lightning_parallel.pipeline.runtime import PipelineRuntime
from lightning_parallel.pipeline.schedule import Schedule
from lightning_parallel.strategies._pipeline_checkpoint import HeldParameter, module_tensors
from lightning_parallel.strategies.set_aside import SetAsideGradients
from lightning_parallel.utils.flat import flatten, unflatten


class PipelineSteps:
    """This rank's stages of one pipeline and the training/evaluation steps over them.

    Args:
        module: the LightningModule that implements the pipeline protocol.
        set_aside: where a training step's gradients wait for ``backward``.
        micro_batches: N, the micro-batches of every step.
        replicas: the number of pipeline replicas whose gradients are averaged.
        device: where losses and reductions live (the strategy's root device).
        timeout_s: how long a pipeline transfer may wait, in seconds.
    """

    def __init__(
        self,
        module: pl.LightningModule,
        set_aside: SetAsideGradients,
        *,
        micro_batches: int,
        replicas: int,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        if not isinstance(module, PipelineProtocol):
            check_pipeline_protocol(module, who="PipelineSteps")
            raise TypeError(f"{type(module).__name__} does not implement the pipeline protocol.")
        self.module = module
        self.hooks: PipelineProtocol = module
        self.set_aside = set_aside
        self.micro_batches = micro_batches
        self.replicas = replicas
        self.device = device
        self.timeout_s = timeout_s
        self.blocks: list[nn.Module] = list(self.hooks.pipeline_blocks())
        self.schedule: Schedule | None = None
        self.groups: PipelineGroups | None = None
        self.runtime: PipelineRuntime | None = None
        self.sizes: list[int] | None = None
        self.stage_modules: dict[tuple[int, int], nn.Module] = {}
        self.copies: list[tuple[nn.Module, nn.Module]] = []
        self.params: list[Tensor] = []
        self.owner_params: list[Tensor] = []
        self.held: list[list[HeldParameter]] = []
        self.full_groups: list[list[list[int]]] = []
        self.localised = False
        self._records: list[tuple[int, dict[str, Tensor]]] | None = None
        self._metric_names: dict[str, list[str]] = {}
        self._weights: dict[int, float] = {}

    # ------------------------------------------------------------------ building
    def build(
        self,
        schedule: Schedule,
        groups: PipelineGroups,
        sizes: Sequence[int],
        *,
        wrap: Callable[[int, nn.Module], nn.Module] | None = None,
        allow_tied: bool = False,
    ) -> None:
        """Place this rank's stages (a ``deepcopy`` for Chimera's second pipeline) and start the runtime.

        Args:
            schedule: the schedule to run.
            groups: this rank's process groups.
            sizes: blocks per stage.
            wrap: ``wrap(stage, module)`` replaces a stage's module in the runtime (e.g. to recompute it);
                its parameters must be the module's.
            allow_tied: accept a parameter shared by blocks of different stages (the caller keeps the
                stages' copies equal); otherwise refused.
        """
        self.schedule, self.groups, self.sizes = schedule, groups, list(sizes)
        slices = stage_slices(self.sizes)
        self._check_blocks(slices, allow_tied=allow_tied)
        for replica, stage in sorted(schedule.stages_of(groups.pipeline_rank)):
            original = nn.Sequential(*self.blocks[slices[stage]])
            if replica == 0:
                self.stage_modules[(replica, stage)] = original
            else:
                duplicate = copy.deepcopy(original)
                self.stage_modules[(replica, stage)] = duplicate
                self.copies.append((original, duplicate))
        if wrap is not None:
            self.stage_modules = {key: wrap(key[1], module) for key, module in self.stage_modules.items()}
        for (replica, _), stage_module in sorted(self.stage_modules.items()):
            for param in stage_module.parameters():
                self.params.append(param)
                if replica == 0:
                    self.owner_params.append(param)
        self.runtime = PipelineRuntime(
            schedule,
            groups,
            self.stage_modules,
            self.hooks.pipeline_input,
            self._loss,
            timeout_s=self.timeout_s,
            device=self.device,
        )

    def _check_blocks(self, slices: Sequence[slice], *, allow_tied: bool = False) -> None:
        stage_of: dict[int, int] = {}
        names = {id(p): name for name, p in self.module.named_parameters(remove_duplicate=False)}
        for stage, block_slice in enumerate(slices):
            for block in self.blocks[block_slice]:
                for param in block.parameters():
                    other = stage_of.setdefault(id(param), stage)
                    if other != stage and not allow_tied:
                        raise ValueError(
                            f"Parameter {names.get(id(param), '?')} is shared by stages {other} and {stage} of "
                            f"partition={self.sizes}; tied weights must sit in one stage: choose a partition "
                            "that keeps the blocks sharing it together, untie them, or use ChimeraStrategy(stage_local=True) "
                            "(a copy per stage, gradients summed)."
                        )
        block_params = {id(p) for block in self.blocks for p in block.parameters()}
        outside = [n for n, p in self.module.named_parameters() if p.requires_grad and id(p) not in block_params]
        if outside:
            rank_zero_warn(
                f"{type(self.module).__name__} has parameters outside pipeline_blocks() ({', '.join(outside[:3])}"
                f"{', ...' if len(outside) > 3 else ''}); pipeline strategies do not train them."
            )
        if self.micro_batches > 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for block in self.blocks for m in block.modules()
        ):
            rank_zero_warn(
                "BatchNorm inside pipeline stages normalises each micro-batch on its own (statistics over "
                f"batch/{self.micro_batches} examples), so results differ from full-batch training; "
                "use GroupNorm/LayerNorm, or micro_batches=1, for exact equivalence."
            )

    def localise_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Cut every optimizer down to this rank's parameters, keeping each param group's settings."""
        local_of: dict[int, list[Tensor]] = {}
        for original, duplicate in self.copies:
            for p, q in zip(original.parameters(), duplicate.parameters()):
                local_of.setdefault(id(p), []).append(q)
        for (replica, _), stage_module in self.stage_modules.items():
            if replica == 0:
                for p in stage_module.parameters():
                    local_of.setdefault(id(p), []).append(p)
        self.held, self.full_groups = [], []
        for optimizer in optimizers:
            held: list[HeldParameter] = []
            groups: list[list[int]] = []
            counter = 0
            for group in optimizer.param_groups:
                originals = list(group["params"])
                indices = list(range(counter, counter + len(originals)))
                counter += len(originals)
                local: list[Tensor] = []
                for original, full_index in zip(originals, indices):
                    for held_param in local_of.get(id(original), []):
                        local.append(held_param)
                        held.append(HeldParameter(held_param, full_index, owner=held_param is original))
                group["params"] = local
                groups.append(indices)
            self.held.append(held)
            self.full_groups.append(groups)
        self.localised = True

    def refresh_copies(self) -> None:
        """Copy the module's (freshly loaded) blocks into Chimera's second-pipeline copies."""
        with torch.no_grad():
            for original, duplicate in self.copies:
                for source, target in zip(module_tensors([original]), module_tensors([duplicate])):
                    target.copy_(source)

    # ------------------------------------------------------------------ steps
    def _loss(self, output: Tensor, micro_batch: Any) -> Tensor:
        loss: Tensor = self.hooks.pipeline_loss(output, micro_batch)
        weight = self._weights.get(id(micro_batch), 1.0)
        if weight != 1.0:
            # Unequal micro-batches: the runtime averages N losses, so weigh each by N * size / batch size.
            loss = loss * weight
        metrics_fn = getattr(self.module, "pipeline_metrics", None)
        if self._records is not None and callable(metrics_fn):
            with torch.no_grad():
                metrics = metrics_fn(output.detach(), micro_batch)
            values = {k: v.detach().float() for k, v in metrics.items() if k != "loss"}
            self._records.append((batch_size(micro_batch), values))
        return loss

    def _sync_modes(self) -> None:
        for _, duplicate in self.copies:
            duplicate.train(self.module.training)

    def train(self, batch: Any) -> Tensor:
        """Run one step of the schedule; keep its gradients for :meth:`install_gradients`; log the loss."""
        if self.runtime is None:
            raise RuntimeError("The pipeline is not built.")
        self._sync_modes()
        runtime = self.runtime
        n = self.micro_batches
        micro_batches = split_micro_batches(batch, n)
        size = batch_size(batch)
        self._weights = {id(mb): batch_size(mb) * n / size for mb in micro_batches}
        self._records = []
        try:
            local_loss = self.set_aside.compute(self.params, lambda: runtime.train_step(micro_batches))
        finally:
            records, self._records = self._records, None
        self._weights = {}
        dp = self.replicas
        names = self._names("train", records)
        # [loss, metric sums..., examples] summed over every rank: one all-reduce per step.
        sums = [float(local_loss.detach()) / dp] + [0.0] * len(names)
        for examples, values in records:
            for i, name in enumerate(names):
                sums[1 + i] += float(values[name]) * examples / (size * dp)
        totals = self._all_reduce(sums)
        loss = torch.tensor(totals[0], device=self.device)
        self.module.log("train_loss", loss, prog_bar=True, batch_size=size * dp)
        for i, name in enumerate(names):
            self.module.log(f"train_{name}", totals[1 + i], prog_bar=True, batch_size=size * dp)
        return loss

    def reduce_replicas(self) -> None:
        """Sum the set-aside gradients over the pipeline replicas (one flat all-reduce; a no-op for one)."""
        if self.replicas <= 1 or self.groups is None:
            return
        group = self.groups.data_parallel_group

        def all_reduce(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor | None]:
            dense = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
            flat = flatten(dense) if dense else torch.zeros(0)
            dist.all_reduce(flat, group=group)  # one all-reduce per step
            return list(unflatten(flat, dense))

        self.set_aside.reduce(all_reduce)

    def clip_grad_norm(self, max_norm: float) -> None:
        """Scale this rank's gradients so that the norm over all stages (each counted once) is <= max_norm."""
        if self.groups is None:
            return
        squares = sum(float(p.grad.detach().double().pow(2).sum()) for p in self.owner_params if p.grad is not None)
        (total,) = self._all_reduce([squares], group=self.groups.pipeline_group)
        coefficient = max_norm / (total**0.5 + 1e-6)
        if coefficient < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coefficient)

    def evaluate(self, batch: Any, split: str) -> Tensor:
        """Forward-only pipeline over ``batch``; log ``<split>_<metric>`` on every rank; return the loss."""
        if self.runtime is None:
            raise RuntimeError("The pipeline is not built.")
        self._sync_modes()
        micro_batches = split_micro_batches(batch, self.micro_batches)
        records: list[tuple[int, dict[str, Tensor]]] = []
        metrics_fn = getattr(self.module, "pipeline_metrics", None)
        with torch.no_grad():
            for index, output in self.runtime.forward_only(micro_batches):
                micro_batch = micro_batches[index]
                if callable(metrics_fn):
                    metrics = metrics_fn(output, micro_batch)
                else:
                    metrics = {"loss": self.hooks.pipeline_loss(output, micro_batch)}
                records.append((batch_size(micro_batch), {k: v.detach().float() for k, v in metrics.items()}))
        names = self._names(split, records)
        sums = [0.0] * (len(names) + 1)
        for size, values in records:
            for i, name in enumerate(names):
                sums[i] += float(values[name]) * size
            sums[-1] += size
        totals = self._all_reduce(sums)
        total = totals[-1]
        results = {name: totals[i] / total for i, name in enumerate(names)}
        for name, value in results.items():
            # Equal on every rank already; sync_dist only reduces once at epoch end and keeps Lightning quiet.
            self.module.log(f"{split}_{name}", value, prog_bar=True, batch_size=int(total), sync_dist=True)
        return torch.tensor(results.get("loss", 0.0), device=self.device)

    def _all_reduce(self, values: list[float], group: Any = None) -> list[float]:
        # On the strategy's device so that NCCL groups work too.
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=group)
        return [float(v) for v in tensor.tolist()]

    def _names(self, split: str, records: Sequence[tuple[int, dict[str, Tensor]]]) -> list[str]:
        # Only ranks holding a last stage see metrics: agree on their names once per split.
        if split not in self._metric_names:
            mine = sorted({name for _, values in records for name in values})
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            self._metric_names[split] = sorted({name for part in gathered for name in part})
        return self._metric_names[split]
