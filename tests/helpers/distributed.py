"""Run a function in N CPU processes joined by a gloo process group, and fail (never hang) on trouble.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes; each initialises a gloo process
group, calls ``fn(rank, world_size, *args)`` and sends back its return value. A worker that raises makes the
call fail with that worker's traceback; a worker that dies without a word, or that is still running after
``timeout`` seconds, makes it fail with "rank r hung" or "rank r died", and every worker is terminated.
``fn`` must be a module-level function (spawned processes import it by name).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], results: Any, timeout: float
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=max(timeout, 10.0))
        )
        value = fn(rank, world_size, *args)
        # Plain pickle serialises tensors by value; the queue's own pickler would pass shared-memory handles
        # that die with this process before the parent reads them.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedTestError(AssertionError):
    """A worker raised, died or hung."""


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return the values by rank.

    Raises:
        DistributedTestError: with the first failing worker's traceback, or naming the ranks that hung or died.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results, timeout), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                missing = [r for r in range(world_size) if r not in values]
                dead = [r for r in missing if not procs[r].is_alive() and procs[r].exitcode not in (None,)]
                # A process that exited may still have its message in flight: look once more before failing.
                if dead:
                    try:
                        rank, status, value = results.get(timeout=2.0)
                    except queue.Empty:
                        raise DistributedTestError(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} without a result"
                        ) from None
                elif time.monotonic() > deadline:
                    raise DistributedTestError(
                        f"rank {missing[0]} hung: ranks {missing} gave no result within {timeout:.0f} s"
                    ) from None
                else:
                    continue
            if status == "error":
                raise DistributedTestError(f"rank {rank} raised:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    return [values[r] for r in range(world_size)]
