"""The multi-process test helper itself: results come back, failures surface, hangs time out."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import DistributedTestError, run_distributed


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t.item())


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")


def _hang_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        import time

        time.sleep(60)


def _die_on_rank_zero(rank: int, world_size: int) -> None:
    # Rank 0 hosts the rendezvous store: dying before every rank has joined the group would make the others
    # fail in init_process_group (a race that decides which failure is reported first). Join first, then die.
    dist.barrier()
    if rank == 0:
        os._exit(3)


def test_results_come_back_by_rank() -> None:
    assert run_distributed(_all_reduce_rank, 2, timeout=60) == [3.0, 3.0]


def test_worker_traceback_is_reported() -> None:
    with pytest.raises(DistributedTestError, match=r"rank 1 raised:(.|\n)*boom on purpose"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def test_hung_worker_times_out() -> None:
    with pytest.raises(DistributedTestError, match="rank 1 hung"):
        run_distributed(_hang_on_rank_one, 2, timeout=15)  # room for a slow start of rank 0 on a loaded machine


def test_dead_worker_is_reported() -> None:
    with pytest.raises(DistributedTestError, match="rank 0 died with exit code 3"):
        run_distributed(_die_on_rank_zero, 2, timeout=60)


def _return_tensor(rank: int, world_size: int) -> torch.Tensor:
    return torch.full((3,), float(rank))


def test_tensors_come_back_after_the_workers_exit() -> None:
    results = run_distributed(_return_tensor, 2, timeout=60)
    torch.testing.assert_close(torch.stack(results), torch.tensor([[0.0] * 3, [1.0] * 3]))
