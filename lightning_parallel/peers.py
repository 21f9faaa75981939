"""Which rank died: a table of every rank's host and process id, written once at setup; no Lightning imported.

Design decisions:

- When a rank is killed (``kill -9``, the out-of-memory killer), the survivors' next collective fails with
  gloo's ``Connection closed by peer [address]:port`` or NCCL's watchdog error, which name an address, not a
  rank. At setup every rank publishes ``host:pid`` in the process group's store and reads the whole table
  once; after a communication error a rank checks the processes of the ranks on its own host
  (``os.kill(pid, 0)``), without any collective or store access (the store lives in rank 0's process, which
  may be the dead one). Ranks on other hosts cannot be checked that way; the message says so.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["PeerTable", "is_communication_error"]

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


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` looks like a collective that failed because a peer went away."""
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(error, backend_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(token in text for token in _COMMUNICATION_ERRORS)


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
        return cls(rank, hosts, pids)

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
