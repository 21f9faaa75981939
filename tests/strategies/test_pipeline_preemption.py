"""SIGTERM and dead ranks inside the pipeline strategies, without the command (the Python API).

The pipeline base adds a ``PreemptionCheckpoint`` when the Trainer has none: a SIGTERM during a step is acted on
at the step boundary (checkpoint of that step, ``Preempted`` with status 143) and resuming from it continues the
uninterrupted losses. The one-step-late agreement of the local-learning strategies gives every rank the signal
at the same step. A failed transfer while a peer's process is gone becomes one ``PeerLost`` naming the rank.
The multi-process runs of the real command are in ``tests/callbacks/test_preemption.py`` (slow).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_parallel import peers
from lightning_parallel.callbacks import PreemptionCheckpoint
from lightning_parallel.callbacks.preemption import Preempted
from lightning_parallel.data import SyntheticDataModule
from lightning_parallel.models import MLPClassifier
from lightning_parallel.peers import PeerLost, PeerTable, peer_failure, transfer_failure
from lightning_parallel.preemption import SignalFlag
from lightning_parallel.strategies import InterlockingBackpropStrategy
from tests.helpers.callbacks import LossRecorder
from tests.helpers.distributed import run_distributed
from tests.helpers.trainers import quiet_trainer
from tests.strategies._preemption_workers import late_agreement


class _SignalAt(pl.Callback):
    """Sends SIGTERM to this process in the middle of training step ``step`` (inside the schedule)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(tmp_path: Path, *callbacks: Any, ckpt: Path | None = None, **strategy: Any) -> tuple[pl.Trainer, list[float]]:
    pl.seed_everything(0)
    model = MLPClassifier(16, (32, 32, 32), 4, lr=1e-2, optimizer="adam")
    data = SyntheticDataModule(shape=(16,), num_classes=4, num_samples=256, batch_size=16)  # 16 batches
    recorder = LossRecorder()
    trainer = quiet_trainer(
        tmp_path,
        [recorder, *callbacks],
        strategy=InterlockingBackpropStrategy(k=1, stages=2, micro_batches=2, **strategy),
        max_steps=20,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data, ckpt_path=ckpt)
    return trainer, recorder.losses


def test_sigterm_inside_a_pipeline_step_checkpoints_that_step_and_resumes(tmp_path: Path) -> None:
    _, whole = _fit(tmp_path / "whole")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        _fit(tmp_path / "run", _SignalAt(7))
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    ckpt = tmp_path / "run" / "preempted" / "preempted.ckpt"
    assert int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]) == 7
    trainer, resumed = _fit(tmp_path / "resumed", ckpt=ckpt)
    assert sum(isinstance(cb, PreemptionCheckpoint) for cb in trainer.callbacks) == 1
    assert len(resumed) == 13
    worst = max(abs(a - b) for a, b in zip(resumed, whole[7:]))
    assert worst <= 1e-6, f"largest loss difference after resuming {worst:.3g}"


def test_preemption_checkpoint_false_keeps_lightnings_handling(tmp_path: Path) -> None:
    trainer, losses = _fit(tmp_path, preemption_checkpoint=False)
    assert len(losses) == 20
    assert not any(isinstance(cb, PreemptionCheckpoint) for cb in trainer.callbacks)
    with pytest.raises(TypeError, match=r"preemption_checkpoint='yes' must be True or False"):
        InterlockingBackpropStrategy(k=1, stages=2, preemption_checkpoint="yes")  # type: ignore[arg-type]


class _Work:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(f"wait {self.name}")


def test_late_agreement_posts_without_waiting_and_reads_the_previous_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    log: list[str] = []
    other_rank = [0, int(signal.SIGTERM), 0]  # what the other rank contributes at each call

    def all_reduce(flag: torch.Tensor, op: Any, group: Any, async_op: bool) -> _Work:
        assert async_op
        call = sum(entry.startswith("post") for entry in log)
        flag.copy_(torch.maximum(flag, torch.tensor([other_rank[call]], dtype=flag.dtype)))
        log.append(f"post {call}")
        return _Work(log, str(call))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    flag = SignalFlag()
    answers = [flag.agreed_late() for _ in range(3)]
    assert answers == [None, None, int(signal.SIGTERM)]  # call 1's agreement is read at call 2
    assert log == ["post 0", "post 1", "wait 0", "post 2", "wait 1"]  # never this call's own collective
    flag.settle()
    assert log[-1] == "wait 2"


@pytest.mark.slow
def test_late_agreement_gives_every_rank_the_signal_at_the_same_call() -> None:
    answers = run_distributed(late_agreement, 2, timeout=300.0)
    # call 1's all-reduce carries rank 1's flag; it is read at call 2, by both ranks
    assert answers[0] == answers[1] == [None, None, int(signal.SIGTERM), int(signal.SIGTERM)]


def test_a_failed_transfer_with_a_dead_peer_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    table = PeerTable(rank=0, hosts=["here", "here"], pids=[os.getpid(), child.pid])
    monkeypatch.setattr(peers, "_CURRENT", table)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4242")
    failure = transfer_failure(gloo, "receiving an activation", who="Interlocking rank 0", peer=1, timeout_s=300)
    assert isinstance(failure, PeerLost)
    assert str(failure).startswith(f"rank 0 lost its peers: rank 1 (pid {child.pid} on here) is dead.")
    assert "receiving an activation" in str(failure) and "300" not in str(failure)
    assert peer_failure(failure, "again") is failure  # named once
    other = ValueError("not a communication error")
    assert peer_failure(other, "x") is other


def test_a_failed_transfer_with_live_peers_says_what_and_how_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "_CURRENT", PeerTable(rank=0, hosts=["here"] * 2, pids=[os.getpid()] * 2))
    monkeypatch.setattr(peers.time, "sleep", lambda s: None)
    timeout = RuntimeError("Timed out waiting 300000ms for recv operation to complete")
    failure = transfer_failure(timeout, "receiving an activation", who="Interlocking rank 0", peer=1, timeout_s=300)
    assert not isinstance(failure, PeerLost)
    assert "Interlocking rank 0 gave up receiving an activation with global rank 1 after at most 300 s" in str(failure)
