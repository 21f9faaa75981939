"""Preemption (SIGTERM) as a flag that every rank agrees on at a step boundary; no Lightning imported.

Design decisions:

- Lightning 2.6's SIGTERM handler runs ``dist.broadcast`` inside the handler. Python runs a handler between
  two bytecodes of the main thread, so the broadcast lands wherever the signalled rank happens to be: a rank
  signalled alone (what a scheduler does to the launcher's rank 0) posts a collective no other rank posts,
  or one in the middle of another collective's sequence, and the job hangs. The handler here only sets a
  flag (and forwards the signal to the launcher's child processes, as Lightning does); nothing blocks.
- The ranks agree at a point every rank reaches once per optimizer step, between steps:
  :meth:`SignalFlag.agreed` all-reduces the flag (``MAX``, one 4-byte collective). When any rank was
  signalled, every rank learns it at the same step, so all of them can write the checkpoint of that
  completed step together and leave.
- The exit status is ``128 + signal`` (143 for SIGTERM), the shell's convention for "killed by a signal",
  so a scheduler does not read a preempted run as finished; 0 only when the job was requeued.
- :meth:`SignalFlag.agreed_late` is the same agreement without a wait for this step's collective: it posts
  the step's all-reduce asynchronously and reads the previous step's, so every rank still learns the signal
  at the same step (one step later), and a strategy without a flush between steps (interlocking, AuxNet)
  keeps its ranks from waiting for each other at every step boundary.
- The pipeline strategies and the DDP callback share this module; the Lightning side is
  :class:`~lightning_parallel.callbacks.PreemptionCheckpoint`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from lightning_parallel.peers import peer_failure

__all__ = ["SignalFlag", "exit_status"]


def exit_status(signum: int) -> int:
    """``128 + signum``: the status a shell reports for a process ended by signal ``signum``."""
    return 128 + int(signum)


class SignalFlag:
    """Notes that a signal arrived; installing it replaces the current handler until :meth:`uninstall`.

    Args:
        signals: the signals to catch. Default ``(SIGTERM,)``.
        forward: called with the signal number from the handler (e.g. to pass it on to child processes);
            it must not block.
    """

    def __init__(
        self, signals: tuple[int, ...] = (signal.SIGTERM,), forward: Callable[[int], None] | None = None
    ) -> None:
        self.signals = tuple(int(s) for s in signals)
        self.forward = forward
        self.received: int | None = None  # the first signal number seen
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None

    def install(self) -> bool:
        """Sets the handlers (main thread only, as Python requires); whether they were set."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.signals:
            if signum not in self._previous:
                self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        """Puts the handlers back that :meth:`install` replaced."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # no collective, no I/O beyond forwarding: the main thread may be inside anything
        first = self.received is None
        if first:
            self.received = signum
        if first and self.forward is not None:
            self.forward(signum)

    def _distributed(self, group: Any) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

    def agreed_late(self, group: Any = None, device: torch.device | None = None) -> int | None:
        """:meth:`agreed` one step late: the previous call's agreement; this call's all-reduce is not waited for.

        The first call returns ``None`` (with several processes). Every rank of the group must call it at the
        same point (once per step); all of them get the same answer at the same call.

        Args:
            group: the process group, default the world.
            device: where the 4-byte flag lives.
        """
        if not self._distributed(group):
            return self.received
        local = 0 if self.received is None else self.received
        flag = torch.tensor([local], dtype=torch.int32, device=device or torch.device("cpu"))
        try:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True)
            previous, self._pending = self._pending, (work, flag)
            if previous is None:
                return None
            previous[0].wait()
        except RuntimeError as error:
            raise peer_failure(error, "agreeing on the preemption flag after a step") from error
        return int(previous[1].item()) or None

    def settle(self) -> None:
        """Waits for the last :meth:`agreed_late` all-reduce (errors ignored: a peer may be gone)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(RuntimeError):
                pending[0].wait()

    def agreed(self, group: Any = None, device: torch.device | None = None) -> int | None:
        """The signal number if any rank of ``group`` received one, else ``None`` (a collective when distributed).

        Every rank of the group must call it at the same point (once per step).

        Args:
            group: the process group, default the world.
            device: where the 4-byte flag lives (the backend's device: CPU for gloo, the GPU for NCCL).
        """
        local = 0 if self.received is None else self.received
        if not self._distributed(group):
            return self.received
        flag = torch.tensor([local], dtype=torch.int32, device=device or torch.device("cpu"))
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        except RuntimeError as error:
            raise peer_failure(error, "agreeing on the preemption flag after a step") from error
        value = int(flag.item())
        return value or None
