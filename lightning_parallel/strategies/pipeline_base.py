"""PipelineStrategy: what every pipeline strategy of this package shares on the Lightning side.

A pipeline strategy cuts a module that implements the pipeline protocol
(:mod:`lightning_parallel.pipeline.protocol`) into stages, gives each rank some of them, and runs its own
schedule of forwards and backwards inside ``training_step``. :class:`ChimeraStrategy` and
:class:`InterlockingBackpropStrategy` are subclasses; each keeps only what differs (the shape of the job,
the schedule, the optimizer slicing, the checkpoint extras).

Design decisions:

- Launching, the default process group and samplers come from :class:`DDPStrategy` (``popen`` launcher
  by default); the module is never wrapped in ``DistributedDataParallel``. ``timeout_s`` is both the
  process group's timeout and the pipeline transfers' one.
- ``setup`` follows the order of Lightning's own ``Strategy.setup``: accelerator, protocol and
  optimization checks, the precision plugin converts the module (it may swap layers, e.g. for QAT ones)
  *before* it moves to the device and before the optimizers exist, then the subclass builds its stages,
  then the optimizers, the precision plugin and the optimizers' move to the device.
- The schedule's gradients are computed apart (:class:`SetAsideGradients`) because Lightning zeroes
  gradients between ``training_step`` and ``backward``; ``backward`` runs no autograd and installs them
  between the precision plugin's ``pre_backward`` and ``post_backward`` (so ``on_before_backward`` /
  ``on_after_backward`` hooks see the step as under DDP).
- ``stage_local=True`` (for subclasses that set :attr:`supports_stage_local`): a rank holds only the weights
  of the stages it trains (:class:`~lightning_parallel.strategies.stage_local_state.StageLocalState`).
  ``configure_model`` runs on the meta device (:meth:`tensor_init_context`), meta tensors stay meta when the
  module moves to the device, the subclass materialises its stages' blocks and frees the others, and
  checkpoints are sharded directories through ``torch.distributed.checkpoint``
  (``save_distributed_checkpoint``), read back by name whatever layout wrote them; after ``fit`` the
  weights stay where they were trained.
- Parameters tied across stages are summed over the ranks that use them before every optimizer step
  (:attr:`tied_gradients`, filled by the subclass when it builds its stages).
- Single-file checkpoints are full and single-device shaped; the strategy records its shape under
  ``checkpoint[checkpoint_key]`` (at least ``{"stages": ...}``) and resuming with another number of
  stages is refused with the way out. ``restore_checkpoint_after_setup`` is True: the stages (and the
  optimizer slices) exist before a checkpoint is loaded into them.
- ``predict`` is not supported: a checkpoint loads into the plain module for that.
- Preemption and dead ranks: unless the Trainer already has one, a
  :class:`~lightning_parallel.callbacks.PreemptionCheckpoint` is added in ``setup_environment`` (before the
  callbacks' ``setup``), so SIGTERM only sets a flag, the ranks agree on it between steps
  (:meth:`agree_on_signal`, never inside the schedule's sends and receives), write the checkpoint of the
  last completed step and exit with status 143; and the table of the ranks' processes is published, with
  which the runtimes name a dead rank. ``preemption_checkpoint=False`` keeps Lightning's own handling.

Extension points (override these; each is called on every rank, in the same order):

- :meth:`configure_stages` (required): build this rank's stages in ``setup``, after the module is on its
  device and before ``configure_optimizers`` runs (a strategy whose stages need a batch may defer the
  build to :meth:`build_stages`).
- :meth:`build_stages` (optional): build the stages from a sample batch, when ``configure_stages``
  deferred it; :attr:`stages_built` says whether that happened.
- :attr:`held_stage_modules` (required) and :meth:`trained_stages` (public, built on demand): the
  ``(replica, stage) -> module`` this rank trains; callbacks use them instead of reaching into a subclass.
- :meth:`on_optimizers_ready` (optional): after ``configure_optimizers`` while fitting, e.g. to cut the
  optimizers down to the held stages.
- :meth:`install_gradients` (optional): inside ``backward``; the default adds the set-aside gradients.
- :meth:`sync_full_module` (required): make every rank's module complete (each stage from its owner) for
  ``state_dict`` and at the end of ``fit``.
- :meth:`checkpoint_metadata` / :meth:`on_checkpoint_metadata` (optional): what is saved under
  ``checkpoint[checkpoint_key]``, and what a resume reads back from it after the stages check.
"""

from __future__ import annotations

