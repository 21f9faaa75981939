"""Preemption and dead ranks: SIGTERM writes a checkpoint of the last completed step on every rank and exits.

Design decisions:

- Replaces Lightning's SIGTERM handler for the duration of training (from ``on_train_start`` to
  ``teardown``) with :class:`~lightning_parallel.preemption.SignalFlag`, which only notes the signal and
  forwards it to the launcher's child processes; Lightning's handler runs a blocking broadcast inside the
  handler, which hangs a job whose rank 0 alone is signalled (see ``lightning_parallel/preemption.py``).
- After every training batch (``on_train_batch_end``, reached by every rank once per step) the ranks agree
  on the flag with one 4-byte all-reduce. When set, every rank writes the checkpoint of that completed step
  together (``trainer.save_checkpoint``, which Lightning writes from rank 0) and raises :class:`Preempted`
  (a ``SystemExit``) with status ``128 + signal`` (143 for SIGTERM), so a scheduler does not read the job as finished. With
  SLURM auto-requeue (Lightning's ``SLURMEnvironment(auto_requeue=True)`` and ``SLURM_JOB_ID``), rank 0
  asks ``scontrol requeue`` as Lightning does for SIGUSR1, and the status is 0 if the requeue succeeded.
- A signal that arrives during validation is acted on after the next training batch.
- Dead ranks: at setup every rank publishes its host and process id
  (:class:`~lightning_parallel.peers.PeerTable`); when training fails with a communication error while a rank
  of this host is dead, the loop that was running raises one :class:`~lightning_parallel.peers.PeerLost`
  naming that rank (the gloo/NCCL error is its cause); other communication errors get the table's sentence
  as a note. The pipeline runtimes raise ``PeerLost`` themselves, saying which transfer failed.
- The agreement after each batch is the strategy's ``agree_on_signal`` when it has one (the pipeline
  strategies; the local-learning ones agree one step late, without a wait at the step boundary).
- The ``lightning-parallel`` command adds this callback to every run that does not list it, and ends a
  preempted process with ``os._exit`` once Lightning's teardown has run and the output is flushed: the
  interpreter's own finalisation of torch, Lightning and gloo measured 6-16 s on a loaded 2-core machine.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from typing_extensions import override

from lightning_parallel.peers import PeerLost, PeerTable, is_communication_error, peer_failure
from lightning_parallel.preemption import SignalFlag, exit_status

__all__ = ["Preempted", "PreemptionCheckpoint"]

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; its ``code`` is the exit status."""


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM, every rank writes the checkpoint of the last completed step and exits with status 143.

    Args:
        dirpath: directory of the checkpoint. Default ``None``: ``<default_root_dir>/preempted``.
        filename: file name of the checkpoint. Default ``"preempted.ckpt"``.
        signals: names of the signals that mean "preempted". Default ``["SIGTERM"]``.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        *,
        filename: str = "preempted.ckpt",
        signals: list[str] | tuple[str, ...] = ("SIGTERM",),
    ) -> None:
        if isinstance(signals, str):
            raise TypeError(f"signals={signals!r} must be a list of signal names, e.g. ['SIGTERM'].")
        numbers = []
        for name in signals:
            number = getattr(signal, str(name), None)
            if not isinstance(number, signal.Signals):
                raise ValueError(f"signals={list(signals)} lists {name!r}, not a signal name; use e.g. 'SIGTERM'.")
            numbers.append(int(number))
        if not filename or "/" in filename:
            raise ValueError(f"filename={filename!r} must be a plain file name, e.g. 'preempted.ckpt'.")
        self.dirpath = dirpath
        self.filename = filename
        self.signals = tuple(numbers)
        self.flag: SignalFlag | None = None
        self.peers: PeerTable | None = None
        self.saved_path: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return type(self).__name__

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the preemption checkpoint is written."""
        root = Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "preempted"
        return root / self.filename

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.peers is None:
            self.peers = PeerTable.publish()
        loops: dict[str, Any] = {"fit": trainer.fit_loop, "validate": trainer.validate_loop, "test": trainer.test_loop}
        loop = loops.get(stage)
        if self.peers is not None and loop is not None and not getattr(loop.run, "_names_dead_peers", False):
            loop.run = _naming_dead_peers(
                loop.run, lambda: f"running {stage} (global step {trainer.global_step})"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        launcher = trainer.strategy.launcher
        kill = getattr(launcher, "kill", None)
        self.flag = SignalFlag(self.signals, forward=kill if callable(kill) else None)
        self.flag.install()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.flag is None:
            return
        agree = getattr(trainer.strategy, "agree_on_signal", None)
        signum = agree(self.flag) if callable(agree) else self.flag.agreed(device=trainer.strategy.root_device)
        if signum is None:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        status = 0 if self._requeue(trainer) else exit_status(signum)
        name = signal.Signals(signum).name
        message = (
            f"rank {trainer.global_rank}: {name} received; the checkpoint of step {trainer.global_step} is "
            f"{path} (resume with --ckpt_path {path}); exiting with status {status}."
        )
        print(f"lightning-parallel: {message}", file=sys.stderr, flush=True)
        raise Preempted(status)

    def _requeue(self, trainer: pl.Trainer) -> bool:
        """Asks SLURM to requeue the job (rank 0) when Lightning's auto-requeue is on; whether it worked."""
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return False
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") is not None:
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        ok = 0
        if trainer.is_global_zero and job:
            try:
                ok = int(subprocess.call(["scontrol", "requeue", job]) == 0)
            except OSError:
                ok = 0
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            result = torch.tensor([ok], dtype=torch.int32, device=trainer.strategy.root_device)
            dist.broadcast(result, src=0)  # every rank is here, at the same step
            ok = int(result.item())
        return bool(ok)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.peers is None or not is_communication_error(exception):
            return
        if isinstance(exception, PeerLost):  # its message names the dead rank already
            print(f"lightning-parallel: {exception}", file=sys.stderr, flush=True)
            return
        text = f"lightning-parallel: {self.peers.describe()}"
        log.error(text)
        print(text, file=sys.stderr, flush=True)
        if hasattr(exception, "add_note"):
            exception.add_note(text)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.flag is not None:
            self.flag.uninstall()
            self.flag.settle()
            self.flag = None


def _naming_dead_peers(run: Callable[[], Any], what: Callable[[], str]) -> Callable[[], Any]:
    """``run`` (a loop's ``run``), raising :class:`PeerLost` naming the dead rank for a failed communication."""

    @functools.wraps(run)
    def wrapped() -> Any:
        try:
            return run()
        except RuntimeError as error:
            failure = peer_failure(error, what())
            if failure is error:
                raise
            raise failure from error

    wrapped._names_dead_peers = True  # type: ignore[attr-defined]
    return wrapped
