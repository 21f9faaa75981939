"""Which rank died: a table of every rank's host and process id, written once at setup; no Lightning imported.

Design decisions:

- When a rank is killed (``kill -9``, the out-of-memory killer), the survivors' next collective fails with
  gloo's ``Connection closed by peer [address]:port`` or NCCL's watchdog error, which name an address, not a
  rank. At setup every rank publishes ``host:pid`` in the process group's store and reads the whole table
  once; after a communication error a rank checks the processes of the ranks on its own host
  (``os.kill(pid, 0)``), without any collective or store access (the store lives in rank 0's process, which
  may be the dead one). Ranks on other hosts cannot be checked that way; the message says so.
- The table published last in this process is kept (:meth:`PeerTable.current`), so the engines (the pipeline
  and interlocking runtimes, the strategies' collectives) can turn a failed send, receive or all-reduce into
  one :class:`PeerLost` error that names the dead rank (:func:`peer_failure`), instead of gloo's address or a
  "waited more than 300 s" sent 2 s after the peer died. Without a table (no ``PreemptionCheckpoint``, no
  pipeline strategy) the message says what failed and with which rank, without checking processes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["PeerLost", "PeerTable", "is_communication_error", "peer_failure", "transfer_failure", "wait_all"]

_PREFIX = "lightning_parallel/peer/"
_COMMUNICATION_ERRORS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "connection refused",
    "socket timeout",
    "timed out",
    "nccl",
    "gloo",
)


class PeerLost(RuntimeError):
    """A send, receive or collective failed because a peer process is gone (or stopped answering)."""


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` looks like a collective that failed because a peer went away."""
    if isinstance(error, PeerLost):
        return True
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(error, backend_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(token in text for token in _COMMUNICATION_ERRORS)


_CURRENT: PeerTable | None = None


def peer_failure(error: BaseException, what: str, peer: int | None = None) -> BaseException:
    """The error to raise for ``error``, met while doing ``what`` (with global rank ``peer``, when known).

    A communication error while a rank of this host is dead becomes a :class:`PeerLost` whose message names
    the dead ranks (from the table this process published) and says what this rank was doing; any other error
    (no table, every rank alive, not a communication error, already a :class:`PeerLost`) is returned
    unchanged, for the caller to re-raise or describe. Raise the result ``from error``.

    Args:
        error: the exception caught around the communication call.
        what: what this rank was doing, e.g. ``"receiving the input of F(0, 1, 2)"``.
        peer: the global rank on the other end, if there is one.
    """
    table = PeerTable.current()
    if table is None or isinstance(error, PeerLost) or not is_communication_error(error):
        return error
    dead = table.dead_ranks()
    for _ in range(10):  # the killed process closes its sockets a moment before it is reaped
        if dead:
            break
        time.sleep(0.1)
        dead = table.dead_ranks()
    if not dead:
        return error
    doing = f"Rank {table.rank} was {what}" + (f" with global rank {peer}" if peer is not None else "")
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    return PeerLost(f"{table.describe()} {doing}. ({type(error).__name__}: {detail})")


def transfer_failure(error: BaseException, what: str, *, who: str, peer: int | None, timeout_s: float) -> BaseException:
    """The error a runtime raises for a failed send, receive or wait: :func:`peer_failure`'s, else one sentence.

    Args:
        error: the exception caught around the communication call.
        what: what ``who`` was doing, e.g. ``"receiving an activation"``.
        who: this rank as the runtime names it, e.g. ``"Interlocking rank 1 (global rank 1)"``.
        peer: the global rank on the other end, if there is one.
        timeout_s: the time limit of the wait.
    """
    failure = peer_failure(error, f"{what} ({who})", peer)
    if failure is not error:
        return failure
    with_whom = "" if peer is None else f" with global rank {peer}"
    return RuntimeError(
        f"{who} gave up {what}{with_whom} after at most {timeout_s:g} s: the peer died, stalled, closed the "
        f"connection or is running a different schedule ({error})."
    )


def wait_all(sends: Sequence[tuple[Any, Any]], timeout: timedelta, failure: Callable[[RuntimeError], BaseException]) -> None:
    """Waits for every ``(work, tensor)`` of ``sends``; a failed wait raises ``failure(error)`` from it."""
    for work, _ in sends:
        try:
            work.wait(timeout)
        except RuntimeError as error:
            raise failure(error) from error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) still answers kill(pid, 0)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(") ", 1)[-1][:1] != "Z"
    return True


@dataclass
class PeerTable:
    """Host and process id of every rank of the world.

    Args:
        rank: this process's rank.
        hosts: host name of each rank.
        pids: process id of each rank.
    """

    rank: int
    hosts: list[str]
    pids: list[int]

    @classmethod
    def publish(cls) -> PeerTable | None:
        """Writes this rank's entry to the default group's store and reads everyone's (``None`` without one)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"{_PREFIX}{rank}", f"{socket.gethostname()}:{os.getpid()}")
        hosts, pids = [], []
        for r in range(world):
            host, pid = store.get(f"{_PREFIX}{r}").decode().rsplit(":", 1)
            hosts.append(host)
            pids.append(int(pid))
        global _CURRENT
        _CURRENT = cls(rank, hosts, pids)
        return _CURRENT

    @staticmethod
    def current() -> PeerTable | None:
        """The table this process published last (``None`` before any), if it belongs to the current world."""
        table = _CURRENT
        if table is None or not (dist.is_available() and dist.is_initialized()):
            return table
        if dist.get_world_size() != len(table.pids) or dist.get_rank() != table.rank:
            return None
        return table

    def dead_ranks(self) -> list[int]:
        """Ranks on this host whose process is gone."""
        here = self.hosts[self.rank]
        return [r for r, (host, pid) in enumerate(zip(self.hosts, self.pids)) if host == here and not _alive(pid)]

    def describe(self) -> str:
        """One sentence naming the dead ranks (or saying which ranks could not be checked)."""
        dead = self.dead_ranks()
        here = self.hosts[self.rank]
        remote = [r for r, host in enumerate(self.hosts) if host != here]
        if dead:
            names = ", ".join(f"rank {r} (pid {self.pids[r]} on {self.hosts[r]})" for r in dead)
            text = f"rank {self.rank} lost its peers: {names} {'is' if len(dead) == 1 else 'are'} dead."
        else:
            text = f"rank {self.rank}: a collective failed but every rank on {here} is alive."
        if remote:
            text += f" Ranks on other hosts ({', '.join(map(str, remote))}) could not be checked from here."
        return text