import numbers
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_parallel.pipeline.adapters import (
    PipelineAdapter,
    check_adapter_options,
    install_adapter,
    resolve_adapter,
)
from lightning_parallel.pipeline.protocol import PipelineProtocol, check_pipeline_protocol
from lightning_parallel.pipeline.stage_local import has_meta_tensors
from lightning_parallel.preemption import SignalFlag
from lightning_parallel.strategies._pipeline_checkpoint import broadcast_tensors, module_tensors
from lightning_parallel.strategies.monitors import warn_unlogged_monitors
from lightning_parallel.strategies.set_aside import SetAsideGradients
from lightning_parallel.strategies.stage_local_state import StageLocalState
from lightning_parallel.strategies.tied_gradients import TiedGradients

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


class PipelineStrategy(DDPStrategy):
    """Base class of the pipeline strategies: setup, gradient hand-over, resume checks, unsupported predict.

    Args:
        stages: number of pipeline stages; ``None`` uses one per process. Validated here.
        timeout_s: seconds a rank waits for a peer (process group and pipeline transfers). Default 300.
        start_method: how processes are launched: ``"popen"`` (re-run the script, default), ``"spawn"``,
            ``"fork"`` or ``"forkserver"``.
        stage_local: hold only the weights of this rank's stages (subclasses with
            :attr:`supports_stage_local`). ``None`` (default): on when the module is built in
            ``configure_model`` (which then runs on the meta device), off for a module built eagerly.
        save_distributed_checkpoint: write sharded checkpoint directories; ``None`` (default) means
            stage-local weights are on. A stage-local run needs True.
        adapter: supplies the pipeline protocol for a module without its hooks
            (:mod:`lightning_parallel.pipeline.adapters`): ``"hf"`` (a Hugging Face causal LM found in the module),
            ``"hf:ATTRIBUTE"``, another registered name, or a ``PipelineAdapter``. Default ``None``: the module's
            own hooks, else a Hugging Face model if the module holds one.
        blocks: dotted name of the module's ``nn.Sequential``/``nn.ModuleList`` trunk, e.g. ``"model.layers"``
            (the sequential-trunk adapter). Default ``None``.
        pre: with ``blocks``: dotted name(s) of modules or methods applied before the trunk. Default ``None``.
        post: with ``blocks``: dotted name(s) applied after the trunk (e.g. ``["norm", "head"]``). Default ``None``.
        loss: with ``blocks``: ``"cross_entropy"`` (the default), ``"nll"``, ``"mse"``, or the dotted name of a
            criterion module or a ``method(output, batch)`` of the module.
        split_points: split the module by tracing (``torch.distributed.pipelining.pipeline``; the ``"traced"``
            adapter): dotted names of the submodules that start stages 1, 2, ... (``stages - 1`` of them), or
            ``"auto"`` (an even split of the longest ``nn.ModuleList``). ``loss`` applies as with ``blocks``.
            Default ``None``.
        preemption_checkpoint: add a :class:`~lightning_parallel.callbacks.PreemptionCheckpoint` when the
            Trainer has none (SIGTERM writes a checkpoint and exits with 143). Default True.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``accelerator``,
            ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``, ``precision_plugin``,
            ``process_group_backend``).
    """

    checkpoint_key: ClassVar[str] = "pipeline"
    """The key of ``checkpoint`` under which :meth:`checkpoint_metadata` is saved."""

    supports_stage_local: ClassVar[bool] = False
    """Whether the subclass builds stage-local weights (``stage_local=True``)."""

    reshards_stages: ClassVar[bool] = True
    """Whether a sharded checkpoint may resume with another number of stages."""

    def __init__(
        self,
        stages: int | None = None,
        *,
        timeout_s: float = 300.0,
        start_method: StartMethod = "popen",
        stage_local: bool | None = None,
        save_distributed_checkpoint: bool | None = None,
        adapter: str | PipelineAdapter | None = None,
        blocks: str | None = None,
        pre: str | list[str] | None = None,
        post: str | list[str] | None = None,
        loss: str | None = None,
        split_points: str | list[str] | None = None,
        preemption_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        check_adapter_options(adapter=adapter, blocks=blocks, pre=pre, post=post, loss=loss, split_points=split_points)
        self.split_points = split_points
        self.adapter, self.blocks, self.pre, self.post, self.loss = adapter, blocks, pre, post, loss
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive, e.g. 300.")
        if not isinstance(preemption_checkpoint, bool):
            raise TypeError(f"preemption_checkpoint={preemption_checkpoint!r} must be True or False.")
        super().__init__(timeout=timedelta(seconds=timeout_s), start_method=start_method, **kwargs)
        self.preemption_checkpoint = preemption_checkpoint
        self.interrupted_by: BaseException | None = None
        if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
            raise ValueError(f"stages={stages!r} must be a positive number of pipeline stages, e.g. 2 or 4.")
        self.stages = stages
        self.timeout_s = float(timeout_s)
        self.set_aside = SetAsideGradients()
        if stage_local is not None and not isinstance(stage_local, bool):
            raise TypeError(f"stage_local={stage_local!r} must be True, False or None (on for configure_model builds).")
        if stage_local is True and not self.supports_stage_local:
            raise ValueError(
                f"{type(self).__name__} does not support stage_local=True; leave it False (every rank holds the model)."
            )
        self._requested_sharded = save_distributed_checkpoint
        self.stage_local: bool | None = False if not self.supports_stage_local else stage_local
        if self.stage_local is not None:
            self._check_stage_local(self.stage_local, save_distributed_checkpoint)
        self.save_distributed_checkpoint = bool(self.stage_local) if save_distributed_checkpoint is None else save_distributed_checkpoint
        self._stage_local: StageLocalState | None = None
        self._sharded_resume: str | None = None
        self.tied_gradients = TiedGradients()

    @staticmethod
    def _check_stage_local(stage_local: bool, save_distributed_checkpoint: bool | None) -> None:
        if save_distributed_checkpoint is None:
            save_distributed_checkpoint = stage_local
        if stage_local and not save_distributed_checkpoint:
            raise ValueError(
                "stage_local=True with save_distributed_checkpoint=False cannot write a checkpoint: no rank holds "
                "the whole model. Use save_distributed_checkpoint=True (then `lightning-parallel consolidate`), "
                "or stage_local=False for models that fit one device."
            )
        if save_distributed_checkpoint and not stage_local:
            raise ValueError(
                "save_distributed_checkpoint=True needs stage_local=True (a full module per rank writes "
                "single-file checkpoints)."
            )

    # ------------------------------------------------------------------ shape of the job
    @property
    def num_stages(self) -> int:
        """The explicit ``stages`` or, by default, one per process."""
        return self.stages if self.stages is not None else self.world_size

    @property
    def pipeline_module(self) -> PipelineProtocol:
        """The LightningModule, typed by the pipeline protocol it implements.

        Raises:
            RuntimeError: before the Trainer attached a module.
            TypeError: if the module lacks the protocol's hooks.
        """
        module = self.lightning_module
        if module is None:
            raise RuntimeError(f"{type(self).__name__} has no LightningModule; run it through a Trainer.")
        if not isinstance(module, PipelineProtocol):
            check_pipeline_protocol(module, who=type(self).__name__)
            raise TypeError(f"{type(module).__name__} does not implement the pipeline protocol.")
        return module

    @staticmethod
    def _check_partition(
        partition: str | Sequence[int] | None, stages: int | None, *, methods: Sequence[str], name: str = "partition"
    ) -> str | list[int] | None:
        """Validate a ``partition`` argument (a method name or blocks per stage) and return it as stored.

        Args:
            partition: the argument as given.
            stages: the number of stages if known (an explicit list must have one entry per stage).
            methods: the method names this strategy accepts.
            name: the argument's name, as the user wrote it, for the message.

        Raises:
            ValueError: for an unknown method or a list of the wrong length.
            TypeError: for a list entry that is not a whole number.
        """
        if partition is None:
            return None
        if isinstance(partition, str):
            if partition not in methods:
                raise ValueError(
                    f"{name}={partition!r} is not one of {tuple(methods)} or a list of blocks per stage such as [2, 2]."
                )
            return partition
        if any(isinstance(size, bool) or not isinstance(size, numbers.Integral) for size in partition):
            raise TypeError(f"{name}={list(partition)!r} must list whole numbers of blocks per stage, e.g. [2, 2].")
        sizes = [int(size) for size in partition]
        if stages is not None and len(sizes) != stages:
            raise ValueError(
                f"{name}={sizes} lists {len(sizes)} stages but stages={stages}; give one block count per stage."
            )
        return sizes

    # ------------------------------------------------------------------ preemption
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if self.preemption_checkpoint and trainer is not None:
            from lightning_parallel.callbacks.preemption import PreemptionCheckpoint

            if not any(isinstance(callback, PreemptionCheckpoint) for callback in trainer.callbacks):
                trainer.callbacks.append(PreemptionCheckpoint())

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self.interrupted_by = exception  # teardown then waits for no peer (one may be dead)

    def agree_on_signal(self, flag: SignalFlag) -> int | None:
        """The signal any rank received, agreed by every rank at the end of a training batch (a collective).

        Called by :class:`~lightning_parallel.callbacks.PreemptionCheckpoint` after every training batch, when
        the step's schedule has finished on this rank. The default is one blocking 4-byte all-reduce.
        """
        return flag.agreed(device=self.root_device)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self.interrupted_by = None
        module = self._begin_setup(trainer)
        self.model_to_device()
        self.configure_stages(trainer, module)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            warn_unlogged_monitors(trainer, module, type(self).__name__)
            self.setup_optimizers(trainer)
            self.on_optimizers_ready(trainer)
        self.setup_precision_plugin()
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        _optimizers_to_device(self.optimizers, self.root_device)

    def _begin_setup(self, trainer: pl.Trainer) -> pl.LightningModule:
        """Set up the accelerator, check the module and let the precision plugin convert it.

        Raises:
            TypeError: if the module lacks the pipeline protocol.
            ValueError: if the module uses manual optimization, or the precision plugin has a gradient scaler.
        """
        name = type(self).__name__
        if self.accelerator is None:
            raise RuntimeError(f"{name}.setup called before an accelerator was set.")
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if module is None:
            raise RuntimeError(f"{name}.setup called without a LightningModule.")
        self._install_adapter(trainer, module)
        check_pipeline_protocol(module, who=name)
        if not module.automatic_optimization:
            raise ValueError(
                f"{name} runs the optimization itself; {type(module).__name__} sets "
                "automatic_optimization=False. Use automatic optimization (the default)."
            )
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"{name} does not support a gradient scaler (precision='16-mixed'); use "
                "precision='bf16-mixed' or '32-true'."
            )
        if self.model is not None:
            self.model = self.precision_plugin.convert_module(self.model)
        return module

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        if not self.stage_local:
            with super().tensor_init_context(empty_init=empty_init):
                yield
            return
        # configure_model builds on meta: each rank materialises only its stages' blocks later.
        with torch.device("meta"):
            yield

    @override
    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        # Lightning runs configure_model here: by default (stage_local=None) a module built there is built on
        # meta and becomes stage-local (the large-model path); explicit False builds it whole on the device.
        if self.stage_local is None:
            with torch.device("meta"):
                yield
            return
        with super().model_sharded_context():
            yield

    @override
    def model_to_device(self) -> None:
        if self.model is None or self.stage_local is False:
            super().model_to_device()
            return
        # Meta tensors stay meta (materialised on the device later, stage by stage).
        device = self.root_device
        self.model._apply(lambda t: t if t.device.type == "meta" else t.to(device))

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if not self.stage_local or module is None:
            super().teardown()
            return
        # Lightning moves the module to the CPU here; the blocks held elsewhere are meta and stay so.
        module.__dict__["cpu"] = lambda: module._apply(lambda t: t if t.device.type == "meta" else t.cpu())
        try:
            super().teardown()
        finally:
            del module.__dict__["cpu"]

    def begin_stage_local(self, module: pl.LightningModule) -> StageLocalState | None:
        """Start every rank from global rank 0's weights and, with ``stage_local``, track the held stages.

        Broadcasts every materialised tensor and the module's ``init_seed`` from global rank 0 (meta tensors
        have no values yet: ``pipeline_init_weights``, seeded by ``init_seed``, gives them theirs). Call it
        in :meth:`configure_stages` before any block is materialised.

        Returns:
            The stage-local state (``None`` without ``stage_local``).

        Raises:
            ValueError: if the module has meta tensors but ``stage_local`` is False.
        """
        blocks = list(module.pipeline_blocks())  # type: ignore[operator]
        if self.stage_local is None:
            self._resolve_stage_local(has_meta_tensors([module]))
        freed = [has_meta_tensors([block]) for block in blocks]
        # A module already trained stage-local (fit, then validate) keeps each rank's values.
        partly_freed = any(freed) and not all(freed)
        if self.world_size > 1:
            if not partly_freed:
                broadcast_tensors([t for t in module_tensors([module]) if t.device.type != "meta"], src=0)
            init_seed = getattr(module, "init_seed", None)
            if isinstance(init_seed, int):
                seed = torch.tensor([init_seed], dtype=torch.long, device=self.root_device)
                dist.broadcast(seed, src=0)
                module.init_seed = int(seed)  # type: ignore[assignment]
        if self.stage_local:
            self._stage_local = StageLocalState(module, blocks)
        elif any(t.device.type == "meta" for t in module_tensors([module])):
            raise ValueError(
                f"{type(module).__name__} has tensors on the meta device (built in configure_model on meta?); "
                f"use {type(self).__name__}(stage_local=True) to materialise only each rank's stages."
            )
        return self._stage_local

    def _resolve_stage_local(self, meta_built: bool) -> None:
        """``stage_local=None``: on for a module built on the meta device (in ``configure_model``), off else."""
        self.stage_local = meta_built
        self._check_stage_local(meta_built, self._requested_sharded)
        if self._requested_sharded is None:
            self.save_distributed_checkpoint = meta_built
    @staticmethod
    def _sample_batch(trainer: pl.Trainer) -> Any:
        """One batch of the data the run starts with (to trace a module or size heads and auxiliary networks), RNG
        untouched."""
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
                f"{trainer.strategy.__class__.__name__} needs one batch of the run's dataloader during setup to "
                f"build its stages' auxiliary modules, and could not get it ({type(error).__name__}: {error}). Pass "
                "the data to trainer.fit/validate/test as a DataLoader or a LightningDataModule."
            ) from error

    def _install_adapter(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Give ``module`` the pipeline protocol through an adapter when it lacks the hooks (or was given one)."""
        adapter = resolve_adapter(
            module, adapter=self.adapter, blocks=self.blocks, pre=self.pre, post=self.post, loss=self.loss,
            split_points=self.split_points,
        )
        if adapter is None:
            return
        install_adapter(module, adapter, sample_batch=lambda: self._sample_batch(trainer))
        rank_zero_info(
            f"{type(self).__name__}: {adapter.describe()} supplies the pipeline protocol of {type(module).__name__}."
        )

    def configure_stages(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Build this rank's stages (or prepare to build them at the first batch). Called by ``setup``.

        Args:
            trainer: the Trainer being set up (its state says fit, validate or test).
            module: the LightningModule, already converted by the precision plugin and on its device.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement configure_stages.")

    def on_optimizers_ready(self, trainer: pl.Trainer) -> None:
        """Called by ``setup`` while fitting, right after ``configure_optimizers`` built ``self.optimizers``."""

    # ------------------------------------------------------------------ stages
    @property
    def stages_built(self) -> bool:
        """Whether this rank's stages exist (a subclass may build them at the first batch)."""
        return True

    def build_stages(self, batch: Any) -> None:
        """Build this rank's stages from a sample ``batch`` when :meth:`configure_stages` deferred it."""

    @property
    def held_stage_modules(self) -> dict[tuple[int, int], nn.Module]:
        """(replica, stage) -> the module this rank trains (empty before the stages are built)."""
        raise NotImplementedError(f"{type(self).__name__} must implement held_stage_modules.")

    def trained_stages(self, batch: Any = None) -> dict[tuple[int, int], nn.Module]:
        """(replica, stage) -> the module this rank trains, building the stages first if needed.

        Args:
            batch: a batch of the run, for strategies that build their stages from one (e.g.
                ``partition="profile"``); ``None`` when they are known to be built.
        """
        if not self.stages_built:
            if batch is None:
                raise RuntimeError(
                    f"{type(self).__name__} builds its stages at the first batch; pass that batch to trained_stages."
                )
            self.build_stages(batch)
        return self.held_stage_modules

    # ------------------------------------------------------------------ steps
    def install_gradients(self) -> None:
        """Add the gradients set aside in ``training_step`` to ``.grad`` (called inside :meth:`backward`)."""
        self.reduce_tied_gradients()
        self.set_aside.install(accumulate_grad_batches=self._accumulate_grad_batches())

    def reduce_tied_gradients(self) -> None:
        """Sum the set-aside gradients of every tied parameter over the ranks that use it (collective)."""
        if len(self.tied_gradients):
            self.set_aside.reduce(self.tied_gradients.reduction)

    def _accumulate_grad_batches(self) -> int:
        module = self.lightning_module
        return 1 if module is None else int(module.trainer.accumulate_grad_batches)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        # The schedule already ran backward inside training_step: install its gradients instead.
        module = self.lightning_module
        if module is None:
            raise RuntimeError("backward called without a LightningModule.")
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self.install_gradients()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} does not run predict; load the checkpoint into a plain module "
            "(`YourModule.load_from_checkpoint(path)`) and predict on one device or under DDP."
        )

    # ------------------------------------------------------------------ full module and checkpoints
    def sync_full_module(self) -> None:
        """Make every rank's copy of every stage equal to its owner's (collective; a no-op before setup)."""
        raise NotImplementedError(f"{type(self).__name__} must implement sync_full_module.")

    @override
    def on_train_end(self) -> None:
        # Hand back a complete module on every rank (each rank trained only its own stages).
        self.sync_full_module()
        super().on_train_end()

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.stage_local:
            return {}  # each rank writes its own stages in save_checkpoint
        self.sync_full_module()
        return super().lightning_module_state_dict()

    def sharded_checkpoint_meta(self) -> dict[str, Any]:
        """Extra entries of a sharded checkpoint's meta file (read by ``lightning-parallel consolidate``)."""
        return {}

    def checkpoint_metadata(self) -> dict[str, Any]:
        """The shape of the job saved under ``checkpoint[checkpoint_key]``; subclasses add their own entries."""
        return {"stages": self.num_stages}

    def on_checkpoint_metadata(self, metadata: dict[str, Any]) -> None:
        """Read back a resumed checkpoint's metadata (called after its ``stages`` has been checked)."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        checkpoint[self.checkpoint_key] = self.checkpoint_metadata()
        if self._stage_local is not None:
            self._stage_local.save(filepath, checkpoint, self.optimizers, self.sharded_checkpoint_meta())
            return
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(checkpoint_path).is_dir():
            return self._load_sharded_checkpoint(checkpoint_path)
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        metadata = checkpoint.get(self.checkpoint_key)
        if metadata is not None:
            if metadata.get("stages") != self.num_stages:
                raise ValueError(
                    f"The checkpoint {checkpoint_path} was written with stages={metadata.get('stages')} but this "
                    f"run has stages={self.num_stages}. Resume with stages={metadata.get('stages')}, or start a new "
                    "run from its weights: `YourModule.load_from_checkpoint(path)` then `trainer.fit(module)`."
                )
            self.on_checkpoint_metadata(metadata)
        return checkpoint

    def _load_sharded_checkpoint(self, checkpoint_path: Any) -> dict[str, Any]:
        """The non-tensor part of a sharded checkpoint; its tensors are read once the stages exist."""
        from lightning_parallel.pipeline.stage_checkpoint import read_meta

        if not self.stage_local:
            raise ValueError(
                f"{checkpoint_path} is a sharded checkpoint directory; resume it with stage_local=True, or "
                "consolidate it first: `lightning-parallel consolidate DIR OUT.ckpt`."
            )
        meta = read_meta(checkpoint_path)  # refuses a half-written directory
        checkpoint = dict(meta["checkpoint"])
        metadata = checkpoint.get(self.checkpoint_key) or {}
        if metadata.get("stages") == self.num_stages:
            self.on_checkpoint_metadata(metadata)
        elif not self.reshards_stages:
            raise ValueError(
                f"The checkpoint {checkpoint_path} was written with stages={metadata.get('stages')} but this run has "
                f"stages={self.num_stages}; {type(self).__name__} resumes only with the same stages. Resume with "
                f"stages={metadata.get('stages')} (any world size that divides it), or consolidate it "
                "(`lightning-parallel consolidate DIR OUT.ckpt`) and start a new run from its weights."
            )
        # Sharded checkpoints reshard: another stage count or schedule reads its own stages' names.
        self._sharded_resume = str(checkpoint_path)
        checkpoint["state_dict"] = {}
        checkpoint["optimizer_states"] = [{} for _ in meta.get("optimizers", [])]
        return checkpoint

    def load_sharded_now(self) -> bool:
        """Read this rank's tensors of a pending sharded resume if the stages exist (collective).

        Returns:
            Whether a sharded resume is pending or was just read (the caller then loads nothing else).
        """
        path, local = self._sharded_resume, self._stage_local
        if path is None or local is None:
            return False
        if self.stages_built:
            local.load_model(path, self.root_device)
            if self.optimizers:
                local.load_optimizers(path, self.optimizers)
            self._sharded_resume = None
        return True

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self.load_sharded_now():
            return  # model and optimizers both exist by now, or the stages are built later and read it then
        super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._stage_local is not None and not any(checkpoint["optimizer_states"]):
            return  # sharded: loaded with the model (load_sharded_now)
        super().load_optimizer_state_dict(checkpoint)
