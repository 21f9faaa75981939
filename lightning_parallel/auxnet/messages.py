"""Point-to-point messages between neighbouring ranks, with timeouts and a byte count.

Sends are asynchronous (``isend``; the tensor is kept alive until the send completes); every receive fails
with a ``RuntimeError`` naming the peer after ``timeout_s``. Messages of one kind between two ranks share a
tag and are matched in the order they were sent. ``bytes_sent`` counts the payload this rank has sent, so a
benchmark or a test can check the traffic per step against its formula; ``wait_seconds`` the time spent
blocked in receives (what a benchmark needs to see where a step's time goes).
This module imports no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_parallel.peers import transfer_failure, wait_all


class Messenger:
    """Sends and receives tensors between the ranks of one pipeline.

    Args:
        rank: this process's index among the pipeline's ranks.
        global_ranks: global rank of each pipeline rank.
        group: the process group joining those ranks (``None``: the default group).
        device: where received tensors are placed.
        timeout_s: seconds a receive (or the final wait for the sends) may take.
        names: tag -> what the message carries, for error messages.
    """

    def __init__(
        self,
        rank: int,
        global_ranks: Sequence[int],
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        timeout_s: float = 300.0,
        names: dict[int, str] | None = None,
    ) -> None:
        self.rank = rank
        self.global_ranks = list(global_ranks)
        self.group = group
        self.device = device or torch.device("cpu")
        self.timeout = timedelta(seconds=timeout_s)
        self.names = dict(names or {})
        self.bytes_sent = 0
        self.wait_seconds = 0.0
        self._sends: list[tuple[Any, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        """Send ``tensor`` (detached, contiguous) to pipeline rank ``peer`` without waiting."""
        tensor = tensor.detach().contiguous()
        try:
            work = dist.isend(tensor, dst=self.global_ranks[peer], group=self.group, tag=tag)
        except RuntimeError as error:
            raise self._failure(error, f"sending {self.names.get(tag, f'a message with tag {tag}')}", peer) from error
        self._sends.append((work, tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self._sends = [item for item in self._sends if not item[0].is_completed()]

    def recv(self, shape: Sequence[int], dtype: torch.dtype, peer: int, tag: int) -> torch.Tensor:
        """Receive a tensor of ``shape`` and ``dtype`` from pipeline rank ``peer``."""
        buffer = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        start = time.perf_counter()
        try:
            work = dist.irecv(buffer, src=self.global_ranks[peer], group=self.group, tag=tag)
            if work is not None:
                work.wait(self.timeout)
        except RuntimeError as error:
            raise self._failure(error, f"receiving {self.names.get(tag, f'a message with tag {tag}')}", peer) from error
        finally:
            self.wait_seconds += time.perf_counter() - start
        return buffer

    def finish(self) -> None:
        """Wait until every message this rank sent has been received."""
        sends, self._sends = self._sends, []
        wait_all(sends, self.timeout, lambda error: self._failure(error, "waiting for its sends to be received", None))

    def _failure(self, error: RuntimeError, what: str, peer: int | None) -> BaseException:
        rank = None if peer is None else self.global_ranks[peer]
        return transfer_failure(
            error, what, who=f"Rank {self.rank}", peer=rank, timeout_s=self.timeout.total_seconds()
        )
