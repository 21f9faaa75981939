"""DP-KFAC: K-FAC preconditioning as a Lightning callback, distributed one owner per layer.

A thin adapter over :mod:`lightning_parallel.kfac` (pure torch).

Design decisions:

- Preconditioning runs in ``on_before_optimizer_step``: after backward and DDP's gradient
  all-reduce (and after the AMP scaler's unscale), before gradient clipping and the optimizer
  step, so clipping and any optimizer (SGD, Adam, ...) see the preconditioned gradient.
- Under ``16-mixed`` the recorded output gradients carry the loss scale; the scaler's current
  scale (the one used by this step's backward, since the scaler updates only after the step) is
  divided out of ``G``.
- The learning rate for KL-clip is read from the optimizer at every step (so LR schedulers are
  honoured). One optimizer (automatic optimization) is assumed.
- Multi-process runs need DDP (every rank holds every layer's full, all-reduced gradient) or
  :class:`~lightning_parallel.strategies.ChimeraStrategy`. Under Chimera (and its 1F1B / GPipe
  schedules) the preconditioner is built once the pipeline exists (``on_fit_start``, or the first
  batch with ``partition="profile"``) over the stage copies the rank holds
  (``held_stage_modules``), and the two copies of a stage combine their factors
  (:class:`~lightning_parallel.kfac.PipelineKFACPreconditioner`), so both receive the
  single-device preconditioned gradient. A sampled ``fisher`` runs its second backward through
  the schedule on factor-update steps (:class:`~lightning_parallel.kfac.pipeline_fisher.SampledFisherPass`,
  the runtime's ``side_backward``). Other pipeline strategies and sharded strategies are
  refused.
- Checkpoints hold the step count, the owners and every layer's factors and decomposition;
  under ``dp`` the owners' states are gathered when Lightning calls ``state_dict`` (on every
  rank while saving), and each rank keeps its own layers when it loads. Resume is exact.
- Per-rank counters (seconds building factors, decomposing, preconditioning, communicating;
  bytes communicated; bytes of curvature state) are gathered every ``log_every_n_steps`` and
  logged by rank 0 as ``kfac/<counter>/rank<r>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_parallel.kfac import (
    Hyperparameter,
    KFACOptions,
    KFACPreconditioner,
    PipelineKFACPreconditioner,
)
from lightning_parallel.kfac.options import Fisher
from lightning_parallel.kfac.pipeline import check_pipeline_options
from lightning_parallel.strategies.chimera import ChimeraStrategy
from lightning_parallel.strategies.pipeline_base import PipelineStrategy


class DPKFAC(Callback):
    """Preconditions the gradients of every ``nn.Linear`` and ``nn.Conv2d`` with K-FAC.

    Each numeric hyperparameter may be a constant, a callable ``step -> value`` or a list of
    ``[first_step, value]`` pairs (piecewise constant over optimizer steps).

    Args:
        {kfac_options}
        log_every_n_steps: Steps between logging the per-rank counters; ``None`` uses the
            Trainer's ``log_every_n_steps``; 0 turns logging off.

    Raises:
        ValueError: On an option :class:`~lightning_parallel.kfac.KFACOptions` refuses (it validates
            them all), a negative ``log_every_n_steps``, or (at setup) a model with no supported
            layer, a ``fisher_output`` naming no module, or ``fisher_output`` with a sampled ``fisher``
            under ChimeraStrategy (there the prediction is the last stage's output).
        TypeError: On a hyperparameter of the wrong type (see ``KFACOptions``).
    """

    def __init__(
        self,
        damping: Hyperparameter = 0.001,
        *,
        factor_decay: Hyperparameter = 0.95,
        kl_clip: Hyperparameter | None = 0.001,
        factor_update_steps: Hyperparameter = 1,
        inv_update_steps: Hyperparameter = 10,
        assignment: Literal["dp", "replicated"] = "dp",
        placement: Literal["auto", "owner", "all"] = "auto",
        method: Literal["eigen", "inverse"] = "eigen",
        factored_damping: bool = True,
        factor_subsample: int = 1,
        position_subsample: int = 1,
        factor_rank: int | None = None,
        stagger_decompositions: bool = False,
        skip_layers: Sequence[str] = (),
        fisher: Fisher = "empirical",
        fisher_output: str | None = None,
        fisher_seed: int = 0,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.options = KFACOptions(
            damping=damping,
            factor_decay=factor_decay,
            kl_clip=kl_clip,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
            assignment=assignment,
            placement=placement,
            method=method,
            factored_damping=factored_damping,
            factor_subsample=factor_subsample,
            position_subsample=position_subsample,
            factor_rank=factor_rank,
            stagger_decompositions=stagger_decompositions,
            skip_layers=tuple(skip_layers),
            fisher=fisher,
            fisher_output=fisher_output,
            fisher_seed=fisher_seed,
        )
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise ValueError(
                f"`log_every_n_steps={log_every_n_steps}` must be >= 0 (0 turns logging off) or None."
            )
        self.log_every_n_steps = log_every_n_steps
        self.preconditioner: KFACPreconditioner | None = None
        self.logged: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._previous: KFACPreconditioner | None = None  # a pipeline's state until its rebuild

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, trainer.world_size, self.options)
        if isinstance(trainer.strategy, ChimeraStrategy):
            self._previous = self.preconditioner
            self.preconditioner = None  # built over the held stage copies once the pipeline exists
            return
        self._build(KFACPreconditioner(pl_module, self.options), self.preconditioner)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, ChimeraStrategy) and strategy.pipeline_groups is not None:
            self._build_pipeline(strategy)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, ChimeraStrategy) and self.preconditioner is None:
            strategy.trained_stages(batch)  # partition="profile" builds the pipeline at the first batch
            self._build_pipeline(strategy)

    def _build_pipeline(self, strategy: ChimeraStrategy) -> None:
        groups = strategy.pipeline_groups
        assert groups is not None
        held = strategy.held_stage_modules
        module = strategy.lightning_module
        two_copies = any(replica > 0 for replica, _ in held)
        preconditioner = PipelineKFACPreconditioner(
            held,
            self.options,
            pipeline_group=groups.pipeline_group,
            pair_group=groups.pair_group if two_copies else None,
            data_parallel_group=groups.data_parallel_group,
            accumulate_grad_batches=int(module.trainer.accumulate_grad_batches) if module is not None else 1,
        )
        self._build(preconditioner, self._previous)
        self._previous = None
        runtime = strategy.pipeline_runtime
        if runtime is not None:  # the sampled Fisher's second backward rides the schedule (None: empirical)
            runtime.side_backward = preconditioner.sampled_pass

    def _build(self, preconditioner: KFACPreconditioner, previous: KFACPreconditioner | None) -> None:
        self.preconditioner = preconditioner
        preconditioner.coverage.report(rank_zero_info, rank_zero_warn)  # which weights K-FAC sees, once
        if self._pending_state is not None:  # restored from a checkpoint before setup
            self.preconditioner.load_state_dict(self._pending_state)
            self._restore_fisher_rng(self._pending_state)
            self._pending_state = None
        elif previous is not None:  # a second fit with the same callback continues its curvature
            self.preconditioner.load_state_dict(previous.state_dict())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.preconditioner is not None:
            self.preconditioner.remove_hooks()  # the state stays for state_dict() after fit
            runtime = getattr(trainer.strategy, "pipeline_runtime", None)
            if runtime is not None:
                runtime.side_backward = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.preconditioner is None:
            return
        self.preconditioner.step(optimizer, grad_scale=_loss_scale(trainer))
        every = (
            getattr(trainer, "log_every_n_steps", 50)
            if self.log_every_n_steps is None
            else self.log_every_n_steps
        )
        if every and trainer.global_step % every == 0:
            self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        assert self.preconditioner is not None
        metrics = self.preconditioner.metrics()
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64)
        world_size = self.preconditioner.comm.world_size
        if world_size > 1:  # a small all-gather for monitoring, not counted as K-FAC traffic
            gathered = [torch.zeros_like(values) for _ in range(world_size)]
            dist.all_gather(gathered, values, group=self.preconditioner.comm.group)
        else:
            gathered = [values]
        self.logged = {
            f"kfac/{name}/rank{rank}": float(row[i])
            for rank, row in enumerate(gathered)
            for i, name in enumerate(names)
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.logged, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.preconditioner is None:
            return dict(self._pending_state or {})
        state = self.preconditioner.state_dict()
        comm = self.preconditioner.comm
        if comm.world_size > 1:
            # the sampled Fisher's generator of every rank (the preconditioner's state holds this rank's), so a
            # resume mid-epoch draws the same samples; every rank is here: Lightning dumps checkpoints on all
            rngs: list[Any] = [None] * comm.world_size
            dist.all_gather_object(rngs, state.get("fisher_rng"), group=comm.group)
            state["fisher_rngs"] = rngs
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.preconditioner is None:
            self._pending_state = state_dict
        else:
            self.preconditioner.load_state_dict(state_dict)
            self._restore_fisher_rng(state_dict)

    def _restore_fisher_rng(self, state_dict: dict[str, Any]) -> None:
        """This rank's sampled-Fisher generator from a checkpoint of the same world size."""
        assert self.preconditioner is not None
        rngs = state_dict.get("fisher_rngs")
        comm = self.preconditioner.comm
        generator = self.preconditioner._generator
        if rngs is None or len(rngs) != comm.world_size or generator is None or rngs[comm.rank] is None:
            return
        generator.set_state(rngs[comm.rank])


# the options are documented once, in KFACOptions; the signature above repeats them for LightningCLI
DPKFAC.__doc__ = (DPKFAC.__doc__ or "").replace("{kfac_options}", KFACOptions.args_doc(indent=8))


def check_strategy(strategy: Any, world_size: int, options: KFACOptions | None = None) -> None:
    """Refuses the strategies K-FAC cannot follow yet (every refusal of a strategy, in one place).

    Args:
        strategy: The Trainer's strategy.
        world_size: The number of processes.
        options: The K-FAC options, checked against a pipeline strategy's rules
            (:func:`~lightning_parallel.kfac.pipeline.check_pipeline_options`).

    Raises:
        ValueError: For this package's pipeline strategies other than ChimeraStrategy, for
            multi-process strategies other than DDP and ChimeraStrategy (sharded parameters have no
            full gradient), and for options ChimeraStrategy cannot run (``fisher_output`` with a sampled
            ``fisher``, ``assignment="dp"`` over pipeline replicas).
    """
    name = type(strategy).__name__
    if isinstance(strategy, ChimeraStrategy):
        if options is not None:
            check_pipeline_options(options, name)
        return
    if isinstance(strategy, PipelineStrategy):
        raise ValueError(
            f"`strategy={name}` is not supported by DPKFAC: its stages are trained on local losses. Use"
            " strategy='ddp', ChimeraStrategy (or one device) when using DPKFAC."
        )
    if world_size > 1 and not isinstance(strategy, DDPStrategy):
        raise ValueError(
            f"`strategy={name}` with {world_size} processes is not supported by DPKFAC: it needs every rank to"
            " hold the full gradient of every layer after backward. Use strategy='ddp'."
        )


def _loss_scale(trainer: pl.Trainer) -> float:
    """The AMP scaler's scale used by this step's backward, or 1 without a scaler."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
