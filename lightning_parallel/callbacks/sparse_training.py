"""SparseTraining: dynamic sparse training (SET, RigL, static masks) as a Lightning callback.

A thin adapter over :class:`lightning_parallel.sparse.SparseEngine` (pure torch).

Design decisions:

- The engine is built in ``setup("fit")``, before the optimizer exists, so with ``execution="sparse"`` the
  optimizer only ever sees the nonzeros of the converted ``nn.Linear`` layers. Models that create their
  layers in ``configure_model`` are not covered (that hook runs after ``setup``).
- Hooks per optimizer step: the mask update (at update steps) and the gradient masking run in
  ``on_before_optimizer_step`` (after backward, DDP's all-reduce and DPKFAC's preconditioning, so the
  preconditioned gradient is re-masked); the weights are re-masked in ``on_train_batch_end``. SparseTraining
  must therefore come after DPKFAC in ``callbacks``; the other order is refused at setup.
- ``stop_at`` <= 1 is a fraction of ``trainer.estimated_stepping_batches``; above 1 a step count.
- Under DDP every rank holds the same weights and (after DDP's all-reduce) the same gradients, so the masked
  layers' decisions agree; RigL's dense gradient of the sparse layers is all-reduced (mean) block by block
  before ranking, and SET draws from a generator seeded identically on every rank.
- Under :class:`~lightning_parallel.strategies.ChimeraStrategy`: the engine is built over the whole module in
  ``setup`` (the same initial masks as on one device), then, once the pipeline exists, cut down to the layers of
  this rank's stages (:meth:`~lightning_parallel.strategies.ChimeraStrategy.trained_stages`), rebound to the
  modules the rank trains (Chimera's second copy of a stage included). The two copies of a stage get the same
  summed gradient and take the same step, so RigL's and SET's decisions on them agree; SET draws the random
  numbers of the masked layers other ranks train too. In sparse execution (RigL, static) RigL's dense-gradient
  blocks are summed over the stage's two copies (each saw half the micro-batches) and averaged over pipeline
  replicas. Checkpoints gather every rank's masks and patterns (one ``all_gather_object``). Refused: SET in
  sparse execution (its draws depend on the patterns other ranks hold) and sparse execution with
  ``stage_local=True``.
- Checkpoints: the callback's state holds the masks, the sparse patterns with their values and the random
  generator (resume is exact). With ``checkpoint_weights="dense"`` (default) the model's ``state_dict`` in the
  checkpoint has each sparse layer as a dense-with-zeros ``weight``, so ``load_from_checkpoint`` into the plain
  module gives the dense-with-zeros model; ``"sparse"`` keeps the compact ``values``/``indices`` (for widths
  whose dense form does not fit in memory; :func:`~lightning_parallel.sparse.export.densify_state_dict` turns
  it dense).
- Neuron pruning (``prune_neurons > 0``) shrinks layers at the end of an epoch, in place (parameters and
  optimizer state keep their identity, so no optimizer rebuild). A checkpoint then holds narrower layers:
  a ``load_state_dict`` pre-hook (registered in ``setup``) resizes the model's linear layers to the shapes in
  the state dict before the weights are loaded;
  a plain module loads it after :func:`~lightning_parallel.sparse.export.resize_to_state_dict`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from typing_extensions import override

from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.pipeline.recompute import RecomputedStage
from lightning_parallel.sparse import SparseEngine
from lightning_parallel.sparse.engine import check_options
from lightning_parallel.sparse.export import densify_state_dict, resize_to_state_dict
from lightning_parallel.strategies import ChimeraStrategy
from lightning_parallel.strategies.pipeline_base import PipelineStrategy


class SparseTraining(Callback):
    """Trains ``nn.Linear`` and ``nn.Conv2d`` layers at a fixed sparsity, moving the nonzeros by SET or RigL.

    Args:
        method: ``"rigl"`` (regrow at the largest dense-gradient magnitude; Evci et al. 2020), ``"set"``
            (regrow at random; Mocanu et al. 2018) or ``"static"`` (a fixed random mask). Default ``"rigl"``.
        sparsity: global fraction of zero weights over the covered layers, in [0, 1). Default 0.9.
        distribution: ``"erk"`` (Erdos-Renyi-Kernel per-layer densities) or ``"uniform"``. Default ``"erk"``.
        update_interval: optimizer steps between mask updates (RigL's ``delta T``), >= 1. Default 100.
        drop_fraction: fraction of a layer's active weights replaced at the first update, in [0, 1].
            Default 0.3.
        decay: ``"cosine"`` (the drop fraction falls to 0 at ``stop_at``) or ``"constant"``. Default ``"cosine"``.
        stop_at: the last update step: a fraction (<= 1) of the run's optimizer steps, or a step count (> 1).
            Default 0.75.
        execution: ``"masked"`` (dense weights under masks; any layer, any strategy) or ``"sparse"`` (plain
            ``nn.Linear`` layers hold only their nonzeros and multiply with sparse kernels; other covered layers
            stay masked). Default ``"masked"``.
        seed: seed of the initial masks and of SET's regrowth. Default 0.
        skip_layers: regular expressions on qualified or class names of layers left dense. Default none.
        checkpoint_weights: ``"dense"`` or ``"sparse"``: how sparse layers appear in the checkpoint's model
            ``state_dict`` (see the module docstring). Default ``"dense"``.
        prune_neurons: fraction of the hidden neurons of each linear pair removed at each neuron pruning (their
            incoming and outgoing weights with them; :mod:`lightning_parallel.sparse.neurons`), in [0, 1);
            0 turns neuron pruning off. One device only. Default 0.
        prune_neurons_every: epochs between neuron prunings, >= 1. Default 10.
        prune_neurons_after: epochs trained before the first neuron pruning, >= 0. Default 0.

    Raises:
        ValueError: on an unknown method, distribution, decay, execution or checkpoint format, a sparsity outside
            [0, 1), a drop fraction outside [0, 1], ``update_interval`` < 1 or ``stop_at`` <= 0; at setup, on a
            model with no covered layer, ``execution="sparse"`` without a plain ``nn.Linear`` or under
            ChimeraStrategy, an unsupported strategy, or DPKFAC listed after this callback.
    """

    def __init__(
        self,
        method: Literal["rigl", "set", "static"] = "rigl",
        *,
        sparsity: float = 0.9,
        distribution: Literal["erk", "uniform"] = "erk",
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        decay: Literal["cosine", "constant"] = "cosine",
        stop_at: float = 0.75,
        execution: Literal["masked", "sparse"] = "masked",
        seed: int = 0,
        skip_layers: Sequence[str] = (),
        checkpoint_weights: Literal["dense", "sparse"] = "dense",
        prune_neurons: float = 0.0,
        prune_neurons_every: int = 10,
        prune_neurons_after: int = 0,
    ) -> None:
        check_options(
            method=method, sparsity=sparsity, distribution=distribution, drop_fraction=drop_fraction,
            decay=decay, execution=execution,
        )
        if update_interval < 1:
            raise ValueError(f"`update_interval={update_interval}` must be >= 1 optimizer step, e.g. 100.")
        if stop_at <= 0:
            raise ValueError(
                f"`stop_at={stop_at}` must be > 0: a fraction of the run (<= 1, e.g. 0.75) or a step count (> 1)."
            )
        if checkpoint_weights not in ("dense", "sparse"):
            raise ValueError(f"`checkpoint_weights={checkpoint_weights!r}` is not one of ['dense', 'sparse'].")
        if not 0.0 <= prune_neurons < 1.0:
            raise ValueError(f"`prune_neurons={prune_neurons}` must be in [0, 1): the fraction removed, e.g. 0.2.")
        if prune_neurons_every < 1 or prune_neurons_after < 0:
            raise ValueError(
                f"`prune_neurons_every={prune_neurons_every}` must be >= 1 and `prune_neurons_after="
                f"{prune_neurons_after}` >= 0 (epochs)."
            )
        self.prune_neurons = prune_neurons
        self.prune_neurons_every = prune_neurons_every
        self.prune_neurons_after = prune_neurons_after
        self.neurons_removed: dict[str, int] = {}
        self.options = dict(
            method=method, sparsity=sparsity, distribution=distribution, drop_fraction=drop_fraction,
            decay=decay, execution=execution, seed=seed, skip_layers=tuple(skip_layers),
        )
        self.update_interval = update_interval
        self.stop_at = stop_at
        self.checkpoint_weights = checkpoint_weights
        self.engine: SparseEngine | None = None
        self._stop_step = 0
        self._pending_state: dict[str, Any] | None = None
        self._pipeline_bound = False
        self._sparse_reduce: dict[str, Any] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        chimera = isinstance(strategy, ChimeraStrategy)
        other_pipeline = isinstance(strategy, PipelineStrategy) and not chimera
        if other_pipeline or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"SparseTraining runs on one device, under DDP or under ChimeraStrategy; got "
                f"{type(strategy).__name__}. Use strategy='auto', 'ddp' or 'chimera' (local-learning strategies "
                "are not supported yet)."
            )
        if chimera and self.options["execution"] == "sparse" and getattr(strategy, "stage_local", False):
            raise ValueError(
                "SparseTraining(execution='sparse') is not supported under ChimeraStrategy(stage_local=True) (the "
                "stage-local state names every tensor of a stage, and a sparse layer's index structures have no "
                "state-dict name); use stage_local=False or execution='masked'."
            )
        if chimera and self.options["execution"] == "sparse" and self.options["method"] == "set":
            raise ValueError(
                "SparseTraining('set', execution='sparse') is not supported under ChimeraStrategy (SET's random draws "
                "for a sparse layer depend on its pattern, which only the ranks holding it know); use method='rigl' "
                "or 'static', execution='masked', or SET in sparse execution under DDP."
            )
        if self.prune_neurons and trainer.world_size > 1:
            raise ValueError(
                f"`prune_neurons={self.prune_neurons}` changes layer shapes, which DDP cannot follow: prune "
                "neurons on one device (or set prune_neurons=0)."
            )
        callbacks = list(getattr(trainer, "callbacks", []))
        names = [type(c).__name__ for c in callbacks]
        if "DPKFAC" in names and names.index("DPKFAC") > callbacks.index(self):
            raise ValueError(
                "DPKFAC is listed after SparseTraining in `callbacks`: put SparseTraining after DPKFAC so the "
                "preconditioned gradients are re-masked."
            )
        self._pipeline_bound = False
        if self.engine is None:
            if self.prune_neurons:  # a neuron-pruned checkpoint has narrower layers: resize before loading
                pl_module.register_load_state_dict_pre_hook(_resize_before_loading)
            self.engine = SparseEngine(pl_module, **self.options)  # type: ignore[arg-type]
            self._warn_coverage(self.engine)
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None

    @staticmethod
    def _warn_coverage(engine: SparseEngine) -> None:
        if engine.uncovered:
            counts = ", ".join(f"{n} x{c}" for n, c in sorted(engine.uncovered.items()))
            warnings.warn(
                f"SparseTraining leaves {sum(engine.uncovered.values())} weighted module(s) dense: {counts} "
                "(covered: nn.Linear, nn.Conv2d and the layer registry's types, lightning_parallel.layers).",
                stacklevel=2,
            )
        if engine.masked_by_sparse_fallback:
            warnings.warn(
                f"SparseTraining(execution='sparse') runs {len(engine.sparse)} nn.Linear layer(s) sparse and keeps "
                f"{engine.masked_by_sparse_fallback} other layer(s) masked: {sorted(engine.masks)}.",
                stacklevel=2,
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self._stop_step = int(self.stop_at * total) if self.stop_at <= 1 else int(self.stop_at)
        strategy = trainer.strategy
        if isinstance(strategy, ChimeraStrategy) and strategy.stages_built:
            self._bind_pipeline(strategy, pl_module, None)

    def _bind_pipeline(self, strategy: ChimeraStrategy, pl_module: pl.LightningModule, batch: Any) -> None:
        """Cut the engine down to the layers of this rank's stages, rebound to the modules the rank trains."""
        if self.engine is None or self._pipeline_bound:
            return
        held = strategy.trained_stages(batch)  # partition="profile" builds the pipeline at the first batch
        sizes = strategy.partition_sizes
        if sizes is None:
            raise RuntimeError("ChimeraStrategy reported its stages built but has no partition.")
        blocks = list(pl_module.pipeline_blocks())  # type: ignore[operator]
        block_names = {id(m): n for n, m in pl_module.named_modules()}
        slices = stage_slices(sizes)
        located: dict[str, torch.nn.Module | torch.Tensor] = {}
        stage_of: dict[str, int] = {}
        for (_, stage), module in held.items():
            inner = module.inner if isinstance(module, RecomputedStage) else module
            for position, block in enumerate(blocks[slices[stage]]):
                prefix = block_names[id(block)]
                held_block = inner[position]  # type: ignore[index]
                for name, layer in held_block.named_modules():
                    located[f"{prefix}.{name}" if name else prefix] = layer
                    stage_of[f"{prefix}.{name}" if name else prefix] = stage
                for name, param in held_block.named_parameters():
                    located.setdefault(f"{prefix}.{name}", param)
        names = [*self.engine.masks, *self.engine.sparse]
        self.engine.keep_only({name: located[name] for name in names if name in located})
        self._sparse_reduce = _stage_reduces(strategy, {name: stage_of[name] for name in self.engine.sparse})
        self._pipeline_bound = True

    def _is_update_step(self, step: int) -> bool:
        assert self.engine is not None
        return self.engine.is_update_step(step, update_interval=self.update_interval, stop_at=self._stop_step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(trainer.strategy, ChimeraStrategy):
            self._bind_pipeline(trainer.strategy, pl_module, batch)
        if self.engine is not None and self.engine.sparse:
            self.engine.record_dense_gradients(self._is_update_step(trainer.global_step))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.engine is None:
            return
        step = trainer.global_step
        if self._is_update_step(step):
            reduce = self._sparse_reduce if self._pipeline_bound else _mean_reduce()
            fraction = self.engine.update(step, stop_at=self._stop_step, optimizer=optimizer, reduce=reduce)
            pl_module.log("sparse/drop_fraction", fraction, on_step=True, on_epoch=False)
        self.engine.mask_gradients()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.engine is not None:
            self.engine.apply_masks()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = trainer.current_epoch + 1 - self.prune_neurons_after
        if self.engine is None or not self.prune_neurons or epochs <= 0 or epochs % self.prune_neurons_every:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        removed = self.engine.prune_neurons(self.prune_neurons, optimizer=optimizer)
        for name, count in removed.items():
            self.neurons_removed[name] = self.neurons_removed.get(name, 0) + count
        pl_module.log("sparse/neurons_removed", float(sum(removed.values())), on_step=False, on_epoch=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self._pending_state or {})
        state = self.engine.state_dict()
        if self._pipeline_bound and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            # each rank holds its stages' masks and patterns
            dist.all_gather_object(gathered, (state["masks"], state["patterns"]))
            for masks, patterns in gathered:
                for name, mask in masks.items():
                    state["masks"].setdefault(name, mask)
                for name, pattern in patterns.items():
                    state["patterns"].setdefault(name, pattern)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.engine is None:
            self._pending_state = state_dict
        else:
            self.engine.load_state_dict(state_dict)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.engine is None or self.checkpoint_weights == "sparse":
            return
        weights = checkpoint["state_dict"]
        for name, layer in self.engine.sparse.items():
            prefix = f"{name}."
            weights.pop(prefix + "values")
            weights.pop(prefix + "indices")
            weights.pop(prefix + "_extra_state", None)
            weights[prefix + "weight"] = layer.dense_weight().cpu()


def _mean_reduce() -> Any:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world = dist.get_world_size()

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)  # one all-reduce per block of RigL's dense gradient
        return tensor.div_(world)

    return reduce


def _stage_reduces(strategy: ChimeraStrategy, stages: dict[str, int]) -> dict[str, Any]:
    """Per sparse layer: the sum of RigL's dense-gradient blocks over its stage's two Chimera copies (their
    micro-batches together are the batch), then the mean over the pipeline replicas (collectives in layer order,
    the same on every holder)."""
    groups, schedule = strategy.pipeline_groups, strategy.pipeline_schedule
    if groups is None or schedule is None:
        raise RuntimeError("ChimeraStrategy reported its stages built but has no process groups.")
    two_copies = schedule.replicas > 1
    replicas = groups.data_parallel_size

    def reduce_for(stage: int) -> Any:
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            if two_copies:
                dist.all_reduce(tensor, group=groups.stage_groups[stage])  # both copies' micro-batches
            if replicas > 1:
                dist.all_reduce(tensor, group=groups.data_parallel_group)
                tensor.div_(replicas)
            return tensor

        return reduce

    return {name: reduce_for(stage) for name, stage in stages.items()}


def _resize_before_loading(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    resize_to_state_dict(module, densify_state_dict({k[len(prefix):]: v for k, v in state_dict.items()}))
